# Weight-only int8 / int4 (model.quantize, --quantize, --draft_quantize, scripts/quantize.py): the
# rounding error stays within its bound, PyTorch's kernels compute what the dequantized weights do,
# a quantized draft leaves the target's output exact (greedy equals AR; sampling keeps the target's
# distribution), a quantized checkpoint loads as --quantize makes it, and bad input is one line.
import json
import os
import sys

import pytest
import torch

import generate as G
from conftest import REPO_ROOT, write_tiny_checkpoint
from engine import Engine, Request, Rows, SpecArgs, decode_round, generate, pad_prompts, serve
from model import (ModelArgs, QuantLinear, dequantize_weight, quantize, quantize_weight, quantized_copy,
                   quantized_layout)
from spec import RowSampling, Sampling, logits_to_probs

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import quantize as Q  # noqa: E402  scripts/quantize.py

MAX_NEW, MAX_SEQ = 40, 112
SCHEMES = [("int8", 0), ("int4", 32), ("int4", 64), ("int4", 128), ("int4", 256)]


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("n", [16, 37, 259])  # 37 and 259: not whole tiles of the int4 kernels
def test_round_trip_within_half_a_step(scheme, group_size, n):
    k = 512
    torch.manual_seed(n)
    w = torch.randn(n, k) * torch.rand(n, 1) * 3  # rows of different ranges
    t = quantize_weight(w, scheme, group_size)
    assert {s: (tuple(v.shape), v.dtype if not v.is_floating_point() else None) for s, v in t.items()} == \
        quantized_layout(n, k, scheme, group_size)
    err = (dequantize_weight(t, scheme, group_size) - w).abs()
    if scheme == "int8":
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        g = w.reshape(n, -1, group_size)
        step = ((g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / 15).expand_as(g).reshape(n, k)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-7).all()
    assert err.max() > step.min() / 100  # it did round


@pytest.mark.parametrize("scheme,group_size", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,bias", [(48, False), (37, True)])
def test_kernel_equals_its_dequantized_reference(scheme, group_size, dtype, n, bias):
    k = 256
    torch.manual_seed(1)
    t = quantize_weight(torch.randn(n, k), scheme, group_size)
    b = torch.randn(n) if bias else None
    lin = QuantLinear(t, scheme, group_size, b, "cpu", dtype)
    x = torch.randn(2, 5, k).to(dtype)
    # the reference in fp32 from the tensors the kernel holds: on the CPU its activations and scales
    # are bfloat16 whatever the model's dtype (the kernels' fast path), its output the model's dtype
    ref_t = {s: v.to(torch.bfloat16).float() if v.is_floating_point() else v for s, v in t.items()}
    want = x.to(torch.bfloat16).float() @ dequantize_weight(ref_t, scheme, group_size).T \
        + (0 if b is None else b.to(dtype).float())
    got = lin(x)
    assert got.shape == (2, 5, n) and got.dtype == dtype
    assert torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max())


@pytest.fixture(scope="module")
def ar(tiny, tiny_prompts):
    return generate(Engine(tiny[0], 3, MAX_SEQ), tiny_prompts, MAX_NEW, {0}, Sampling()).tokens


def self_args(kind, gamma=3):
    return SpecArgs("self", gamma=gamma, draft_kv=kind, draft_budget=24, sinks=4, snapkv_window=8)


@pytest.mark.parametrize("scheme,group_size", [("int8", 0), ("int4", 32)])
@pytest.mark.parametrize("kind", ["streaming", "snapkv"])
def test_greedy_with_a_quantized_draft_equals_autoregressive(tiny, tiny_prompts, ar, scheme, group_size, kind):
    target = tiny[0]
    draft = quantized_copy(target, scheme, group_size)
    assert isinstance(draft.layers[0].attention.wqkv, QuantLinear) and not isinstance(target.output, QuantLinear)
    assert draft.tok_embeddings.weight is target.tok_embeddings.weight  # shared, not copied
    r = generate(Engine(target, 3, MAX_SEQ, sa=self_args(kind), draft_model=draft), tiny_prompts, MAX_NEW, {0},
                 Sampling())
    assert r.tokens == ar
    assert r.acceptance < 1.0


