"""Weight-only int8 / int4 on this machine: the target's own decoding speed, a quantized
self-speculation draft, and what quantization costs in quality.

    python -m benchmarks.quant ar       # AR tokens/s per scheme and shape (and llama.cpp's, if installed)
    python -m benchmarks.quant sd       # self-speculation with a dense, int8 and int4 draft, against AR
    python -m benchmarks.quant quality  # greedy agreement with the dense model, perplexity on held-out essays
    python -m benchmarks.quant kernels  # each matrix shape alone: bf16, this engine's int8 / int4, torchao's
    python -m benchmarks.quant profile  # where a compiled decode step's time goes, per scheme (torch.profiler)

Every configuration runs once per cycle and ratios are taken within a cycle (the machine's speed
drifts), then the median over cycles. llama.cpp (the llama-cpp-python package) runs the same
weights in the same class: SmolLM2's Q4_1 GGUF requantized by llama.cpp itself to Q8_0 (against
int8), Q4_0 (against int4) and BF16 (against bf16); its decode is timed by wall time as the engine's, at batch 1
only (its Python API decodes one sequence).
"""
import argparse
import glob
import math
import os
import statistics
import time

import numpy as np
import torch

import costmodel
from benchmarks import common
from checkpoint import load_model
from engine import Engine, SpecArgs, auto_attn, generate
from kv_cache import KVCache
from model import quantize, quantized_copy
from spec import RowSampling, Sampling
from tokenizer import load_tokenizer

LLAMA_CPP_CLASS = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # fp32 has no llama.cpp row


def scheme_of(name):
    """"fp32" | "bf16" | "int8" | "int4:64" (+ "-dense_output": the output layer kept dense) -> (scheme,
    group size); all but fp32 run in bfloat16."""
    scheme, _, group = name.removesuffix("-dense_output").partition(":")
    return ("none", 0) if scheme in ("bf16", "fp32") else (scheme, int(group or 64) if scheme == "int4" else 0)


def attn_for(a, model):
    return auto_attn("cpu", model.tok_embeddings.weight.dtype, a.compile) if a.attn == "auto" else a.attn


def shapes(text):
    return [tuple(int(x) for x in s.split("x")) for s in text.split(",")]


def models(a, names):
    out = {}
    for name in names:
        q = scheme_of(name)
        dtype = torch.float32 if name == "fp32" else torch.bfloat16
        out[name] = quantize(load_model(a.checkpoint_path, "cpu", dtype), *q, output=not name.endswith("-dense_output")) \
            if q[0] != "none" else load_model(a.checkpoint_path, "cpu", dtype)
    return out


def llama_cpp_model(a, cls):
    """SmolLM2 in llama.cpp's class cls, requantized from the Q4_1 GGUF by llama.cpp (once, cached)."""
    import llama_cpp
    src = glob.glob(os.path.join(a.checkpoint_path, "*.gguf"))[0]  # where scripts/prepare_smollm2.py keeps it
    out = os.path.join(a.llama_cpp_dir, f"SmolLM2-135M-Instruct.{cls}.gguf")
    if not os.path.exists(out):
        os.makedirs(a.llama_cpp_dir, exist_ok=True)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{cls}")
        params.allow_requantize = True
        params.nthread = 2
        if llama_cpp.llama_model_quantize(src.encode(), out.encode(), params) != 0:
            raise RuntimeError(f"llama.cpp could not write {out}")
    return out


def llama_cpp_ar(path, prompt, new_tokens):
    """Greedy decode of new_tokens after prompt -> llama.cpp's decode tokens/s by wall time, as the
    engine's. The prompt goes in one token at a time: this build's batched prompt evaluation
    (GGML_NATIVE, AMX on this CPU) crashes."""
    import llama_cpp
    llm = llama_cpp.Llama(path, n_ctx=len(prompt) + new_tokens + 8, n_threads=torch.get_num_threads(),
                          n_threads_batch=torch.get_num_threads(), n_batch=512, verbose=False)
    for tok in prompt:
        llm.eval([tok])
    t0 = time.perf_counter()
    for _ in range(new_tokens):  # the logits of the last token evaluated
        tok = int(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).argmax())
        llm.eval([tok])
    seconds = time.perf_counter() - t0
    llm.close()
    return new_tokens / seconds


