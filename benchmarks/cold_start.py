# The command line's cold start as a new user meets it: the wall time of one whole
#   python generate.py --prompt ... --speculate self --gamma 3 --max_new_tokens 64 --dtype bfloat16
# eager; the same with --compile and an empty inductor cache (truly cold: besides compiling every
# graph, inductor probes the CPU's vector instruction set once per cache directory, which costs
# seconds); and --compile again on the cache that run filled (warm). The three run in turn, once
# per cycle, --repeats cycles, each cold run with a fresh cache directory. Reports the median wall
# time of each, the ratios compiled-cold / eager and compiled-warm / eager (the median over cycles
# of the ratio within a cycle), and the decode tokens/s and prefill seconds each run reported in
# its --json output (compilation happens within both).
#   python -m benchmarks.cold_start --repeats 3
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks import common

CONFIGS = ("eager", "compiled_cold", "compiled_warm")


def run_cli(args, compiled, cache_dir, out_json) -> dict:
    """One generate.py process, timed from start to exit; its own --json figures besides."""
    cmd = [sys.executable, os.path.join(common.ROOT, "generate.py"), "--checkpoint_path", args.checkpoint_path,
           "--prompt", args.prompt, "--speculate", "self", "--gamma", str(args.gamma),
           "--max_new_tokens", str(args.max_new_tokens), "--dtype", args.dtype, "--json", out_json]
    cmd += ["--compile"] if compiled else []
    # every compiler cache lives under the inductor cache directory (Triton's too, on a GPU)
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, TRITON_CACHE_DIR=os.path.join(cache_dir, "triton"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=common.ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    with open(out_json) as f:
        out = json.load(f)
    return dict(wall_s=wall, tokens_per_s=out["tokens_per_s"], prefill_s=out["prefill_s"], decode_s=out["decode_s"],
                new_tokens=len(out["tokens"][0]))


def main(argv=None):
    p = argparse.ArgumentParser(description="Wall time of generate.py from a cold start: eager, compiled cold, compiled warm.")
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--prompt", default="Once upon a time, in a small village by the sea,",
                   help="SmolLM2 continues this one past 64 tokens without an EOS")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--repeats", type=int, default=3, help="cycles over the three configurations")
    p.add_argument("--json", default=None, help="default: benchmarks/results/cold-start-<time>.json")
    args = p.parse_args(argv)
    runs = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        for cycle in range(args.repeats):
            warm_cache = tempfile.mkdtemp(dir=tmp)  # empty: the cold run fills it for the warm one
            for c in CONFIGS:
                cache = warm_cache if c != "eager" else tempfile.mkdtemp(dir=tmp)
                runs[c].append(run_cli(args, c != "eager", cache, os.path.join(tmp, f"{c}-{cycle}.json")))
                r = runs[c][-1]
                print(f"cycle {cycle} {c:13s}: {r['wall_s']:6.1f} s wall, prefill {r['prefill_s']:.2f} s, decode "
                      f"{r['decode_s']:.2f} s, {r['new_tokens']} tokens at {r['tokens_per_s']:.1f} tokens/s", flush=True)
    med = statistics.median
    summary = {c: dict(wall_s=med(r["wall_s"] for r in rs), tokens_per_s=med(r["tokens_per_s"] for r in rs),
                       prefill_s=med(r["prefill_s"] for r in rs), decode_s=med(r["decode_s"] for r in rs))
               for c, rs in runs.items()}
    ratios = {f"{c}_over_eager": [x["wall_s"] / e["wall_s"] for x, e in zip(runs[c], runs["eager"])] for c in CONFIGS[1:]}
    device = "cuda" if torch.cuda.is_available() else "cpu"  # generate.py's default
    record = dict(env=common.environment(device), settings=vars(args), runs=runs,
                  median=summary, **{k: med(v) for k, v in ratios.items()}, **{f"{k}_runs": v for k, v in ratios.items()})
    for c in CONFIGS:
        s = summary[c]
        print(f"{c:13s} median {s['wall_s']:6.1f} s wall ({s['wall_s'] / summary['eager']['wall_s']:.2f}x eager by "
              f"medians), {s['tokens_per_s']:.1f} decode tokens/s")
    print(f"within cycles: compiled cold / eager {record['compiled_cold_over_eager']:.2f}, "
          f"compiled warm / eager {record['compiled_warm_over_eager']:.2f}")
    path = args.json or os.path.join(common.RESULTS, f"cold-start-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    common.write_json(path, record)


if __name__ == "__main__":
    main()
