# Speculative against autoregressive decoding over batch size x prefix length x draft budget x gamma
# (fixed gammas, and --gamma auto as the CLI runs it), on essay prompts, greedy, no EOS stop:
#   python -m benchmarks.sweep --dtype bfloat16 --compile --batch_sizes 1,4,8 --prefixes 4096 --gammas 2,3,4,auto
# Per batch size and prefix: decode tokens/s, speedup over AR, acceptance, tokens per round; the step
# ratios T_D/T_T and T_V/T_T measured on the engine's own steps and the speedup they predict, next to
# the cost model's. One JSON (--json, default benchmarks/results/sweep-<time>.json) for benchmarks/plot.py.
#
# The machine's speed may drift 2-4x within minutes (shared cores), so every configuration runs
# --repeats times in cycles over all of them; AR runs again after every speculative run, which is
# compared with the mean of the AR runs either side of it; a run is rated at its median step or
# round (common.median_step_tokens_per_s); a configuration's speedup is the median over cycles.
# Wall-time figures and the share of CPU stolen from each run are recorded beside them. Every run
# prefills anew; only decode is timed.
import argparse
import datetime
import os
import statistics
from dataclasses import dataclass

import torch

from benchmarks import common
import costmodel
from benchmarks.common import Run, engine_run, ints
from engine import Engine, SpecArgs, auto_attn, pad_prompts
from checkpoint import load_model
from spec import RowSampling, Sampling
from tokenizer import load_tokenizer

ADAPT_EVERY = 8  # --gamma auto re-chooses gamma every this many rounds (the CLI's default)


@dataclass(frozen=True)
class Config:
    speculate: str  # self | draft
    draft_kv: str  # streaming | snapkv | full
    budget: int  # 0 for a standalone draft's full cache
    gamma: object  # an int, or "auto"


@dataclass
class Paired:
    """A speculative run and the AR speed around it: the mean of the AR runs just before and after."""
    sd: Run
    ar_tokens_per_s: float
    ar_tokens_per_s_median_step: float

    @property
    def speedup(self):
        return self.sd.tokens_per_s_median_step / self.ar_tokens_per_s_median_step

    @property
    def speedup_wall(self):
        return self.sd.tokens_per_s / self.ar_tokens_per_s


@dataclass
class Group:
    """The records of one batch size and prefix length."""
    ar: dict
    sd: list
    auto: list
    steps: dict
    samples: list  # (ModelArgs, batch, tokens, slots, itemsize, seconds) for costmodel.fit_overhead


def spec_args(args, model, draft_model, c: Config, B, S, max_seq, dtype, gammas) -> SpecArgs:
    """As generate.py builds them, with one draft-cache shape (gamma_max) for every gamma."""
    sa = SpecArgs(c.speculate, gamma=c.gamma, draft_kv=c.draft_kv, draft_budget=c.budget or 256,
                  refresh=c.speculate == "self", gamma_max=max(gammas))
    if c.gamma == "auto":  # planned from a measurement of the device, calibrated and adapted in generate()
        sa.planner, sa.gamma, _, _ = costmodel.auto_plan(
            model.args, B, max_seq, dtype=dtype, device=args.device, gamma="auto", budget=sa.draft_budget,
            prompt_len=S, draft=draft_model.args if c.speculate == "draft" else None,
            draft_full_cache=c.draft_kv == "full", compiled=args.compile, gammas=gammas)
        sa.adapt_every = ADAPT_EVERY
    return sa


