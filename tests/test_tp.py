# Tensor parallelism on CPU (gloo): generate.py under torchrun must give the tokens of one process.
# Greedy speculative decoding emits the target's greedy tokens whatever the draft proposes, so the
# speculative cases also compare rounds and acceptance, which do depend on the (sharded) draft.
# Every launch costs a few CPU-seconds of interpreter and torch start-up per process: keep them few.
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

import generate as G
from conftest import TINY_CONFIG, write_tiny_checkpoint
from model import ModelArgs, Transformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 300
PROMPTS = ["Hi", "The quick brown fox jumps over the lazy dog, twice.",
           "Once upon a time, in a kingdom by the sea, there lived a king who counted every grain of sand on the "
           "shore, and every evening he wrote the number into a very long book that nobody ever read."]


def env():
    # N processes share a couple of cores: more than one thread each only thrashes
    e = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def torchrun(n, argv, timeout=TIMEOUT):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "generate.py", *argv]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def run_tp(n, argv, tmp_path):
    out = tmp_path / f"tp{n}.json"
    r = torchrun(n, [*argv, "--json", str(out)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("prefill ") == 1, r.stdout  # only rank 0 prints
    res = json.loads(out.read_text())
    assert res["world_size"] == n
    return res


def run_one(argv, tmp_path):
    out = tmp_path / "one.json"
    G.main([*argv, "--json", str(out)])
    return json.loads(out.read_text())


def same_run(a, b):
    assert a["tokens"] == b["tokens"]
    assert (a["rounds"], a["acceptance"]) == (b["rounds"], b["acceptance"])


@pytest.fixture(scope="module")
def tiny_ckpts(tmp_path_factory):
    """A 2-layer target with 4 KV heads (2 per rank at world size 2) and a qkv bias, and as the
    standalone draft its first layer alone: close enough to the target that the acceptance, which the
    draft test compares, depends on the draft computing right. (SmolLM2 covers tied embeddings.)"""
    cfg = dict(TINY_CONFIG, rope_theta=1000.0, num_attention_heads=8, num_key_value_heads=4, attention_bias=True)
    torch.manual_seed(0)
    state = Transformer(ModelArgs.from_hf_config(cfg)).state_dict()
    for k, v in state.items():  # wide weights: peaked logits, so no near-ties for rounding to flip
        v.normal_(0, 0.35 if not k.startswith("layers.1.") else 0.1)
    root = tmp_path_factory.mktemp("tp_models")
    target = write_tiny_checkpoint(root / "target", state, **cfg)
    draft = write_tiny_checkpoint(root / "draft", {k: v for k, v in state.items() if not k.startswith("layers.1.")},
                                  **dict(cfg, num_hidden_layers=1))
    return target, draft


def tiny_argv(target):
    argv = ["--checkpoint_path", target, "--max_new_tokens", "20", "--prefill_chunk", "16", "--gamma", "3",
            "--draft_budget", "20", "--sinks", "4", "--snapkv_window", "8"]
    return argv + [a for p in PROMPTS for a in ("--prompt", p)]


SAMPLED = ["--temperature", "0.8", "--top_p", "0.95", "--seed", "3"]


@pytest.mark.parametrize("mode", [[], ["--speculate", "self"], ["--speculate", "self", "--draft_kv", "snapkv"] + SAMPLED,
                                  "draft"], ids=["ar", "self-streaming", "self-snapkv-sampled", "draft"])
def test_tiny_two_ranks_equal_one(tiny_ckpts, tmp_path, mode):
    """Sampling: every rank draws from the same RNG stream as one process would (main() also checks
    that the ranks' tokens agree), and the logits differ from one process's only by rounding, which
    would have to fall on a near-tie to change a draw."""
    target, draft = tiny_ckpts
    if mode == "draft":
        mode = ["--speculate", "draft", "--draft_checkpoint_path", draft]
    argv = tiny_argv(target) + mode
    one, two = run_one(argv, tmp_path), run_tp(2, argv, tmp_path)
    same_run(one, two)
    assert min(map(len, two["tokens"])) > 1


def test_gamma_auto_two_ranks(tiny_ckpts, tmp_path):
    """--gamma auto times the steps on each rank; all ranks must take rank 0's timings, or they would
    pick different gammas and their collectives would no longer match."""
    target, _ = tiny_ckpts
    ar = run_one(tiny_argv(target), tmp_path)
    two = run_tp(2, tiny_argv(target) + ["--speculate", "self", "--gamma", "auto", "--adapt_every", "2"], tmp_path)
    assert two["tokens"] == ar["tokens"] and len(two["gamma_per_round"]) > 2


def test_request_stream_two_ranks_equal_one(tiny_ckpts, tmp_path):
    """Continuous batching under tensor parallelism: every rank refills the same slots in the same
    order, and the results (written by rank 0) are one process's."""
    target, _ = tiny_ckpts
    reqs = tmp_path / "requests.jsonl"
    reqs.write_text("\n".join(json.dumps(dict(prompt=p, max_new_tokens=n)) for p, n in zip(PROMPTS * 2, (3, 12, 7, 9, 2, 5))))
    argv = ["--checkpoint_path", target, "--requests", str(reqs), "--batch_size", "2", "--prefill_chunk", "16",
            "--speculate", "self", "--gamma", "2", "--draft_budget", "20", "--sinks", "4"]
    G.main(argv + ["--results", str(tmp_path / "one.jsonl")])
    r = torchrun(2, argv + ["--results", str(tmp_path / "two.jsonl")])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    one, two = ({rec["id"]: rec["tokens"] for rec in map(json.loads, (tmp_path / f).read_text().splitlines())}
                for f in ("one.jsonl", "two.jsonl"))
    assert one == two and len(one) == 6


def test_disagreeing_ranks_fail():
    """The agreement check itself: ranks that hold different tokens exit non-zero, rank 0 says why."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = ("import os, tp; tp.maybe_init_distributed(__import__('torch').device('cpu')); "
            "tp.check_agree([[1, 2, int(os.environ['RANK'])]])")
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=dict(env(), RANK=str(r), WORLD_SIZE="2",
                                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    assert [p.returncode for p in procs] == [1, 1], outs
    assert "ranks generated different tokens" in outs[0][1] and "different tokens" not in outs[1][1]


def test_smollm2_three_ranks_equal_one(smollm2_dir, tmp_path):
    """SmolLM2-135M: 9 query and 3 KV heads, so 3 ranks of 3 and 1. One launch (3 processes on 2 cores
    are slow): greedy self-speculation gives the greedy autoregressive tokens, and the rounds and
    acceptance of one process's self-speculation."""
    argv = ["--checkpoint_path", smollm2_dir, "--max_new_tokens", "12", "--prompt", "The capital of France is",
            "--prompt", "A short poem about the sea, the wind and the gulls that cry over the harbour at dawn:"]
    spec = ["--speculate", "self", "--gamma", "3", "--draft_budget", "12", "--sinks", "4"]
    ar = run_one(argv, tmp_path)
    one, three = run_one(argv + spec, tmp_path), run_tp(3, argv + spec, tmp_path)
    assert ar["tokens"] == one["tokens"]
    same_run(one, three)


def test_bad_world_size_fails_fast_everywhere(smollm2_dir):
    """3 KV heads do not split over 2 ranks: every rank exits before any process group exists (nothing
    can hang), with one line from rank 0 naming the world size and the head counts."""
    r = torchrun(2, ["--checkpoint_path", smollm2_dir, "--prompt", "hi"], timeout=50)  # a hang would wait 60 s
    assert r.returncode != 0
    lines = [line for line in (r.stdout + r.stderr).splitlines() if "does not divide" in line]
    assert len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: ") and all(s in lines[0] for s in ("world size 2", "n_head=9", "n_kv_head=3"))
    assert 'generate.py", line' not in r.stderr  # no traceback from any rank
