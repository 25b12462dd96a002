"""Acceptance of self-speculation on real text: per-token acceptance and tokens per round for each
draft cache kind and budget, with and without refreshing the draft window with the target's K/V.

    python -m benchmarks.acceptance --rows 4 --prompt_len 4096 --new_tokens 128 --gamma 4 \
        --json benchmarks/results/acceptance_smollm2.json

Greedy decoding; every configuration is also checked token for token against autoregressive output.
Acceptance depends on the model and text, not on the machine, so this runs anywhere. Every
configuration prefills its prompts anew."""
import argparse
import os
import time

import torch

from benchmarks import common
from benchmarks.common import NO_EOS
from engine import Engine, SpecArgs, generate
from checkpoint import load_model
from spec import Sampling
from tokenizer import load_tokenizer


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--essays", default=common.ESSAYS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=4, help="prompts, each from its own stretch of the essays")
    p.add_argument("--prompt_len", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budgets", type=int, nargs="+", default=[128, 256, 512, 1024])
    p.add_argument("--kinds", nargs="+", default=["streaming", "snapkv"])
    p.add_argument("--refresh", type=int, nargs="+", default=[1, 0], help="1: refresh the draft window, 0: not")
    p.add_argument("--snapkv_recent", type=int, nargs="+", default=[0], help="SnapKV recent windows to try (0: budget/2)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)

    model = load_model(a.checkpoint_path, a.device, getattr(torch, a.dtype))
    prompts = common.essay_prompts(load_tokenizer(a.checkpoint_path), a.rows, a.prompt_len, a.essays)
    max_seq = a.prompt_len + a.new_tokens
    t = time.perf_counter()
    ar = generate(Engine(model, a.rows, max_seq), prompts, a.new_tokens, NO_EOS, Sampling()).tokens
    print(f"autoregressive reference: {time.perf_counter() - t:.0f} s", flush=True)
    results = []
    print(f"{'draft_kv':10} {'budget':>6} {'recent':>6} {'refresh':>7} {'accept':>7} {'tok/round':>9} {'== AR':>5}")
    for kind in a.kinds:
        for budget in a.budgets:
            for recent in (a.snapkv_recent if kind == "snapkv" else [0]):
                for refresh in a.refresh:
                    sa = SpecArgs("self", gamma=a.gamma, draft_kv=kind, draft_budget=budget, snapkv_recent=recent,
                                  refresh=bool(refresh))
                    r = generate(Engine(model, a.rows, max_seq, sa=sa), prompts, a.new_tokens, NO_EOS, Sampling())
                    row = dict(draft_kv=kind, budget=budget, snapkv_recent=recent or (budget // 2 if kind == "snapkv" else None),
                               refresh=bool(refresh), acceptance=r.acceptance, tokens_per_round=r.tokens_per_round,
                               equals_autoregressive=r.tokens == ar)
                    results.append(row)
                    print(f"{kind:10} {budget:6} {row['snapkv_recent'] or '-':>6} {refresh:7} {r.acceptance:7.3f} "
                          f"{r.tokens_per_round:9.2f} {str(row['equals_autoregressive']):>5}", flush=True)
    if a.json:
        sa = SpecArgs()
        common.write_json(a.json, dict(env=common.environment(a.device), model=a.checkpoint_path, rows=a.rows,
                                         prompt_len=a.prompt_len, new_tokens=a.new_tokens, gamma=a.gamma, dtype=a.dtype,
                                         sinks=sa.sinks, snapkv_window=sa.snapkv_window, text="PaulGrahamEssays",
                                         results=results))


if __name__ == "__main__":
    main()
