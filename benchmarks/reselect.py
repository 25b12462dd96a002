"""Drafts re-selected from the target's own attention (--draft_reselect) against static drafts.

    python -m benchmarks.reselect acceptance --sampling greedy,sampled --kinds streaming,snapkv \\
        --every 0,1,2,4,8 --budgets 256 --new_tokens 1024 --lengths 128,512,1024 --seeds 0,1,2
    python -m benchmarks.reselect acceptance --policies all,last,layer,pool5,sinks4 --every 1 ...
    python -m benchmarks.reselect speed --configs streaming:0,snapkv:0,snapkv:4 --new_tokens 1024 --cycles 2
    python -m benchmarks.reselect cost --batch_size 8 --context 4096      # scored verify against plain verify

acceptance: per-token acceptance against output length (at each of --lengths, over the tokens made so
far) for each sampling mode, draft kind, budget, re-selection interval (0: static) and scoring
policy, over --rows essay prompts of --prompt_len tokens in one batch, once per seed (greedy runs
once: it has no randomness). Reports the mean over seeds and the spread (min, max; and across rows).
speed: SD against AR end to end (sampled unless --sampling greedy), every configuration once per
cycle, alternated, decode tokens/s by wall time; ratios within a cycle, median over cycles.
cost: the time of a scored verify step against a plain one at one shape, the cost of re-selecting.
"""
import argparse
import statistics
import time

import torch

import costmodel
from benchmarks import common
from benchmarks.common import NO_EOS
from checkpoint import load_model
from engine import Engine, SpecArgs, auto_attn, generate
from kv_cache import Reselect
from spec import RowSampling, Sampling
from tokenizer import load_tokenizer

SAMPLED = Sampling(temperature=0.7, top_p=0.95)
POLICIES = {"all": Reselect(), "last": Reselect(queries="last"), "layer": Reselect(scope="layer"),
            "pool5": Reselect(pool=5), "sinks4": Reselect(sinks=4)}


def sampling(name):
    return Sampling() if name == "greedy" else SAMPLED


def spec_args(a, kind, budget, every, policy):
    return SpecArgs("self", gamma=a.gamma, draft_kv=kind, draft_budget=budget, reselect=every,
                    reselect_policy=POLICIES[policy])


def run_acceptance(a, model, prompts, kind, budget, every, policy, mode, seed):
    """One generation -> acceptance at each of a.lengths (over all rows), per row at the last."""
    engine = Engine(model, len(prompts), a.prompt_len + a.new_tokens, sa=spec_args(a, kind, budget, every, policy),
                    compile=a.compile, attn=a.attn)
    marks = []  # per round: accepted, evaluated, generated, per row (one host sync per round)
    torch.manual_seed(seed)
    t = time.perf_counter()
    r = generate(engine, prompts, a.new_tokens, NO_EOS, sampling(mode),
                 on_round=lambda rows: marks.append(torch.stack([rows.stats[0], rows.stats[1], rows.n_gen]).tolist()))
    at = {}
    for length in a.lengths:  # the first round at which every row has made `length` tokens
        acc, ev, _ = next((m for m in marks if min(m[2]) >= length), marks[-1])
        at[length] = sum(acc) / max(sum(ev), 1)
    acc, ev, _ = marks[-1]
    return dict(acceptance=at, rows=[x / max(y, 1) for x, y in zip(acc, ev)], seconds=time.perf_counter() - t,
                tokens_per_round=r.tokens_per_round)


def acceptance(a, model, prompts):
    results = []
    save = lambda: common.write_json(a.json, dict(env=common.environment("cpu"), settings=vars(a), acceptance=results))  # noqa: E731
    for mode in a.sampling:
        for kind in a.kinds:
            for budget in a.budgets:
                for every in a.every:
                    for policy in (a.policies if every else ["all"]):
                        runs = [run_acceptance(a, model, prompts, kind, budget, every, policy, mode, seed)
                                for seed in (a.seeds if mode == "sampled" else a.seeds[:1])]
                        by_length = {L: [x["acceptance"][L] for x in runs] for L in a.lengths}
                        rec = dict(sampling=mode, draft_kv=kind, budget=budget, every=every, policy=policy,
                                   acceptance={L: statistics.mean(v) for L, v in by_length.items()},
                                   spread={L: [min(v), max(v)] for L, v in by_length.items()},
                                   rows_range=[min(min(x["rows"]) for x in runs), max(max(x["rows"]) for x in runs)],
                                   runs=runs)
                        results.append(rec)
                        print(f"{mode:8} {kind:9} budget {budget:5} every {every} {policy:6}: "
                              + ", ".join(f"{L}: {rec['acceptance'][L]:.3f}" for L in a.lengths)
                              + f"  (seeds {len(runs)}, rows {rec['rows_range'][0]:.2f}-{rec['rows_range'][1]:.2f})",
                              flush=True)
                        save()  # a long sweep keeps what it finished
    return dict(acceptance=results)


