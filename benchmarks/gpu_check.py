"""The prepared GPU check: what this engine does on one GPU at large batch x long context.

    python -m benchmarks.gpu_check [--phases preflight,ar,ratios,sd,stream,serving] [--out PATH] [--budget_s 450]
    python -m benchmarks.gpu_check --smoke      # the same code on tiny shapes, on the CPU (CI runs it)

Phases, in order of importance, each written to the JSON as soon as it ends (a run stopped at its
time limit keeps what it finished; a second run with other phases adds to the same file). Every
shape runs in isolation: an exception is recorded under "failures" with its traceback, and the
check moves on to the next shape.
  preflight  first, under a minute: compiles, captures and replays every step kind once (prefill
          chunk, AR decode, draft, verify, refill of a slot, a whole speculative generation) with
          each attention backend, at small real shapes (SmolLM2's, random weights); each step's
          pass or fail goes under "preflight"
  ar      AR decode step time against copy bandwidth (weights + KV bytes per step over the step
          time), per attention backend, random weights: SmolLM2 at B=1 x 512, 64 x 8K, 256 x 8K and
          Llama-3.1-8B at B=1 x 4K, 16 x 32K (8 x 32K where the GPU has under 100 GB); the batch-1
          rows also with weight-only int8 and int4 weights (--quantize)
  ratios  Llama-3.1-8B at 16 x 32K: T_D/T_T (StreamingLLM budget 512) and T_V/T_T per gamma, and the
          speedup they predict with MagicDec's published acceptance 0.81 (32K, budget 512); a scored
          verify over a plain one (--draft_reselect); T_D/T_T with an int4 draft (--draft_quantize)
  sd      SmolLM2 with its real weights on essay prompts, greedy, 256 new tokens: AR against
          self-speculation (StreamingLLM 256) end to end at B=64 and 256 x 8K, with each shape's
          measured step ratios
  stream  SmolLM2, 128 essay requests (prompts 1K-4K tokens, 32-512 new) through 64 slots: static
          waves against continuous batching, AR and SD (python -m benchmarks.stream)
  serving the same requests over HTTP through server.py at 64 slots, AR and SD, all at once and at 8
          requests/s: throughput, TTFT and TPOT percentiles (python -m benchmarks.serving)
Every engine compiles (one shared block per step kind) and replays its steps as CUDA graphs. A
phase is skipped once the time budget would be overrun, and says so in the JSON.
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

import torch
from torch._dynamo.utils import counters

import costmodel
from benchmarks.common import NO_EOS, ROOT, SMOLLM2, agreement, environment, essay_prompts, random_model, write_json
from checkpoint import load_model
from engine import Engine, Request, SpecArgs, generate, serve, sync
from model import default_group_size, flash_attn_with_kvcache, quantized_copy
from spec import RowSampling, Sampling
from tokenizer import load_tokenizer

GREEDY = Sampling()
RESELECT_EVERY = 4  # --draft_reselect in the SD row with re-selection
QUANT_AR = ("int8", "int4")  # the AR rows at batch 1 also run with these weights
MAGICDEC_ALPHA_8B_32K = 0.81  # Llama-3.1-8B self-speculation, budget 512, 32K (MagicDec, arXiv 2408.11049)
PHASE_KEYS = {"preflight": ["preflight"], "ar": ["ar", "attn_default"], "ratios": ["step_ratios", "predicted_speedup_8b"], "sd": ["sd"],
              "stream": ["stream"], "serving": ["serving"]}


def greedy(cur):  # GREEDY for each row of a step's input, as a step takes it
    return RowSampling.of(GREEDY, cur.shape[0], cur.device)


def sizes(smoke, big_gpu):
    """Shapes per phase: the full check, or tiny ones for the CPU smoke run."""
    if smoke:
        return dict(preflight=("tiny", 2, 128), ar=[("tiny", 1, 256), ("tiny", 4, 512)], ratios=("tiny", 2, 512), ratio_gammas=(2, 4),
                    ratio_budget=64, sd=[(2, 128)], sd_new=8, sd_gammas=(2,), sd_budget=32, repeats=3,
                    stream=dict(n=5, slots=2, prompt_lens=(20, 60), new_tokens=(2, 12)),
                    serving=dict(n=4, slots=2, rates="4,inf", prompt_lens=(16, 48), new_tokens=(4, 12)))
    return dict(preflight=("smollm2-135m", 2, 256), ar=[("smollm2-135m", 1, 512), ("smollm2-135m", 64, 8192), ("smollm2-135m", 256, 8192),
                    ("llama-3.1-8b", 1, 4096), ("llama-3.1-8b", 16 if big_gpu else 8, 32768)],
                ratios=("llama-3.1-8b", 16 if big_gpu else 8, 32768), ratio_gammas=(2, 4), ratio_budget=512,
                sd=[(64, 8192), (256, 8192)], sd_new=256, sd_gammas=(3, 5), sd_budget=256, repeats=10,
                stream=dict(n=128, slots=64, prompt_lens=(1024, 4096), new_tokens=(32, 512)),
                serving=dict(n=128, slots=64, rates="8,inf", prompt_lens=(1024, 4096), new_tokens=(32, 512)))


class Run:
    """The record being built, the clock against the budget, and the compile bookkeeping."""

    def __init__(self, args, device, dtype):
        self.args, self.device, self.dtype = args, device, dtype
        self.t0 = time.perf_counter()
        self.rec = dict(environment(device), dtype=str(dtype), smoke=args.smoke, preflight=[], ar=[], sd=[],
                        step_ratios=[], compile_s=0.0, capture_s=0.0, recompiles=0, skipped=[], failures=[], runs=[])
        if os.path.exists(args.out):  # an earlier run's phases stay, and its compile figures add up
            with open(args.out) as f:
                old = json.load(f)
            for phase, keys in PHASE_KEYS.items():
                if phase not in args.phases:
                    self.rec.update({k: old[k] for k in keys if k in old})
            for k in ("compile_s", "capture_s", "recompiles", "runs", "failures"):
                self.rec[k] = old.get(k, self.rec[k])
        self.rec["runs"].append(dict(phases=args.phases, date=self.rec["date"], commit=self.rec["commit"]))

    def isolated(self, what, fn):
        """fn(), or None with its exception recorded (and the memory it held freed): one shape's bug
        must not cost the shapes after it."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  (anything a shape raises is a finding to record)
            self.rec["failures"].append(dict(what=what, error=f"{type(e).__name__}: {e}"[:2000],
                                             traceback=traceback.format_exc()[-8000:]))
            print(f"FAILED {what}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            free(self.device)
            self.save()
            return None

    def elapsed(self):
        return time.perf_counter() - self.t0

    def room_for(self, seconds, what):
        if self.elapsed() + seconds <= self.args.budget_s:
            return True
        self.rec["skipped"].append(f"{what}: not started at {self.elapsed():.0f} s (budget {self.args.budget_s} s)")
        print("skip:", self.rec["skipped"][-1], flush=True)
        return False

    def first_call(self, fn):
        """fn(), counted as compile time (less the graph captures it made, counted apart)."""
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        return out, time.perf_counter() - t

    def engine(self, model, B, S, sa=None, attn="sdpa", chunk=512, draft_model=None):
        return Engine(model, B, S, sa=sa, draft_model=draft_model, attn=attn, compile=True, prefill_chunk=chunk,
                      backend="aot_eager" if self.args.smoke else "inductor")

    def add_graph_times(self, engine, first_s):
        self.rec["capture_s"] += engine.capture_s
        self.rec["compile_s"] += max(first_s - engine.capture_s, 0.0)

    def save(self):
        self.rec["runs"][-1]["elapsed_s"] = self.elapsed()
        write_json(self.args.out, self.rec)

    def median(self, fn):
        return costmodel.median_time(fn, self.device, self.args.repeats, warmup=2,
                                     inner=20 if self.device.type == "cuda" else 1)


def free(device):
    gc.collect()  # an engine's caches and graphs go before the next shape allocates its own
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def phase_preflight(run, name, B, S, backends):
    """Every step kind once, compiled, captured and replayed, per attention backend: the bugs that
    would otherwise surface one expensive shape at a time, found in the first minute."""
    model = run.isolated(f"preflight: random {name}", lambda: random_model(name, run.device, run.dtype))
    if model is None:
        return
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, model.args.vocab_size, (n,), generator=g).tolist() for n in (S // 2, S // 4)][:B]
    prompts += [prompts[0]] * (B - len(prompts))
    cur = torch.ones(B, dtype=torch.long, device=run.device)
    pos = torch.full((B,), S // 2, device=run.device)
    sa = SpecArgs("self", gamma=2, draft_kv="streaming", draft_budget=S // 4, sinks=4)
    for attn in backends:
        def step(kind, fn, repeat=2):
            def go():
                t = time.perf_counter()
                for _ in range(repeat):  # the first call compiles (and on CUDA captures), the next replays
                    fn()
                sync(run.device)
                return time.perf_counter() - t
            seconds = run.isolated(f"preflight {attn} {kind}", go)
            run.rec["preflight"].append(dict(attn=attn, step=kind, ok=seconds is not None, seconds=seconds))
            print(f"preflight {attn} {kind}: {'ok' if seconds is not None else 'FAILED'}", flush=True)

        def engines():
            return run.engine(model, B, S, attn=attn, chunk=S // 4), run.engine(model, B, S, sa, attn=attn, chunk=S // 4)
        made = run.isolated(f"preflight {attn} engines", engines)
        if made is None:
            continue
        ar, sd = made
        tokens = torch.tensor([p + [0] * (S // 2 - len(p)) for p in prompts], device=run.device)
        lens = torch.tensor([len(p) for p in prompts], device=run.device)
        step("prefill chunk", lambda: ar.prefill(tokens, lens), repeat=1)
        step("decode", lambda: ar.decode(cur, pos, greedy(cur)))
        step("self-speculation draft setup", lambda: (sd.prefill(tokens, lens), sd.setup_draft(tokens, lens)), repeat=1)
        step("draft", lambda: sd.draft(cur[:, None], pos[:, None], greedy(cur)))
        step("verify", lambda: sd.verify(cur, cur[:, None].expand(-1, 2).contiguous(), None, pos, greedy(cur)))
        step("scored verify", lambda: sd.verify(cur, cur[:, None].expand(-1, 2).contiguous(), None, pos, greedy(cur),
                                                scored=True))
        step("refill", lambda: sd.refill(1, prompts[1]), repeat=1)
        requests = [Request(i, p[:S // 8], 6) for i, p in enumerate(prompts * 2)]
        step("request stream (refills, rounds)", lambda: serve(sd, requests, NO_EOS, GREEDY, lambda *a: None), repeat=1)
        step("speculative generation", lambda: generate(sd, [p[:S // 8] for p in prompts], 8, NO_EOS, GREEDY), repeat=1)
        del ar, sd
        free(run.device)
    run.save()


@torch.no_grad()
def ar_shape(run, hw, model, name, B, S, attn):
    """One AR row; model may be quantized (model.quantization says how), its row says so."""
    engine = run.engine(model, B, S, attn=attn)
    cur = torch.ones(B, dtype=torch.long, device=run.device)
    pos = torch.full((B,), S - 1, device=run.device)  # the step reads all S positions
    _, first = run.first_call(lambda: engine.decode(cur, pos, greedy(cur)))
    run.add_graph_times(engine, first)
    t = run.median(lambda: engine.decode(cur, pos, greedy(cur)))
    a = model.args
    moved = costmodel.round_bytes(a, batch=B, slots=S, itemsize=run.dtype.itemsize, quantization=model.quantization)
    row = dict(model=name, batch_size=B, context=S, attn=attn, quantization=model.quantization, step_ms=t * 1e3,
               bytes_per_step=moved,
               bandwidth_GBps=moved / t / 1e9, bandwidth_fraction=moved / t / hw.bandwidth,
               tokens_per_s=B / t, first_call_s=first)
    run.rec["ar"].append(row)
    print(f"AR {name} B={B} x {S} {attn} {model.quantization[0]}: {row['step_ms']:.3f} ms, {row['bandwidth_GBps']:.0f} GB/s = "
          f"{row['bandwidth_fraction']:.2f} of copy bandwidth", flush=True)


def phase_ar(run, hw, shapes, backends):
    model, name_loaded = None, None
    for name, B, S in shapes:
        if name != name_loaded:
            model, name_loaded = None, None
            free(run.device)
            model = run.isolated(f"ar: random {name}", lambda: random_model(name, run.device, run.dtype))
            name_loaded = name if model is not None else None
        if model is None:
            continue
        for attn in backends:
            if run.room_for(30, f"ar {name} B={B} S={S} {attn}"):
                run.isolated(f"ar {name} B={B} S={S} {attn}", lambda: ar_shape(run, hw, model, name, B, S, attn))
                free(run.device)
                run.save()
        if B == 1:  # weight-only int8 / int4 (--quantize), where the weights are what a step reads
            for scheme in QUANT_AR:
                what = f"ar {name} B={B} S={S} {backends[0]} {scheme}"
                if run.room_for(30, what):
                    run.isolated(what, lambda: ar_shape(run, hw, quantized_copy(model, scheme, group_size(model, scheme)),
                                                        name, B, S, backends[0]))
                    free(run.device)
                    run.save()
    return model, name_loaded


def group_size(model, scheme):
    return default_group_size(model.args) if scheme == "int4" else 0


def fastest_backend(run, backends):
    """The backend of the fastest AR step at the largest SmolLM2-shaped (or only) batch measured."""
    rows = [r for r in run.rec["ar"] if r["attn"] in backends]
    if not rows:
        return backends[0]
    key = max((r["batch_size"], r["context"]) for r in rows if r["model"] == rows[0]["model"])
    return min((r for r in rows if (r["batch_size"], r["context"]) == key), key=lambda r: r["step_ms"])["attn"]


@torch.no_grad()
def step_ratios(run, engine, pos, gammas):
    """T_T, T_V(gamma) / T_T and T_D / T_T on engine's caches, queries at positions pos [B]."""
    B = pos.shape[0]
    cur = torch.ones(B, dtype=torch.long, device=run.device)
    t_t = run.median(lambda: engine.decode(cur, pos, greedy(cur)))
    t_v = {}
    for g in gammas:
        drafts = torch.ones(B, g, dtype=torch.long, device=run.device)
        t_v[g] = run.median(lambda: engine.verify(cur, drafts, None, pos, greedy(cur))) / t_t
    t_d = run.median(lambda: engine.draft(cur[:, None], pos[:, None], greedy(cur))) / t_t
    return t_t, t_v, t_d


def predicted_speedups(t_v, t_d, alpha, gammas=range(1, 9)):
    """MagicDec's speedup model, T_V/T_T taken linear in gamma through the measured points."""
    (g0, v0), (g1, v1) = sorted(t_v.items())[0], sorted(t_v.items())[-1]
    slope = (v1 - v0) / (g1 - g0) if g1 != g0 else 0.0
    return {g: costmodel.speedup(alpha, g, t_d, v0 + slope * (g - g0)) for g in gammas}


def phase_ratios(run, model, name, B, S, gammas, budget, attn):
    if model is not None and run.room_for(60, f"ratios {name} B={B} S={S}"):
        run.isolated(f"ratios {name} B={B} S={S}", lambda: ratios_shape(run, model, name, B, S, gammas, budget, attn))
        free(run.device)
        run.save()


@torch.no_grad()
def ratios_shape(run, model, name, B, S, gammas, budget, attn):
    sa = SpecArgs("self", gamma=max(gammas), draft_kv="streaming", draft_budget=budget, gamma_max=max(gammas))
    engine = run.engine(model, B, S, sa, attn=attn)
    pos = torch.full((B,), S - max(gammas) - 1, device=run.device)
    engine.draft_cache.fill(engine.cache, pos)  # sinks + window over a context of pos
    t = time.perf_counter()
    t_t, t_v, t_d = step_ratios(run, engine, pos, gammas)
    run.add_graph_times(engine, time.perf_counter() - t)  # the warm-up calls compiled: an upper bound
    predicted = predicted_speedups(t_v, t_d, MAGICDEC_ALPHA_8B_32K)
    best = max(predicted, key=predicted.get)
    row = dict(model=name, batch_size=B, context=S, attn=attn, draft_budget=budget, t_target_ms=t_t * 1e3,
               t_verify_over_t_target=t_v, t_draft_over_t_target=t_d, alpha=MAGICDEC_ALPHA_8B_32K,
               predicted_speedup_by_gamma=predicted)
    g = max(gammas)
    drafts = torch.ones(B, g, dtype=torch.long, device=run.device)
    cur = torch.ones(B, dtype=torch.long, device=run.device)
    t_scored = run.median(lambda: engine.verify(cur, drafts, None, pos, greedy(cur), scored=True)) / t_t
    row.update(gamma_scored=g, t_scored_verify_over_t_verify=t_scored / t_v[g])  # --draft_reselect's extra cost
    del engine
    free(run.device)
    # the same draft step with an int4 copy of the weights (--draft_quantize int4): a second engine,
    # built after the first is freed (two target caches of this shape may not fit)
    engine = run.engine(model, B, S, sa, attn=attn, draft_model=quantized_copy(model, "int4", group_size(model, "int4")))
    engine.draft_cache.fill(engine.cache, pos)
    t_t4 = run.median(lambda: engine.decode(cur, pos, greedy(cur)))
    row.update(t_draft_int4_over_t_target=run.median(lambda: engine.draft(cur[:, None], pos[:, None], greedy(cur))) / t_t4)
    row["predicted_speedup_int4_draft_by_gamma"] = predicted_speedups(t_v, row["t_draft_int4_over_t_target"],
                                                                      MAGICDEC_ALPHA_8B_32K)
    run.rec["step_ratios"].append(row)
    run.rec["predicted_speedup_8b"] = dict(speedup=predicted[best], gamma=best, batch_size=B, context=S,
                                           alpha=MAGICDEC_ALPHA_8B_32K, draft_budget=budget)
    print(f"ratios {name} B={B} x {S}: T_T {t_t * 1e3:.2f} ms, T_V/T_T {t_v}, T_D/T_T {t_d:.3f}, scored verify "
          f"{t_scored / t_v[g]:.3f} of a verify; predicted speedup {predicted[best]:.2f} at gamma {best}; int4 draft "
          f"T_D/T_T {row['t_draft_int4_over_t_target']:.3f}", flush=True)


def phase_sd(run, cases, new, gammas, budget, attn):
    if not os.path.exists(os.path.join(SMOLLM2, "model.pth")):
        run.rec["skipped"].append(f"sd: no SmolLM2 checkpoint in {SMOLLM2}")
        print("skip:", run.rec["skipped"][-1], flush=True)
        return
    loaded = run.isolated("sd: load SmolLM2", lambda: (load_model(SMOLLM2, run.device, run.dtype), load_tokenizer(SMOLLM2)))
    if loaded is None:
        return
    for B, S in cases:
        if run.room_for(120, f"sd B={B} S={S}"):
            run.isolated(f"sd B={B} S={S}", lambda: sd_shape(run, *loaded, B, S, new, gammas, budget, attn))
            free(run.device)
            run.save()


@torch.no_grad()
def sd_shape(run, model, tok, B, S, new, gammas, budget, attn):
    prompts = essay_prompts(tok, B, S - new, overlap=True)
    chunk = max(16, min(512, 32768 // B))  # prefill activations and SDPA's mask stay within a few GB
    warm = [p[:8] for p in prompts]
    runs = {}
    # (gamma, re-selection interval): AR, each gamma with a static draft, the first with re-selection
    configs = [(0, 0)] + [(g, 0) for g in gammas]
    if B == min(b for b, _ in run.sd_cases):
        configs.append((gammas[0], RESELECT_EVERY))
    for g, every in configs:
        if g and not run.room_for(60, f"sd B={B} S={S} gamma {g} reselect {every}"):
            continue
        sa = SpecArgs("self", gamma=g, draft_kv="streaming", draft_budget=budget, reselect=every) if g else None
        engine = run.engine(model, B, S, sa, attn=attn, chunk=chunk)
        # compiles and captures every step kind the run uses: enough rounds to reach a scored verify
        _, first = run.first_call(lambda: generate(engine, warm, (every + 1) * (g + 1) + 2, NO_EOS, GREEDY))
        run.add_graph_times(engine, first)
        before = counters["stats"]["unique_graphs"]
        with torch.compiler.set_stance("fail_on_recompile"):
            res = generate(engine, prompts, new, NO_EOS, GREEDY)
        run.rec["recompiles"] += counters["stats"]["unique_graphs"] - before
        runs[g, every] = res
        ar = runs.get((0, 0))
        row = dict(model="smollm2-135m", batch_size=B, prefix=S - new, new_tokens=new, gamma=g, draft_reselect=every,
                   draft_budget=budget if g else None, attn=attn, prefill_s=res.prefill_s,
                   tokens_per_s=res.tokens_per_s)
        if g and ar is not None:
            pos = torch.full((B,), S - new, device=run.device)
            _, t_v, t_d = step_ratios(run, engine, pos, (g,))
            row.update(acceptance=res.acceptance, tokens_per_round=res.tokens_per_round, rounds=res.rounds,
                       ar_tokens_per_s=ar.tokens_per_s, sd_tokens_per_s=res.tokens_per_s,
                       speedup=res.tokens_per_s / ar.tokens_per_s, t_draft_over_t_target=t_d,
                       t_verify_over_t_target=t_v[g], **agreement(res.tokens, ar.tokens))
            run.rec["sd"].append(row)
            print(f"SD B={B} x {S} gamma {g} reselect {every}: {res.tokens_per_s:.0f} tok/s against AR {ar.tokens_per_s:.0f}: "
                  f"{row['speedup']:.2f}x, acceptance {res.acceptance:.3f}, T_D/T_T {t_d:.3f}, "
                  f"T_V/T_T {t_v[g]:.3f}, rows equal to AR {row['rows_equal']:.2f}", flush=True)
        else:
            print(f"AR B={B} x {S}: {res.tokens_per_s:.0f} tok/s, prefill {res.prefill_s:.1f} s", flush=True)
        del engine
        free(run.device)
        run.save()


def phase_stream(run, cfg, gamma, budget, attn):
    """The stream benchmark (python -m benchmarks.stream) at the check's slot count, in a process of
    its own: its engines and graphs go with it."""
    if not os.path.exists(os.path.join(SMOLLM2, "model.pth")) or not run.room_for(150, "stream"):
        return

    def stream():
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "stream.json")
            cmd = [sys.executable, "-m", "benchmarks.stream", "--requests", str(cfg["n"]), "--slots", str(cfg["slots"]),
                   "--prompt_lens", ",".join(map(str, cfg["prompt_lens"])), "--new_tokens",
                   ",".join(map(str, cfg["new_tokens"])), "--gamma", str(gamma), "--draft_budget", str(budget),
                   "--cycles", "1", "--device", run.device.type, "--dtype", str(run.dtype).split(".")[1],
                   "--attn", attn, "--backend", "aot_eager" if run.args.smoke else "inductor", "--json", out]
            subprocess.run(cmd, cwd=ROOT, check=True, timeout=max(run.args.budget_s - run.elapsed(), 60))
            with open(out) as f:
                rec = json.load(f)
        run.rec["compile_s"] += rec["warmup_s"]
        run.rec["stream"] = dict(cfg, gamma=gamma, draft_budget=budget, attn=attn, warmup_s=rec["warmup_s"],
                                 ratios=rec["ratios"], runs=[{k: v for k, v in r.items() if k != "timeline"}
                                                              for r in rec["runs"]])
    run.isolated("stream", stream)
    run.save()


def phase_serving(run, cfg, gamma, budget):
    """The serving benchmark (python -m benchmarks.serving): server.py processes, AR and SD at the
    check's slot count, driven over HTTP at each rate, one cycle; compiled with CUDA graphs on the GPU
    (eager in the smoke run)."""
    if not os.path.exists(os.path.join(SMOLLM2, "model.pth")) or not run.room_for(240, "serving"):
        return

    def serving():
        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "serving.json")
            cmd = [sys.executable, "-m", "benchmarks.serving", "--slots", str(cfg["slots"]), "--rates", cfg["rates"],
                   "--requests", str(cfg["n"]), "--prompt_lens", ",".join(map(str, cfg["prompt_lens"])),
                   "--new_tokens", ",".join(map(str, cfg["new_tokens"])), "--gamma", str(gamma),
                   "--draft_budget", str(budget), "--cycles", "1", "--device", run.device.type,
                   "--dtype", str(run.dtype).split(".")[1], "--prefill_chunk", "512" if not run.args.smoke else "64",
                   "--compile" if not run.args.smoke else "--no-compile", "--json", out, "--plots", ""]
            subprocess.run(cmd, cwd=ROOT, check=True, timeout=max(run.args.budget_s - run.elapsed(), 60))
            with open(out) as f:
                rec = json.load(f)
        run.rec["serving"] = dict(cfg, gamma=gamma, draft_budget=budget, servers=rec["servers"], summary=rec["summary"],
                                  runs=[{k: v for k, v in r.items() if k != "per_request"} for r in rec["runs"]])
    run.isolated("serving", serving)
    run.save()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phases", default="preflight,ar,ratios,sd,stream,serving",
                   help="comma-separated: preflight, ar, ratios, sd, stream, serving")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code, measures nothing")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu-<device>-<date>.json)")
    p.add_argument("--budget_s", type=float, default=450, help="start no phase step that would end past this")
    p.add_argument("--backends", default="sdpa,flex", help="attention backends the AR phase compares")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    unknown = set(args.phases) - set(PHASE_KEYS)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    device = torch.device("cpu" if args.smoke else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device (use --smoke to check the code on the CPU)")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    backends = [b for b in args.backends.split(",") if b]
    big_gpu = device.type == "cuda" and torch.cuda.get_device_properties(device).total_memory > 100e9
    sz = sizes(args.smoke, big_gpu)
    args.repeats = sz["repeats"]
    if args.out is None:
        tag = "smoke" if args.smoke else torch.cuda.get_device_name(device).split()[-1].lower()
        args.out = os.path.join(ROOT, "benchmarks", "results", f"gpu-{tag}-{time.strftime('%Y%m%d')}.json")
    run = Run(args, device, dtype)
    hw = costmodel.measure_hardware(device, dtype, copy_bytes=(1 << 20) if args.smoke else 0, matmul_n=64 if args.smoke else 0)
    run.rec.update(copy_bandwidth_GBps=hw.bandwidth / 1e9, matmul_TFLOPs=hw.flops / 1e12)
    print(f"{run.rec['device']}: copy bandwidth {hw.bandwidth / 1e9:.0f} GB/s, matmul {hw.flops / 1e12:.0f} TFLOP/s",
          flush=True)
    if flash_attn_with_kvcache is not None and device.type == "cuda":
        backends.append("flash")
    model = name = None
    if "preflight" in args.phases:
        phase_preflight(run, *sz["preflight"], backends)
    if "ar" in args.phases:
        model, name = phase_ar(run, hw, sz["ar"], backends)
        run.rec["attn_default"] = fastest_backend(run, backends)
    attn = run.rec.get("attn_default") or ("flex" if "flex" in backends else backends[0])
    if "ratios" in args.phases:
        r_name, B, S = sz["ratios"]
        if name != r_name:
            model = None
            free(device)
            model = run.isolated(f"ratios: random {r_name}", lambda: random_model(r_name, device, dtype))
        phase_ratios(run, model, r_name, B, S, sz["ratio_gammas"], sz["ratio_budget"], attn)
    model = None
    free(device)
    run.sd_cases = sz["sd"]
    if "sd" in args.phases:
        phase_sd(run, sz["sd"], sz["sd_new"], sz["sd_gammas"], sz["sd_budget"], attn)
    if "stream" in args.phases:
        phase_stream(run, sz["stream"], sz["sd_gammas"][0], sz["sd_budget"], attn)
    if "serving" in args.phases:
        phase_serving(run, sz["serving"], sz["sd_gammas"][0], sz["sd_budget"])
    run.save()
    print(f"done in {run.elapsed():.0f} s: compile {run.rec['compile_s']:.0f} s, capture {run.rec['capture_s']:.1f} s, "
          f"recompiles {run.rec['recompiles']}, failures {len(run.rec['failures'])}", flush=True)


if __name__ == "__main__":
    main()
