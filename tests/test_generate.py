# End-to-end generation on SmolLM2 (fp32) and the CLI's handling of bad input.
import json
import os
import subprocess
import sys

import pytest
import torch

import generate as G
from generate import SpecArgs, generate
from model import load_model
from spec import Sampling
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smollm(smollm2_dir):
    return load_model(smollm2_dir, "cpu", torch.float32), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def essay_prompts(smollm, essay_text):
    _, tok = smollm
    ids = tok.encode(essay_text[:20000])
    return [ids[100:130], ids[1000:1190], ids[3000:3077]]  # ragged: 30, 190 and 77 tokens


@pytest.fixture(scope="module")
def ar_tokens(smollm, essay_prompts):
    model, tok = smollm
    return generate(model, essay_prompts, 24, set(), Sampling(), 256).tokens


def test_ragged_batch_equals_each_row_alone(smollm, essay_prompts, ar_tokens):
    model, _ = smollm
    for p, row in zip(essay_prompts, ar_tokens):
        assert generate(model, [p], 24, set(), Sampling(), 256).tokens[0] == row
    assert all(len(r) == 24 for r in ar_tokens)


def test_chunked_prefill_equals_one_pass(smollm, essay_prompts):
    model, _ = smollm
    from generate import pad_prompts, prefill
    from kv_cache import KVCache

    tokens, lens = pad_prompts(essay_prompts, "cpu")
    outs = []
    for chunk in (256, 64, 48):  # one pass, aligned chunks, chunks that do not divide the prompt
        cache = KVCache(30, 3, 3, 256, 64, torch.float32, "cpu")
        outs.append(prefill(model, cache, tokens, lens, chunk))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,budget", [("streaming", 48), ("snapkv", 96)])
def test_self_speculation_equals_autoregressive_on_smollm2(smollm, essay_prompts, ar_tokens, kind, budget):
    model, _ = smollm
    sa = SpecArgs("self", 3, kind, budget, sinks=16, snapkv_window=16)
    r = generate(model, essay_prompts, 24, set(), Sampling(), 256, prefill_chunk=64, sa=sa)
    assert r.tokens == ar_tokens
    assert 0.3 < r.acceptance < 1.0  # a real, imperfect draft


def test_sampling_is_reproducible_and_differs_from_greedy(smollm, essay_prompts, ar_tokens):
    model, _ = smollm
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate(model, essay_prompts, 24, set(), s, 256).tokens)
    assert runs[0] == runs[1] and runs[0] != ar_tokens


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_writes_json_and_speculation_matches(tmp_path, smollm2_dir):
    common = ["--checkpoint_path", smollm2_dir, "--prompt", "The capital of France is", "--prompt",
              "def fibonacci(n):", "--max_new_tokens", "16"]
    ar = run_cli(*common, "--json", str(tmp_path / "ar.json"))
    assert ar.returncode == 0, ar.stderr
    sd = run_cli(*common, "--speculate", "self", "--draft_budget", "24", "--sinks", "4", "--json", str(tmp_path / "sd.json"))
    assert sd.returncode == 0, sd.stderr
    a, s = json.loads((tmp_path / "ar.json").read_text()), json.loads((tmp_path / "sd.json").read_text())
    assert a["tokens"] == s["tokens"] and len(a["tokens"]) == 2
    for key in ("tokens_per_s", "prefill_s", "decode_s", "device"):
        assert key in a
    assert 0 < s["acceptance"] <= 1 and s["tokens_per_round"] >= 1
    assert "tokens/s" in ar.stdout and "acceptance per draft token" in sd.stdout


# ---- bad input: one line, before any heavy work ----

@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights fails the test: the error must come first."""
    def refuse(*a, **k):
        raise AssertionError("model loaded before the input was checked")
    monkeypatch.setattr(G, "load_model", refuse)


def cli_error(argv):
    with pytest.raises((SystemExit, ValueError, MemoryError)) as e:
        G.main(argv)
    msg = str(e.value.code if isinstance(e.value, SystemExit) else e.value)
    assert msg and "\n" not in msg, msg
    return msg


def test_prompt_longer_than_cache(smollm2_dir, no_loading):
    msg = cli_error(["--checkpoint_path", smollm2_dir, "--prompt", "word " * 20, "--max_new_tokens", "20", "--max_seq_len", "30"])
    assert "more than --max_seq_len 30" in msg


def test_empty_prompt(smollm2_dir, no_loading):
    assert "prompt 0 is empty" in cli_error(["--checkpoint_path", smollm2_dir, "--prompt", ""])


def test_missing_checkpoint_names_prepare_command(tmp_path, no_loading):
    msg = cli_error(["--checkpoint_path", str(tmp_path / "nothing"), "--prompt", "hi"])
    assert "scripts/prepare_smollm2.py" in msg and "missing model.pth" in msg


def test_kv_cache_too_large_reports_bytes(smollm2_dir, no_loading):
    msg = cli_error(["--checkpoint_path", smollm2_dir, "--prompt", "hi", "--batch_size", "100000", "--max_seq_len", "8192"])
    need = 2 * 30 * 100000 * 3 * 8192 * 64 * 4
    assert f"{need:,} bytes" in msg


@pytest.mark.parametrize("argv,expected", [
    (["--speculate", "self", "--draft_budget", "16", "--sinks", "16"], "must be larger than --sinks 16"),
    (["--speculate", "self", "--gamma", "0"], "--gamma must be >= 1"),
    (["--speculate", "draft"], "needs --draft_checkpoint_path"),
    (["--speculate", "draft", "--draft_checkpoint_path", "/nonexistent/draft"], "draft checkpoint /nonexistent/draft: missing"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--speculate", "self", "--draft_kv", "full"], "needs a sparse --draft_kv"),
])
def test_bad_flags(smollm2_dir, no_loading, argv, expected):
    assert expected in cli_error(["--checkpoint_path", smollm2_dir, "--prompt", "hi", *argv])


def test_draft_with_other_vocabulary(tmp_path, smollm2_dir, no_loading):
    cfg = json.load(open(os.path.join(smollm2_dir, "config.json")))
    cfg["vocab_size"] = 32000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.pth").write_bytes(b"")
    msg = cli_error(["--checkpoint_path", smollm2_dir, "--prompt", "hi", "--speculate", "draft",
                     "--draft_checkpoint_path", str(tmp_path)])
    assert "draft vocabulary (32000) differs from the target's (49152)" in msg


def test_cli_one_line_errors_without_traceback(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (tmp_path / "config.json").write_text(json.dumps(dict(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96, vocab_size=49152)))
    torch.save({"tok_embeddings.weight": torch.zeros(2), "x": Payload()}, tmp_path / "model.pth")
    smol = os.path.join(REPO, "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct/bpe_tokenizer.json")
    (tmp_path / "bpe_tokenizer.json").write_bytes(open(smol, "rb").read())
    r = run_cli("--checkpoint_path", str(tmp_path), "--prompt", "hi", timeout=120)
    assert r.returncode != 0 and "pwned" not in r.stdout
    assert r.stderr.strip().count("\n") == 0 and "refused: holds pickled objects" in r.stderr, r.stderr
