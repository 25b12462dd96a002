# What every benchmark script shares (each runs as a module from the repository root, e.g.
# `python -m benchmarks.sweep`, so the engine's files import as they are): where the repository is, the environment record, atomic JSON
# output, essay prompts, random-weight models of named shapes, CPU steal-time counters, and one
# timed engine run rated by wall time and at its median step. The one timing helper is
# costmodel.median_time; the one definition of decode tokens/s is engine.Result.tokens_per_s.
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from checkpoint import DEFAULT_CHECKPOINT as SMOLLM2, write_atomic
from engine import Result, device_name, generate
from model import ModelArgs, Transformer, place
from spec import Sampling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ESSAYS = os.path.join(ROOT, "data", "PaulGrahamEssays.json")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
NO_EOS = {-1}  # an id no model emits: every row runs to max_new_tokens
# shapes for random-weight runs besides model.CONFIGS; "tiny" checks GPU code paths on a CPU
EXTRA_SHAPES = {"tiny": dict(dim=96, n_layer=2, n_head=6, n_kv_head=2, intermediate_size=128, vocab_size=512)}


def git(*cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device) -> dict:
    head = git("rev-parse", "HEAD")
    return dict(device=device_name(torch.device(device)),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                # a copy of the tree without .git (a remote machine) names its commit in GIT_COMMIT
                commit=head or os.environ.get("GIT_COMMIT"),
                uncommitted_changes=None if head is None else bool(git("status", "--porcelain", "-uno")),
                torch=torch.__version__, python=platform.python_version(), torch_threads=torch.get_num_threads())


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    text = json.dumps(record, indent=1, default=str)
    write_atomic(path, lambda f: f.write(text.encode()))
    print(f"wrote {path}", flush=True)


def essay_prompts(tokenizer, batch: int, length: int, path: str = ESSAYS, overlap: bool = False) -> list:
    """batch prompts of exactly `length` tokens (BOS first where the tokenizer uses one), each from
    its own stretch of the essays. overlap: when the essays are too short for batch disjoint
    stretches (about 700K SmolLM2 tokens), start the rows at evenly spaced offsets instead."""
    with open(path) as f:
        text = json.load(f)["text"]
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    n = length - len(bos)
    ids, chars = [], 6 * batch * n
    while len(ids) < batch * n:  # encode only as much text as needed
        ids = tokenizer.encode(text[:chars])
        if chars >= len(text):
            break
        chars *= 2
    if len(ids) >= batch * n:
        starts = [i * n for i in range(batch)]
    elif overlap and len(ids) >= n:
        starts = [i * (len(ids) - n) // max(batch - 1, 1) for i in range(batch)]
    else:
        sys.exit(f"error: the essays hold {len(ids)} tokens, fewer than {batch} x {n}")
    return [bos + ids[s:s + n] for s in starts]


def random_model(name: str, device, dtype) -> Transformer:
    """Random weights of a named shape, built in `dtype` directly (an 8B model never exists in fp32)."""
    args = ModelArgs(**EXTRA_SHAPES[name]) if name in EXTRA_SHAPES else ModelArgs.from_name(name)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    for n, p in model.named_parameters():
        p.data.fill_(1.0) if n.endswith("norm.weight") else p.data.normal_(0, 0.02)
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return place(model, device, dtype)


def cpu_counters():
    """(steal, total) CPU time from /proc/stat, or None off Linux. Steal is time the hypervisor gave
    this machine's virtual CPUs to others: the cause of large speed swings on shared VMs."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return v[7], sum(v)


def cpu_stolen_since(start):
    """Fraction of CPU time stolen since cpu_counters() returned `start`."""
    end = cpu_counters()
    if start is None or end is None or end[1] == start[1]:
        return None
    return (end[0] - start[0]) / (end[1] - start[1])


def ints(text: str) -> list:
    """"1,2,4" -> [1, 2, 4] (flags that take lists)."""
    return [int(x) for x in text.split(",") if x]


def common_prefix(a: list, b: list) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(rows: list, ref: list) -> dict:
    """Fraction of rows identical to the reference rows, and the mean length of the common prefix."""
    return dict(rows_equal=sum(a == b for a, b in zip(rows, ref)) / len(ref),
                mean_common_prefix=statistics.mean(common_prefix(a, b) for a, b in zip(rows, ref)))


def median_step_tokens_per_s(r: Result) -> float:
    """Decode tokens/s with every step (or every round of one gamma) at the median time of its kind.
    Static shapes make them all cost the same, so the median keeps the run's own speed and drops the
    stalls other processes cause, which on a shared machine swing wall time by 2-4x."""
    by_gamma = {}
    for g, t in zip(r.gammas or [0] * len(r.round_s), r.round_s):
        by_gamma.setdefault(g, []).append(t)
    return (sum(map(len, r.tokens)) - len(r.tokens)) / sum(len(ts) * statistics.median(ts) for ts in by_gamma.values())


@dataclass
class Run:
    """One timed generation of all of a configuration's prompts."""
    result: Result  # the generate() Results of its batches, merged
    tokens_per_s: float  # by wall time: Result.tokens_per_s
    tokens_per_s_median_step: float  # see median_step_tokens_per_s
    cpu_stolen: Optional[float]  # share of CPU time stolen during the run (None off Linux)


def engine_run(engine, prompts: list, max_new_tokens: int, warm: bool = False) -> Run:
    """Greedy, no EOS stop, the prompts in consecutive batches of the engine's rows, one generate()
    each. warm: first a short generation, a few steps or rounds, which compiles the step shapes
    the run uses and pays the first calls' allocations."""
    B, sa = engine.batch_size, engine.sa
    if warm:
        width = max(sa.gamma, sa.gamma_max) + 1 if sa.mode != "none" else 1
        generate(engine, prompts[:B], min(max_new_tokens, 2 * width + 1), NO_EOS, Sampling())
    start = cpu_counters()
    parts = [generate(engine, prompts[i:i + B], max_new_tokens, NO_EOS, Sampling()) for i in range(0, len(prompts), B)]
    r = Result(tokens=[t for p in parts for t in p.tokens], prefill_s=sum(p.prefill_s for p in parts),
               decode_s=sum(p.decode_s for p in parts), rounds=sum(p.rounds for p in parts),
               accepted=sum(p.accepted for p in parts), evaluated=sum(p.evaluated for p in parts),
               row_rounds=sum(p.row_rounds for p in parts), gammas=[g for p in parts for g in p.gammas],
               round_s=[t for p in parts for t in p.round_s])
    return Run(r, r.tokens_per_s, median_step_tokens_per_s(r), cpu_stolen_since(start))
