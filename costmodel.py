# Roofline cost model of one forward step and the MagicDec speedup model on top of it, for choosing
# gamma and the draft budget. Decode is memory-bound, so a step costs the larger of (bytes moved /
# bandwidth) and (FLOPs / FLOP rate), plus a per-layer launch overhead that neither term explains.
# "slots" below are the cache entries a step reads: with SDPA the static cache in full behind its
# mask (max_seq_len; budget + gamma + 1 for a sparse draft), with FlexAttention the 128-wide blocks
# up to the query position.
import statistics
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from kv_cache import DraftLayout, kv_bytes
from model import ModelArgs

# Prior per-token acceptance of self-speculation against the StreamingLLM draft budget, measured for
# SmolLM2-135M-Instruct on 4K-token essay prompts (gamma 4, refresh on; benchmarks/acceptance.py,
# benchmarks/results/acceptance_smollm2_4k.json). Its keys are the budgets --draft_budget auto
# considers. Other models and texts differ (MagicDec reports about 0.8 at budget 512 for
# Llama-3.1-8B); --gamma auto then corrects gamma from the acceptance it measures.
PRIOR_ACCEPTANCE = {128: 0.889, 256: 0.910, 512: 0.944, 1024: 0.939}
GAMMAS = tuple(range(1, 9))  # the gammas --gamma auto chooses among
LOGIT_PASSES = 4  # fp32 logits are written, then read again by argmax/softmax and the acceptance test


@dataclass
class Hardware:
    bandwidth: float  # bytes/s: a large device copy, read + write
    flops: float  # matmul FLOP/s in the model dtype
    layer_overhead: float = 0.0  # seconds per layer per forward (kernel launches, Python dispatch)