def test_quantized_draft_rows_stop_at_eos_and_stream_through_fewer_slots(tiny, tiny_prompts, ar):
    target = tiny[0]
    draft = quantized_copy(target, "int4", 32)
    stop_at = next(i for i in range(3, MAX_NEW) if ar[2][i] not in ar[0] + ar[1] + ar[2][:i])
    eos = {ar[2][stop_at]}
    r = generate(Engine(target, 3, MAX_SEQ, sa=self_args("snapkv"), draft_model=draft), tiny_prompts, MAX_NEW, eos,
                 Sampling())
    assert r.tokens == [ar[0], ar[1], ar[2][: stop_at + 1]]
    g = torch.Generator().manual_seed(3)
    requests = [Request(i, torch.randint(3, target.args.vocab_size, (int(n),), generator=g).tolist(), int(m))
                for i, (n, m) in enumerate(zip(torch.randint(20, 70, (6,), generator=g), torch.randint(5, 30, (6,), generator=g)))]
    finished = []
    serve(Engine(target, 2, MAX_SEQ, sa=self_args("streaming"), draft_model=draft), requests, {0}, Sampling(),
          lambda req, rec: finished.append((req, rec)))
    alone = Engine(target, 1, MAX_SEQ)
    assert len(finished) == 6
    for req, rec in finished:
        assert rec["tokens"] == generate(alone, [req.prompt], req.max_new_tokens, {0}, Sampling()).tokens[0], req.id


def test_sampling_with_a_quantized_draft_keeps_the_target_distribution(tiny, tiny_prompts):
    """4096 copies of one row, one sampled round with an int4 draft: its first token must follow the
    target's distribution at that position (chi-square, as tests/test_spec.py's rejection tests)."""
    from test_spec import _chi2_ok
    from kv_cache import KVCache
    target, n = tiny[0], 4096
    engine = Engine(target, n, MAX_SEQ, sa=self_args("snapkv"), draft_model=quantized_copy(target, "int4", 32))
    prompt = tiny_prompts[1]
    tokens, lens = pad_prompts([prompt] * n, "cpu")
    first = engine.prefill(tokens, lens).argmax(-1)
    engine.setup_draft(tokens, lens)
    rows, eos = Rows.empty(n, 20, 4, "cpu"), torch.tensor([-1])
    s = Sampling(temperature=1.5)
    rows.start(torch.arange(n), lens, tokens[:, len(prompt) - 1], first, torch.full((n,), 20), eos, s)
    history = prompt + [int(first[0])]
    full = KVCache(3, 1, 2, MAX_SEQ, 16, dtype=torch.float32, device="cpu")
    p = logits_to_probs(target(torch.tensor([history]), torch.arange(len(history))[None], full)[0, -1:],
                        RowSampling.of(s, 1, "cpu"))[0]
    n_gen = int(rows.n_gen[0])
    torch.manual_seed(0)
    decode_round(engine, rows, 3, s.kind, eos)
    assert 0 < rows.stats[0].sum() < 3 * n  # drafts were kept, and rejected
    ok, stat, limit = _chi2_ok(rows.out[:, n_gen], p)
    assert ok, f"chi2 {stat:.1f} >= {limit:.1f}"


def test_a_tied_output_gets_a_quantized_copy_and_the_embedding_stays_dense(tmp_path):
    from checkpoint import load_model
    model = load_model(write_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True))
    emb = model.tok_embeddings.weight
    assert model.output.weight is emb
    x = torch.randn(2, 3, 64)
    want = model.output(x)
    quantize(model, "int8")
    assert model.tok_embeddings.weight is emb and isinstance(model.output, QuantLinear)
    assert model.quantization == ("int8", 0)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert torch.allclose(model.output(x), want, rtol=0.05, atol=0.05 * want.abs().max())


