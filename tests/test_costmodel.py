# The speedup model and the gamma/budget choice (pure arithmetic, no timing), and --gamma auto end to
# end: whatever gamma the cost model picks, and however often it changes it, greedy speculation must
# reproduce autoregressive decoding token for token.
import json
import os
import shutil

import pytest
import torch

import costmodel
import generate
from costmodel import Hardware, Planner, omega, speedup
from generate import SpecArgs
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
    assert costmodel.kv_bytes(LLAMA8B, b, n, 2) == pytest.approx(per_layer * LLAMA8B.n_layer)


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
    ar = generate.generate(generate.Engine(model, 3, 112), tiny_prompts, 40, {0}, Sampling()).tokens
    planner = CyclingPlanner()
    sa = SpecArgs("self", 2, kind, 24, sinks=4, snapkv_window=8, gamma_max=5, adapt_every=1, planner=planner)
    r = generate.generate(generate.Engine(model, 3, 112, sa), tiny_prompts, 40, {0}, Sampling())
    assert r.tokens == ar
    assert len(set(r.gammas)) == 5 and planner.calls and r.acceptance < 1.0
    assert len(planner.measured) == 5 and planner.measured[2] == 2  # calibrated on a verify of the first gamma


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, smollm2_dir):
    """A random 2-layer model with SmolLM2's vocabulary and tokenizer, in the checkpoint layout main() loads."""
    d = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(3)
    model = place(Transformer(ModelArgs(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128,
                                        vocab_size=49152, rope_base=100.0)), "cpu", torch.float32)
    for p in model.parameters():  # wide weights: peaked logits, so greedy tokens are far from ties
        p.data.normal_(0, 0.35)
    torch.save(model.state_dict(), d / "model.pth")
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128, vocab_size=49152, rope_theta=100.0, max_position_embeddings=2048)
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(os.path.join(smollm2_dir, "bpe_tokenizer.json"), d)
    return str(d)


def test_gamma_auto_end_to_end_matches_autoregressive(tiny_checkpoint, tmp_path, capsys):
    prompt = ["--prompt", "Paul Graham writes essays about startups, programming and how to do great work. " * 3]
    common = ["--checkpoint_path", tiny_checkpoint, *prompt, "--batch_size", "2", "--max_new_tokens", "40"]
    generate.main(common + ["--json", str(tmp_path / "ar.json")])
    generate.main(common + ["--speculate", "self", "--gamma", "auto", "--draft_budget", "auto", "--adapt_every", "2",
                            "--json", str(tmp_path / "sd.json")])
    assert "cost model: gamma" in capsys.readouterr().out
    ar, sd = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("ar", "sd"))
    assert sd["tokens"] == ar["tokens"] and len(ar["tokens"][0]) > 1
    assert sd["gamma_per_round"] and all(1 <= g <= 8 for g in sd["gamma_per_round"])


def test_auto_flags_parse(tiny_checkpoint):
    args = generate.parse_args(["--checkpoint_path", tiny_checkpoint, "--prompt", "x", "--speculate", "self",
                                "--gamma", "auto", "--draft_budget", "auto"])
    assert args.gamma == args.draft_budget == "auto"
    with pytest.raises(generate.UsageError, match="expected an integer or 'auto'"):
        generate.parse_args(["--checkpoint_path", tiny_checkpoint, "--prompt", "x", "--gamma", "often"])
