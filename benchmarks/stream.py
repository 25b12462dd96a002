"""A stream of requests through a fixed number of slots: static batches against continuous batching,
autoregressive and speculative.

    python -m benchmarks.stream [--requests 32] [--slots 8] [--prompt_lens 1024,4096] [--new_tokens 32,512]

Requests are essay stretches with prompt lengths and max_new_tokens drawn uniformly from the given
ranges (--seed, recorded). Every request arrives at the start. Four ways to serve them, each once
per cycle (--cycles), in turn, on one engine per mode:
  ar-static, sd-static            waves of --slots requests (generate()); a wave runs until its
                                  slowest row is done, each row stopping at its own max_new_tokens
  ar-continuous, sd-continuous    engine.serve(): a finished request's slot takes the next one
Throughput is generated tokens (and requests) over the wall time of the whole stream, prefill
included. Ratios are taken within a cycle, then the median over cycles. The JSON keeps each run's
finish timeline (seconds, cumulative tokens) for plot.py's throughput-over-time plot.
"""
import argparse
import os
import random
import statistics
import time

import torch

from benchmarks import common

from benchmarks.common import NO_EOS, RESULTS, cpu_counters, cpu_stolen_since, environment, essay_prompts, write_json
from engine import Engine, Request, SpecArgs, auto_attn, generate, serve, sync
from checkpoint import load_model
from spec import Sampling
from tokenizer import load_tokenizer

MODES = ("ar-static", "ar-continuous", "sd-static", "sd-continuous")


def make_requests(tokenizer, n, prompt_lens, new_tokens, seed):
    """n requests: a prompt of a length drawn from prompt_lens (lo, hi) and a max_new_tokens drawn from
    new_tokens (lo, hi), each from its own stretch of the essays."""
    rng = random.Random(seed)
    lens = [rng.randint(*prompt_lens) for _ in range(n)]
    news = [rng.randint(*new_tokens) for _ in range(n)]
    texts = essay_prompts(tokenizer, n, max(lens), overlap=True)
    return [Request(i, t[:m], k) for i, (t, m, k) in enumerate(zip(texts, lens, news))]


@torch.no_grad()
def run_static(engine, requests, s):
    """Waves of engine.batch_size requests in arrival order -> (tokens, seconds, timeline)."""
    B, t0, n_tokens, timeline = engine.batch_size, time.perf_counter(), 0, []
    for i in range(0, len(requests), B):
        wave = requests[i:i + B]
        prompts = [r.prompt for r in wave] + [wave[0].prompt] * (B - len(wave))  # a short last wave idles rows
        news = [r.max_new_tokens for r in wave] + [1] * (B - len(wave))
        res = generate(engine, prompts, news, NO_EOS, s)
        n_tokens += sum(len(t) for t in res.tokens[:len(wave)])
        timeline.append((time.perf_counter() - t0, n_tokens))  # a wave's requests all finish at its end
    return n_tokens, time.perf_counter() - t0, timeline


@torch.no_grad()
def run_continuous(engine, requests, s):
    t0, timeline, count = time.perf_counter(), [], [0]

    def finished(req, record):
        count[0] += len(record["tokens"])
        timeline.append((time.perf_counter() - t0, count[0]))

    totals = serve(engine, requests, NO_EOS, s, finished)
    return totals["tokens"], totals["seconds"], timeline


def run_mode(engines, mode, requests, s):
    engine = engines["sd" if mode.startswith("sd") else "ar"]
    sync(engine.device)
    stolen = cpu_counters()
    n_tokens, seconds, timeline = (run_continuous if mode.endswith("continuous") else run_static)(engine, requests, s)
    return dict(mode=mode, tokens=n_tokens, seconds=seconds, tokens_per_s=n_tokens / seconds,
                requests_per_s=len(requests) / seconds, cpu_stolen=cpu_stolen_since(stolen), timeline=timeline)


def stream_benchmark(model, requests, slots, sa, s, compile, cycles, modes=MODES, attn="sdpa", say=print,
                     backend="inductor"):
    """The four modes over the same requests, cycles times -> records and the ratios of each cycle."""
    max_seq_len = max(len(r.prompt) + r.max_new_tokens for r in requests)
    engines = {"ar": Engine(model, slots, max_seq_len, sa=None, attn=attn, compile=compile, backend=backend),
               "sd": Engine(model, slots, max_seq_len, sa=sa, attn=attn, compile=compile, backend=backend)}
    warm = [Request(-1, r.prompt[:16], sa.gamma + 3) for r in requests[:slots + 1]]
    t = time.perf_counter()
    for mode in modes:  # compiles (and captures) every step each mode uses, on short prompts
        run_mode(engines, mode, warm, s)
    warmup_s = time.perf_counter() - t
    runs = []
    for cycle in range(cycles):
        for mode in modes:
            rec = dict(run_mode(engines, mode, requests, s), cycle=cycle)
            runs.append(rec)
            say(f"cycle {cycle} {mode}: {rec['tokens_per_s']:.1f} tokens/s, {rec['requests_per_s']:.3f} requests/s "
                f"({rec['seconds']:.1f} s)", flush=True)

    def ratio(a, b):
        per_cycle = [x["tokens_per_s"] / y["tokens_per_s"] for c in range(cycles)
                     for x in runs if x["cycle"] == c and x["mode"] == a for y in runs if y["cycle"] == c and y["mode"] == b]
        return dict(median=statistics.median(per_cycle), cycles=per_cycle) if per_cycle else None

    ratios = {"sd_continuous_over_sd_static": ratio("sd-continuous", "sd-static"),
              "sd_continuous_over_ar_continuous": ratio("sd-continuous", "ar-continuous"),
              "ar_continuous_over_ar_static": ratio("ar-continuous", "ar-static"),
              "sd_static_over_ar_static": ratio("sd-static", "ar-static")}
    return runs, ratios, warmup_s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--prompt_lens", default="1024,4096", help="lo,hi: prompt lengths drawn uniformly")
    p.add_argument("--new_tokens", default="32,512", help="lo,hi: max_new_tokens drawn uniformly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--draft_budget", type=int, default=256)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "math", "flex"], help="auto: as generate.py's")
    p.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: the GPU check's smoke mode)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.attn = auto_attn(device, dtype, args.compile) if args.attn == "auto" else args.attn
    tokenizer = load_tokenizer(args.checkpoint_path)
    lo_hi = [tuple(int(x) for x in r.split(",")) for r in (args.prompt_lens, args.new_tokens)]
    requests = make_requests(tokenizer, args.requests, *lo_hi, args.seed)
    model = load_model(args.checkpoint_path, device, dtype)
    sa = SpecArgs("self", gamma=args.gamma, draft_kv="streaming", draft_budget=args.draft_budget)
    runs, ratios, warmup_s = stream_benchmark(model, requests, args.slots, sa, Sampling(), args.compile, args.cycles,
                                              args.modes.split(","), args.attn, backend=args.backend)
    for name, r in ratios.items():
        if r:
            print(f"{name}: {r['median']:.2f} (cycles: {', '.join(f'{x:.2f}' for x in r['cycles'])})")
    path = args.json or os.path.join(RESULTS, f"stream-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    write_json(path, dict(environment(device), settings=vars(args), warmup_s=warmup_s,
                          request_lens=[[len(r.prompt), r.max_new_tokens] for r in requests], runs=runs, ratios=ratios))


if __name__ == "__main__":
    main()