def cli_tokens(argv, tmp_path, name):
    out = tmp_path / f"{name}.json"
    G.main([*argv, "--json", str(out)])
    return json.loads(out.read_text())


PROMPTS = ["--prompt", "The quick brown fox jumps over the lazy dog.", "--prompt", "Once upon a time"]


@pytest.mark.parametrize("scheme,extra", [("int8", []), ("int4", ["--group_size", "32"])])
def test_quantized_checkpoint_loads_as_quantize_at_load_makes_it(tiny_checkpoint, tmp_path, scheme, extra):
    out = tmp_path / f"q-{scheme}"
    Q.main(["--checkpoint_path", tiny_checkpoint, "--scheme", scheme, "--out", str(out), *extra])
    from checkpoint import load_model, read_quantization, verify_checkpoint
    verify_checkpoint(str(out), hashes=True)
    assert read_quantization(str(out))[0] == scheme
    state = torch.load(out / "model.pth", weights_only=True)
    assert state["layers.0.attention.wqkv.weight"].dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    assert isinstance(load_model(str(out)).layers[1].feed_forward.w2, QuantLinear)
    common = [*PROMPTS, "--max_new_tokens", "12"]
    at_load = cli_tokens(["--checkpoint_path", tiny_checkpoint, "--quantize", scheme, *extra, *common], tmp_path, "a")
    loaded = cli_tokens(["--checkpoint_path", str(out), *common], tmp_path, "b")
    assert loaded["tokens"] == at_load["tokens"]
    # self-speculation on the quantized checkpoint equals its own AR
    spec = cli_tokens(["--checkpoint_path", str(out), *common, "--speculate", "self", "--draft_budget", "8",
                       "--sinks", "2"], tmp_path, "d")
    assert spec["tokens"] == loaded["tokens"]


def test_cli_draft_quantize_equals_ar(tiny_checkpoint, tmp_path):
    common = ["--checkpoint_path", tiny_checkpoint, *PROMPTS, "--max_new_tokens", "16"]
    ar = cli_tokens(common, tmp_path, "ar")
    for scheme in ("int8", "int4"):
        r = cli_tokens([*common, "--speculate", "self", "--draft_quantize", scheme, "--draft_budget", "8",
                        "--sinks", "2", "--gamma", "3"], tmp_path, scheme)
        assert r["tokens"] == ar["tokens"] and r["acceptance"] < 1
    # --gamma auto times the quantized draft step itself
    r = cli_tokens([*common, "--speculate", "self", "--draft_quantize", "int4", "--draft_budget", "8", "--sinks", "2",
                    "--gamma", "auto"], tmp_path, "auto")
    assert r["tokens"] == ar["tokens"]


def test_three_ranks_with_a_quantized_draft_equal_autoregressive(tmp_path):
    """Tensor parallelism: each of 3 ranks quantizes its own shard for the draft (group 32 divides
    the 32-wide shards of wo); the target still verifies, so the tokens are the AR ones."""
    from test_tp import run_one, run_tp
    ckpt = write_tiny_checkpoint(tmp_path / "three", hidden_size=96, num_attention_heads=6, num_key_value_heads=3,
                                 intermediate_size=192)
    common = ["--checkpoint_path", ckpt, "--max_new_tokens", "24",
              "--prompt", "The quick brown fox jumps over the lazy dog, and then it runs far away.",
              "--prompt", "Once upon a time, in a kingdom by the sea, there lived a king."]
    ar = run_one(common, tmp_path)
    three = run_tp(3, common + ["--speculate", "self", "--draft_kv", "snapkv", "--draft_budget", "24",
                                "--snapkv_window", "8", "--gamma", "3", "--draft_quantize", "int4"], tmp_path)
    assert three["tokens"] == ar["tokens"] and three["acceptance"] < 1


