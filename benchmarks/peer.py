# This engine against transformers generate() on the same weights, prompts and greedy settings:
# autoregressive decoding at batch 1 and at --ar_batch_sizes, and speculative decoding at batch 1,
# where transformers' assisted generation runs (it takes one row): prompt lookup, early exit, and an
# assistant model with --hf_assistant.
#   python -m benchmarks.peer --dtype bfloat16 --compile --prefixes 512,4096
# Decode is timed apart from prefill on both sides: the engine times it itself; for transformers a
# stopping criterion stamps the clock at every new token, so decode runs from the first token to the
# last. The machine's speed drifts, so every configuration runs once per cycle, --repeats cycles, and
# each ratio is the median over cycles of the ratio within a cycle.
import argparse
import datetime
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from benchmarks import common
from benchmarks.common import engine_run, ints
from engine import Engine, SpecArgs, sync
from checkpoint import load_model
from tokenizer import load_tokenizer


@dataclass
class Method:
    system: str  # engine | transformers
    name: str
    sa: Optional[SpecArgs] = None  # engine: speculation (None: AR)
    draft_model: object = None  # engine: a standalone draft model
    hf: object = None  # transformers: the model that generates
    kwargs: dict = field(default_factory=dict)  # transformers: generate() arguments
    drafter: object = None  # transformers: the model whose generation_config fixes the drafts per round
    gamma: int = 0


def load_hf(path, gguf, dtype, device):
    """transformers dequantizes a GGUF on loading: it runs the same dense weights as this engine."""
    from transformers import AutoModelForCausalLM

    kw = dict(gguf_file=gguf) if gguf else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw).to(device).eval().requires_grad_(False)


