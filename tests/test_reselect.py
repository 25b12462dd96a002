# Drafts re-selected from the target's own attention (--draft_reselect): a scored verify step re-picks
# the draft cache's fixed entries. The output stays exact (greedy equals autoregressive; sampling keeps
# the target distribution), the picks are the ones a direct computation makes, and the re-picking
# really happens in these runs (the fixed slots change).
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import write_tiny_checkpoint
from engine import Engine, Request, Rows, SpecArgs, decode_round, generate, pad_prompts, serve
from kv_cache import Reselect
from model import apply_rope
from spec import RowSampling, Sampling, logits_to_probs

MAX_NEW, MAX_SEQ = 40, 112


def spec_args(kind, every, policy=Reselect(), gamma=3):
    return SpecArgs("self", gamma=gamma, draft_kv=kind, draft_budget=24, sinks=4, snapkv_window=8, reselect=every,
                    reselect_policy=policy)


@pytest.fixture(scope="module")
def ar(tiny, tiny_prompts):
    return generate(Engine(tiny[0], 3, MAX_SEQ), tiny_prompts, MAX_NEW, {0}, Sampling()).tokens


def fixed_slots(engine):
    return torch.stack([layer.slot_pos[:, :, :layer.n_keep] for layer in engine.draft_cache.layers])


@pytest.mark.parametrize("kind", ["streaming", "snapkv"])
@pytest.mark.parametrize("every", [1, 2, 4, 8])
def test_greedy_with_reselection_equals_autoregressive(tiny, tiny_prompts, ar, kind, every):
    engine = Engine(tiny[0], 3, MAX_SEQ, sa=spec_args(kind, every))
    tokens, lens = pad_prompts(tiny_prompts, "cpu")
    engine.prefill(tokens, lens)
    engine.setup_draft(tokens, lens)
    prefill_picks = fixed_slots(engine)
    r = generate(engine, tiny_prompts, MAX_NEW, {0}, Sampling())
    assert r.tokens == ar and r.acceptance < 1.0
    assert not torch.equal(fixed_slots(engine), prefill_picks), "no scored verify re-picked the draft's entries"


@pytest.mark.parametrize("policy", [Reselect(queries="last"), Reselect(scope="layer"), Reselect(pool=5),
                                    Reselect(sinks=2)], ids=["last-query", "per-layer", "pooled", "sinks"])
def test_every_scoring_policy_is_exact(tiny, tiny_prompts, ar, policy):
    r = generate(Engine(tiny[0], 3, MAX_SEQ, sa=spec_args("snapkv", 1, policy)), tiny_prompts, MAX_NEW, {0}, Sampling())
    assert r.tokens == ar


def test_rows_stopping_at_eos(tiny, tiny_prompts, ar):
    stop_at = next(i for i in range(3, MAX_NEW) if ar[2][i] not in ar[0] + ar[1] + ar[2][:i])
    eos = {ar[2][stop_at]}
    want = [ar[0], ar[1], ar[2][: stop_at + 1]]
    for kind in ("streaming", "snapkv"):
        assert generate(Engine(tiny[0], 3, MAX_SEQ, sa=spec_args(kind, 1)), tiny_prompts, MAX_NEW, eos,
                        Sampling()).tokens == want


def test_request_stream_through_fewer_slots(tiny):
    """Refilled rows start from their own prefill pick while the others keep re-selecting."""
    target = tiny[0]
    g = torch.Generator().manual_seed(3)
    requests = [Request(i, torch.randint(3, target.args.vocab_size, (int(n),), generator=g).tolist(), int(m))
                for i, (n, m) in enumerate(zip(torch.randint(20, 70, (7,), generator=g), torch.randint(5, 30, (7,), generator=g)))]
    finished = []
    sa = spec_args("snapkv", 2)
    serve(Engine(target, 2, MAX_SEQ, sa=sa), requests, {0}, Sampling(), lambda req, rec: finished.append((req, rec)))
    alone = Engine(target, 1, MAX_SEQ)
    assert len(finished) == 7 and [r.id for r, _ in finished] != list(range(7))
    for req, rec in finished:
        assert rec["tokens"] == generate(alone, [req.prompt], req.max_new_tokens, {0}, Sampling()).tokens[0], req.id


