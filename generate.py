# Batched generation: ragged prompts, chunked prefill, autoregressive or speculative decoding.
#   python generate.py --prompt "Hello" --max_new_tokens 64
#   python generate.py --prompt_file essay.txt --speculate self --draft_kv snapkv --draft_budget 256
#   torchrun --nproc_per_node=2 generate.py ...   (tensor parallel, see tp.py)
import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import spec
import tp
from kv_cache import DraftCache, KVCache, check_fits, snapkv_scores
from model import Transformer, flash_attn_with_kvcache, load_model, read_config
from spec import Sampling, logits_to_probs, sample

DEFAULT_CHECKPOINT = "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class SpecArgs:
    mode: str = "none"  # none | self | draft
    gamma: int = 4
    draft_kv: str = "streaming"  # streaming | snapkv | full (full: standalone draft only)
    draft_budget: int = 256
    sinks: int = 16
    snapkv_window: int = 32  # observation window: the prompt's last queries that score the prefix
    snapkv_recent: int = 0  # recent positions the SnapKV draft keeps besides its picks (0: budget // 2)
    refresh: bool = True  # self-speculation: copy the target's verified K/V into the draft cache
    gamma_max: int = 0  # largest gamma any round may use: sizes the draft ring (0: gamma)
    adapt_every: int = 0  # > 0: re-choose gamma every this many rounds from the measured acceptance of each row
    planner: object = None  # costmodel.Planner that re-chooses gamma (with adapt_every)


@dataclass
class Result:
    tokens: list  # per row, generated ids (up to and including its EOS)
    prefill_s: float
    decode_s: float
    rounds: int  # decode steps (autoregressive) or speculation rounds
    accepted: int = 0  # accepted draft tokens, over active rows
    evaluated: int = 0  # draft tokens verified up to and including each round's first rejection
    row_rounds: int = 0  # (row, round) pairs with the row still active
    gammas: list = None  # gamma of each round
    round_s: list = None  # wall seconds of each step or round (each ends at the host sync of the next)

    @property
    def acceptance(self):  # per-token acceptance rate alpha
        return self.accepted / max(self.evaluated, 1)

    @property
    def tokens_per_round(self):  # mean tokens a row gains per round: accepted drafts + 1
        return (self.accepted + self.row_rounds) / max(self.row_rounds, 1)


def pad_prompts(prompts, device):
    """list of token-id lists -> right-padded tokens [B, T] and lengths [B]."""
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lens


def forward_chunk(model, cache, tokens, input_pos, logits_idx):
    return model(tokens, input_pos, cache, logits_idx)


def decode_step(model, cache, cur, pos, s: Sampling):
    """One autoregressive step for every row: cur, pos [B] -> next token [B]."""
    return sample(logits_to_probs(model(cur[:, None], pos[:, None], cache)[:, -1], s))


@torch.no_grad()
def prefill(model, cache, tokens, prompt_lens, chunk):
    """Write the prompts into the cache chunk by chunk (peak activations bounded by the chunk) and
    return the logits at each row's last prompt token [B, V]. Every chunk has the same shape; rows
    shorter than the chunk write padding past their end, which later writes overwrite."""
    B, T = tokens.shape
    compiled = forward_chunk is not _eager_steps.get("forward_chunk", forward_chunk)
    chunk = min(chunk, cache.max_seq_len if compiled else T)  # compiled: one static shape, whatever T
    tokens = torch.nn.functional.pad(tokens, (0, -T % chunk))
    last = prompt_lens - 1
    logits = None
    for start in range(0, tokens.shape[1], chunk):
        input_pos = start + torch.arange(chunk, device=tokens.device).expand(B, -1)
        idx = (last - start).clamp(0, chunk - 1)[:, None]
        out = forward_chunk(model, cache, tokens[:, start : start + chunk].contiguous(), input_pos, idx)[:, 0]
        in_chunk = ((last >= start) & (last < start + chunk))[:, None]
        logits = out if logits is None else torch.where(in_chunk, out, logits)
    return logits


_caches = {}  # role -> (how it was built, cache)


