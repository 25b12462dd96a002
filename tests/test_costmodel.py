# The speedup model and the gamma/budget choice (pure arithmetic, no timing), and --gamma auto end to
# end: whatever gamma the cost model picks, and however often it changes it, greedy speculation must
# reproduce autoregressive decoding token for token.
import json
import os
import shutil

import pytest
import torch

import costmodel
import engine
import generate as G
from costmodel import Hardware, Planner, omega, speedup
from engine import SpecArgs
from kv_cache import kv_bytes
from model import ModelArgs, Transformer, place
from spec import Sampling

SMOLLM2 = ModelArgs.from_name("smollm2-135m")
LLAMA8B = ModelArgs.from_name("llama-3.1-8b")
H100ISH = Hardware(bandwidth=2.5e12, flops=6e14, layer_overhead=2e-6)


def test_omega_known_values():
    assert omega(0.5, 2) == pytest.approx(1.75)  # 1 + 0.5 + 0.25
    assert omega(0.8, 3) == pytest.approx(2.952)
    assert omega(0.0, 5) == 1.0
    assert omega(1.0, 4) == 5.0
    assert omega(1 - 1e-9, 4) == pytest.approx(5.0, rel=1e-6)  # continuous at alpha = 1
    for alpha in (0.3, 0.7, 0.95):  # expected accepted drafts: alpha + ... + alpha^gamma
        assert omega(alpha, 6) - 1 == pytest.approx(sum(alpha ** i for i in range(1, 7)))


def test_speedup_known_values():
    assert speedup(0.8, 3, 0.1, 1.1) == pytest.approx(2.952 / 1.4)
    assert speedup(1.0, 4, 0.0, 1.0) == pytest.approx(5.0)  # free draft, free verify, all accepted
    assert speedup(0.0, 3, 0.5, 1.0) == pytest.approx(1 / 2.5)  # nothing accepted: pure overhead