@torch.no_grad()
def step_times(args, model, draft_model, mode, prompts, max_seq, pos, gammas) -> dict:
    """Median seconds of one target step, one verify step per gamma and one draft step per draft cache
    (StreamingLLM at each budget, as SnapKV's has the same shapes; a standalone draft's full cache),
    every row at position pos. The steps are timed in turn, one call each per cycle, so that a drift
    in machine speed hits them alike; two cycles warm up. Self-speculation's verify steps also
    refresh the first budget's draft cache, as in generate()."""
    device = torch.device(args.device)
    B = len(prompts)
    greedy = RowSampling.of(Sampling(), B, device)
    tokens, lens = pad_prompts(prompts, device)
    keys = list(args.budgets) + (["full"] if mode == "draft" and "full" in args.draft_kv else [])
    engines = {}
    for key in keys:
        sa = SpecArgs(mode, gamma=max(gammas), draft_kv="full" if key == "full" else "streaming",
                      draft_budget=256 if key == "full" else key, refresh=mode == "self")
        engines[key] = Engine(model, B, max_seq, sa=sa, draft_model=draft_model, attn=args.attn, compile=args.compile)
        engines[key].setup_draft(tokens, lens)  # cache contents do not change step times: no prefill needed
    at = torch.full((B,), pos, dtype=torch.long, device=device)
    cur, target = torch.ones_like(at), engines[keys[0]]
    steps = {("t_target", None): lambda: target.decode(cur, at, greedy)}
    for g in gammas:
        drafts = torch.ones(B, g, dtype=torch.long, device=device)
        steps["t_verify", g] = lambda d=drafts: target.verify(cur, d, None, at, greedy)
    for key, e in engines.items():
        steps["t_draft", key] = lambda e=e: e.draft(cur[:, None], at[:, None], greedy)
    times = {k: [] for k in steps}
    for cycle in range(2 + args.step_repeats):
        for k, fn in steps.items():
            t = costmodel.median_time(fn, device, repeats=1, warmup=0, inner=10 if device.type == "cuda" else 1)
            if cycle >= 2:
                times[k].append(t)
    out = dict(t_target=statistics.median(times["t_target", None]), t_verify={}, t_draft={})
    for (name, key), ts in times.items():
        if key is not None:
            out[name][key] = statistics.median(ts)
    return out


def round_cost(st, c: Config, gamma):
    """One speculation round in target steps, gamma T_D/T_T + T_V/T_T, from step_times."""
    return (gamma * st["t_draft"]["full" if c.draft_kv == "full" else c.budget] + st["t_verify"][gamma]) / st["t_target"]


