"""Acceptance of self-speculation on real text: per-token acceptance and tokens per round for each
draft cache kind and budget, with and without refreshing the draft window with the target's K/V.

    python scripts/acceptance.py --rows 4 --prompt_len 4096 --new_tokens 128 --gamma 4 \
        --json benchmarks/results/acceptance_smollm2.json

Greedy decoding; every configuration is also checked token for token against autoregressive output.
Acceptance depends on the model and text, not on the machine, so this runs anywhere."""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import generate as G  # noqa: E402
from generate import DEFAULT_CHECKPOINT, SpecArgs, generate  # noqa: E402
from model import load_model  # noqa: E402
from spec import Sampling  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def essay_prompts(tokenizer, path, rows, prompt_len):
    """rows prompts of prompt_len tokens from distinct, non-overlapping stretches of the essays."""
    ids = tokenizer.encode(json.load(open(path))["text"][: rows * prompt_len * 6])
    stride = len(ids) // rows
    assert stride >= prompt_len, "not enough text for that many rows"
    return [ids[i * stride: i * stride + prompt_len] for i in range(rows)]


def prefill_once(prefill):
    """The target's prefill is the same for every configuration: compute it once, copy it after."""
    saved = {}

    def cached(model, cache, tokens, prompt_lens, chunk):
        key = (id(model), tokens.shape, hash(tokens.numpy().tobytes()), cache.k.shape)
        if key not in saved:
            saved[key] = (prefill(model, cache, tokens, prompt_lens, chunk), cache.k.clone(), cache.v.clone())
        logits, k, v = saved[key]
        cache.k.copy_(k)
        cache.v.copy_(v)
        return logits

    return cached


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT)
    p.add_argument("--essays", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "PaulGrahamEssays.json"))
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--prompt_len", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--kinds", nargs="+", default=["streaming", "snapkv"])
    p.add_argument("--refresh", type=int, nargs="+", default=[1, 0], help="1: refresh the draft window, 0: not")
    p.add_argument("--snapkv_recent", type=int, nargs="+", default=[0], help="SnapKV recent windows to try (0: budget/2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", default=None)
    a = p.parse_args()

    model = load_model(a.checkpoint_path, "cpu", getattr(torch, a.dtype))
    prompts = essay_prompts(load_tokenizer(a.checkpoint_path), a.essays, a.rows, a.prompt_len)
    max_seq = a.prompt_len + a.new_tokens
    G.prefill = prefill_once(G.prefill)
    t = time.time()
    ar = generate(model, prompts, a.new_tokens, set(), Sampling(), max_seq).tokens
    print(f"autoregressive reference: {time.time() - t:.0f} s", flush=True)
    results = []
    print(f"{'draft_kv':10} {'budget':>6} {'recent':>6} {'refresh':>7} {'accept':>7} {'tok/round':>9} {'== AR':>5}")
    for kind in a.kinds:
        for budget in a.budgets:
            for recent in (a.snapkv_recent if kind == "snapkv" else [0]):
                for refresh in a.refresh:
                    sa = SpecArgs("self", a.gamma, kind, budget, snapkv_recent=recent, refresh=bool(refresh))
                    r = generate(model, prompts, a.new_tokens, set(), Sampling(), max_seq, sa=sa)
                    row = dict(draft_kv=kind, budget=budget, snapkv_recent=recent or (budget // 2 if kind == "snapkv" else None),
                               refresh=bool(refresh), acceptance=r.acceptance, tokens_per_round=r.tokens_per_round,
                               equals_autoregressive=r.tokens == ar)
                    results.append(row)
                    print(f"{kind:10} {budget:6} {row['snapkv_recent'] or '-':>6} {refresh:7} {r.acceptance:7.3f} "
                          f"{r.tokens_per_round:9.2f} {str(row['equals_autoregressive']):>5}", flush=True)
    if a.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(model=a.checkpoint_path, rows=a.rows, prompt_len=a.prompt_len, new_tokens=a.new_tokens,
                           gamma=a.gamma, dtype=a.dtype, sinks=16, snapkv_window=32, text="PaulGrahamEssays",
                           date=datetime.date.today().isoformat(), commit=commit, torch=torch.__version__,
                           results=results), f, indent=1)


if __name__ == "__main__":
    main()
