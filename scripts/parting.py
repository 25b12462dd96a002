"""Where speculative and autoregressive greedy rows part, and whether each parting is a tie at the
compute dtype's precision.

    python scripts/parting.py --rows 8 --prefix 4096 --new_tokens 128 --gammas 2,4

Greedy speculative decoding is exact: its rows equal autoregressive ones token for token, which the
tests check in fp32. In bf16 the two can still part: a verify step runs the target over gamma + 1
tokens and a decode step over one, and the matmul kernels for the two shapes may round differently
(on the CPU, rows part most at batch 1). Where the two best tokens' logits lie
closer than bf16 resolves (0.125 apart at logits of 16-32), either path may pick either. For each
row's first parting this recomputes the logits in fp32 on the common prefix and reports the gap
between the two tokens in units in the last place (ulp) of the compute dtype at that magnitude: a
gap of a few ulp is a tie; a wider one is a bug. Exits 1 if any gap exceeds --max_ulps."""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark as bm  # noqa: E402  (also puts the repository root on the path)
import generate as G  # noqa: E402
from kv_cache import KVCache  # noqa: E402
from model import load_model  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def gap_in_ulps(a: float, b: float, dtype: torch.dtype) -> float:
    """|a - b| in units of the spacing of `dtype` numbers at max(|a|, |b|)."""
    top = max(abs(a), abs(b))
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else torch.finfo(dtype).tiny
    return abs(a - b) / ulp


@torch.no_grad()
def fp32_logits(model, tokens):
    """Logits after the last of `tokens` (one row), from an fp32 prefill."""
    a = model.args
    chunk = 512  # prefill pads the row to whole chunks: the cache holds them
    cache = KVCache(a.n_layer, 1, model.layers[0].attention.n_kv_head, -(-len(tokens) // chunk) * chunk, a.head_dim,
                    torch.float32, model.tok_embeddings.weight.device, "sdpa")
    ids, lens = G.pad_prompts([tokens], model.tok_embeddings.weight.device)
    return G.prefill(model, cache, ids, lens, chunk)[0].float()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", default=os.path.join(bm.ROOT, G.DEFAULT_CHECKPOINT))
    p.add_argument("--essays", default=os.path.join(bm.ROOT, "..", "shared", "data", "PaulGrahamEssays.json"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=8, help="prompts, each from its own stretch of the essays")
    p.add_argument("--batch", type=int, default=1, help="rows per generate() call")
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--gammas", type=bm.ints, default=[2, 4])
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--draft_kv", default="streaming", choices=["streaming", "snapkv"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max_ulps", type=float, default=4.0, help="widest gap still called a tie")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rows % args.batch:
        sys.exit(f"error: --rows {args.rows} is not a multiple of --batch {args.batch}")
    args.mode = "parting"
    device, dtype = torch.device(args.device), bm.dtype_of(args.dtype)
    bm.raise_recompile_limit(64)
    prompts = bm.Essays(args.essays, load_tokenizer(args.checkpoint_path)).prompts(args.rows, args.prefix)
    max_seq = args.prefix + args.new_tokens + max(args.gammas) + 1
    model = load_model(args.checkpoint_path, device, dtype)

    def rows(sa=None):
        return bm.run_engine(model, prompts, args.new_tokens, max_seq, 512, "sdpa", sa, batch=args.batch).tokens

    partings = []  # (gamma, row, position, AR token, SD token)
    with bm.engine_steps(args.compile, device), bm.reuse_prefill():
        ar = rows()
        for gamma in args.gammas:
            sd = rows(G.SpecArgs("self", gamma, args.draft_kv, args.budget, gamma_max=max(args.gammas)))
            for i, (a, s) in enumerate(zip(ar, sd)):
                at = bm.common_prefix(a, s)
                if at < min(len(a), len(s)):
                    partings.append((gamma, i, at, a[at], s[at]))
            print(f"gamma {gamma}: {sum(a == s for a, s in zip(ar, sd))} of {len(ar)} rows equal to AR", flush=True)
    del model
    ref = load_model(args.checkpoint_path, device, torch.float32)
    report, logits_at = [], {}
    for gamma, i, at, a_tok, s_tok in partings:
        if (i, at) not in logits_at:
            logits_at[i, at] = fp32_logits(ref, prompts[i] + ar[i][:at])
        lg = logits_at[i, at]
        la, ls = lg[a_tok].item(), lg[s_tok].item()
        gap = gap_in_ulps(la, ls, dtype)
        r = dict(gamma=gamma, row=i, position=at, ar_token=a_tok, sd_token=s_tok, ar_logit_fp32=la, sd_logit_fp32=ls,
                 fp32_argmax=int(lg.argmax()), gap_ulps=gap, tie=gap <= args.max_ulps)
        report.append(r)
        print(f"gamma {gamma} row {i} parts at token {at}: AR {a_tok} ({la:.4f}), SD {s_tok} ({ls:.4f}), fp32 argmax "
              f"{r['fp32_argmax']}; gap {gap:.2f} ulp of {args.dtype}: {'tie' if r['tie'] else 'NOT A TIE'}", flush=True)
    wide = [r for r in report if not r["tie"]]
    print(f"{len(report)} partings, {len(wide)} wider than {args.max_ulps} ulp")
    if args.json:
        bm.write_json(args, dict(partings=report, rows_equal={g: 1 - sum(r["gamma"] == g for r in report) / len(ar)
                                                              for g in args.gammas}))
    sys.exit(1 if wide else 0)


if __name__ == "__main__":
    main()