@pytest.mark.parametrize("argv,expected", [
    (["--draft_quantize", "int8"], "--draft_quantize needs --speculate self"),
    (["--speculate", "draft", "--draft_checkpoint_path", "{ckpt}", "--draft_quantize", "int8"],
     "--draft_quantize needs --speculate self"),
    (["--quantize", "int8", "--group_size", "64"], "--group_size is for int4"),
    (["--quantize", "int4", "--group_size", "48"], "--group_size must be one of 32, 64, 128, 256"),
    (["--quantize", "int4", "--group_size", "256"], "does not divide the input width of"),  # the tiny width is 64
    (["--speculate", "self", "--draft_quantize", "int4", "--group_size", "-1"], "--group_size must be >= 0"),
])
def test_bad_flags_are_one_line_before_loading(tiny_checkpoint, refused_before_loading, argv, expected):
    refused_before_loading(["--checkpoint_path", tiny_checkpoint, "--prompt", "hi",
                            *[a.format(ckpt=tiny_checkpoint) for a in argv]], expected)


def test_a_quantized_checkpoint_with_bad_scales_is_refused_naming_the_tensor(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "bad"
    Q.main(["--checkpoint_path", tiny_checkpoint, "--scheme", "int4", "--group_size", "32", "--out", str(out)])
    state = torch.load(out / "model.pth", weights_only=True)
    name = "layers.1.feed_forward.w2.scales_and_zeros"
    state[name] = state[name][:1]  # scales for one group of a row that has four
    torch.save(state, out / "model.pth")
    os.remove(out / "manifest.json")  # as if written by hand: only the contents can be checked
    with pytest.raises(SystemExit) as e:
        G.cli(["--checkpoint_path", str(out), "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "\n" not in err and name in err and "shape" in err, err
    # and with --quantize of another scheme, refused before loading
    with pytest.raises(SystemExit) as e:
        G.cli(["--checkpoint_path", str(out), "--prompt", "hi", "--quantize", "int8"])
    assert e.value.code == 2 and "quantized as int4 already" in capsys.readouterr().err


def test_quantize_script_refuses_what_it_cannot_do(tiny_checkpoint, tmp_path, one_line_error):
    assert "does not divide" in one_line_error(Q.main, ["--checkpoint_path", tiny_checkpoint, "--scheme", "int4",
                                                        "--group_size", "128", "--out", str(tmp_path / "x")])
    assert not os.path.exists(tmp_path / "x" / "model.pth")
    assert "a directory of its own" in one_line_error(Q.main, ["--checkpoint_path", tiny_checkpoint, "--scheme", "int8",
                                                               "--out", tiny_checkpoint])
    out = str(tmp_path / "q")
    Q.main(["--checkpoint_path", tiny_checkpoint, "--scheme", "int8", "--out", out])
    assert "--force" in one_line_error(Q.main, ["--checkpoint_path", tiny_checkpoint, "--scheme", "int8", "--out", out])
    assert "already quantized" in one_line_error(Q.main, ["--checkpoint_path", out, "--scheme", "int4",
                                                          "--out", str(tmp_path / "qq")])


def test_memory_plan_counts_the_quantized_copy(tiny):
    from engine import memory_plan
    a = ModelArgs.from_name("smollm2-135m")
    plain = memory_plan(a, batch=1, max_seq_len=64, itemsize=2, sa=self_args("streaming"))
    plan = memory_plan(a, batch=1, max_seq_len=64, itemsize=2, sa=self_args("streaming"),
                       draft_quantization=("int4", 64))
    assert set(plan) - set(plain) == {"draft's quantized matrices"}
    # 4-bit weights and a bf16 scale and zero per 64: about a quarter of the bf16 matrices
    assert 0.25 < plan["draft's quantized matrices"] / a.matmul_bytes(2) < 0.3