@torch.no_grad()
def hf_generate(m: Method, prompts, n_new, device) -> dict:
    """transformers generate(), greedy, exactly n_new tokens per row, with a clock at every new token
    (or run of accepted tokens) from a stopping criterion that stops nothing."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []  # (seconds, sequence length)

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            sync(device)
            stamps.append((time.perf_counter(), input_ids.shape[1]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    if m.drafter is not None:  # a fixed gamma, as in this engine (transformers' default adapts it, up to 20)
        m.drafter.generation_config.num_assistant_tokens = m.gamma
        m.drafter.generation_config.num_assistant_tokens_schedule = "constant"
        m.drafter.generation_config.assistant_confidence_threshold = 0.0
    ids = torch.tensor(prompts, device=device)
    start = common.cpu_counters()
    out = m.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                        do_sample=False, pad_token_id=m.hf.generation_config.eos_token_id,
                        stopping_criteria=StoppingCriteriaList([Clock()]), **m.kwargs)
    (t_a, n_a), (t_b, n_b) = stamps[0], stamps[-1]
    steps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]  # one per decode step or assisted round
    return dict(tokens=out[:, ids.shape[1]:].tolist(), tokens_per_s=len(prompts) * (n_b - n_a) / (t_b - t_a),
                # as common.median_step_tokens_per_s; meaningful for AR, where every step does the same work
                tokens_per_s_median_step=len(prompts) * (n_b - n_a) / (len(steps) * statistics.median(steps)),
                cpu_stolen=common.cpu_stolen_since(start))


def engine_generate(m: Method, model, prompts, n_new, max_seq, args, warm) -> dict:
    engine = Engine(model, len(prompts), max_seq, sa=m.sa, draft_model=m.draft_model, compile=args.compile)
    r = engine_run(engine, prompts, n_new, warm)
    rec = dict(tokens=r.result.tokens, tokens_per_s=r.tokens_per_s, tokens_per_s_median_step=r.tokens_per_s_median_step,
               cpu_stolen=r.cpu_stolen)
    if m.sa is not None:
        rec.update(acceptance=r.result.acceptance, tokens_per_round=r.result.tokens_per_round)
    return rec


def methods(args, B, hf, hf_compiled, assistant, draft_model) -> list:
    ms = [Method("engine", "ar"), Method("transformers", "ar", hf=hf)]
    if hf_compiled is not None:  # its forward compiled over a static cache (disable_compile: no second compile)
        ms.append(Method("transformers", "ar compiled", hf=hf_compiled,
                         kwargs=dict(cache_implementation="static", disable_compile=True)))
    for g in args.gammas if B == 1 else []:
        ms += [Method("engine", f"self-spec {kind} b{budget} g{g}",
                      SpecArgs("self", gamma=g, draft_kv=kind, draft_budget=budget))
               for kind in args.draft_kv for budget in args.budgets]
        if draft_model is not None:  # the counterpart of transformers' assistant model
            ms.append(Method("engine", f"draft model g{g}", SpecArgs("draft", gamma=g, draft_kv="full", refresh=False),
                             draft_model))
        ms.append(Method("transformers", f"prompt lookup g{g}", hf=hf, kwargs=dict(prompt_lookup_num_tokens=g)))
        ms += [Method("transformers", f"early exit L{n} g{g}", hf=hf, kwargs=dict(assistant_early_exit=n), drafter=hf,
                      gamma=g) for n in args.early_exit]
        if assistant is not None:
            ms.append(Method("transformers", f"assistant model g{g}", hf=hf, kwargs=dict(assistant_model=assistant),
                             drafter=assistant, gamma=g))
    return ms


def main(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description="This engine against transformers generate(): AR and speculative decoding.")
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--hf_model", default=None, help="directory transformers loads (default: --checkpoint_path)")
    p.add_argument("--hf_gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf",
                   help="GGUF file inside --hf_model ('' for a directory with safetensors)")
    p.add_argument("--hf_assistant", default=None, help="a transformers model directory to draft as assistant_model")
    p.add_argument("--draft_checkpoint_path", default=None, help="the same draft for this engine (--speculate draft)")
    p.add_argument("--essays", default=common.ESSAYS)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--compile", action="store_true", help="this engine's steps compiled, as generate.py --compile")
    p.add_argument("--hf_compile", action="store_true",
                   help="also transformers AR with a static cache and its forward torch.compile'd")
    p.add_argument("--prefixes", type=ints, default=[512, 4096], help="prompt lengths in tokens")
    p.add_argument("--ar_batch_sizes", type=ints, default=[8], help="AR is compared at batch 1 and at these")
    p.add_argument("--gammas", type=ints, default=[2, 4], help="drafts per round (speculation at batch 1)")
    p.add_argument("--budgets", type=ints, default=[256], help="draft budgets of self-speculation")
    p.add_argument("--draft_kv", type=lambda s: [x for x in s.split(",") if x], default=["streaming"])
    p.add_argument("--early_exit", type=ints, default=[8], help="transformers assistant_early_exit layers")
    p.add_argument("--max_new_tokens", type=int, default=64, help="tokens per row (no EOS stop)")
    p.add_argument("--repeats", type=int, default=3, help="cycles over all configurations")
    p.add_argument("--json", default=None, help="default: benchmarks/results/peer-<time>.json")
    args = p.parse_args(argv)
    if args.max_new_tokens < 3:
        p.error("--max_new_tokens must be >= 3 (transformers' decode time runs from its first token to its last)")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tok = load_tokenizer(args.checkpoint_path)
    model = load_model(args.checkpoint_path, device, dtype)
    hf = load_hf(args.hf_model or args.checkpoint_path, args.hf_gguf, dtype, device)
    hf_compiled = None
    if args.hf_compile:  # a second copy, so that the eager one stays eager
        hf_compiled = load_hf(args.hf_model or args.checkpoint_path, args.hf_gguf, dtype, device)
        hf_compiled.forward = torch.compile(hf_compiled.forward)
    assistant = load_hf(args.hf_assistant, "", dtype, device) if args.hf_assistant else None
    draft_model = load_model(args.draft_checkpoint_path, device, dtype) if args.draft_checkpoint_path else None
    N, med = args.max_new_tokens, statistics.median

    def paired(a, b, key="tokens_per_s"):  # the median over cycles of the ratio within a cycle
        return med(x[key] / y[key] for x, y in zip(a, b))

    results, summary = [], []
    for S in args.prefixes:
        max_seq = S + N + max(args.gammas, default=0) + 1
        for B in sorted({1, *args.ar_batch_sizes}):
            prompts = common.essay_prompts(tok, B, S, args.essays)
            ms = methods(args, B, hf, hf_compiled, assistant, draft_model)
            runs = {(m.system, m.name): [] for m in ms}
            for cycle in range(args.repeats):
                for m in ms:
                    if m.system == "engine":
                        rec = engine_generate(m, model, prompts, N, max_seq, args, warm=cycle == 0)
                    else:
                        if cycle == 0:  # as the engine's warm-up; whole, as a static cache's shape depends on it
                            hf_generate(m, prompts, N, device)
                        rec = hf_generate(m, prompts, N, device)
                    runs[m.system, m.name].append(rec)
                print(f"B={B} S={S} cycle {cycle}: " + ", ".join(f"{s} {n} {rs[-1]['tokens_per_s']:.1f}"
                                                                for (s, n), rs in runs.items()), flush=True)
            ref, hf_ar = runs["engine", "ar"][0]["tokens"], runs["transformers", "ar"]
            block = []
            for (system, name), rs in runs.items():
                rec = dict(prefix=S, batch_size=B, system=system, method=name, tokens_per_s=med(x["tokens_per_s"] for x in rs),
                           tokens_per_s_runs=[x["tokens_per_s"] for x in rs],
                           speedup_over_own_ar=paired(rs, runs[system, "ar"]), over_transformers_ar=paired(rs, hf_ar),
                           cpu_stolen_runs=[x["cpu_stolen"] for x in rs], **common.agreement(rs[0]["tokens"], ref))
                if name.startswith("ar"):  # every AR step does the same work: the median step is the run's own speed
                    rec.update(tokens_per_s_median_step=med(x["tokens_per_s_median_step"] for x in rs),
                               over_transformers_ar_median_step=paired(rs, hf_ar, "tokens_per_s_median_step"))
                if "acceptance" in rs[0]:
                    rec.update(acceptance=statistics.mean(x["acceptance"] for x in rs),
                               tokens_per_round=statistics.mean(x["tokens_per_round"] for x in rs))
                block.append(rec)
                print(f"B={B} S={S} {system:12s} {name:30s} {rec['tokens_per_s']:8.2f} tok/s, {rec['speedup_over_own_ar']:.2f}x "
                      f"its own AR, {rec['over_transformers_ar']:.2f}x transformers AR, rows equal to engine AR "
                      f"{rec['rows_equal']:.2f}", flush=True)
            results += block
            line = dict(prefix=S, batch_size=B, engine_ar_over_transformers_ar=block[0]["over_transformers_ar"],
                        engine_ar_over_transformers_ar_median_step=block[0]["over_transformers_ar_median_step"])
            if hf_compiled is not None:
                pair = runs["engine", "ar"], runs["transformers", "ar compiled"]
                line.update(engine_ar_over_transformers_ar_compiled=paired(*pair),
                            engine_ar_over_transformers_ar_compiled_median_step=paired(*pair, "tokens_per_s_median_step"))
            best = {s: max((r for r in block if r["system"] == s and not r["method"].startswith("ar")),
                           key=lambda r: r["tokens_per_s"], default=None) for s in ("engine", "transformers")}
            if best["engine"] and best["transformers"]:
                e, t = best["engine"], best["transformers"]
                line.update(best_engine_spec=e["method"], best_transformers_assisted=t["method"],
                            best_engine_spec_over_own_ar=e["speedup_over_own_ar"],
                            best_transformers_assisted_over_own_ar=t["speedup_over_own_ar"],
                            best_engine_spec_over_best_transformers_assisted=paired(runs["engine", e["method"]],
                                                                                    runs["transformers", t["method"]]))
            summary.append(line)
            print(", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in line.items()), flush=True)
    env = dict(common.environment(device), transformers=transformers.__version__)
    path = args.json or os.path.join(common.RESULTS, f"peer-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    common.write_json(path, dict(env=env, settings=vars(args), results=results, summary=summary))


if __name__ == "__main__":
    main()
