"""End-to-end speculative vs autoregressive decode throughput, interleaved in one process.

    OMP_NUM_THREADS=1 python scripts/sd_vs_ar.py --dtype bfloat16 --batch_size 8 --prompt_len 4096 \
        --gammas 3 4 --budget 256 --json benchmarks/results/sd_vs_ar-cpu.json

AR and SD runs alternate (AR, SD gamma..., AR, ...) so that drift in machine load hits both alike;
the target's prefill is computed once and copied into every run (only decode is compared)."""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import generate as G  # noqa: E402
from acceptance import essay_prompts, prefill_once  # noqa: E402
from model import load_model  # noqa: E402
from spec import Sampling  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint_path", default=G.DEFAULT_CHECKPOINT)
    p.add_argument("--essays", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "PaulGrahamEssays.json"))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--prompt_len", type=int, default=4096)
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--gammas", type=int, nargs="+", default=[3, 4])
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--draft_kv", default="streaming")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    model = load_model(a.checkpoint_path, "cpu", getattr(torch, a.dtype))
    prompts = essay_prompts(load_tokenizer(a.checkpoint_path), a.essays, a.batch_size, a.prompt_len)
    G.prefill = prefill_once(G.prefill)
    max_seq = a.prompt_len + a.new_tokens
    G.generate(model, prompts, 4, set(), Sampling(), max_seq)  # warm-up, and computes the prefill
    configs = [("ar", None)] + [(f"sd_gamma{g}", G.SpecArgs("self", g, a.draft_kv, a.budget)) for g in a.gammas]
    tps = {name: [] for name, _ in configs}
    alpha = {}
    for rep in range(a.repeats):
        for name, sa in configs:
            r = G.generate(model, prompts, a.new_tokens, set(), Sampling(), max_seq, sa=sa)
            tps[name].append(a.batch_size * a.new_tokens / r.decode_s)
            alpha[name] = r.acceptance
            print(f"{rep} {name:10} {tps[name][-1]:7.2f} tokens/s  acceptance {r.acceptance:.3f}", flush=True)
    ar = statistics.median(tps["ar"])
    summary = {name: dict(tokens_per_s=statistics.median(v), speedup=statistics.median(v) / ar, acceptance=alpha[name])
               for name, v in tps.items()}
    for name, s in summary.items():
        print(f"{name:10} median {s['tokens_per_s']:.2f} tokens/s, {s['speedup']:.2f}x AR")
    if a.json:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        with open(a.json, "w") as f:
            json.dump(dict(device=f"cpu: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads",
                           date=datetime.date.today().isoformat(), commit=commit, torch=torch.__version__,
                           settings=vars(a), runs=tps, summary=summary), f, indent=1)


if __name__ == "__main__":
    main()