def ar(a, tokenizer):
    ms = models(a, a.schemes)
    try:
        import llama_cpp  # noqa: F401
        have_llama_cpp = True
    except ImportError:
        have_llama_cpp = False
        print("llama-cpp-python is not installed: engine rows only (pip install llama-cpp-python builds it)")
    runs = []
    for B, S in shapes(a.shapes):
        prompts = common.essay_prompts(tokenizer, B, S)
        engines = {n: Engine(m, B, S + a.new_tokens, compile=a.compile, attn=attn_for(a, m)) for n, m in ms.items()}
        for e in engines.values():  # compiles every step shape
            generate(e, [p[:64] for p in prompts], 4, common.NO_EOS, Sampling())
        gguf = {n: llama_cpp_model(a, LLAMA_CPP_CLASS[n.split(":")[0]]) for n in ms if n.split(":")[0] in LLAMA_CPP_CLASS} \
            if have_llama_cpp and B == 1 else {}
        for cycle in range(a.cycles):
            for name, engine in engines.items():
                run = common.engine_run(engine, prompts, a.new_tokens)
                runs.append(dict(B=B, S=S, cycle=cycle, system="engine", scheme=name, tokens_per_s=run.tokens_per_s,
                                 prefill_s=run.result.prefill_s, cpu_stolen=run.cpu_stolen))
                print(f"{B}x{S} cycle {cycle} engine {name:8}: {run.tokens_per_s:6.1f} tok/s "
                      f"(prefill {run.result.prefill_s:.2f} s)", flush=True)
                if name in gguf:
                    tps = llama_cpp_ar(gguf[name], prompts[0], a.new_tokens)
                    runs.append(dict(B=B, S=S, cycle=cycle, system="llama.cpp", scheme=name, tokens_per_s=tps,
                                     gguf=os.path.basename(gguf[name])))
                    print(f"{B}x{S} cycle {cycle} llama.cpp {name:8}: {tps:6.1f} tok/s", flush=True)
        del engines
    ratios = {}
    for B, S in shapes(a.shapes):
        for name in ms:
            def per(x_sys, x_scheme, y_sys, y_scheme):
                return [x["tokens_per_s"] / y["tokens_per_s"] for x in runs for y in runs
                        if (x["B"], x["S"], x["cycle"], x["system"], x["scheme"]) == (B, S, y["cycle"], x_sys, x_scheme)
                        and (y["B"], y["S"], y["system"], y["scheme"]) == (B, S, y_sys, y_scheme)]
            key = f"{B}x{S} {name}"
            ratios[key] = {"over_engine_bf16": per("engine", name, "engine", a.schemes[0])}
            if any(r["system"] == "llama.cpp" and r["B"] == B and r["S"] == S for r in runs):
                ratios[key]["over_llama_cpp_same_class"] = per("engine", name, "llama.cpp", name)
            ratios[key] = {k: dict(median=statistics.median(v), cycles=v) for k, v in ratios[key].items() if v}
            print(key + ": " + ", ".join(f"{k} {v['median']:.2f}" for k, v in ratios[key].items()))
    return dict(ar=runs, ratios=ratios)


def sd(a, tokenizer):
    dense = load_model(a.checkpoint_path, "cpu", torch.bfloat16)
    drafts = {name: None if scheme_of(name)[0] == "none" else quantized_copy(dense, *scheme_of(name))
              for name in a.schemes}
    runs = []
    for B, S in shapes(a.shapes):
        prompts = common.essay_prompts(tokenizer, B, S)
        sa = SpecArgs("self", gamma=a.gamma, draft_kv=a.draft_kv, draft_budget=a.budget)
        attn = attn_for(a, dense)
        engines = {"ar": Engine(dense, B, S + a.new_tokens, compile=a.compile, attn=attn)}
        engines |= {f"sd {n}": Engine(dense, B, S + a.new_tokens, sa=sa, draft_model=d, compile=a.compile, attn=attn)
                    for n, d in drafts.items()}
        for e in engines.values():
            common.engine_run(e, [p[:64] for p in prompts], 2 * (a.gamma + 1) + 1)
        for cycle in range(a.cycles):
            for name, engine in engines.items():
                run = common.engine_run(engine, prompts, a.new_tokens)
                runs.append(dict(B=B, S=S, cycle=cycle, config=name, tokens_per_s=run.tokens_per_s,
                                 acceptance=run.result.acceptance if name != "ar" else None, cpu_stolen=run.cpu_stolen))
                print(f"{B}x{S} cycle {cycle} {name:10}: {run.tokens_per_s:6.1f} tok/s"
                      + (f", acceptance {run.result.acceptance:.3f}" if name != "ar" else ""), flush=True)
        del engines
    ratios = {}
    for B, S in shapes(a.shapes):
        def per(x_name, y_name):
            return [x["tokens_per_s"] / y["tokens_per_s"] for x in runs for y in runs
                    if (x["B"], x["S"], x["config"]) == (B, S, x_name) and (y["B"], y["S"], y["config"]) == (B, S, y_name)
                    and x["cycle"] == y["cycle"]]
        for n in a.schemes:
            r = {"sd_over_ar": per(f"sd {n}", "ar"), "sd_over_sd_dense_draft": per(f"sd {n}", f"sd {a.schemes[0]}")}
            ratios[f"{B}x{S} {n}"] = {k: dict(median=statistics.median(v), cycles=v) for k, v in r.items()}
            acc = statistics.mean(x["acceptance"] for x in runs if (x["B"], x["S"], x["config"]) == (B, S, f"sd {n}"))
            ratios[f"{B}x{S} {n}"]["acceptance"] = acc
            print(f"{B}x{S} draft {n}: SD/AR {statistics.median(r['sd_over_ar']):.2f}, over the dense draft's SD "
                  f"{statistics.median(r['sd_over_sd_dense_draft']):.2f}, acceptance {acc:.3f}")
    return dict(sd=runs, ratios=ratios)


