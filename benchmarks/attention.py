"""The attention backends on this machine: SDPA's kernel against the math backend (softmax(QK^T)V
written out, which inductor fuses into the compiled block), step by step and end to end.

    python -m benchmarks.attention steps --shapes bfloat16:8:4096,bfloat16:1:4096,float32:8:4096
    python -m benchmarks.attention e2e --shapes bfloat16:8:4096 --new_tokens 256

steps: the median time of a decode step, a verify step of --gamma drafts and a draft step
(self-speculation, StreamingLLM --budget) per backend, on SmolLM2's shape with random weights,
queries at position S; backends alternate within each cycle, ratios over the first backend are taken
within a cycle, then the median over cycles.
e2e: AR and self-speculation (greedy, --gamma, StreamingLLM --budget) decode tokens/s on essay
prompts with SmolLM2's weights, per backend, alternated per cycle: what the backend changes in each
mode, and in SD over AR.
"""
import argparse
import statistics
import time

import torch

import costmodel
from benchmarks import common
from checkpoint import load_model
from engine import Engine, SpecArgs
from spec import RowSampling, Sampling
from tokenizer import load_tokenizer


def shapes(text):
    """"bfloat16:8:4096,..." -> [(dtype, B, S)]"""
    return [(getattr(torch, d), int(b), int(s)) for d, b, s in (x.split(":") for x in text.split(","))]


def ratios_over_first(times: dict, backends: list) -> dict:
    """{(backend, what): [seconds per cycle]} -> {"backend/first what": median of per-cycle ratios, cycles}"""
    out = {}
    for b in backends[1:]:
        for what in {w for _, w in times}:
            per = [x / y for x, y in zip(times[b, what], times[backends[0], what])]
            out[f"{b}/{backends[0]} {what}"] = dict(median=statistics.median(per), cycles=per)
    return out


@torch.no_grad()
def steps(a):
    rows = []
    for dtype, B, S in shapes(a.shapes):
        model = common.random_model("smollm2-135m", "cpu", dtype)
        sa = SpecArgs("self", gamma=a.gamma, draft_kv="streaming", draft_budget=a.budget)
        engines = {b: Engine(model, B, S + a.gamma + 1, sa=sa, attn=b, compile=a.compile) for b in a.backends}
        pos, cur = torch.full((B,), S, dtype=torch.long), torch.ones(B, dtype=torch.long)
        drafts, greedy = torch.ones(B, a.gamma, dtype=torch.long), RowSampling.of(Sampling(), B, "cpu")
        for e in engines.values():
            e.draft_cache.fill(e.cache, pos)
        times = {(b, w): [] for b in a.backends for w in ("decode", "verify", "draft")}
        start = common.cpu_counters()
        for cycle in range(a.cycles + 1):  # cycle 0 compiles and warms up, uncounted
            for b, e in engines.items():
                for what, fn in (("decode", lambda: e.decode(cur, pos, greedy)),
                                 ("verify", lambda: e.verify(cur, drafts, None, pos, greedy)),
                                 ("draft", lambda: e.draft(cur[:, None], pos[:, None], greedy))):
                    t = costmodel.median_time(fn, "cpu", a.repeats)
                    if cycle:
                        times[b, what].append(t)
        row = dict(dtype=str(dtype), batch_size=B, context=S, gamma=a.gamma, budget=a.budget,
                   ms={f"{b} {w}": statistics.median(v) * 1e3 for (b, w), v in times.items()},
                   ratios=ratios_over_first(times, a.backends), cpu_stolen=common.cpu_stolen_since(start))
        rows.append(row)
        print(f"{dtype} {B}x{S}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in row["ms"].items()), flush=True)
        print("  " + ", ".join(f"{k} {v['median']:.2f}" for k, v in row["ratios"].items()), flush=True)
        del engines
    return dict(steps=rows)


@torch.no_grad()
def e2e(a):
    tokenizer = load_tokenizer(a.checkpoint_path)
    rows = []
    for dtype, B, S in shapes(a.shapes):
        model = load_model(a.checkpoint_path, "cpu", dtype)
        prompts = common.essay_prompts(tokenizer, B, S)
        sa = SpecArgs("self", gamma=a.gamma, draft_kv="streaming", draft_budget=a.budget)
        engines = {(b, mode): Engine(model, B, S + a.new_tokens, sa=sa if mode == "sd" else None, attn=b,
                                     compile=a.compile) for b in a.backends for mode in ("ar", "sd")}
        warm = 2 * (a.gamma + 1) + 1  # compiles every step shape the runs use
        for e in engines.values():
            common.engine_run(e, [p[:min(64, S + a.new_tokens - warm)] for p in prompts], warm)
        runs = []
        for cycle in range(a.cycles):
            for (b, mode), e in engines.items():
                run = common.engine_run(e, prompts, a.new_tokens)
                runs.append(dict(cycle=cycle, attn=b, mode=mode, tokens_per_s=run.tokens_per_s,
                                 acceptance=run.result.acceptance if mode == "sd" else None, cpu_stolen=run.cpu_stolen))
                print(f"{dtype} {B}x{S} cycle {cycle} {b:5} {mode}: {run.tokens_per_s:6.1f} tok/s", flush=True)

        def per(x, y):  # x, y: (attn, mode); ratio of their tokens/s within each cycle
            tps = {(r["cycle"], r["attn"], r["mode"]): r["tokens_per_s"] for r in runs}
            v = [tps[c, *x] / tps[c, *y] for c in range(a.cycles)]
            return dict(median=statistics.median(v), cycles=v)

        ratios = {f"{b} sd/ar": per((b, "sd"), (b, "ar")) for b in a.backends}
        first = a.backends[0]
        ratios |= {f"{b}/{first} {m}": per((b, m), (first, m)) for b in a.backends[1:] for m in ("ar", "sd")}
        rows.append(dict(dtype=str(dtype), batch_size=B, context=S, new_tokens=a.new_tokens, gamma=a.gamma,
                         budget=a.budget, runs=runs, ratios=ratios))
        print("  " + ", ".join(f"{k} {v['median']:.2f}" for k, v in ratios.items()), flush=True)
        del engines
    return dict(e2e=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["steps", "e2e"])
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--shapes", default="bfloat16:8:4096,bfloat16:1:4096,bfloat16:1:512,float32:8:4096,float32:1:512",
                   help="dtype:B:S list")
    p.add_argument("--backends", type=lambda s: s.split(","), default=["sdpa", "math"],
                   help="the first is what ratios are over")
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="steps: timings per step and cycle")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.json = a.json or f"{common.RESULTS}/attention-{a.what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = dict(steps=steps, e2e=e2e)[a.what](a)
    common.write_json(a.json, dict(env=common.environment("cpu"), settings=vars(a), **out))


if __name__ == "__main__":
    main()