def reuse(role, cls, *args, **kwargs):
    """cls(*args, **kwargs), or the cache the previous generate() built the same way for this role.
    CUDA graphs replay on the buffers they were recorded with: fresh caches on every call would make
    each compiled step record its graphs again. Reuse is safe because nothing reads a slot before
    this generation writes it (KVCache: a query reads positions <= its own, all written by prefill or
    decode; DraftCache.fill rewrites every slot). One cache per role is kept; a new one frees the old."""
    how = (cls, args, tuple(sorted(kwargs.items())))
    if role not in _caches or _caches[role][0] != how:
        _caches.pop(role, None)
        _caches[role] = (how, cls(*args, **kwargs))
    return _caches[role][1]


@torch.no_grad()
def setup_draft(sa: SpecArgs, target, cache, draft_model, tokens, prompt_lens, chunk, max_seq_len, attn="sdpa"):
    """Build the draft's cache from the prompts. Self-speculation compresses the target's full cache;
    a standalone draft prefills its own full cache first (freed unless --draft_kv full)."""
    if sa.mode == "self":
        draft_model, full = target, cache
    else:
        a = draft_model.args
        cache_args = (a.n_layer, tokens.shape[0], draft_model.layers[0].attention.n_kv_head, max_seq_len, a.head_dim,
                      draft_model.tok_embeddings.weight.dtype, tokens.device, attn)
        # only a full draft cache is read by the draft steps; otherwise it is freed once compressed
        full = reuse("draft_full", KVCache, *cache_args) if sa.draft_kv == "full" else KVCache(*cache_args)
        prefill(draft_model, full, tokens, prompt_lens, chunk)
        if sa.draft_kv == "full":
            return draft_model, full
    a, heads = draft_model.args, draft_model.layers[0].attention
    draft_cache = reuse("draft", DraftCache, sa.draft_kv, a.n_layer, tokens.shape[0], full.k.shape[2], a.head_dim,
                        sa.draft_budget, max(sa.gamma, sa.gamma_max), full.k.dtype, tokens.device, sinks=sa.sinks,
                        recent=sa.snapkv_recent, attn=attn, q_per_kv=heads.n_head // heads.n_kv_head)
    scores = None
    if sa.draft_kv == "snapkv":
        scores = snapkv_scores(draft_model, full, tokens, prompt_lens, sa.snapkv_window)
    draft_cache.fill(full, prompt_lens, scores)
    return draft_model, draft_cache


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calibrate_gamma(sa: SpecArgs, target, cache, draft_model, draft_cache, pos, s: Sampling) -> int:
    """--gamma auto: time this run's own target step, verify step (at the planner's first gamma) and
    draft step, so that the planner's step ratios are measured ones, and return the starting gamma
    they give at the prior acceptance. The steps write junk K/V at positions >= pos [B]; decoding
    writes each of those positions before any query reads it (see kv_cache.py), in the draft cache
    too. Under tensor parallelism every rank takes rank 0's timings, so all choose alike."""
    import costmodel

    B, g, V = pos.shape[0], sa.gamma, target.args.vocab_size
    cur = torch.zeros(B, dtype=torch.long, device=pos.device)
    drafts = torch.zeros(B, g, dtype=torch.long, device=pos.device)
    q = torch.nn.functional.one_hot(drafts, V).float()
    refresh = draft_cache if sa.refresh and sa.mode == "self" else None
    t_t = costmodel.median_time(lambda: decode_step(target, cache, cur, pos, s), pos.device, 3)
    t_v = costmodel.median_time(lambda: spec.verify_step(target, cache, cur, drafts, q, pos, s, refresh), pos.device, 3)
    t_d = costmodel.median_time(lambda: spec.draft_step(draft_model, draft_cache, cur[:, None], pos[:, None], s),
                                pos.device, 3)
    times = [t_t, t_v, t_d]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(times, src=0)
    sa.planner.calibrate(times[0], times[1], g, times[2], sa.draft_budget)
    return sa.planner.choose_gamma(sa.planner.alpha, sa.draft_budget)[0]


@torch.no_grad()
def generate(model: Transformer, prompts: list, max_new_tokens: int, eos_ids, s: Sampling, max_seq_len: int,
             prefill_chunk: int = 512, sa: Optional[SpecArgs] = None, draft_model: Optional[Transformer] = None,
             attn: str = "sdpa") -> Result:
    """Generate for a ragged batch of prompts (lists of token ids). Each row stops at its own EOS or
    after max_new_tokens; finished rows idle (static shapes) without affecting the others. The
    prefill time includes the draft cache's setup and, with sa.planner (--gamma auto), the timing
    of the steps that calibrates it.
    attn: attention backend, sdpa | flex | flash (flash: the target's cache; drafts then use SDPA)."""
    device = model.tok_embeddings.weight.device
    sa = sa or SpecArgs()
    a = model.args
    tokens, prompt_lens = pad_prompts(prompts, device)
    B = tokens.shape[0]
    cache = reuse("target", KVCache, a.n_layer, B, model.layers[0].attention.n_kv_head, max_seq_len, a.head_dim,
                  model.tok_embeddings.weight.dtype, device, attn)
    eos = torch.tensor(sorted(eos_ids), device=device)

    sync(device)
    t0 = time.perf_counter()
    first = sample(logits_to_probs(prefill(model, cache, tokens, prompt_lens, prefill_chunk), s))
    gamma, width = sa.gamma, 1
    if sa.mode != "none":
        draft_model, draft_cache = setup_draft(sa, model, cache, draft_model, tokens, prompt_lens,
                                               prefill_chunk, max_seq_len, attn)
        width = max(sa.gamma, sa.gamma_max) + 1
        if sa.planner is not None:
            gamma = calibrate_gamma(sa, model, cache, draft_model, draft_cache, prompt_lens, s)
    sync(device)
    t1 = time.perf_counter()

    last_prompt = tokens.gather(1, (prompt_lens - 1)[:, None])[:, 0]
    last2 = torch.stack([last_prompt, first], 1)  # [B, 2]: the second is at position pos, not yet cached
    out = torch.zeros(B, max_new_tokens + width, dtype=torch.long, device=device)
    out[:, 0] = first
    n_gen = torch.ones(B, dtype=torch.long, device=device)
    done = torch.isin(first, eos) | (n_gen >= max_new_tokens)
    cols = torch.arange(width, device=device)
    row_stats = torch.zeros(3, B, dtype=torch.long, device=device)  # per row: accepted, evaluated, rounds active
    rounds, gammas = 0, []
    marks = []
    while not bool(done.all()):  # the one host sync per step/round
        marks.append(time.perf_counter())
        pos = prompt_lens + n_gen - 1
        if sa.mode == "none":
            emitted = decode_step(model, cache, last2[:, 1].contiguous(), pos, s)[:, None]
            n_emit = torch.ones_like(n_gen)
        else:
            emitted, n_emit = spec.speculate_round(model, cache, draft_model, draft_cache, last2, pos,
                                                   gamma, s, sa.refresh and sa.mode == "self")
            active = (~done).long()
            n_acc = n_emit - 1
            row_stats += torch.stack([n_acc, torch.clamp(n_emit, max=gamma), torch.ones_like(n_acc)]) * active
            gammas.append(gamma)
        n_emit = torch.where(done, 0, n_emit)
        # a finished row writes past its own end, which the final truncation drops
        c = cols[: emitted.shape[1]]
        out.scatter_(1, (n_gen[:, None] + c).clamp(max=out.shape[1] - 1), emitted)
        hit_eos = (torch.isin(emitted, eos) & (c < n_emit[:, None])).any(1)
        last2 = torch.cat([last2, emitted], 1).gather(1, n_emit[:, None] + torch.arange(2, device=device))
        n_gen = n_gen + n_emit
        done = done | hit_eos | (n_gen >= max_new_tokens)
        rounds += 1
        if sa.adapt_every and rounds % sa.adapt_every == 0:  # one extra host sync every adapt_every rounds
            # a static batch runs until its last row is done: the planner weighs each unfinished
            # row's acceptance so far against the tokens it still has to make
            acc, ev, left = torch.stack([row_stats[0], row_stats[1], torch.where(done, 0, max_new_tokens - n_gen)]).tolist()
            rows = [(a / e, n) for a, e, n in zip(acc, ev, left) if e and n > 0]
            if rows:
                gamma = sa.planner.choose_gamma_for_rows(rows, sa.draft_budget)
    sync(device)
    t2 = time.perf_counter()
    round_s = [b - a for a, b in zip(marks, marks[1:] + [t2])]

    rows = []
    for row, n in zip(out.tolist(), n_gen.tolist()):
        row = row[: min(n, max_new_tokens)]
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        rows.append(row if stop is None else row[: stop + 1])
    acc, ev, rr = row_stats.sum(1).tolist()
    return Result(rows, t1 - t0, t2 - t1, rounds, acc, ev, rr, gammas, round_s)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        sys.exit(f"{self.prog}: error: {message} (see --help)")


def int_or_auto(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def parse_args(argv=None):
    p = Parser(description="Batched autoregressive or MagicDec-style speculative generation.")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT, help="directory with model.pth, config.json, tokenizer")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one row each)")
    p.add_argument("--prompt_file", action="append", default=[], help="a file whose text is one prompt (repeatable)")
    p.add_argument("--batch_size", type=int, default=0, help="rows; prompts repeat cyclically to fill (default: one per prompt)")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode, draft and verify steps and prefill chunks")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "flex", "flash"],
                   help="attention backend; flex and flash read only each row's valid part of the target's cache "
                        "(flash: needs the flash-attn package, CUDA, fp16/bf16; the draft cache then uses sdpa)")
    p.add_argument("--max_seq_len", type=int, default=0, help="KV cache length per row (default: longest prompt + max_new_tokens)")
    p.add_argument("--prefill_chunk", type=int, default=512, help="prompt tokens per prefill forward")
    p.add_argument("--json", default=None, metavar="PATH", help="write tokens, timings and acceptance here")
    p.add_argument("--speculate", default="none", choices=["none", "self", "draft"])
    p.add_argument("--gamma", type=int_or_auto, default=4,
                   help="draft tokens per round; auto: chosen by the cost model (costmodel.py), then re-chosen "
                        "every --adapt_every rounds from the measured acceptance")
    p.add_argument("--draft_kv", default="streaming", choices=["streaming", "snapkv", "full"])
    p.add_argument("--draft_budget", type=int_or_auto, default=256,
                   help="KV entries the draft attends to; auto: chosen by the cost model from a prior acceptance")
    p.add_argument("--adapt_every", type=int, default=8, help="rounds between gamma re-choices with --gamma auto")
    p.add_argument("--sinks", type=int, default=16, help="StreamingLLM sink tokens")
    p.add_argument("--snapkv_window", type=int, default=32, help="SnapKV observation window")
    p.add_argument("--snapkv_recent", type=int, default=0, help="SnapKV recent window kept during decode (0: budget/2)")
    p.add_argument("--draft_refresh", action=argparse.BooleanOptionalAction, default=True,
                   help="self-speculation: copy the target's verified K/V into the draft cache")
    p.add_argument("--draft_checkpoint_path", default=None, help="standalone draft model (--speculate draft)")
    args = p.parse_args(argv)

    def check(ok, msg):
        if not ok:
            p.error(msg)

    check(args.max_new_tokens >= 1, "--max_new_tokens must be >= 1")
    check(args.temperature >= 0, "--temperature must be >= 0")
    check(0 < args.top_p <= 1, "--top_p must be in (0, 1]")
    check(args.top_k >= 0 and args.batch_size >= 0 and args.prefill_chunk >= 1, "--top_k, --batch_size >= 0, --prefill_chunk >= 1")
    check(args.prompt or args.prompt_file, "give at least one --prompt or --prompt_file")
    check(args.attn != "flash" or flash_attn_with_kvcache is not None, "--attn flash needs the flash-attn package")
    check(args.gamma == "auto" or args.gamma >= 1, f"--gamma must be >= 1 or auto (got {args.gamma})")
    check(args.adapt_every >= 1, "--adapt_every must be >= 1")
    if args.speculate != "none" and args.draft_kv == "streaming" and args.draft_budget != "auto":
        check(args.draft_budget > args.sinks, f"--draft_budget {args.draft_budget} must be larger than --sinks {args.sinks}")
    if args.speculate != "none" and args.draft_kv == "snapkv" and args.draft_budget != "auto":
        recent = args.snapkv_recent or args.draft_budget // 2
        check(0 < recent < args.draft_budget, f"--draft_budget {args.draft_budget} must be larger than --snapkv_recent {recent}")
    check(not (args.speculate == "self" and args.draft_kv == "full"),
          "--speculate self needs a sparse --draft_kv (a full cache makes the draft the target itself)")
    check(args.speculate == "draft" or not args.draft_checkpoint_path, "--draft_checkpoint_path needs --speculate draft")
    check(args.speculate != "draft" or args.draft_checkpoint_path, "--speculate draft needs --draft_checkpoint_path")
    args.checkpoint_path = checkpoint_dir(args.checkpoint_path, "checkpoint")
    if args.draft_checkpoint_path:
        args.draft_checkpoint_path = checkpoint_dir(args.draft_checkpoint_path, "draft checkpoint")
    for f in args.prompt_file:
        check(os.path.isfile(f), f"--prompt_file {f}: no such file")
    return args