def speed(a, model, prompts):
    """AR and each configuration once per cycle, alternated; decode tokens/s by wall time."""
    configs = [("ar", None)] + [(c, c.split(":")) for c in a.configs]
    engines = {}
    for name, conf in configs:
        sa = None if conf is None else spec_args(a, conf[0], a.budgets[0], int(conf[1]), a.policies[0])
        engines[name] = Engine(model, len(prompts), a.prompt_len + a.new_tokens, sa=sa, compile=a.compile, attn=a.attn)
        warm = 2 * (a.gamma + 1) * (int(conf[1]) + 1) + 2 if conf else 4  # reaches a scored verify
        generate(engines[name], [p[:64] for p in prompts], warm, NO_EOS, sampling(a.sampling[0]))
    runs = []
    for cycle in range(a.cycles):
        for name, _ in configs:
            torch.manual_seed(cycle)
            stolen = common.cpu_counters()
            r = generate(engines[name], prompts, a.new_tokens, NO_EOS, sampling(a.sampling[0]))
            runs.append(dict(cycle=cycle, config=name, tokens_per_s=r.tokens_per_s, acceptance=r.acceptance,
                             prefill_s=r.prefill_s, decode_s=r.decode_s, cpu_stolen=common.cpu_stolen_since(stolen)))
            print(f"cycle {cycle} {name:14}: {r.tokens_per_s:6.1f} tok/s, acceptance {r.acceptance:.3f}", flush=True)
    ratios = {}
    for name, _ in configs[1:]:
        per = [x["tokens_per_s"] / y["tokens_per_s"] for c in range(a.cycles) for x in runs for y in runs
               if x["cycle"] == y["cycle"] == c and x["config"] == name and y["config"] == "ar"]
        ratios[name] = dict(median=statistics.median(per), cycles=per)
        print(f"{name}: SD/AR {ratios[name]['median']:.2f} (cycles {', '.join(f'{x:.2f}' for x in per)})")
    return dict(speed=runs, ratios=ratios)


@torch.no_grad()
def cost(a, model, prompts):
    """Scored verify over plain verify at the prompts' shape (the draft cache holds prompt picks)."""
    sa = spec_args(a, a.kinds[0], a.budgets[0], 1, a.policies[0])
    engine = Engine(model, len(prompts), a.prompt_len + a.new_tokens, sa=sa, compile=a.compile, attn=a.attn)
    B = len(prompts)
    pos = torch.full((B,), a.prompt_len, dtype=torch.long)
    engine.draft_cache.fill(engine.cache, pos)
    cur, drafts = torch.ones(B, dtype=torch.long), torch.ones(B, a.gamma, dtype=torch.long)
    greedy = RowSampling.of(Sampling(), B, "cpu")
    times = {"verify": [], "scored": [], "decode": []}
    for _ in range(a.cycles):  # alternated
        times["decode"].append(costmodel.median_time(lambda: engine.decode(cur, pos, greedy), "cpu", 5))
        times["verify"].append(costmodel.median_time(lambda: engine.verify(cur, drafts, None, pos, greedy), "cpu", 5))
        times["scored"].append(costmodel.median_time(
            lambda: engine.verify(cur, drafts, None, pos, greedy, scored=True), "cpu", 5))
    per = [s / v for s, v in zip(times["scored"], times["verify"])]
    print(f"B={B} x {a.prompt_len}: decode {statistics.median(times['decode']) * 1e3:.1f} ms, verify "
          f"{statistics.median(times['verify']) * 1e3:.1f} ms, scored verify {statistics.median(times['scored']) * 1e3:.1f}"
          f" ms: {statistics.median(per):.3f} of a verify")
    return dict(cost=dict(times_s=times, scored_over_verify=statistics.median(per), cycles=per))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["acceptance", "speed", "cost"])
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--essays", default=common.ESSAYS)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=1024)
    p.add_argument("--lengths", type=common.ints, default=[128, 512, 1024])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budgets", type=common.ints, default=[256])
    p.add_argument("--kinds", default="streaming,snapkv")
    p.add_argument("--every", type=common.ints, default=[0, 1, 2, 4, 8])
    p.add_argument("--policies", default="all", help=f"scoring policies: {', '.join(POLICIES)}")
    p.add_argument("--sampling", default="sampled", help="greedy, sampled (temperature 0.7, top-p 0.95), or both")
    p.add_argument("--seeds", type=common.ints, default=[0, 1, 2])
    p.add_argument("--configs", default="streaming:0,snapkv:4", help="speed: draft_kv:every, each against AR")
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "math"], help="auto: as generate.py's")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.attn = auto_attn("cpu", getattr(torch, a.dtype), a.compile) if a.attn == "auto" else a.attn
    a.kinds, a.policies, a.sampling, a.configs = (x.split(",") for x in (a.kinds, a.policies, a.sampling, a.configs))
    a.lengths = [L for L in a.lengths if L <= a.new_tokens] or [a.new_tokens]
    a.json = a.json or f"{common.RESULTS}/reselect-{a.what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    torch.set_grad_enabled(False)
    model = load_model(a.checkpoint_path, "cpu", getattr(torch, a.dtype))
    prompts = common.essay_prompts(load_tokenizer(a.checkpoint_path), a.rows, a.prompt_len, a.essays)
    out = dict(acceptance=acceptance, speed=speed, cost=cost)[a.what](a, model, prompts)
    common.write_json(a.json, dict(env=common.environment("cpu"), settings=vars(a), **out))


if __name__ == "__main__":
    main()
