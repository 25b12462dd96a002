# Bad input, as a new user or an adversary gives it: every case fails with a non-zero exit code and
# exactly one line on stderr, no traceback, and (the load_model trap) before any weights load. The
# table runs main() in-process through generate.cli, the same wrapper `python generate.py` uses; a
# few cases also run as real processes. Faults: an output write that fails leaves the old file whole.
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import generate as G
import model as M
from checkpoint import MANIFEST, sha256_of
from conftest import write_tiny_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUGE = str(2 ** 40)


@pytest.fixture
def no_loading(monkeypatch):
    """Any attempt to load weights fails the test: the error must come first."""
    def refuse(*a, **k):
        raise AssertionError("model loaded before the input was checked")
    monkeypatch.setattr(G, "load_model", refuse)


@pytest.fixture(scope="module")
def bad(tmp_path_factory, tiny_checkpoint):
    """Files the cases point at: checkpoints broken in one way each, a non-UTF-8 prompt, a directory."""
    root = tmp_path_factory.mktemp("bad")
    good_cfg = json.load(open(os.path.join(tiny_checkpoint, "config.json")))

    def checkpoint(name, cfg_text=None, model_bytes=b"x"):
        d = root / name
        d.mkdir()
        (d / "config.json").write_text(cfg_text if cfg_text is not None else json.dumps(good_cfg))
        (d / "model.pth").write_bytes(model_bytes)
        shutil.copy(os.path.join(tiny_checkpoint, "bpe_tokenizer.json"), d)
        return str(d)

    paths = dict(
        not_object=checkpoint("not_object", "[1, 2]"),
        not_json=checkpoint("not_json", "{hidden_size: 5"),
        missing_key=checkpoint("missing_key", json.dumps({k: v for k, v in good_cfg.items() if k != "hidden_size"})),
        wrong_type=checkpoint("wrong_type", json.dumps(dict(good_cfg, num_hidden_layers="30"))),
        negative=checkpoint("negative", json.dumps(dict(good_cfg, intermediate_size=-4))),
        bad_heads=checkpoint("bad_heads", json.dumps(dict(good_cfg, num_key_value_heads=3))),
        other_vocab=checkpoint("other_vocab", json.dumps(dict(good_cfg, vocab_size=32000))),
        no_template=checkpoint("no_template"),
    )
    # a copy of a checkpoint with a manifest, whose model.pth is then cut short: its manifest says so
    trunc = root / "truncated"
    shutil.copytree(tiny_checkpoint, trunc)
    files = {f: dict(size=os.path.getsize(trunc / f), sha256=sha256_of(str(trunc / f))) for f in os.listdir(trunc)}
    (trunc / MANIFEST).write_text(json.dumps(dict(files=files)))
    with open(trunc / "model.pth", "r+b") as f:
        f.truncate(1000)
    paths["truncated"] = str(trunc)
    (root / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    paths["latin1"] = str(root / "latin1.txt")
    paths["dir"] = str(root)
    return paths


def P(*a):  # a prompt and the flags of the case
    return ["--prompt", "Hello there", *a]


CASES = {
    "max_new_tokens 0": (P("--max_new_tokens", "0"), "--max_new_tokens must be >= 1"),
    "max_new_tokens negative": (P("--max_new_tokens", "-5"), "--max_new_tokens must be >= 1"),
    "max_new_tokens not a number": (P("--max_new_tokens", "many"), "invalid int value"),
    "temperature negative": (P("--temperature", "-1"), "--temperature must be finite and >= 0"),
    "temperature inf": (P("--temperature", "inf"), "--temperature must be finite and >= 0"),
    "temperature nan": (P("--temperature", "nan"), "--temperature must be finite and >= 0"),
    "top_p 0": (P("--top_p", "0"), "--top_p must be in (0, 1]"),
    "top_p above 1": (P("--top_p", "1.5"), "--top_p must be in (0, 1]"),
    "top_p nan": (P("--top_p", "nan"), "--top_p must be in (0, 1]"),
    "top_k negative": (P("--top_k", "-1"), "--top_k must be >= 0"),
    "batch_size negative": (P("--batch_size", "-2"), "--batch_size must be >= 0"),
    "prefill_chunk 0": (P("--prefill_chunk", "0"), "--prefill_chunk must be in 1-65536"),
    "prefill_chunk huge": (P("--prefill_chunk", HUGE), "--prefill_chunk must be in 1-65536"),
    "max_seq_len negative": (P("--max_seq_len", "-1"), "--max_seq_len must be >= 0"),
    "prompt longer than the cache": (["--prompt", "word " * 30, "--max_seq_len", "30"], "more than --max_seq_len 30"),
    "gamma 0": (P("--speculate", "self", "--gamma", "0"), "--gamma must be in 1-32 or auto"),
    "gamma 1000": (P("--speculate", "self", "--gamma", "1000"), "--gamma must be in 1-32 or auto"),
    "gamma not a number": (P("--speculate", "self", "--gamma", "often"), "expected an integer or 'auto'"),
    "adapt_every 0": (P("--adapt_every", "0"), "--adapt_every must be >= 1"),
    "sinks negative": (P("--speculate", "self", "--sinks", "-1"), "--sinks must be >= 0"),
    "budget not above sinks": (P("--speculate", "self", "--draft_budget", "16", "--sinks", "16"),
                               "must be larger than --sinks 16"),
    "budget 0": (P("--speculate", "self", "--draft_kv", "snapkv", "--draft_budget", "0"), "--draft_budget must be >= 1"),
    "auto budget below sinks": (P("--speculate", "self", "--draft_budget", "auto", "--sinks", "5000"),
                                "none above --sinks 5000"),
    "snapkv_window 0": (P("--speculate", "self", "--draft_kv", "snapkv", "--snapkv_window", "0"),
                        "--snapkv_window must be >= 1"),
    "snapkv_window negative": (P("--snapkv_window", "-3"), "--snapkv_window must be >= 1"),
    "snapkv_recent negative": (P("--snapkv_recent", "-1"), "--snapkv_recent must be >= 0"),
    "snapkv budget not above recent": (P("--speculate", "self", "--draft_kv", "snapkv", "--draft_budget", "10",
                                         "--snapkv_recent", "10"), "must be larger than --snapkv_recent 10"),
    "self-speculation with a full cache": (P("--speculate", "self", "--draft_kv", "full"), "needs a sparse --draft_kv"),
    "draft without its checkpoint": (P("--speculate", "draft"), "needs --draft_checkpoint_path"),
    "draft checkpoint without draft": (P("--draft_checkpoint_path", "/tmp"), "--draft_checkpoint_path needs --speculate draft"),
    "draft checkpoint missing": (P("--speculate", "draft", "--draft_checkpoint_path", "/nonexistent/draft"),
                                 "draft checkpoint /nonexistent/draft: missing model.pth"),
    "draft with another vocabulary": (P("--speculate", "draft", "--draft_checkpoint_path", "{other_vocab}"),
                                      "draft vocabulary (32000) differs from the target's (259)"),
    "unknown flag": (P("--no_such_flag"), "unrecognized arguments: --no_such_flag"),
    "unknown dtype": (P("--dtype", "float8"), "invalid choice: 'float8'"),
    "flex without compile": (P("--attn", "flex"), "--attn flex runs inside compiled steps: add --compile"),
    "flash without flash-attn": (P("--attn", "flash"), "--attn flash needs the flash-attn package"),
    "cuda without CUDA": (P("--device", "cuda"), "CUDA is not available"),
    "unknown device": (P("--device", "banana"), "is not a device"),
    "unsupported device": (P("--device", "meta"), "only cpu and cuda are supported"),
    "json into a missing directory": (P("--json", "/nonexistent/dir/out.json"), "directory /nonexistent/dir does not exist"),
    "json is a directory": (P("--json", "{dir}"), "is a directory"),
    "prompt file missing": (["--prompt_file", "/nonexistent.txt"], "/nonexistent.txt: no such readable file"),
    "prompt file not UTF-8": (["--prompt_file", "{latin1}"], "not UTF-8 text"),
    "empty prompt": (["--prompt", ""], "prompt 0 is empty"),
    "no prompt": ([], "give at least one --prompt or --prompt_file, or --requests"),
    "prompt and requests": (P("--requests", "/dev/null"), "not both"),
    "results without requests": (P("--results", "/tmp/r.jsonl"), "--results needs --requests"),
    "checkpoint missing": (P("--checkpoint_path", "/nonexistent/ckpt"), "missing model.pth (run: python scripts/prepare_smollm2.py"),
    "config not an object": (P("--checkpoint_path", "{not_object}"), "expected a JSON object, found list"),
    "config not JSON": (P("--checkpoint_path", "{not_json}"), "not readable JSON"),
    "config lacks a key": (P("--checkpoint_path", "{missing_key}"), "missing key 'hidden_size'"),
    "config with a string size": (P("--checkpoint_path", "{wrong_type}"), "'num_hidden_layers' must be a positive integer"),
    "config with a negative size": (P("--checkpoint_path", "{negative}"), "'intermediate_size' must be a positive integer"),
    "config with heads that do not group": (P("--checkpoint_path", "{bad_heads}"), "is not a multiple of n_kv_head=3"),
    "truncated weights": (P("--checkpoint_path", "{truncated}"), "has 1000 bytes, manifest.json says"),
    "chat without a template": (P("--chat", "--checkpoint_path", "{no_template}"), "--chat:"),
    "cache larger than memory": (P("--batch_size", "100000", "--max_seq_len", "8192"), "bytes ("),
    "draft cache larger than memory": (P("--speculate", "self", "--batch_size", "4000", "--max_seq_len", "64",
                                         "--max_new_tokens", "8", "--draft_budget", "60000"), "or --draft_budget"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_loading(case, bad, tiny_checkpoint, no_loading, capsys):
    argv, expected = CASES[case]
    argv = [a.format(**bad) for a in argv]
    if "--checkpoint_path" not in argv:
        argv = ["--checkpoint_path", tiny_checkpoint, *argv]
    with pytest.raises(SystemExit) as e:
        G.cli(argv)
    out = capsys.readouterr()
    err = out.err.strip()
    assert e.value.code == 2, (e.value.code, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert expected in err, err
    assert not out.out.strip()


def test_cache_beyond_the_process_memory_limit(tiny_checkpoint):
    """A cache that fits the machine but not this process's address-space limit is refused in one line."""
    limit = 4 << 30  # the 8 GiB fp32 cache below fits this machine, not the limit
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit})); "
            f"sys.argv = ['generate.py', '--checkpoint_path', {tiny_checkpoint!r}, '--prompt', 'hi', '--batch_size', '2048', "
            "'--max_seq_len', '8192']; import runpy; runpy.run_path('generate.py', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "free to this process" in r.stderr, r.stderr


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_real_process_prints_one_line(tiny_checkpoint):
    ckpt = ["--checkpoint_path", tiny_checkpoint]
    for argv in ([*ckpt, "--prompt", "hi", "--gamma", "0", "--speculate", "self"], [*ckpt, "--prompt", "hi", "--bogus"],
                 ["--checkpoint_path", "/nonexistent", "--prompt", "hi"]):
        r = run_cli(*argv, timeout=120)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr


def test_faulty_weights_are_one_line_after_loading_began(tmp_path):
    """Faults only reading the weights reveals: pickled code, a tensor of the wrong shape, weights of
    another size than config.json says, a file that is not a checkpoint. Exit code 1, one line."""
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    good = write_tiny_checkpoint(tmp_path / "good", num_hidden_layers=1)
    state = torch.load(os.path.join(good, "model.pth"), weights_only=True)
    cases = {
        "refused: holds pickled objects": write_tiny_checkpoint(
            tmp_path / "pickle", {"tok_embeddings.weight": torch.zeros(2), "x": Payload()}, num_hidden_layers=1),
        "tensor layers.0.attention.wo.weight has shape [64, 32], config.json implies [64, 64]": write_tiny_checkpoint(
            tmp_path / "shape", dict(state, **{"layers.0.attention.wo.weight": torch.zeros(64, 32)}),
            num_hidden_layers=1),
        "state dict does not match config.json": write_tiny_checkpoint(tmp_path / "layers", state, num_hidden_layers=2),
        "tensor tok_embeddings.weight has shape [259, 64], config.json implies [259, 128]": write_tiny_checkpoint(
            tmp_path / "dim", state, num_hidden_layers=1, hidden_size=128, head_dim=16),
    }
    garbage = write_tiny_checkpoint(tmp_path / "garbage", num_hidden_layers=1)
    with open(os.path.join(garbage, "model.pth"), "wb") as f:
        f.write(b"not a checkpoint at all")
    cases["not a readable checkpoint"] = garbage
    for expected, ckpt in cases.items():
        r = run_cli("--checkpoint_path", ckpt, "--prompt", "hi", "--max_new_tokens", "2", timeout=120)
        assert r.returncode == 1 and "pwned" not in r.stdout, r.stdout + r.stderr
        assert r.stderr.strip().count("\n") == 0 and expected in r.stderr, r.stderr


def test_failed_output_write_keeps_the_old_file(tmp_path, tiny_checkpoint, monkeypatch, capsys):
    ckpt = tiny_checkpoint
    out = tmp_path / "out.json"
    out.write_text('{"old": true}')

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(SystemExit) as e:
        G.cli(["--checkpoint_path", ckpt, "--prompt", "hi", "--max_new_tokens", "2", "--json", str(out)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "No space left on device" in err and "\n" not in err, err
    assert json.loads(out.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["out.json"]


def test_tiny_temperature_is_greedy_and_huge_is_well_defined():
    from spec import RowSampling, Sampling, logits_to_probs
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3]])
    p = logits_to_probs(logits, RowSampling.of(Sampling(temperature=1e-40), 1, "cpu"))
    assert torch.isfinite(p).all() and p.argmax().item() == 1 and p[0, 1] == 1.0
    p = logits_to_probs(logits, RowSampling.of(Sampling(temperature=1e30), 1, "cpu"))
    assert torch.isfinite(p).all() and torch.allclose(p, torch.full_like(p, 0.25))


def test_prompt_past_the_trained_context_warns_once(tmp_path, capsys):
    ckpt = write_tiny_checkpoint(tmp_path / "short", max_position_embeddings=16)
    assert G.cli(["--checkpoint_path", ckpt, "--prompt", "word " * 12, "--max_new_tokens", "8"]) == 0
    err = capsys.readouterr().err
    assert err.count("past the model's trained context of 16") == 1


def test_num_samples_reports_each_sample_bandwidth_and_memory(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["--checkpoint_path", tiny_checkpoint, "--prompt", "Hello there", "--max_new_tokens", "12",
            "--speculate", "self", "--draft_budget", "8", "--sinks", "2", "--num_samples", "3", "--json", str(out)]
    assert G.cli(argv) == 0
    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("sample ")] == \
        ["sample 0", "sample 1", "sample 2"]
    assert "bandwidth achieved" in printed and "peak memory" in printed and "over 3 samples" in printed
    rec = json.loads(out.read_text())
    assert len(rec["samples_tokens_per_s"]) == 3 and rec["bandwidth_GBps"] > 0 and rec["peak_memory_bytes"] > 0


def test_default_gamma_adapts_to_a_short_generation(tiny_checkpoint, tmp_path, capsys):
    """--speculate self with --max_new_tokens 4: the default gamma (4) drafts more than the row can
    keep, so it is lowered with a note, never refused; the tokens are the autoregressive ones."""
    common = ["--checkpoint_path", tiny_checkpoint, "--prompt", "Hello there", "--max_new_tokens", "4"]
    assert G.cli(common + ["--json", str(tmp_path / "ar.json")]) == 0
    assert G.cli(common + ["--speculate", "self", "--draft_budget", "8", "--sinks", "2",
                           "--json", str(tmp_path / "sd.json")]) == 0
    assert "note: --gamma 4 drafts more than --max_new_tokens 4 can keep: gamma 3 instead" in capsys.readouterr().err
    ar, sd = (json.loads((tmp_path / f).read_text()) for f in ("ar.json", "sd.json"))
    assert sd["tokens"] == ar["tokens"]