def test_sampling_after_a_reselection_keeps_the_target_distribution(tiny, tiny_prompts):
    """4096 copies of one row: a greedy round with a scored verify (all rows alike, the draft's
    entries re-picked), then a sampled round, whose first token must follow the target's distribution
    at that position (chi-square, as tests/test_spec.py's rejection-sampling tests)."""
    from test_spec import _chi2_ok
    target, n = tiny[0], 4096
    engine = Engine(target, n, MAX_SEQ, sa=spec_args("snapkv", 1))
    prompt = tiny_prompts[1]
    tokens, lens = pad_prompts([prompt] * n, "cpu")
    first = engine.prefill(tokens, lens).argmax(-1)
    engine.setup_draft(tokens, lens)
    picks = fixed_slots(engine)
    rows, eos = Rows.empty(n, 20, 4, "cpu"), torch.tensor([-1])
    rows.start(torch.arange(n), lens, tokens[:, len(prompt) - 1], first, torch.full((n,), 20), eos, Sampling())
    decode_round(engine, rows, 3, "greedy", eos, scored=True)
    assert not torch.equal(fixed_slots(engine), picks)
    history = prompt + rows.out[0, :int(rows.n_gen[0])].tolist()  # every row's tokens so far
    s = Sampling(temperature=1.5)
    from kv_cache import KVCache
    full = KVCache(3, 1, 2, MAX_SEQ, 16, dtype=torch.float32, device="cpu")
    p = logits_to_probs(target(torch.tensor([history]), torch.arange(len(history))[None], full)[0, -1:],
                        RowSampling.of(s, 1, "cpu"))[0]
    n_gen = int(rows.n_gen[0])
    rows.sampling = RowSampling.of(s, n, "cpu")  # every row samples from here on
    torch.manual_seed(0)
    decode_round(engine, rows, 3, s.kind, eos)
    ok, stat, limit = _chi2_ok(rows.out[:, n_gen], p)
    assert ok, f"chi2 {stat:.1f} >= {limit:.1f}"


def reference_picks(target, history, pos, n_keep, window, T):
    """Recompute a scored verify's picks from scratch for one row: a full forward over history (the
    prompt, the tokens since, the verified block of T tokens at positions pos..pos+T-1), each layer's
    queries and keys from its input, the softmax attention of the T verify queries over the keys up to
    each, summed over the queries and the query heads of each KV group; the top n_keep among positions
    <= pos + 1 - window -> per layer, per KV head, the sorted positions."""
    S = len(history)
    inputs = []
    hooks = [layer.attention_norm.register_forward_hook(lambda m, i, o: inputs.append(o)) for layer in target.layers]
    from kv_cache import KVCache
    target(torch.tensor([history]), torch.arange(S)[None], KVCache(3, 1, 2, S, 16, dtype=torch.float32, device="cpu"))
    for h in hooks:
        h.remove()
    picks = []
    for layer, x in zip(target.layers, inputs):
        q, k, _ = F.linear(x, layer.attention.wqkv.weight).split([64, 32, 32], -1)
        ang = torch.arange(S)[None, :, None].float() * target.inv_freq
        cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
        q = apply_rope(q.view(1, S, 4, 16), cos, sin)[0].transpose(0, 1)[:, pos:pos + T]  # [4, T, 16]
        k = apply_rope(k.view(1, S, 2, 16), cos, sin)[0].transpose(0, 1).repeat_interleave(2, 0)  # [4, S, 16]
        causal = torch.arange(S)[None, :] > torch.arange(pos, pos + T)[:, None]
        att = (q @ k.transpose(1, 2) / 4.0).masked_fill(causal, float("-inf")).softmax(-1)  # [4, T, S]
        score = att.sum(1).view(2, 2, S).sum(1)  # [Hkv, S]
        n = pos + 1 - window + 1  # candidates 0 .. pos + 1 - window
        picks.append([sorted(score[h, :max(n, 0)].topk(min(n_keep, max(n, 0))).indices.tolist()) for h in range(2)])
    return picks