def sweep_group(args, model, draft_model, prompts, B, S, dtype) -> Group:
    N, gammas = args.max_new_tokens, [g for g in args.gammas if g != "auto"]
    max_seq = S + N + max(gammas) + 1  # one cache length for AR and SD: the same attention cost
    # target cache slots a step reads at the middle of a run: all of them behind SDPA's mask,
    # with FlexAttention only the 128-wide blocks up to the query
    read = min(max_seq, -(-(S + N // 2 + 1) // 128) * 128) if args.attn == "flex" else max_seq
    batches = len(prompts) // B  # a prompt pool larger than the batch runs in consecutive batches
    modes = ["self"] + (["draft"] if draft_model is not None else [])
    configs = [Config(mode, kind, budget, g) for mode in modes for kind in args.draft_kv if mode == "draft" or kind != "full"
               for budget in ([0] if kind == "full" else args.budgets) for g in args.gammas]
    ar_engine = Engine(model, B, max_seq, sa=None, draft_model=None, attn=args.attn, compile=args.compile)
    ar = [engine_run(ar_engine, prompts, N, warm=True)]
    print(f"AR B={B} S={S}: {ar[0].tokens_per_s:.2f} tok/s, {ar[0].tokens_per_s_median_step:.2f} at the median step")
    steps = {mode: step_times(args, model, draft_model if mode == "draft" else None, mode, prompts[:B], max_seq,
                              S + N // 2, gammas) for mode in modes}
    runs = {c: [] for c in configs}
    for cycle in range(args.repeats):
        for c in configs:
            dm = draft_model if c.speculate == "draft" else None
            engine = Engine(model, B, max_seq, sa=spec_args(args, model, dm, c, B, S, max_seq, dtype, gammas), draft_model=dm,
                            attn=args.attn, compile=args.compile)
            sd = engine_run(engine, prompts, N, warm=cycle == 0)
            del engine  # one speculative engine's caches at a time
            ar.append(engine_run(ar_engine, prompts, N))
            p = Paired(sd, statistics.mean(a.tokens_per_s for a in ar[-2:]),
                       statistics.mean(a.tokens_per_s_median_step for a in ar[-2:]))
            runs[c].append(p)
            used = f" (used {sorted(set(sd.result.gammas))})" if c.gamma == "auto" else ""
            print(f"  cycle {cycle} {c.speculate} {c.draft_kv} budget={c.budget} gamma={c.gamma}{used}: "
                  f"{sd.tokens_per_s_median_step:.2f} tok/s at the median step, speedup {p.speedup:.2f} "
                  f"({p.speedup_wall:.2f} by wall time); CPU stolen {sd.cpu_stolen or 0:.0%}", flush=True)

    med, mean = statistics.median, statistics.mean
    sd, auto, samples = [], [], []
    for c, ps in sorted(runs.items(), key=lambda kv: kv[0].gamma == "auto"):  # fixed gammas first
        st = steps[c.speculate]
        rec = dict(batch_size=B, prefix=S, prompts=len(prompts), speculate=c.speculate, draft_kv=c.draft_kv,
                   budget=c.budget or None, gamma=c.gamma, tokens_per_s=med(p.sd.tokens_per_s for p in ps),
                   tokens_per_s_median_step=med(p.sd.tokens_per_s_median_step for p in ps),
                   ar_tokens_per_s=med(p.ar_tokens_per_s for p in ps),
                   ar_tokens_per_s_median_step=med(p.ar_tokens_per_s_median_step for p in ps),
                   speedup=med(p.speedup for p in ps), speedup_wall=med(p.speedup_wall for p in ps),
                   speedup_runs=[p.speedup for p in ps], cpu_stolen_runs=[p.sd.cpu_stolen for p in ps],
                   acceptance=mean(p.sd.result.acceptance for p in ps),
                   tokens_per_round=mean(p.sd.result.tokens_per_round for p in ps),
                   rounds=mean(p.sd.result.rounds for p in ps), **common.agreement(ps[0].sd.result.tokens, ar[0].result.tokens))
        if c.gamma == "auto":
            fixed = [r for r in sd if (r["speculate"], r["draft_kv"], r["budget"]) == (c.speculate, c.draft_kv, c.budget or None)]
            best = max(fixed, key=lambda r: r["speedup"])
            per_cycle = [p.speedup / s for p, s in zip(ps, best["speedup_runs"])]  # against the best, cycle by cycle
            # the choice of gammas free of timing noise: each run's rounds weighed by the timed step
            # costs, as predicted_speedup_batch weighs a fixed gamma's rounds
            by_rounds = [(N - 1) * batches / sum(round_cost(st, c, g) for g in p.sd.result.gammas) for p in ps]
            rec.update(start_gamma=[p.sd.result.gammas[0] for p in ps],
                       gammas_used=[{g: p.sd.result.gammas.count(g) for g in sorted(set(p.sd.result.gammas))} for p in ps],
                       best_fixed_gamma=best["gamma"], best_fixed_speedup=best["speedup"],
                       auto_over_best_fixed=med(per_cycle), auto_over_best_fixed_runs=per_cycle,
                       predicted_speedup_batch=med(by_rounds),
                       auto_over_best_fixed_by_rounds=med(by_rounds) / max(r["predicted_speedup_batch"] for r in fixed))
            auto.append(rec)
            print(f"  {c.speculate} {c.draft_kv} budget={c.budget} gamma=auto: speedup {rec['speedup']:.2f} = "
                  f"{rec['auto_over_best_fixed']:.3f} of the best fixed gamma ({best['gamma']}), "
                  f"{rec['auto_over_best_fixed_by_rounds']:.3f} by rounds weighed with the step times", flush=True)
            continue
        td = st["t_draft"]["full" if c.draft_kv == "full" else c.budget] / st["t_target"]
        tv = st["t_verify"][c.gamma] / st["t_target"]
        rec.update(t_draft_over_t_target=td, t_verify_over_t_target=tv,
                   predicted_speedup=costmodel.speedup(rec["acceptance"], c.gamma, td, tv),
                   # a static batch runs until its slowest row is done: what the batch gained per round
                   # stands in for Omega, max_new_tokens - 1 decode tokens per row over the rounds it took
                   predicted_speedup_batch=(N - 1) * batches / rec["rounds"] / round_cost(st, c, c.gamma),
                   max_seq_len=max_seq, kv_slots_read=read)
        sd.append(rec)
        print(f"  {c.speculate} {c.draft_kv} budget={c.budget} gamma={c.gamma}: speedup {rec['speedup']:.2f} at median "
              f"steps, {rec['speedup_wall']:.2f} by wall time; predicted {rec['predicted_speedup']:.2f} from step ratios, "
              f"{rec['predicted_speedup_batch']:.2f} with the rounds the batch took; acceptance {rec['acceptance']:.3f}, "
              f"T_D/T_T {td:.3f}, T_V/T_T {tv:.3f}, rows equal to AR {rec['rows_equal']:.2f}", flush=True)
    for mode, st in steps.items():
        a, da, i = model.args, (draft_model if mode == "draft" else model).args, dtype.itemsize
        samples += [(a, B, 1, read, i, st["t_target"])] + [(a, B, g + 1, read, i, t) for g, t in st["t_verify"].items()]
        samples += [(da, B, 1, read if b == "full" else b + max(gammas) + 1, i, t) for b, t in st["t_draft"].items()]
    ar_rec = dict(batch_size=B, prefix=S, prompts=len(prompts), tokens_per_s=med(a.tokens_per_s for a in ar),
                  tokens_per_s_median_step=med(a.tokens_per_s_median_step for a in ar),
                  tokens_per_s_runs=[a.tokens_per_s for a in ar],
                  tokens_per_s_median_step_runs=[a.tokens_per_s_median_step for a in ar],
                  cpu_stolen_runs=[a.cpu_stolen for a in ar], prefill_s=med(a.result.prefill_s for a in ar),
                  max_seq_len=max_seq, t_target_s={m: st["t_target"] for m, st in steps.items()})
    return Group(ar_rec, sd, auto, dict(batch_size=B, prefix=S, max_seq_len=max_seq, **steps), samples)


def planner_for(rec, hw, model, draft_model, itemsize, gammas=costmodel.GAMMAS):
    return costmodel.Planner(hw, model.args, rec["batch_size"], rec["kv_slots_read"], itemsize,
                             draft=draft_model.args if rec["speculate"] == "draft" else None,
                             draft_full_cache=rec["draft_kv"] == "full", gammas=gammas)


def gamma_choices(sd, hw, model, draft_model, itemsize):
    """Per batch, prefix and draft cache: the gamma the cost model picks at the measured acceptance,
    next to the gamma that measured fastest."""
    groups = {}
    for r in sd:
        groups.setdefault((r["batch_size"], r["prefix"], r["speculate"], r["draft_kv"], r["budget"]), []).append(r)
    out = []
    for rs in groups.values():
        alpha = statistics.mean(r["acceptance"] for r in rs)
        g, predicted = planner_for(rs[0], hw, model, draft_model, itemsize,
                                   tuple(sorted(r["gamma"] for r in rs))).choose_gamma(alpha, rs[0]["budget"] or 0)
        best = max(rs, key=lambda r: r["speedup"])
        out.append(dict({k: rs[0][k] for k in ("batch_size", "prefix", "speculate", "draft_kv", "budget")},
                        acceptance=alpha, model_gamma=g, model_speedup=predicted, measured_best_gamma=best["gamma"],
                        measured_best_speedup=best["speedup"],
                        measured_speedup_at_model_gamma=next(r["speedup"] for r in rs if r["gamma"] == g)))
        c = out[-1]
        print(f"B={c['batch_size']} S={c['prefix']} {c['speculate']} {c['draft_kv']} budget={c['budget']}: cost model "
              f"gamma {g} (measured speedup {c['measured_speedup_at_model_gamma']:.2f}), measured best gamma "
              f"{best['gamma']} ({best['speedup']:.2f})")
    return out


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="Speculative vs autoregressive decoding: batch x prefix x budget x gamma.")
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--draft_checkpoint_path", default=None, help="also sweep this standalone draft model")
    p.add_argument("--essays", default=common.ESSAYS)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="as generate.py --compile")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "math", "flex", "flash"], help="auto: as generate.py's")
    p.add_argument("--batch_sizes", type=ints, default=[1, 8])
    p.add_argument("--prefixes", type=ints, default=[512, 4096], help="prompt lengths in tokens")
    p.add_argument("--budgets", type=ints, default=[64, 256], help="draft budgets")
    p.add_argument("--gammas", type=lambda s: [x if x == "auto" else int(x) for x in s.split(",") if x],
                   default=[1, 2, 3, 4, "auto"], help="fixed gammas; auto: --gamma auto choosing among them")
    p.add_argument("--draft_kv", type=lambda s: s.split(","), default=["streaming", "snapkv"],
                   help="draft caches: streaming,snapkv (full: a standalone draft's own full cache)")
    p.add_argument("--prompt_pool", type=int, default=0,
                   help="run every batch size over the same P prompts, in P / batch consecutive batches, so that "
                        "acceptance is alike across batch sizes (0: each batch size its own rows)")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens per row (no EOS stop)")
    p.add_argument("--repeats", type=int, default=3, help="cycles over all configurations")
    p.add_argument("--step_repeats", type=int, default=5, help="cycles of the step timings")
    p.add_argument("--json", default=None, help="default: benchmarks/results/sweep-<time>.json")
    args = p.parse_args(argv)
    if not [g for g in args.gammas if g != "auto"]:
        p.error("--gammas needs a fixed gamma (auto chooses among the fixed ones)")
    if min(args.budgets) <= SpecArgs().sinks:
        p.error(f"--budgets must exceed the {SpecArgs().sinks} sink tokens of a StreamingLLM draft cache")
    if args.prompt_pool and any(args.prompt_pool % B for B in args.batch_sizes):
        p.error(f"--prompt_pool {args.prompt_pool} is not a multiple of every batch size {args.batch_sizes}")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    args.attn = auto_attn(device, dtype, args.compile) if args.attn == "auto" else args.attn
    tok = load_tokenizer(args.checkpoint_path)
    model = load_model(args.checkpoint_path, device, dtype)
    draft_model = load_model(args.draft_checkpoint_path, device, dtype) if args.draft_checkpoint_path else None
    hw = costmodel.measure_hardware(device, dtype, ops_per_layer=10 if args.compile else 40)
    groups = [sweep_group(args, model, draft_model, common.essay_prompts(tok, max(B, args.prompt_pool), S, args.essays),
                          B, S, dtype) for B in args.batch_sizes for S in args.prefixes]
    sd = [r for g in groups for r in g.sd]
    hw_fit = costmodel.fit_overhead(hw, [s for g in groups for s in g.samples])
    for r in sd:  # the cost model's ratios and speedup, at the measured acceptance
        td, tv = planner_for(r, hw_fit, model, draft_model, dtype.itemsize).ratios(r["gamma"], r["budget"] or 0)
        r.update(model_t_draft_over_t_target=td, model_t_verify_over_t_target=tv,
                 model_speedup=costmodel.speedup(r["acceptance"], r["gamma"], td, tv))
    choices = gamma_choices(sd, hw_fit, model, draft_model, dtype.itemsize)
    path = args.json or os.path.join(common.RESULTS, f"sweep-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    common.write_json(path, dict(env=common.environment(device), settings=vars(args), ar=[g.ar for g in groups], sd=sd,
                                   gamma_auto=[r for g in groups for r in g.auto], steps=[g.steps for g in groups],
                                   gamma_choices=choices, costmodel=dict(measured=vars(hw), fitted=vars(hw_fit))))


if __name__ == "__main__":
    main()