def checkpoint_dir(path, what):
    d = path if os.path.isdir(path) else os.path.dirname(path)
    for f in ("model.pth", "config.json"):
        if not os.path.isfile(os.path.join(d, f)):
            sys.exit(f"error: {what} {path}: missing {f} (run: python scripts/prepare_smollm2.py for the default "
                     f"model, or scripts/convert_hf_checkpoint.py for a HF checkpoint)")
    return d


def main(argv=None):
    from tokenizer import load_tokenizer

    args = parse_args(argv)
    device = tp.rank_device(torch.device(args.device))
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    rank, world = tp.rank_and_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    cfg = read_config(args.checkpoint_path)
    tp.check_divisible(cfg, world)

    tokenizer = load_tokenizer(args.checkpoint_path)
    texts = list(args.prompt) + [open(f).read() for f in args.prompt_file]
    prompts = []
    for i, text in enumerate(texts):
        ids = tokenizer.encode(text)
        if not ids:
            sys.exit(f"error: prompt {i} is empty")
        prompts.append(([tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []) + ids)
    B = args.batch_size or len(prompts)
    prompts = [prompts[i % len(prompts)] for i in range(B)]
    need = max(map(len, prompts)) + args.max_new_tokens
    max_seq_len = args.max_seq_len or need
    if need > max_seq_len:
        sys.exit(f"error: the longest prompt ({need - args.max_new_tokens} tokens) plus --max_new_tokens "
                 f"{args.max_new_tokens} needs {need} positions, more than --max_seq_len {max_seq_len}")
    kv_bytes = 2 * cfg.n_layer * B * (cfg.n_kv_head // world) * max_seq_len * cfg.head_dim * dtype.itemsize
    check_fits(kv_bytes, device, "the KV cache")
    draft_model = None
    if args.speculate == "draft":
        dcfg = read_config(args.draft_checkpoint_path)
        if dcfg.vocab_size != cfg.vocab_size:
            sys.exit(f"error: draft vocabulary ({dcfg.vocab_size}) differs from the target's ({cfg.vocab_size})")
        tp.check_divisible(dcfg, world, "draft model")

    tp.maybe_init_distributed(device)
    where = (device, dtype) if world == 1 else ("cpu", None)  # TP: shard before anything reaches the device
    model = tp.shard(load_model(args.checkpoint_path, *where), device, dtype)
    if args.speculate == "draft":
        draft_model = tp.shard(load_model(args.draft_checkpoint_path, *where), device, dtype)
    if args.compile:
        compile_steps(device)

    gamma, budget, planner = args.gamma, args.draft_budget, None
    if args.speculate != "none" and "auto" in (gamma, budget):
        planner, gamma, budget, predicted = choose_speculation(args, model, draft_model, B, max_seq_len,
                                                               max(map(len, prompts)), dtype, world)
        say(f"cost model: gamma {gamma}, draft budget {budget}, predicted speedup {predicted:.2f}")
    sa = SpecArgs(args.speculate, gamma, args.draft_kv, budget, args.sinks, args.snapkv_window,
                  args.snapkv_recent, args.draft_refresh and args.speculate == "self")
    if args.gamma == "auto":
        sa.gamma_max, sa.adapt_every, sa.planner = max(planner.gammas), args.adapt_every, planner
    s = Sampling(args.temperature, args.top_k, args.top_p)
    res = generate(model, prompts, args.max_new_tokens, tokenizer.eos_ids, s, max_seq_len, args.prefill_chunk, sa, draft_model,
                   args.attn)
    tp.check_agree(res.tokens)

    for i, row in enumerate(res.tokens):
        say(f"--- row {i} ({len(prompts[i])} prompt tokens, {len(row)} generated)\n{tokenizer.decode(row)}")
    n_tokens = sum(map(len, res.tokens))
    tps = n_tokens / res.decode_s
    say(f"\nprefill {res.prefill_s:.3f} s, decode {res.decode_s:.3f} s for {n_tokens} tokens: {tps:.1f} tokens/s "
        f"({B} rows, {device}, {dtype})")
    if args.speculate != "none":
        say(f"acceptance per draft token {res.acceptance:.3f}, tokens per round {res.tokens_per_round:.2f} "
            f"(gamma {f'auto: first {res.gammas[0]}, last {res.gammas[-1]}' if args.gamma == 'auto' and res.gammas else gamma}, "
            f"{args.draft_kv}, budget {budget})")
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(dict(tokens=res.tokens, tokens_per_s=tps, prefill_s=res.prefill_s, decode_s=res.decode_s,
                           rounds=res.rounds, acceptance=res.acceptance, tokens_per_round=res.tokens_per_round,
                           device=device_name(device), dtype=str(dtype), world_size=world, batch_size=B,
                           gamma_per_round=res.gammas, draft_budget=budget, args=vars(args)), f, indent=1)
    tp.finish()


def choose_speculation(args, model, draft_model, batch, max_seq_len, prompt_len, dtype, world):
    """--gamma/--draft_budget auto -> (planner, gamma, budget, predicted speedup). Every rank must run
    the same gamma, so rank 0's choice (measured on its device) is the one all ranks use."""
    import costmodel

    floor = args.sinks if args.draft_kv == "streaming" else args.snapkv_recent
    budgets = [b for b in costmodel.PRIOR_ACCEPTANCE if b > floor] or [max(costmodel.PRIOR_ACCEPTANCE)]
    choice = list(costmodel.auto_plan(model.args, batch, max_seq_len, dtype, args.device, args.gamma, args.draft_budget,
                                      budgets, prompt_len, draft_model.args if draft_model else None,
                                      args.draft_kv == "full", args.compile))
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


_eager_steps, _compiled_steps = {}, {}


def compile_steps(device, enable=True, backend="inductor"):
    """Swap in torch.compile'd steps, fullgraph with static shapes: the autoregressive decode step, the
    draft step, the verify step (which also refreshes the draft cache) and the prefill chunk, which
    then always has its full shape. On CUDA the steps replay as CUDA graphs (prefill is compute
    bound: plain compile). enable=False swaps the eager steps back; the compiled ones are kept, so
    enabling again recompiles nothing."""
    mode = "reduce-overhead" if torch.device(device).type == "cuda" and backend == "inductor" else None
    here = sys.modules[__name__]
    for owner, name, m in ((here, "decode_step", mode), (spec, "draft_step", mode), (spec, "verify_step", mode),
                           (here, "forward_chunk", None)):
        fn = _eager_steps.setdefault(name, getattr(owner, name))
        if enable:
            if (name, m, backend) not in _compiled_steps:
                _compiled_steps[name, m, backend] = torch.compile(fn, mode=m, backend=backend, fullgraph=True, dynamic=False)
            fn = _compiled_steps[name, m, backend]
        setattr(owner, name, fn)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, MemoryError, FileNotFoundError) as e:  # bad checkpoints, budgets, memory: one line
        tp.fail(f"error: {e}")
    except SystemExit as e:
        if isinstance(e.code, str):  # an error message: under torchrun, printed once (by rank 0)
            tp.fail(e.code)
        raise