def test_step_cost_counts_weights_and_kv():
    nbytes, flops = costmodel.step_cost(SMOLLM2, 1, 1, 0, 2)
    # SmolLM2-135M: ~134.5M parameters; with tied embeddings the output matrix is the embedding, read once
    assert 2 * 120e6 < nbytes < 2 * 140e6 + 4 * 4 * 49152 * 2
    assert flops == pytest.approx(nbytes - costmodel.LOGIT_PASSES * 4 * 49152, rel=1e-9)  # 2 FLOPs per bf16 weight
    # MagicDec's per-layer KV bytes: 2 * 2 * b * n * d / g in bf16 (g: GQA ratio)
    b, n = 16, 16384
    per_layer = 2 * 2 * b * n * LLAMA8B.dim / (LLAMA8B.n_head // LLAMA8B.n_kv_head)
    a = LLAMA8B
    assert kv_bytes(a.n_layer, b, a.n_kv_head, n, a.head_dim, 2) == pytest.approx(per_layer * a.n_layer)


def test_ratios_follow_magicdec_regimes():
    short = Planner(H100ISH, LLAMA8B, 1, 1024, 2).ratios(4, 256)
    long_big = Planner(H100ISH, LLAMA8B, 64, 32768, 2).ratios(4, 256)
    assert short[0] > 0.8  # batch 1, short context: the draft reads nearly what the target reads
    assert long_big[0] < 0.1  # large batch, long context: the sparse draft is almost free
    assert 1.0 <= long_big[1] < 1.1  # verifying 5 tokens costs about one KV read


def test_gamma_choice_grows_with_acceptance():
    for batch, slots in ((1, 512), (16, 8192), (64, 32768)):
        p = Planner(H100ISH, LLAMA8B, batch, slots, 2)
        chosen = [p.choose_gamma(a / 100, 256)[0] for a in range(0, 100, 3)]
        assert chosen == sorted(chosen), (batch, slots, chosen)
        assert chosen[0] == 1
    p = Planner(H100ISH, LLAMA8B, 64, 32768, 2)
    assert p.choose_gamma(0.95, 256)[0] > p.choose_gamma(0.5, 256)[0]


def test_calibrated_ratios_come_from_the_timed_steps():
    p = Planner(H100ISH, SMOLLM2, 8, 4165, 2)
    before = p.ratios(4, 256)
    p.calibrate(0.27, 0.27 * 1.4, 4, 0.09, 256)  # as on a CPU: a 5-token verify costs 1.4 target steps
    assert p.ratios(4, 256) == pytest.approx((0.09 / 0.27, 1.4)) and p.ratios(4, 256) != pytest.approx(before)
    assert p.ratios(2, 256)[1] == pytest.approx(1.2)  # the verify's extra cost is linear in the drafts
    assert p.ratios(4, 1024)[0] > p.ratios(4, 256)[0]  # a bigger budget: the model scales the timed draft step
    g, predicted = p.choose_gamma(0.88, 256)
    assert g == max(range(1, 9), key=lambda g: speedup(0.88, g, *p.ratios(g, 256)))
    assert predicted == pytest.approx(speedup(0.88, g, *p.ratios(g, 256)))
    p.calibrate(0.27, 0.25, 4, 0.09, 256)  # a noisy verify timed faster than a step counts as one step
    assert p.ratios(3, 256)[1] == 1.0


def test_gamma_for_rows_finishes_the_batch_soonest():
    p = Planner(H100ISH, LLAMA8B, 8, 16384, 2)
    for alpha in (0.5, 0.8, 0.95):  # one row: the same choice as by speedup
        assert p.choose_gamma_for_rows([(alpha, 100)], 256) == p.choose_gamma(alpha, 256)[0]
    p.calibrate(0.27, 0.27 * 1.4, 4, 0.09, 256)  # CPU-like ratios: a larger gamma is dear
    even = p.choose_gamma_for_rows([(0.9, 100)] * 8, 256)
    uneven = p.choose_gamma_for_rows([(0.9, 100)] * 7 + [(0.55, 100)], 256)
    assert uneven < even  # the slow row sets the batch's pace, and it gains little from long drafts
    finish = lambda g: max(n / omega(a, g) for a, n in [(0.9, 100)] * 7 + [(0.55, 100)]) * (g * p.ratios(g, 256)[0] + p.ratios(g, 256)[1])  # noqa: E731
    assert uneven == min(range(1, 9), key=finish)
    # a slow row that is nearly done no longer decides
    assert p.choose_gamma_for_rows([(0.9, 100)] * 7 + [(0.55, 3)], 256) == even


def test_budget_choice_trades_acceptance_for_draft_cost():
    p = Planner(H100ISH, LLAMA8B, 64, 32768, 2)
    # equal acceptance: the cheapest budget wins; much better acceptance: a bigger budget is worth it
    assert p.choose({128: 0.8, 512: 0.8, 2048: 0.8})[0] == 128
    assert p.choose({128: 0.3, 512: 0.85})[0] == 512


def test_fit_overhead_recovers_a_constant():
    hw = Hardware(1e10, 1e12)
    samples = [(SMOLLM2, b, t, s, 4, costmodel.step_time(Hardware(1e10, 1e12, 3e-5), SMOLLM2, b, t, s, 4))
               for b, t, s in ((1, 1, 512), (8, 1, 4096), (8, 5, 4096))]
    assert costmodel.fit_overhead(hw, samples).layer_overhead == pytest.approx(3e-5)


class CyclingPlanner:
    """Stands in for the cost model: a new gamma at every re-choice, the hardest case for the loop."""
    gammas = (1, 2, 3, 4, 5)
    alpha = 0.9

    def __init__(self):
        self.calls = []

    def calibrate(self, *measured):
        self.measured = measured

    def choose_gamma(self, alpha, budget):
        self.calls.append(alpha)
        return self.gammas[len(self.calls) % len(self.gammas)], 1.0

    def choose_gamma_for_rows(self, rows, budget):
        assert all(0 <= alpha <= 1 and left > 0 for alpha, left in rows)
        return self.choose_gamma(rows[0][0], budget)[0]


@pytest.mark.parametrize("kind", ["streaming", "snapkv"])
def test_changing_gamma_mid_generation_keeps_greedy_tokens(tiny, tiny_prompts, kind):
    model = tiny[0]
    ar = engine.generate(engine.Engine(model, 3, 112), tiny_prompts, 40, {0}, Sampling()).tokens
    planner = CyclingPlanner()
    sa = SpecArgs("self", gamma=2, draft_kv=kind, draft_budget=24, sinks=4, snapkv_window=8, gamma_max=5, adapt_every=1,
                  planner=planner)
    r = engine.generate(engine.Engine(model, 3, 112, sa=sa), tiny_prompts, 40, {0}, Sampling())
    assert r.tokens == ar
    assert len(set(r.gammas)) == 5 and planner.calls and r.acceptance < 1.0
    assert len(planner.measured) == 5 and planner.measured[2] == 2  # calibrated on a verify of the first gamma


def test_gamma_auto_end_to_end_matches_autoregressive(tiny_checkpoint, tmp_path, capsys):
    prompt = ["--prompt", "Paul Graham writes essays about startups, programming and how to do great work. " * 3]
    common = ["--checkpoint_path", tiny_checkpoint, *prompt, "--batch_size", "2", "--max_new_tokens", "40"]
    G.main(common + ["--json", str(tmp_path / "ar.json")])
    G.main(common + ["--speculate", "self", "--gamma", "auto", "--draft_budget", "auto", "--adapt_every", "2",
                            "--json", str(tmp_path / "sd.json")])
    assert "cost model: gamma" in capsys.readouterr().out
    ar, sd = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ar", "sd"))
    assert sd["tokens"] == ar["tokens"] and len(ar["tokens"][0]) > 1
    assert sd["gamma_per_round"] and all(1 <= g <= 8 for g in sd["gamma_per_round"])


def test_auto_flags_parse(tiny_checkpoint):
    args = G.parse_args(["--checkpoint_path", tiny_checkpoint, "--prompt", "x", "--speculate", "self",
                                "--gamma", "auto", "--draft_budget", "auto"])
    assert args.gamma == args.draft_budget == "auto"
    with pytest.raises(G.UsageError, match="expected an integer or 'auto'"):
        G.parse_args(["--checkpoint_path", tiny_checkpoint, "--prompt", "x", "--gamma", "often"])


def cache_bytes(cache):
    """Bytes of a cache's K, V and a draft cache's entry positions [B, Hkv, N]: the buffers that grow with
    rows and slots, which memory_plan accounts for (the rest is a few index vectors)."""
    return sum(b.numel() * b.element_size() for n, b in cache.named_buffers()
               if n.endswith((".k", ".v")) or (n.endswith(".slot_pos") and b.ndim == 3))


@pytest.mark.parametrize("sa,attn", [
    (None, "sdpa"), (None, "flash"),
    (SpecArgs("self", gamma=3, draft_kv="streaming", draft_budget=24, sinks=4, gamma_max=5), "sdpa"),
    (SpecArgs("self", gamma=2, draft_kv="snapkv", draft_budget=24), "flex"),
    (SpecArgs("draft", gamma=2, draft_kv="streaming", draft_budget=24, sinks=4), "sdpa"),
    (SpecArgs("draft", gamma=2, draft_kv="full"), "sdpa")])
def test_memory_plan_is_what_the_engine_allocates(tiny, sa, attn):
    """The one account of every cache: what the up-front check adds up is what the caches hold."""
    target, draft = tiny
    e = engine.Engine(target, 3, 112, sa=sa, draft_model=draft if sa is not None and sa.mode == "draft" else None,
                      attn=attn)
    plan = e.plan
    assert plan["target cache"] == cache_bytes(e.cache)
    assert plan["target scratch row"] == cache_bytes(e.scratch("target"))
    if sa is not None:
        assert plan["draft cache"] == cache_bytes(e.draft_cache)
    if sa is not None and sa.mode == "draft":
        assert plan["draft scratch row"] == cache_bytes(e.scratch("draft"))
        if sa.draft_kv != "full":
            full = e.full_cache(draft, 3, "draft full cache, while building the sparse one")
            assert plan["draft full cache, while building the sparse one"] == cache_bytes(full)
