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

import benchlib
from generate import DEFAULT_CHECKPOINT, Engine, SpecArgs, pad_prompts
from checkpoint import load_model
from tokenizer import load_tokenizer

CHUNK = 512  # prefill chunk of the fp32 recomputation


def gap_in_ulps(a: float, b: float, dtype: torch.dtype) -> float:
    """|a - b| in units of the spacing of `dtype` numbers at max(|a|, |b|)."""
    top = max(abs(a), abs(b))
    ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(top)) if top > 0 else torch.finfo(dtype).tiny
    return abs(a - b) / ulp


@torch.no_grad()
def fp32_logits(model, tokens):
    """Logits after the last of `tokens` (one row), from an fp32 prefill."""
    engine = Engine(model, 1, -(-len(tokens) // CHUNK) * CHUNK, prefill_chunk=CHUNK)  # the cache holds whole chunks
    ids, lens = pad_prompts([tokens], engine.device)
    return engine.prefill(ids, lens)[0].float()


def generate_rows(model, prompts, args, sa=None) -> list:
    """Greedy rows for every prompt, --batch rows per generate() call."""
    max_seq = args.prefix + args.new_tokens + max(args.gammas) + 1
    return benchlib.engine_run(Engine(model, args.batch, max_seq, sa, compile=args.compile), prompts,
                               args.new_tokens).result.tokens


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", default=os.path.join(benchlib.ROOT, DEFAULT_CHECKPOINT))
    p.add_argument("--essays", default=benchlib.ESSAYS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=8, help="prompts, each from its own stretch of the essays")
    p.add_argument("--batch", type=int, default=1, help="rows per generate() call")
    p.add_argument("--prefix", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--gammas", type=benchlib.ints, default=[2, 4])
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--draft_kv", default="streaming", choices=["streaming", "snapkv"])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max_ulps", type=float, default=4.0, help="widest gap still called a tie")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.rows % args.batch:
        sys.exit(f"error: --rows {args.rows} is not a multiple of --batch {args.batch}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    prompts = benchlib.essay_prompts(load_tokenizer(args.checkpoint_path), args.rows, args.prefix, args.essays)
    model = load_model(args.checkpoint_path, device, dtype)

    partings = []  # dicts: gamma, row, position, AR token, SD token
    ar = generate_rows(model, prompts, args)
    for gamma in args.gammas:
        sd = generate_rows(model, prompts, args, SpecArgs("self", gamma, args.draft_kv, args.budget,
                                                          gamma_max=max(args.gammas)))
        for i, (a, s) in enumerate(zip(ar, sd)):
            at = benchlib.common_prefix(a, s)
            if at < min(len(a), len(s)):
                partings.append(dict(gamma=gamma, row=i, position=at, ar_token=a[at], sd_token=s[at]))
        print(f"gamma {gamma}: {sum(a == s for a, s in zip(ar, sd))} of {len(ar)} rows equal to AR", flush=True)
    del model
    ref = load_model(args.checkpoint_path, device, torch.float32)
    report, logits_at = [], {}
    for r in partings:
        i, at = r["row"], r["position"]
        if (i, at) not in logits_at:
            logits_at[i, at] = fp32_logits(ref, prompts[i] + ar[i][:at])
        lg = logits_at[i, at]
        la, ls = lg[r["ar_token"]].item(), lg[r["sd_token"]].item()
        gap = gap_in_ulps(la, ls, dtype)
        r.update(ar_logit_fp32=la, sd_logit_fp32=ls, fp32_argmax=int(lg.argmax()), gap_ulps=gap, tie=gap <= args.max_ulps)
        report.append(r)
        print(f"gamma {r['gamma']} row {i} parts at token {at}: AR {r['ar_token']} ({la:.4f}), SD {r['sd_token']} "
              f"({ls:.4f}), fp32 argmax {r['fp32_argmax']}; gap {gap:.2f} ulp of {args.dtype}: "
              f"{'tie' if r['tie'] else 'NOT A TIE'}", flush=True)
    wide = [r for r in report if not r["tie"]]
    print(f"{len(report)} partings, {len(wide)} wider than {args.max_ulps} ulp")
    if args.json:
        rows_equal = {g: 1 - sum(r["gamma"] == g for r in report) / len(ar) for g in args.gammas}
        benchlib.write_json(args.json, dict(env=benchlib.environment(device), settings=vars(args), partings=report,
                                            rows_equal=rows_equal))
    sys.exit(1 if wide else 0)


if __name__ == "__main__":
    main()