def test_picks_equal_a_direct_computation(tiny, tiny_prompts):
    target = tiny[0]
    sa = SpecArgs("self", gamma=3, draft_kv="snapkv", draft_budget=40, snapkv_window=8, snapkv_recent=12, reselect=1)
    engine = Engine(target, 3, MAX_SEQ, sa=sa)
    tokens, lens = pad_prompts(tiny_prompts, "cpu")
    first = engine.prefill(tokens, lens).argmax(-1)
    engine.setup_draft(tokens, lens)
    drafts = torch.randint(3, target.args.vocab_size, (3, 3), generator=torch.Generator().manual_seed(1))
    engine.verify(first, drafts, None, lens, RowSampling.of(Sampling(), 3, "cpu"), scored=True)  # verifies [first, drafts] at lens..lens+3
    heads_differ = False
    for b, prompt in enumerate(tiny_prompts):
        history = prompt + [int(first[b])] + drafts[b].tolist()
        want = reference_picks(target, history, len(prompt), n_keep=28, window=12, T=4)
        for i, layer in enumerate(engine.draft_cache.layers):
            for h in range(2):
                got = sorted(p for p in layer.slot_pos[b, h, :28].tolist() if p >= 0)
                assert got == want[i][h], (b, i, h)
            heads_differ |= want[i][0] != want[i][1]
    assert heads_differ  # the 61-token row has more candidates than picks: per-head choices are tested


def test_three_ranks_equal_one_with_reselection(tmp_path):
    """Tensor parallelism: each of 3 ranks re-picks for its own KV head; the tokens, rounds and
    acceptance are one process's."""
    from test_tp import run_one, run_tp, same_run
    ckpt = write_tiny_checkpoint(tmp_path / "three", hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                 intermediate_size=192)
    common = ["--checkpoint_path", ckpt, "--max_new_tokens", "24",
              "--prompt", "The quick brown fox jumps over the lazy dog, and then it runs far away.",
              "--prompt", "Once upon a time, in a kingdom by the sea, there lived a king."]
    argv = common + ["--speculate", "self", "--draft_kv", "snapkv", "--draft_budget", "24", "--snapkv_window", "8",
                     "--gamma", "3", "--draft_reselect", "2"]
    ar = run_one(common, tmp_path)
    one, three = run_one(argv, tmp_path), run_tp(3, argv, tmp_path)
    assert one["tokens"] == ar["tokens"] and one["acceptance"] < 1
    same_run(one, three)


@pytest.mark.parametrize("argv,expected", [
    (["--speculate", "self", "--draft_reselect", "-1"], "--draft_reselect must be >= 0"),
    (["--draft_reselect", "2"], "--draft_reselect needs --speculate self"),
    (["--speculate", "draft", "--draft_checkpoint_path", "{ckpt}", "--draft_reselect", "2"],
     "--draft_reselect needs --speculate self"),
    (["--speculate", "self", "--draft_kv", "full", "--draft_reselect", "2"], "needs a sparse --draft_kv"),
])
def test_bad_flags_are_one_line_before_loading(tiny_checkpoint, refused_before_loading, argv, expected):
    refused_before_loading(["--checkpoint_path", tiny_checkpoint, "--prompt", "hi",
                            *[a.format(ckpt=tiny_checkpoint) for a in argv]], expected)


def test_memory_plan_counts_the_scoring_pass(tiny):
    plain = Engine(tiny[0], 3, MAX_SEQ, sa=spec_args("snapkv", 0)).plan
    scored = Engine(tiny[0], 3, MAX_SEQ, sa=spec_args("snapkv", 2)).plan
    extra = set(scored) - set(plain)
    assert extra == {"one layer's attention weights"}
    assert scored["one layer's attention weights"] == 3 * 4 * 4 * MAX_SEQ * (4 + 8)  # B (gamma+1) Hq S bytes
    assert json.dumps(scored) and math.isfinite(sum(scored.values()))