@torch.no_grad()
def quality(a, tokenizer):
    ms = models(a, a.schemes)
    prompts = common.essay_prompts(tokenizer, a.rows, a.prompt_len)
    # held-out text: the essays' last tokens, past every stretch the prompts above take
    held = common.essay_prompts(tokenizer, 2 * a.rows + a.ppl_chunks, a.ppl_len, overlap=True)[-a.ppl_chunks:]
    ref, out = None, {}
    for name, m in ms.items():
        tokens = generate(Engine(m, a.rows, a.prompt_len + a.new_tokens), prompts, a.new_tokens, common.NO_EOS,
                          Sampling()).tokens
        ref = ref or tokens
        nll, n = 0.0, 0
        for chunk in held:
            cache = KVCache(m.args.n_layer, 1, m.args.n_kv_head, a.ppl_len, m.args.head_dim, dtype=torch.bfloat16,
                            device="cpu")
            x = torch.tensor([chunk])
            logits = m(x, torch.arange(len(chunk))[None], cache)[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum").item()
            n += len(chunk) - 1
        out[name] = dict(perplexity=math.exp(nll / n), **common.agreement(tokens, ref))
        print(f"{name:8}: perplexity {out[name]['perplexity']:.3f}, rows equal to {a.schemes[0]} "
              f"{out[name]['rows_equal']:.2f}, mean common prefix {out[name]['mean_common_prefix']:.1f} of {a.new_tokens}",
              flush=True)
    return dict(quality=out)


@torch.no_grad()
def kernels(a, tokenizer):
    """One forward's matmuls of SmolLM2, by kernel, at each row count M (1: a batch-1 decode or draft
    step, 8: batch 8, 40: a verify of 4 drafts at batch 8): seconds per forward, each matrix shape
    timed alone and counted as often as a forward multiplies by it. torchao, where installed, with
    its int8 weight-only configuration (its int4 one has no CPU format without further packages)."""
    import torch.nn as nn

    from model import ModelArgs, QuantLinear, quantize_weight
    args = ModelArgs.from_name("smollm2-135m")
    counts = {}
    for n_k in args.matmul_shapes().values():
        counts[n_k] = counts.get(n_k, 0) + 1
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        quantize_ = None
    rows = []
    for (n, k), count in counts.items():
        w = torch.randn(n, k) * 0.02
        impls = {"bf16": nn.Linear(k, n, bias=False).bfloat16()}
        impls["bf16"].weight.data.copy_(w)
        for name in ("int8", "int4:64"):
            scheme, g = scheme_of(name)
            impls[name] = QuantLinear(quantize_weight(w, scheme, g), scheme, g, None, "cpu", torch.bfloat16)
        if quantize_ is not None:
            lin = nn.Sequential(nn.Linear(k, n, bias=False).bfloat16())
            lin[0].weight.data.copy_(w)
            quantize_(lin, Int8WeightOnlyConfig(set_inductor_config=False))
            impls["torchao int8"] = lin
        for M in (1, 8, 40):
            x = torch.randn(M, k, dtype=torch.bfloat16)
            for cycle in range(a.cycles):
                for name, f in impls.items():
                    t = costmodel.median_time(lambda: f(x), "cpu", repeats=5, inner=20)
                    rows.append(dict(n=n, k=k, count=count, M=M, cycle=cycle, kernel=name, seconds=t))
    per_forward = {}
    for M in (1, 8, 40):
        for name in {r["kernel"] for r in rows}:
            per_forward[f"M={M} {name}"] = sum(
                statistics.median(r["seconds"] for r in rows if (r["n"], r["k"], r["M"], r["kernel"]) == (n, k, M, name))
                * count for (n, k), count in counts.items())
        base = per_forward[f"M={M} bf16"]
        print(f"M={M}: " + ", ".join(f"{name} {per_forward[f'M={M} {name}'] * 1e3:.2f} ms ({base / per_forward[f'M={M} {name}']:.2f}x)"
                                     for name in sorted({r['kernel'] for r in rows})), flush=True)
    return dict(kernels=rows, per_forward_s=per_forward)


@torch.no_grad()
def profile(a, tokenizer):
    """One compiled decode step per scheme and shape, after warm-up: its median time, then the self
    CPU time per op over --steps profiled steps, per step, largest first (what the step spends on
    matmuls, attention, the compiled block's own kernels and its Dynamo guards and wrappers)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    ms, rows = models(a, a.schemes), []
    for B, S in shapes(a.shapes):
        for name, m in ms.items():
            engine = Engine(m, B, S + 8, compile=a.compile, attn=attn_for(a, m))
            engine.prefill(torch.randint(0, 1000, (B, S)), torch.full((B,), S))
            cur, pos, greedy = torch.ones(B, dtype=torch.long), torch.full((B,), S), RowSampling.of(Sampling(), B, "cpu")
            step_s = costmodel.median_time(lambda: engine.decode(cur, pos, greedy), "cpu", 20, warmup=3)
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(a.steps):
                    engine.decode(cur, pos, greedy)
            ops = sorted(((e.key, e.self_cpu_time_total / a.steps / 1e3, e.count // a.steps) for e in prof.key_averages()),
                         key=lambda x: -x[1])
            top = [dict(op=k, ms_per_step=t, calls_per_step=c) for k, t, c in ops[:12]]
            rows.append(dict(B=B, S=S, scheme=name, attn=engine.attn, step_ms=step_s * 1e3, top_ops=top))
            print(f"{B}x{S} {name}: step {step_s * 1e3:.1f} ms; " + ", ".join(
                f"{x['op'][:40]} {x['ms_per_step']:.2f} ms ({x['calls_per_step']})" for x in top[:6]), flush=True)
            del engine
    return dict(profile=rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["ar", "sd", "quality", "kernels", "profile"])
    p.add_argument("--checkpoint_path", default=common.SMOLLM2)
    p.add_argument("--schemes", default=None,
                   help="fp32, bf16, int8, int4:GROUP, each quantized one also with -dense_output; the first is what "
                        "ratios are over (default: ar bf16,int8,int4:64,fp32; sd bf16,int8,int4:64; quality "
                        "bf16,int8,int4:64,int4:32 and int8 / int4:64 with a dense output layer)")
    p.add_argument("--shapes", default=None, help="BxS list (default: ar 1x512,1x4096,8x4096; sd 1x4096,8x4096)")
    p.add_argument("--new_tokens", type=int, default=None, help="default: ar 128, sd and quality 256")
    p.add_argument("--gamma", type=int, default=3)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--draft_kv", default="streaming")
    p.add_argument("--rows", type=int, default=8, help="quality: essay prompts")
    p.add_argument("--prompt_len", type=int, default=512, help="quality: prompt tokens")
    p.add_argument("--ppl_chunks", type=int, default=8)
    p.add_argument("--ppl_len", type=int, default=1024)
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="profile: decode steps profiled")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "math"],
                   help="auto: as generate.py's for each scheme's dtype (bfloat16: math when compiled)")
    p.add_argument("--llama_cpp_dir", default=os.path.join(common.ROOT, "checkpoints", "llama.cpp"),
                   help="where the requantized GGUFs are kept")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.schemes = (a.schemes or dict(ar="bf16,int8,int4:64,fp32", sd="bf16,int8,int4:64", kernels="", profile="bf16,int8,int4:32",
                                   quality="bf16,int8,int4:64,int4:32,int8-dense_output,int4:64-dense_output")[a.what]
                 ).split(",")
    a.shapes = a.shapes or dict(ar="1x512,1x4096,8x4096", profile="1x512").get(a.what, "1x4096,8x4096")
    a.new_tokens = a.new_tokens or (128 if a.what == "ar" else 256)
    a.json = a.json or f"{common.RESULTS}/quant-{a.what}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    torch.set_grad_enabled(False)
    tokenizer = load_tokenizer(a.checkpoint_path)
    out = dict(ar=ar, sd=sd, quality=quality, kernels=kernels, profile=profile)[a.what](a, tokenizer)
    common.write_json(a.json, dict(env=common.environment("cpu"), settings=vars(a), **out))


if __name__ == "__main__":
    main()