def median_time(fn, device, repeats=5, warmup=1, inner=1):
    """Median seconds per call over `repeats` timings of `inner` back-to-back calls, after `warmup`
    calls (the first pays allocation and kernel selection)."""
    cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            if cuda:
                torch.compiler.cudagraph_mark_step_begin()  # a previous replay's outputs are not read again
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def measure_hardware(device, dtype, copy_bytes=0, matmul_n=0, repeats=5, ops_per_layer=40) -> Hardware:
    """Micro-benchmarks: copy bandwidth, matmul FLOP/s, and the latency of a tiny op times the ops a
    layer launches (about 40 eager; pass fewer for compiled steps, ~0 for CUDA graphs). The default
    sizes saturate a GPU and take about a second on one CPU core."""
    cuda = torch.device(device).type == "cuda"
    copy_bytes = copy_bytes or (1 << 30 if cuda else 128 << 20)
    matmul_n = matmul_n or (8192 if cuda else 1024)
    x = torch.empty(copy_bytes // dtype.itemsize, dtype=dtype, device=device)
    y = torch.empty_like(x)
    bw = 2 * copy_bytes / median_time(lambda: y.copy_(x), device, repeats)
    a = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    b = torch.randn(matmul_n, matmul_n, device=device).to(dtype)
    flops = 2 * matmul_n ** 3 / median_time(lambda: a @ b, device, repeats)
    t = torch.zeros(8, device=device)
    launch = median_time(lambda: [t.add_(1) for _ in range(200)], device, repeats) / 200
    return Hardware(bw, flops, launch * ops_per_layer)


def step_cost(a: ModelArgs, batch: int, tokens: int, slots: int, itemsize: int, quantization=("none", 0)):
    """(bytes, FLOPs) of one forward of `tokens` new tokens per row against `slots` cache slots, its
    matrices stored as quantization (scheme, group size) says (ModelArgs.matmul_bytes)."""
    nbytes = a.matmul_bytes(itemsize, *quantization) + kv_bytes(a.n_layer, batch, a.n_kv_head, slots, a.head_dim, itemsize) \
        + LOGIT_PASSES * 4 * batch * tokens * a.vocab_size
    attn = 4 * batch * a.n_head * tokens * slots * a.head_dim * a.n_layer  # QK^T and PV
    return nbytes, 2 * batch * tokens * a.n_matmul_params() + attn


def step_time(hw: Hardware, a: ModelArgs, batch: int, tokens: int, slots: int, itemsize: int,
              quantization=("none", 0)) -> float:
    nbytes, flops = step_cost(a, batch, tokens, slots, itemsize, quantization)
    return max(nbytes / hw.bandwidth, flops / hw.flops) + hw.layer_overhead * a.n_layer


def fit_overhead(hw: Hardware, samples) -> Hardware:
    """samples: (ModelArgs, batch, tokens, slots, itemsize, measured seconds). Keeps bandwidth and
    FLOP/s and sets the per-layer overhead to the median unexplained time (never negative)."""
    rest = [(t - step_time(replace(hw, layer_overhead=0.0), a, b, n, s, i)) / a.n_layer for a, b, n, s, i, t in samples]
    return replace(hw, layer_overhead=max(0.0, statistics.median(rest)))


def omega(alpha: float, gamma: int) -> float:
    """Expected tokens per round (accepted drafts + the target's own token) at per-token acceptance alpha."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1 - alpha ** (gamma + 1)) / (1 - alpha)


def speedup(alpha: float, gamma: int, td_tt: float, tv_tt: float) -> float:
    """SD throughput over autoregressive decoding: Omega / (gamma * T_D/T_T + T_V/T_T)."""
    return omega(alpha, gamma) / (gamma * td_tt + tv_tt)


def prior_acceptance(budget: int, context: int) -> float:
    """Prior acceptance for a sparse self-speculation draft; a budget covering the context sees it all."""
    if budget >= context:
        return 0.99
    keys = sorted(PRIOR_ACCEPTANCE)
    below = max([k for k in keys if k <= budget], default=keys[0])
    return PRIOR_ACCEPTANCE[below]


@dataclass
class Planner:
    """Chooses gamma (and the draft budget) for one batch size and cache length by predicted speedup."""
    hw: Hardware
    target: ModelArgs
    batch: int
    slots: int  # target cache slots one step reads
    itemsize: int
    draft: Optional[ModelArgs] = None  # None: self-speculation (the target's weights, a sparse cache)
    draft_full_cache: bool = False  # a standalone draft reading its own full cache
    quantization: tuple = ("none", 0)  # (scheme, group size) of the target's matrices
    draft_quantization: tuple = ("none", 0)  # self-speculation with a quantized copy of the target's matrices
    gammas: tuple = GAMMAS
    alpha: float = 0.9  # the acceptance estimate the starting gamma was chosen with
    measured: Optional[tuple] = None  # (t_target, t_verify, its gamma, t_draft, its budget), see calibrate

    def calibrate(self, t_target: float, t_verify: float, gamma: int, t_draft: float, budget: int):
        """Replace the predicted ratios by ones from this run's own steps, timed once: a target step,
        a verify step of `gamma` drafts and a draft step at `budget`. The roofline misses what the
        attention kernel really costs per extra query (on a CPU a 5-token verify can cost 1.4 target
        steps, where bytes alone say 1.0) and the weight of per-step overheads in the draft."""
        self.measured = (t_target, t_verify, gamma, t_draft, budget)

    def draft_time(self, gamma: int, budget: int):
        # a sparse draft step reads its whole layout (StreamingLLM's; SnapKV's has as many slots)
        draft_slots = self.slots if self.draft_full_cache else DraftLayout.of("streaming", budget, gamma, 0).n_slots
        return step_time(self.hw, self.draft or self.target, self.batch, 1, draft_slots, self.itemsize,
                         self.draft_quantization)

    def ratios(self, gamma: int, budget: int):
        """(T_D/T_T, T_V/T_T) for this gamma and draft budget: predicted, or from calibrate's timings."""
        if self.measured is not None:
            t_t, t_v, g, t_d, b = self.measured
            # the verify step's extra cost grows linearly with the drafts it checks; another budget
            # scales the measured draft step as the model scales it
            tv = 1 + max(t_v / t_t - 1, 0.0) * gamma / g
            return t_d / t_t * self.draft_time(gamma, budget) / self.draft_time(g, b), tv
        t_t = step_time(self.hw, self.target, self.batch, 1, self.slots, self.itemsize, self.quantization)
        t_v = step_time(self.hw, self.target, self.batch, gamma + 1, self.slots, self.itemsize, self.quantization)
        return self.draft_time(gamma, budget) / t_t, t_v / t_t

    def choose_gamma(self, alpha: float, budget: int):
        """-> (gamma, predicted speedup); ties go to the smaller gamma."""
        best = max(self.gammas, key=lambda g: (round(speedup(alpha, g, *self.ratios(g, budget)), 12), -g))
        return best, speedup(alpha, best, *self.ratios(best, budget))

    def choose_gamma_for_rows(self, rows, budget: int) -> int:
        """rows: (acceptance, tokens still to make) of each unfinished row of a static batch, which
        runs until its last row is done -> the gamma that finishes the batch soonest by the model
        (ties go to the smaller gamma). One row: the gamma of choose_gamma. A row that accepts
        little holds the batch back, and it gains less from a larger gamma than the others do."""
        def finish(g):
            td, tv = self.ratios(g, budget)
            return max(left / omega(alpha, g) for alpha, left in rows) * (g * td + tv)
        return min(self.gammas, key=lambda g: (round(finish(g), 12), g))

    def choose(self, acceptance: dict):
        """acceptance {budget: alpha} -> (budget, gamma, predicted speedup) maximising the speedup."""
        options = [(b, *self.choose_gamma(alpha, b)) for b, alpha in sorted(acceptance.items())]
        return max(options, key=lambda o: o[2])


def auto_plan(target: ModelArgs, batch: int, slots: int, *, dtype, device, gamma, budget, budgets=(), prompt_len=0,
              draft: Optional[ModelArgs] = None, draft_full_cache=False, compiled=False, gammas=GAMMAS,
              quantization=("none", 0), draft_quantization=("none", 0)):
    """--gamma auto / --draft_budget auto: measure the device, then fill in whichever is "auto" from
    the prior acceptance (budgets, gammas: the candidates). -> (planner, gamma, budget, predicted speedup)."""
    cuda = torch.device(device).type == "cuda"
    hw = measure_hardware(device, dtype, ops_per_layer=(1 if cuda else 10) if compiled else 40)
    p = Planner(hw, target, batch, slots, dtype.itemsize, draft=draft, draft_full_cache=draft_full_cache,
                gammas=tuple(gammas), quantization=quantization, draft_quantization=draft_quantization)
    if budget == "auto":
        table = {b: prior_acceptance(b, prompt_len) for b in budgets}
        if gamma == "auto":
            budget = p.choose(table)[0]
        else:
            budget = max(budgets, key=lambda b: speedup(table[b], gamma, *p.ratios(gamma, b)))
    alpha = p.alpha = prior_acceptance(budget, prompt_len)
    if gamma == "auto":
        gamma = p.choose_gamma(alpha, budget)[0]
    return p, gamma, budget, speedup(alpha, gamma, *p.ratios(gamma, budget))


def round_bytes(target: ModelArgs, *, batch: int, slots: int, itemsize: int, gamma: int = 0,
                draft: Optional[ModelArgs] = None, draft_slots: int = 0, quantization=("none", 0),
                draft_quantization=("none", 0)) -> int:
    """Bytes one autoregressive step (gamma 0) or one speculative round (gamma draft steps against
    draft_slots, then a verify of gamma + 1 tokens) reads: what "bandwidth achieved" divides by."""
    if gamma == 0:
        return step_cost(target, batch, 1, slots, itemsize, quantization)[0]
    return gamma * step_cost(draft or target, batch, 1, draft_slots, itemsize, draft_quantization)[0] \
        + step_cost(target, batch, gamma + 1, slots, itemsize, quantization)[0]
