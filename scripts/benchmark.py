# Throughput benchmarks. Every size is a flag and the defaults are the full measurements, so pass
# small ones for a quick check. Each mode writes one JSON (device, date, commit, torch version, every
# setting) to --json, by default benchmarks/results/<mode>-<time>.json.
#   ar     autoregressive decode tokens/s: this engine (fp32/bf16, eager/compiled, attention backends) and
#          transformers generate() on the same model, prompts and greedy settings
#   sweep  batch x prefix x draft budget x gamma: AR and speculative tokens/s, acceptance, tokens per
#          round, and measured T_draft/T_target and T_verify/T_target next to the cost model's
#   gpu    (CUDA) decode bandwidth against copy bandwidth, SD/AR at GPU sizes, 8B-shape step ratios
#   peer   transformers AR (batch 1 and 8) and assisted generation (batch 1: prompt lookup, early exit,
#          an assistant model) against this engine's AR and speculative decoding
# Decode is timed apart from prefill everywhere: the engine reports both; for transformers a stopping
# criterion stamps the clock at each new token, so decode time runs from the first token to the last.
import argparse
import contextlib
import copy
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import costmodel  # noqa: E402
import generate as G  # noqa: E402
import spec  # noqa: E402
from kv_cache import DraftCache, KVCache  # noqa: E402
from model import ModelArgs, Transformer, load_model, place  # noqa: E402
from spec import Sampling  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

NO_EOS = {-1}  # an id no model emits: every row runs to max_new_tokens, like min_new_tokens in transformers
GREEDY = Sampling()
# shapes for random-weight runs besides model.CONFIGS; "tiny" is for checking the gpu mode on a CPU
EXTRA_SHAPES = {"tiny": dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, intermediate_size=128, vocab_size=49152)}


# ---------------------------------------------------------------- shared pieces

def ints(text):
    return [int(x) for x in text.split(",") if x]


def strs(text):
    return [x for x in text.split(",") if x]


def git(*cmd):
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device):
    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    head = git("rev-parse", "HEAD")
    return dict(device=G.device_name(torch.device(device)), date=now,
                # a copy of the tree without .git (a remote machine) names its commit in GIT_COMMIT
                commit=head or os.environ.get("GIT_COMMIT"),
                uncommitted_changes=None if head is None else bool(git("status", "--porcelain", "-uno")),
                torch=torch.__version__, transformers=tf_version, python=platform.python_version(),
                torch_threads=torch.get_num_threads(), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS"))


def write_json(args, results):
    path = args.json or os.path.join(ROOT, "benchmarks", "results",
                                     f"{args.mode}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "func"}
    with open(path, "w") as f:
        json.dump(dict(mode=args.mode, env=environment(args.device), settings=settings, **results), f, indent=1, default=str)
    print(f"wrote {path}")


def cpu_counters():
    """(steal, total) CPU time from /proc/stat, or None off Linux. Steal is time the hypervisor gave
    this machine's virtual CPUs to others: the cause of the large speed swings on shared VMs."""
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


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Essays:
    """Equal-length prompts from the essays, each row from its own stretch of text."""

    def __init__(self, path, tokenizer):
        with open(path) as f:
            self.text = json.load(f)["text"]
        self.tokenizer = tokenizer
        self.ids = []

    def prompts(self, batch, prefix):
        bos = [self.tokenizer.bos_id] if self.tokenizer.bos_id is not None else []
        n = prefix - len(bos)
        chars = 6 * batch * n
        while len(self.ids) < batch * n and len(self.ids) < len(self.text):  # encode only as much as needed
            self.ids = self.tokenizer.encode(self.text[:chars])
            if chars >= len(self.text):
                break
            chars *= 2
        if len(self.ids) < batch * n:
            sys.exit(f"error: the essays hold {len(self.ids)} tokens, fewer than {batch} x {n}")
        return [bos + self.ids[i * n:(i + 1) * n] for i in range(batch)]


ATTN_CHOICES = ["sdpa", "sdpa-math", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "flex", "flash"]


def attn_kind(name):
    """An attention choice -> the caches' backend (sdpa | flex | flash); "sdpa-X" pins SDPA's kernel X."""
    return name.split("-")[0]


def sdpa_kernel_for(name):
    if "-" not in name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel({"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                        "cudnn": SDPBackend.CUDNN_ATTENTION}[name.split("-")[1]])


@contextlib.contextmanager
def engine_steps(compiled, device, attn="sdpa"):
    """Eager or compiled step functions, with SDPA's kernel pinned for "sdpa-X". generate.compile_steps
    swaps module globals; they are put back afterwards, and dynamo is reset so that no configuration
    reuses another's graphs."""
    saved = [(m, dict(vars(m))) for m in (G, spec)]
    torch._dynamo.reset()
    try:
        if compiled:
            G.compile_steps(torch.device(device))
        with sdpa_kernel_for(attn):
            yield
    finally:
        for m, names in saved:
            for k, v in names.items():
                if callable(v) and getattr(m, k, None) is not v:
                    setattr(m, k, v)
        torch._dynamo.reset()


@contextlib.contextmanager
def reuse_prefill():
    """Runs with the same model and prompts copy the first run's prefilled K/V instead of recomputing
    it: only decode is compared, and on a CPU a batch of 4K-token prefills costs more than the decode.
    Yields a dict of the real prefill times, keyed like the memo (the first run's prefill: it includes
    compilation when that run is compiled)."""
    real, memo, seconds = G.prefill, {}, {}

    def prefill(model, cache, tokens, prompt_lens, chunk):
        key = (id(model), tuple(tokens.shape), hash(tokens.cpu().numpy().tobytes()), cache.k.dtype)
        T = tokens.shape[1]
        if key not in memo:
            sync(tokens.device)
            t0 = time.perf_counter()
            logits = real(model, cache, tokens, prompt_lens, chunk)
            sync(tokens.device)
            seconds[key] = time.perf_counter() - t0
            memo[key] = (cache.k[..., :T, :].clone(), cache.v[..., :T, :].clone(), logits)
        k, v, logits = memo[key]
        cache.k[..., :T, :].copy_(k)  # beyond T the cache holds zeros: junk that decode overwrites first
        cache.v[..., :T, :].copy_(v)
        return logits.clone()

    G.prefill = prefill
    try:
        yield seconds
    finally:
        G.prefill = real


def raise_recompile_limit(n=64):
    """One process compiles every batch size, cache length and gamma of a sweep: more graphs than
    dynamo's default limit, past which it would silently fall back to eager."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n))


def decode_tps(r):
    """Tokens per second of the decode loop: the first token of each row comes from prefill."""
    return (sum(map(len, r.tokens)) - len(r.tokens)) / r.decode_s


def median_step_tps(r):
    """Decode tokens per second with every step (or round of one gamma) taking the median time of its
    kind. Static shapes make all of them cost the same, so the median keeps the run's own speed and
    drops the stalls other processes cause, which on a shared machine swing wall time by 2-4x."""
    by_gamma = {}
    for g, t in zip(r.gammas or [0] * len(r.round_s), r.round_s):
        by_gamma.setdefault(g, []).append(t)
    return (sum(map(len, r.tokens)) - len(r.tokens)) / sum(len(ts) * statistics.median(ts) for ts in by_gamma.values())


def merge_results(parts):
    """generate() Results of consecutive batches -> one Result: sums, and the lists concatenated."""
    if len(parts) == 1:
        return parts[0]
    total = {f: sum(getattr(p, f) for p in parts) for f in ("prefill_s", "decode_s", "rounds", "accepted", "evaluated",
                                                              "row_rounds")}
    cat = {f: [x for p in parts for x in getattr(p, f) or []] or None for f in ("tokens", "gammas", "round_s")}
    return G.Result(**total, **cat)


def run_engine(model, prompts, n_new, max_seq_len, chunk, attn, sa=None, draft_model=None, repeats=1, warm=True,
               batch=None):
    """A short warm-up (compiles every shape the run uses), then the median of `repeats` runs. With
    `batch` below the number of prompts, a run goes through them in consecutive batches of `batch`
    rows, one generate() each, and returns their merged Result (rounds summed over the batches)."""
    kw = dict(attn=attn_kind(attn))
    batch = batch or len(prompts)
    if warm:
        n_warm = 2 * ((max(sa.gamma, sa.gamma_max) + 1) if sa and sa.mode != "none" else 1) + 1
        G.generate(model, prompts[:batch], min(n_new, n_warm), NO_EOS, GREEDY, max_seq_len, chunk, sa, draft_model, **kw)
    runs = [merge_results([G.generate(model, prompts[i:i + batch], n_new, NO_EOS, GREEDY, max_seq_len, chunk, sa,
                                      draft_model, **kw) for i in range(0, len(prompts), batch)])
            for _ in range(repeats)]
    return sorted(runs, key=lambda r: r.decode_s)[len(runs) // 2]


def common_prefix(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(rows, ref):
    """Fraction of rows identical to the reference, and the mean length of the common prefix."""
    return dict(rows_equal=sum(a == b for a, b in zip(rows, ref)) / len(ref),
                mean_common_prefix=statistics.mean(common_prefix(a, b) for a, b in zip(rows, ref)))


def dtype_of(name):
    return getattr(torch, name)


# ---------------------------------------------------------------- transformers

def load_hf(args, dtype, path=None, gguf=None):
    from transformers import LlamaForCausalLM
    path = path or args.checkpoint_path
    gguf = gguf if gguf is not None else args.hf_gguf
    kw = {}
    if gguf and os.path.exists(os.path.join(path, gguf)):
        kw = dict(gguf_file=gguf)
        try:  # newer transformers keep GGUF weights packed and unpack them at every matmul: ask for the dense
            from transformers import GgufConfig  # model this engine runs, so that both compute alike
            kw["quantization_config"] = GgufConfig(gguf_file=os.path.join(path, gguf), dequantize=True)
        except ImportError:
            pass
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    return model.to(args.device).eval().requires_grad_(False)


@torch.no_grad()
def hf_generate(hf, prompts, n_new, device, subtract=False, **kw):
    """transformers generate(), greedy, exactly n_new tokens per row. Decode time runs from the first
    token to the last (clock stamped by a stopping criterion that never stops anything). With subtract,
    also the time of generate(n_new) minus generate(1), the cruder estimate that needs a second prefill."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            sync(device)
            stamps.append((time.perf_counter(), input_ids.shape[1]))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = torch.tensor(prompts, device=device)

    def call(n):
        stamps.clear()
        sync(device)
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=hf.generation_config.eos_token_id, stopping_criteria=StoppingCriteriaList([Clock()]), **kw)
        sync(device)
        return out, t0, time.perf_counter() - t0

    out, t0, total = call(n_new)
    (t_a, n_a), (t_b, n_b) = stamps[0], stamps[-1]
    step_s = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]  # one per decode step or assisted round
    rec = dict(total_s=total, first_token_s=t_a - t0, decode_s=t_b - t_a,
               tokens_per_s=len(prompts) * (n_b - n_a) / max(t_b - t_a, 1e-9),
               # as median_step_tps; only for AR, where every step does the same work
               tokens_per_s_median_step=len(prompts) * (n_b - n_a) / max(len(step_s) * statistics.median(step_s or [0]), 1e-9),
               tokens=out[:, ids.shape[1]:].tolist())
    if subtract:
        one = call(1)[2]
        rec["subtract_tokens_per_s"] = len(prompts) * (n_new - 1) / max(total - one, 1e-9)
    return rec


@contextlib.contextmanager
def assistant_tokens(models, gamma):
    """Fixed gamma drafts per round for transformers' assisted generation (its defaults: 20 drafts,
    cut short by a confidence threshold), so that it drafts as many tokens as our runs do."""
    saved = [(m, copy.deepcopy(m.generation_config)) for m in models]
    for m in models:
        m.generation_config.num_assistant_tokens = gamma
        m.generation_config.num_assistant_tokens_schedule = "constant"
        m.generation_config.assistant_confidence_threshold = 0.0
    try:
        yield
    finally:
        for m, cfg in saved:
            m.generation_config = cfg


def hf_compiled_kwargs():
    """generate() kwargs for transformers' own compiled decoding: a static cache, whose decode step
    generate() then torch.compiles (on CUDA by default; _compile_all_devices allows the CPU). Mode
    "default", as this engine compiles on the CPU (reduce-overhead means CUDA graphs)."""
    from transformers import CompileConfig
    cfg = CompileConfig(mode="default")
    cfg._compile_all_devices = True
    return dict(cache_implementation="static", compile_config=cfg)


def hf_warmup(hf, device):
    hf_generate(hf, [[1, 2, 3, 4]], 2, device)


# ---------------------------------------------------------------- step timing and the cost model

def random_model(name, device, dtype):
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


def new_cache(model, batch, slots, dtype, device, attn="sdpa"):
    a = model.args
    return KVCache(a.n_layer, batch, model.layers[0].attention.n_kv_head, slots, a.head_dim, dtype, device, attn_kind(attn))


@torch.no_grad()
def step_times(model, batch, slots, pos, gammas, budgets, dtype, device, draft_model=None, draft_full=False,
               sinks=16, repeats=5, rounds=True, attn="sdpa"):
    """Median seconds of one AR target step, one verify step per gamma, one draft step per budget (a
    StreamingLLM cache: SnapKV has the same shapes) and, with rounds, one whole speculation round per
    (budget, gamma) (drafts + verify + refreshing the draft cache), at batch `batch` against a target
    cache of `slots` slots with every row at position `pos`. Self-speculation's verify steps refresh
    a draft cache of the first budget, as they do in generate(). The steps are timed in turn, one
    call each per cycle, so that a drift in machine speed hits them alike. Cache contents do not
    change the timings, so the caches are not prefilled."""
    cuda = torch.device(device).type == "cuda"
    inner = 1 if not cuda else 10
    cache = new_cache(model, batch, slots, dtype, device, attn)
    cur = torch.ones(batch, dtype=torch.long, device=device)
    at = torch.full((batch,), pos, dtype=torch.long, device=device)
    last2 = torch.ones(batch, 2, dtype=torch.long, device=device)
    dm = draft_model or model
    da, heads = dm.args, dm.layers[0].attention
    full = cache if draft_model is None else new_cache(dm, batch, slots, dtype, device, attn)

    def sparse(b):
        dc = DraftCache("streaming", da.n_layer, batch, heads.n_kv_head, da.head_dim, b, max(gammas), dtype, device,
                        sinks=min(sinks, b - 1), attn=attn_kind(attn), q_per_kv=heads.n_head // heads.n_kv_head)
        dc.fill(full, at + 1)
        return dc

    draft_caches = {b: full if b == "full" else sparse(b) for b in (["full"] if draft_full else budgets)}
    refreshed = draft_caches[budgets[0]] if draft_model is None and budgets else None
    steps = [("t_target", None, lambda: G.decode_step(model, cache, cur, at, GREEDY))]
    for g in gammas:
        drafts = torch.ones(batch, g, dtype=torch.long, device=device)
        q = torch.nn.functional.one_hot(drafts, model.args.vocab_size).float()
        steps.append(("t_verify", g, lambda d=drafts, q=q: spec.verify_step(model, cache, cur, d, q, at, GREEDY, refreshed)))
    for b, dc in draft_caches.items():
        steps.append(("t_draft", b, lambda dc=dc: spec.draft_step(dm, dc, cur[:, None], at[:, None], GREEDY)))
        for g in gammas if rounds else []:
            steps.append(("t_round", f"{b}/{g}", lambda dc=dc, g=g: spec.speculate_round(model, cache, dm, dc, last2, at, g,
                                                                                         GREEDY, draft_model is None)))
    times = [[] for _ in steps]
    for cycle in range(2 + repeats):  # two warm-up cycles
        for (_, _, fn), ts in zip(steps, times):
            t = costmodel.median_time(fn, device, repeats=1, warmup=0, inner=inner)
            if cycle >= 2:
                ts.append(t)
    out = dict(t_target=None, t_verify={}, t_draft={}, t_round={})
    for (name, key, _), ts in zip(steps, times):
        if key is None:
            out[name] = statistics.median(ts)
        else:
            out[name][key] = statistics.median(ts)
    return out


def kv_read_slots(attn, pos, max_seq_len):
    """Cache slots one target step reads: all of them behind SDPA's mask; with FlexAttention only the
    128-wide blocks up to the query position."""
    if attn_kind(attn) == "flex":
        return min(max_seq_len, -(-(pos + 1) // 128) * 128)
    return max_seq_len


def cost_samples(model, draft_model, batch, slots, gammas, st, itemsize):
    """(ModelArgs, batch, tokens, slots, itemsize, seconds) for costmodel.fit_overhead."""
    a, da = model.args, (draft_model or model).args
    s = [(a, batch, 1, slots, itemsize, st["t_target"])]
    s += [(a, batch, g + 1, slots, itemsize, t) for g, t in st["t_verify"].items()]
    s += [(da, batch, 1, slots if b == "full" else b + max(gammas) + 1, itemsize, t) for b, t in st["t_draft"].items()]
    return s


# ---------------------------------------------------------------- ar

def mode_ar(args):
    device = torch.device(args.device)
    tok = load_tokenizer(args.checkpoint_path)
    essays = Essays(args.essays, tok)
    raise_recompile_limit()
    records, hf_records = [], []
    for dname in args.dtypes:
        dtype = dtype_of(dname)
        model = load_model(args.checkpoint_path, device, dtype)
        hf = None if args.no_hf else load_hf(args, dtype)
        if hf is not None:
            hf_warmup(hf, device)
        for B in args.batch_sizes:
            for S in args.prefixes:
                prompts = essays.prompts(B, S)
                max_seq = S + args.max_new_tokens
                ref = None
                with reuse_prefill() as prefill_s:
                    for compiled in args.compile_modes:
                        for attn in args.attns:
                            with engine_steps(compiled == "compile", device, attn):
                                r = run_engine(model, prompts, args.max_new_tokens, max_seq, args.prefill_chunk, attn,
                                               repeats=args.repeats)
                            ref = ref or r.tokens
                            rec = dict(dtype=dname, batch_size=B, prefix=S, compile=compiled, attn=attn,
                                       tokens_per_s=decode_tps(r), decode_s=r.decode_s,
                                       first_prefill_s=next(iter(prefill_s.values())), **agreement(r.tokens, ref))
                            records.append(rec)
                            print(f"engine {dname} {compiled:7s} {attn:10s} B={B} S={S}: {rec['tokens_per_s']:.2f} tok/s "
                                  f"(first prefill {rec['first_prefill_s']:.2f} s)", flush=True)
                if hf is not None:
                    h = hf_generate(hf, prompts, args.max_new_tokens, device, subtract=args.hf_subtract)
                    best = max((r for r in records if r["dtype"] == dname and r["batch_size"] == B and r["prefix"] == S),
                               key=lambda r: r["tokens_per_s"])
                    hrec = dict(dtype=dname, batch_size=B, prefix=S, engine_best_tokens_per_s=best["tokens_per_s"],
                                engine_over_hf=best["tokens_per_s"] / h["tokens_per_s"],
                                **{k: v for k, v in h.items() if k != "tokens"}, **agreement(h["tokens"], ref))
                    hf_records.append(hrec)
                    print(f"transformers {dname} B={B} S={S}: {h['tokens_per_s']:.2f} tok/s; engine best / transformers = "
                          f"{hrec['engine_over_hf']:.2f}; rows equal to the engine's: {hrec['rows_equal']:.2f}", flush=True)
        del model, hf
    # the configuration with the best geometric mean over all shapes: the AR baseline for the sweep
    configs = {}
    for r in records:
        configs.setdefault((r["dtype"], r["compile"], r["attn"]), []).append(math.log(r["tokens_per_s"]))
    best = max(configs, key=lambda k: statistics.mean(configs[k]))
    recommended = dict(dtype=best[0], compile=best[1] == "compile", attn=best[2])
    by_dtype = {d: math.exp(statistics.mean(v for (dd, _, _), vs in configs.items() if dd == d for v in vs)) for d in args.dtypes}
    print(f"fastest engine AR configuration: {recommended}; geometric-mean tok/s by dtype: "
          + ", ".join(f"{d} {v:.2f}" for d, v in by_dtype.items()))
    write_json(args, dict(engine=records, transformers=hf_records, recommended=recommended,
                          geomean_tokens_per_s_by_dtype=by_dtype))


# ---------------------------------------------------------------- sweep

def round_cost(st, kind, budget, gamma):
    """One speculation round in target steps, gamma T_D/T_T + T_V/T_T, from step_times' output."""
    return (gamma * st["t_draft"]["full" if kind == "full" else budget] + st["t_verify"][gamma]) / st["t_target"]


def sweep_group(args, model, draft_model, prompts, B, S, dtype, device, hw):
    """AR and every speculative configuration at one batch size and prefix length (prefill reused).

    The machine's speed may drift by 2-4x within minutes (shared cores), so: every configuration
    runs --repeats times, in cycles over all of them; AR runs again after every SD run, and each SD
    run is compared with the mean of the AR runs on either side; a run's tokens/s is taken at its
    median step (median_step_tps); a configuration's speedup is the median over its cycles. Wall-time
    figures are recorded next to them."""
    gmax = max(args.gammas)
    max_seq = S + args.max_new_tokens + gmax + 1  # the same cache for AR and SD: same attention cost
    itemsize = dtype.itemsize
    read = kv_read_slots(args.attn, S + args.max_new_tokens // 2, max_seq)  # at the middle of the run

    batches = len(prompts) // B  # a prompt pool larger than the batch runs as consecutive batches

    def run(sa=None, dm=None, warm=False):
        start = cpu_counters()
        r = run_engine(model, prompts, args.max_new_tokens, max_seq, args.prefill_chunk, args.attn, sa, dm, warm=warm,
                       batch=B)
        r.cpu_stolen = cpu_stolen_since(start)
        return r

    modes = ["self"] + (["draft"] if draft_model is not None else [])
    configs = []  # (mode, draft kind, budget (0: full cache), gamma or "auto")
    for mode in modes:
        for kind in [k for k in args.draft_kv if mode == "draft" or k != "full"]:
            for budget in ([0] if kind == "full" else args.budgets):
                configs += [(mode, kind, budget, g) for g in args.gammas] + ([(mode, kind, budget, "auto")] if args.adapt_every else [])
    with reuse_prefill() as prefill_s:
        ar = run(warm=True)
        ar_runs, ar_stolen = [(decode_tps(ar), median_step_tps(ar))], [ar.cpu_stolen]
        print(f"AR B={B} S={S}: {ar_runs[0][0]:.2f} tok/s, {ar_runs[0][1]:.2f} at the median step", flush=True)
        steps, samples = {}, []
        for mode in modes:
            dm = draft_model if mode == "draft" else None
            st = step_times(model, B, max_seq, S + args.max_new_tokens // 2, args.gammas, args.budgets, dtype, device,
                            dm, False, args.sinks, args.step_repeats, not args.no_round_timing, args.attn)
            if mode == "draft" and "full" in args.draft_kv:
                st["t_draft"]["full"] = step_times(model, B, max_seq, S, [1], [], dtype, device, dm, True, args.sinks,
                                                   args.step_repeats, False, args.attn)["t_draft"]["full"]
            steps[mode] = st
            samples += cost_samples(model, dm, B, read, args.gammas, st, itemsize)
        runs = {c: [] for c in configs}  # per cycle: (Result, wall tok/s, median-step tok/s, AR wall, AR median-step)
        for cycle in range(args.repeats):
            for c in configs:
                mode, kind, budget, gamma = c
                sa = G.SpecArgs(mode, gamma, kind, budget or 256, args.sinks, args.snapkv_window, args.snapkv_recent,
                                refresh=mode == "self", gamma_max=gmax)  # one draft-cache shape for all gammas
                if gamma == "auto":
                    sa.planner, sa.gamma, _, _ = costmodel.auto_plan(
                        model.args, B, max_seq, dtype, device, "auto", budget or 256, (), S,
                        draft_model.args if mode == "draft" else None, kind == "full", args.compile, args.gammas)
                    sa.adapt_every = args.adapt_every
                r = run(sa, draft_model if mode == "draft" else None, warm=cycle == 0)
                if args.interleave:
                    a = run()
                    ar_runs.append((decode_tps(a), median_step_tps(a)))
                    ar_stolen.append(a.cpu_stolen)
                ref = [(x + y) / 2 for x, y in zip(*ar_runs[-2:])] if args.interleave else ar_runs[0]
                runs[c].append((r, decode_tps(r), median_step_tps(r), *ref))
                print(f"  cycle {cycle} {mode} {kind} budget={budget} gamma={gamma}"
                      f"{f' (used {sorted(set(r.gammas))})' if gamma == 'auto' else ''}: {runs[c][-1][2]:.2f} tok/s at the "
                      f"median step, speedup {runs[c][-1][2] / ref[1]:.2f} ({runs[c][-1][1] / ref[0]:.2f} by wall time); "
                      f"CPU stolen {r.cpu_stolen or 0:.0%}",
                      flush=True)
    med = statistics.median
    sd, auto = [], []
    for c in configs:
        mode, kind, budget, gamma = c
        rs = runs[c]
        r = rs[0][0]
        common = dict(batch_size=B, prefix=S, prompts=len(prompts), speculate=mode, draft_kv=kind, budget=budget or None,
                      tokens_per_s=med(x[1] for x in rs), tokens_per_s_median_step=med(x[2] for x in rs),
                      ar_tokens_per_s=med(x[3] for x in rs), ar_tokens_per_s_median_step=med(x[4] for x in rs),
                      speedup=med(x[2] / x[4] for x in rs), speedup_wall=med(x[1] / x[3] for x in rs),
                      speedup_runs=[x[2] / x[4] for x in rs], cpu_stolen_runs=[x[0].cpu_stolen for x in rs],
                      acceptance=statistics.mean(x[0].acceptance for x in rs),
                      tokens_per_round=statistics.mean(x[0].tokens_per_round for x in rs), **agreement(r.tokens, ar.tokens))
        if gamma == "auto":
            fixed = [x for x in sd if x["speculate"] == mode and x["draft_kv"] == kind and x["budget"] == (budget or None)]
            best = max(fixed, key=lambda x: x["speedup"])
            per_cycle = [x[2] / x[4] / s for x, s in zip(rs, best["speedup_runs"])]  # against the best, cycle by cycle
            # The choice itself, free of timing noise: each run's rounds weighed by the timed step
            # costs, as predicted_speedup_batch weighs a fixed gamma's rounds
            cost = {g: round_cost(steps[mode], kind, budget, g) for g in args.gammas}
            by_rounds = [(args.max_new_tokens - 1) * batches / sum(cost[g] for g in x[0].gammas) for x in rs]
            best_by_rounds = max(x["predicted_speedup_batch"] for x in fixed)
            rec = dict(common, start_gamma=[x[0].gammas[0] for x in rs],
                       gammas_used=[{g: x[0].gammas.count(g) for g in sorted(set(x[0].gammas))} for x in rs],
                       best_fixed_gamma=best["gamma"], best_fixed_speedup=best["speedup"],
                       auto_over_best_fixed=med(per_cycle), auto_over_best_fixed_runs=per_cycle,
                       predicted_speedup_batch=med(by_rounds),
                       auto_over_best_fixed_by_rounds=med(by_rounds) / best_by_rounds)
            auto.append(rec)
            print(f"  {mode} {kind:9s} budget={budget:<5d} gamma=auto (first gammas {rec['start_gamma']}): speedup "
                  f"{rec['speedup']:.2f} = {rec['auto_over_best_fixed']:.3f} of the best fixed gamma ({best['gamma']}); "
                  f"{rec['auto_over_best_fixed_by_rounds']:.3f} of the best by rounds weighed with the step times", flush=True)
            continue
        st = steps[mode]
        td = st["t_draft"]["full" if kind == "full" else budget] / st["t_target"]
        tv = st["t_verify"][gamma] / st["t_target"]
        rnd = st["t_round"].get(f"{budget}/{gamma}")
        rec = dict(common, gamma=gamma, rounds=r.rounds, t_draft_over_t_target=td, t_verify_over_t_target=tv,
                   t_round_over_t_target=rnd / st["t_target"] if rnd else None,
                   predicted_speedup=costmodel.speedup(common["acceptance"], gamma, td, tv),
                   # a static batch runs until its slowest row is done: Omega is then what the batch
                   # gained per round, max_new_tokens - 1 decode tokens per row over the rounds it took
                   predicted_speedup_batch=(args.max_new_tokens - 1) * batches / statistics.mean(x[0].rounds for x in rs)
                   / round_cost(st, kind, budget, gamma),
                   # a whole round timed alone also counts the draft refresh and the glue
                   predicted_speedup_from_round=(common["tokens_per_round"] * st["t_target"] / rnd) if rnd else None,
                   max_seq_len=max_seq, kv_slots_read=read)
        sd.append(rec)
        print(f"  {mode} {kind:9s} budget={budget:<5d} gamma={gamma}: speedup {rec['speedup']:.2f} at median steps "
              f"(runs {', '.join(f'{x:.2f}' for x in rec['speedup_runs'])}), {rec['speedup_wall']:.2f} by wall time; "
              f"predicted {rec['predicted_speedup']:.2f} from step ratios ({rec['predicted_speedup_batch']:.2f} with the "
              f"rounds the batch took), {rec['predicted_speedup_from_round'] or float('nan'):.2f} from a timed round; alpha {rec['acceptance']:.3f}, {rec['tokens_per_round']:.2f} tok/round, T_D/T_T {td:.3f}, "
              f"T_V/T_T {tv:.3f}, rows equal to AR {rec['rows_equal']:.2f}", flush=True)
    ar_rec = dict(batch_size=B, prefix=S, prompts=len(prompts), tokens_per_s=med(w for w, _ in ar_runs),
                  tokens_per_s_median_step=med(m for _, m in ar_runs), tokens_per_s_runs=[w for w, _ in ar_runs],
                  tokens_per_s_median_step_runs=[m for _, m in ar_runs], cpu_stolen_runs=ar_stolen,
                  first_prefill_s=next(iter(prefill_s.values())),
                  max_seq_len=max_seq, t_target_s={m: st["t_target"] for m, st in steps.items()}, gamma_auto=auto)
    step_rec = dict(batch_size=B, prefix=S, max_seq_len=max_seq, **{m: st for m, st in steps.items()})
    return ar_rec, sd, step_rec, samples


def planner_for(rec, hw, model, draft_model, itemsize, gammas=tuple(range(1, 9))):
    return costmodel.Planner(hw, model.args, rec["batch_size"], rec["kv_slots_read"], itemsize,
                             draft_model.args if rec["speculate"] == "draft" else None, rec["draft_kv"] == "full", gammas)


def add_model_predictions(sd, hw, model, draft_model, itemsize):
    """The cost model's ratios and speedup (at the measured acceptance) next to each measured run."""
    for r in sd:
        td, tv = planner_for(r, hw, model, draft_model, itemsize).ratios(r["gamma"], r["budget"] or 0)
        r.update(model_t_draft_over_t_target=td, model_t_verify_over_t_target=tv,
                 model_speedup=costmodel.speedup(r["acceptance"], r["gamma"], td, tv))


def choices_vs_measured(sd, hw_fit, model, draft_model, itemsize):
    """Per (batch, prefix, mode, kind, budget): the gamma the cost model picks at the measured
    acceptance next to the gamma that measured fastest."""
    out = []
    groups = {}
    for r in sd:
        groups.setdefault((r["batch_size"], r["prefix"], r["speculate"], r["draft_kv"], r["budget"]), []).append(r)
    for (B, S, mode, kind, budget), rs in groups.items():
        alpha = statistics.mean(r["acceptance"] for r in rs)
        p = planner_for(rs[0], hw_fit, model, draft_model, itemsize, tuple(sorted(r["gamma"] for r in rs)))
        g, pred = p.choose_gamma(alpha, budget or 0)
        best = max(rs, key=lambda r: r["speedup"])
        out.append(dict(batch_size=B, prefix=S, speculate=mode, draft_kv=kind, budget=budget, acceptance=alpha,
                        model_gamma=g, model_speedup=pred, measured_best_gamma=best["gamma"],
                        measured_best_speedup=best["speedup"],
                        measured_speedup_at_model_gamma=next(r["speedup"] for r in rs if r["gamma"] == g)))
    return out


def apply_baseline(args):
    """--baseline_from an ar JSON: use its fastest configuration for AR and SD alike."""
    if args.baseline_from:
        with open(args.baseline_from) as f:
            rec = json.load(f)["recommended"]
        args.dtype, args.compile, args.attn = rec["dtype"], rec["compile"], rec["attn"]
        print(f"baseline from {args.baseline_from}: {rec}")


def mode_sweep(args):
    if args.prompt_pool and any(args.prompt_pool % B for B in args.batch_sizes):
        sys.exit(f"error: --prompt_pool {args.prompt_pool} is not a multiple of every batch size {args.batch_sizes}")
    apply_baseline(args)
    device, dtype = torch.device(args.device), dtype_of(args.dtype)
    raise_recompile_limit(256)
    tok = load_tokenizer(args.checkpoint_path)
    essays = Essays(args.essays, tok)
    model = load_model(args.checkpoint_path, device, dtype)
    draft_model = load_model(args.draft_checkpoint_path, device, dtype) if args.draft_checkpoint_path else None
    hw = costmodel.measure_hardware(device, dtype, ops_per_layer=10 if args.compile else 40)
    ar, sd, steps, samples = [], [], [], []
    with engine_steps(args.compile, device, args.attn):
        for B in args.batch_sizes:
            for S in args.prefixes:
                prompts = essays.prompts(max(B, args.prompt_pool), S)
                a, s, st, sm = sweep_group(args, model, draft_model, prompts, B, S, dtype, device, hw)
                ar.append(a)
                sd += s
                steps.append(st)
                samples += sm
    hw_fit = costmodel.fit_overhead(hw, samples)
    add_model_predictions(sd, hw_fit, model, draft_model, dtype.itemsize)
    choices = choices_vs_measured(sd, hw_fit, model, draft_model, dtype.itemsize)
    for c in choices:
        print(f"B={c['batch_size']} S={c['prefix']} {c['speculate']} {c['draft_kv']} budget={c['budget']}: cost model "
              f"gamma {c['model_gamma']} (speedup {c['measured_speedup_at_model_gamma']:.2f}), measured best gamma "
              f"{c['measured_best_gamma']} ({c['measured_best_speedup']:.2f})")
    write_json(args, dict(ar=ar, sd=sd, steps=steps, gamma_choices=choices,
                          costmodel=dict(measured=vars(hw), fitted=vars(hw_fit))))


# ---------------------------------------------------------------- gpu

def parse_cases(text):
    """"name:BxS,..." -> [(name, B, S)]"""
    out = []
    for case in strs(text):
        name, shape = case.split(":")
        B, S = shape.lower().split("x")
        out.append((name, int(B), int(S)))
    return out


@torch.no_grad()  # as generate() runs: grad mode is part of every compiled step's guards
def mode_gpu(args):
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        sys.exit("error: the gpu mode needs a CUDA device (--smoke runs its code on any device, for checking)")
    dtype = dtype_of(args.dtype)
    raise_recompile_limit(256)
    hw = costmodel.measure_hardware(device, dtype, ops_per_layer=1 if args.compile else 40)
    print(f"copy bandwidth {hw.bandwidth / 1e9:.1f} GB/s, matmul {hw.flops / 1e12:.1f} TFLOP/s", flush=True)
    models = {}

    def get(name):
        if name not in models:
            models.clear()  # one model resident at a time: an 8B model and its caches fill most of a GPU
            if device.type == "cuda":
                torch.cuda.empty_cache()
            models[name] = (load_model(args.checkpoint_path, device, dtype) if name == "smollm2"
                            else random_model(name, device, dtype))
        return models[name]

    bandwidth, ratios, sd_ar = [], [], []
    with engine_steps(args.compile, device, args.attn):
        for name, B, S in parse_cases(args.ar_cases):
            model = get(name)
            cache = new_cache(model, B, S + 1, dtype, device, args.attn)  # valid length S + 1 = the whole cache
            cur = torch.ones(B, dtype=torch.long, device=device)
            at = torch.full((B,), S, dtype=torch.long, device=device)
            t = costmodel.median_time(lambda: G.decode_step(model, cache, cur, at, GREEDY), device, args.step_repeats,
                                      warmup=3, inner=1 if device.type == "cpu" else 20)
            w, kv = costmodel.weight_bytes(model.args, dtype.itemsize), costmodel.kv_bytes(model.args, B, S + 1, dtype.itemsize)
            rec = dict(model=name, batch_size=B, context=S, step_s=t, weight_bytes=w, kv_bytes=kv,
                       bandwidth=(w + kv) / t, fraction_of_copy=(w + kv) / t / hw.bandwidth,
                       tokens_per_s=B / t, model_step_s=costmodel.step_time(hw, model.args, B, 1, S + 1, dtype.itemsize))
            bandwidth.append(rec)
            print(f"AR {name} B={B} S={S}: {t * 1e3:.3f} ms/step, {rec['bandwidth'] / 1e9:.1f} GB/s = "
                  f"{rec['fraction_of_copy']:.2f} of copy bandwidth", flush=True)
            del cache
        for name, B, S in parse_cases(args.ratio_cases):
            model = get(name)
            st = step_times(model, B, S + max(args.ratio_gammas) + 1, S, args.ratio_gammas, args.ratio_budgets, dtype,
                            device, None, False, args.sinks, args.step_repeats, False, args.attn)
            p = costmodel.Planner(hw, model.args, B, kv_read_slots(args.attn, S, S + max(args.ratio_gammas) + 1), dtype.itemsize)
            rec = dict(model=name, batch_size=B, context=S, t_target_s=st["t_target"],
                       t_verify_over_t_target={g: t / st["t_target"] for g, t in st["t_verify"].items()},
                       t_draft_over_t_target={b: t / st["t_target"] for b, t in st["t_draft"].items()},
                       model_ratios={f"{b}/{g}": p.ratios(g, b) for b in args.ratio_budgets for g in args.ratio_gammas})
            ratios.append(rec)
            print(f"ratios {name} B={B} S={S}: T_V/T_T {rec['t_verify_over_t_target']}, T_D/T_T {rec['t_draft_over_t_target']}",
                  flush=True)
        models.clear()
        if args.sd_batch_sizes:
            model = get("smollm2")
            essays = Essays(args.essays, load_tokenizer(args.checkpoint_path))
            for B in args.sd_batch_sizes:
                for S in args.sd_prefixes:
                    a, s, st, _ = sweep_group(args, model, None, essays.prompts(B, S), B, S, dtype, device, hw)
                    add_model_predictions(s, hw, model, None, dtype.itemsize)
                    sd_ar.append(dict(ar=a, sd=s, steps=st))
    write_json(args, dict(copy_bandwidth=hw.bandwidth, matmul_flops=hw.flops, ar_bandwidth=bandwidth,
                          step_ratios=ratios, sd_vs_ar=sd_ar))


# ---------------------------------------------------------------- peer

def mode_peer(args):
    """One process, one model: this engine against transformers generate() on the same weights, prompts
    and greedy settings. AR at batch 1 and at --ar_batch_sizes; speculative decoding at batch 1, where
    transformers' assisted generation runs (it takes one row). Ratios are of decode tokens/s (prefill
    apart). The machine's speed drifts, so every configuration runs once per cycle, --repeats cycles,
    and each ratio is the median over cycles of the ratio within a cycle."""
    apply_baseline(args)
    device, dtype = torch.device(args.device), dtype_of(args.dtype)
    raise_recompile_limit(256)
    essays = Essays(args.essays, load_tokenizer(args.checkpoint_path))
    model = load_model(args.checkpoint_path, device, dtype)
    hf = load_hf(args, dtype)
    assistant = load_hf(args, dtype, args.hf_assistant, args.hf_assistant_gguf) if args.hf_assistant else None
    draft_model = load_model(args.draft_checkpoint_path, device, dtype) if args.draft_checkpoint_path else None
    hf_warmup(hf, device)
    N, med = args.max_new_tokens, statistics.median

    def paired(runs_a, runs_b, key="tokens_per_s"):  # median over cycles of the ratio within a cycle
        return med(x[key] / y[key] for x, y in zip(runs_a, runs_b))

    results, summary = [], []
    for S in args.prefixes:
        max_seq = S + N + max(args.gammas, default=0) + 1
        for B in sorted({1, *args.ar_batch_sizes}):
            prompts = essays.prompts(B, S)
            spec_too = B == 1
            # (method, SpecArgs, draft model) for the engine; (method, generate() kwargs, models whose
            # drafts are fixed at gamma, gamma) for transformers
            engine = [("ar", None, None)]
            hf_cfg = [("ar", {}, [], 0)] + ([("ar compiled", hf_compiled_kwargs(), [], 0)] if args.hf_compile else [])
            for gamma in args.gammas if spec_too else []:
                engine += [(f"self-spec {kind} b{budget} g{gamma}",
                            G.SpecArgs("self", gamma, kind, budget, args.sinks, args.snapkv_window, args.snapkv_recent), None)
                           for kind in args.draft_kv if kind != "full" for budget in args.budgets]
                if draft_model is not None:  # the counterpart of assistant_model
                    engine.append((f"draft model g{gamma}", G.SpecArgs("draft", gamma, "full", refresh=False), draft_model))
                hf_cfg.append((f"prompt lookup g{gamma}", dict(prompt_lookup_num_tokens=gamma), [hf], gamma))
                hf_cfg += [(f"early exit L{n} g{gamma}", dict(assistant_early_exit=n), [hf], gamma) for n in args.early_exit]
                if assistant is not None:
                    hf_cfg.append((f"assistant model g{gamma}", dict(assistant_model=assistant), [hf, assistant], gamma))
            runs = {("engine", m): [] for m, _, _ in engine} | {("transformers", m): [] for m, _, _, _ in hf_cfg}
            with engine_steps(args.compile, device, args.attn), reuse_prefill():
                for method, kw, _, _ in hf_cfg:  # compile (and any recompile for this shape) before timing
                    if "compile_config" in kw:
                        hf_generate(hf, prompts, N, device, **kw)
                for cycle in range(args.repeats):
                    for method, sa, dm in engine:
                        start = cpu_counters()
                        r = run_engine(model, prompts, N, max_seq, args.prefill_chunk, args.attn, sa, dm, warm=cycle == 0)
                        runs["engine", method].append(dict(
                            tokens_per_s=decode_tps(r), tokens_per_s_median_step=median_step_tps(r), tokens=r.tokens,
                            cpu_stolen=cpu_stolen_since(start),
                            **(dict(acceptance=r.acceptance, tokens_per_round=r.tokens_per_round) if sa else {})))
                    for method, kw, fixed, gamma in hf_cfg:
                        start = cpu_counters()
                        with assistant_tokens(fixed, gamma) if fixed else contextlib.nullcontext():
                            h = hf_generate(hf, prompts, N, device, **kw)
                        runs["transformers", method].append(dict(h, cpu_stolen=cpu_stolen_since(start)))
                    print(f"B={B} S={S} cycle {cycle}: " + ", ".join(f"{sys_} {m} {rs[-1]['tokens_per_s']:.1f}"
                                                                    for (sys_, m), rs in runs.items()), flush=True)
            ref = runs["engine", "ar"][0]["tokens"]
            hf_ar = runs["transformers", "ar"]
            block = []
            for (system, method), rs in runs.items():
                own_ar = runs[system, "ar"]
                rec = dict(prefix=S, batch_size=B, system=system, method=method,
                           tokens_per_s=med(x["tokens_per_s"] for x in rs), tokens_per_s_runs=[x["tokens_per_s"] for x in rs],
                           speedup_over_own_ar=paired(rs, own_ar), over_transformers_ar=paired(rs, hf_ar),
                           cpu_stolen_runs=[x["cpu_stolen"] for x in rs], **agreement(rs[0]["tokens"], ref))
                if method.startswith("ar"):  # every AR step does the same work: the median step is the run's own speed
                    rec.update(tokens_per_s_median_step=med(x["tokens_per_s_median_step"] for x in rs),
                               over_transformers_ar_median_step=paired(rs, hf_ar, "tokens_per_s_median_step"))
                if "acceptance" in rs[0]:
                    rec.update(acceptance=statistics.mean(x["acceptance"] for x in rs),
                               tokens_per_round=statistics.mean(x["tokens_per_round"] for x in rs))
                block.append(rec)
                print(f"B={B} S={S} {system:12s} {method:28s} {rec['tokens_per_s']:8.2f} tok/s, "
                      f"{rec['speedup_over_own_ar']:.2f}x its own AR, {rec['over_transformers_ar']:.2f}x transformers AR", flush=True)
            results += block
            line = dict(prefix=S, batch_size=B, engine_ar_over_transformers_ar=block[0]["over_transformers_ar"],
                        engine_ar_over_transformers_ar_median_step=block[0]["over_transformers_ar_median_step"])
            if args.hf_compile:
                ar_pair = runs["engine", "ar"], runs["transformers", "ar compiled"]
                line.update(engine_ar_over_transformers_ar_compiled=paired(*ar_pair),
                            engine_ar_over_transformers_ar_compiled_median_step=paired(*ar_pair, "tokens_per_s_median_step"))
            best = {sys_: max((r for r in block if r["system"] == sys_ and not r["method"].startswith("ar")),
                              key=lambda r: r["tokens_per_s"], default=None) for sys_ in ("engine", "transformers")}
            if best["engine"] and best["transformers"]:
                e, t = runs["engine", best["engine"]["method"]], runs["transformers", best["transformers"]["method"]]
                line.update(best_engine_spec=best["engine"]["method"], best_transformers_assisted=best["transformers"]["method"],
                            best_engine_spec_over_own_ar=best["engine"]["speedup_over_own_ar"],
                            best_transformers_assisted_over_own_ar=best["transformers"]["speedup_over_own_ar"],
                            best_engine_spec_over_best_transformers_assisted=paired(e, t))
            summary.append(line)
            print(line, flush=True)
    write_json(args, dict(results=results, summary=summary))


# ---------------------------------------------------------------- command line

def main(argv=None):
    cpu = not torch.cuda.is_available()
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint_path", default=os.path.join(ROOT, G.DEFAULT_CHECKPOINT))
    common.add_argument("--device", default="cpu" if cpu else "cuda")
    common.add_argument("--essays", default=os.path.join(ROOT, "..", "shared", "data", "PaulGrahamEssays.json"))
    common.add_argument("--json", default=None, help="output path (default: benchmarks/results/<mode>-<time>.json)")
    common.add_argument("--max_new_tokens", type=int, default=64, help="tokens per row (no EOS stop)")
    common.add_argument("--repeats", type=int, default=1,
                        help="timed generate() runs per configuration (median); sweep and gpu run them in cycles")
    common.add_argument("--prefill_chunk", type=int, default=512)
    common.add_argument("--sinks", type=int, default=16)
    common.add_argument("--snapkv_window", type=int, default=32)
    common.add_argument("--snapkv_recent", type=int, default=0)
    common.add_argument("--hf_gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf",
                        help="GGUF file in the checkpoint directory that transformers loads (else a HF model dir)")
    engine = argparse.ArgumentParser(add_help=False)
    engine.add_argument("--dtype", default="float32" if cpu else "bfloat16", choices=["float32", "bfloat16", "float16"])
    engine.add_argument("--compile", action=argparse.BooleanOptionalAction, default=not cpu)
    engine.add_argument("--attn", default="sdpa", choices=ATTN_CHOICES,
                        help="attention backend (generate.py --attn); sdpa-X pins SDPA's kernel X")
    engine.add_argument("--baseline_from", default=None, help="an ar-mode JSON: take dtype, compile and attn from its fastest")

    p = argparse.ArgumentParser(description="Throughput benchmarks: ar, sweep, gpu, peer (see the top of this file).")
    sub = p.add_subparsers(dest="mode", required=True)
    a = sub.add_parser("ar", parents=[common], help="AR decode: engine configurations and transformers")
    a.add_argument("--batch_sizes", type=ints, default=[1, 8])
    a.add_argument("--prefixes", type=ints, default=[512, 4096])
    a.add_argument("--dtypes", type=strs, default=["float32", "bfloat16"])
    a.add_argument("--compile_modes", type=strs, default=["eager", "compile"])
    a.add_argument("--attns", type=strs, default=["sdpa", "sdpa-math", "flex"],
                   help=f"attention backends for this engine, from {', '.join(ATTN_CHOICES)}")
    a.add_argument("--no_hf", action="store_true", help="skip transformers")
    a.add_argument("--hf_subtract", action="store_true", help="also time transformers by generate(N) - generate(1)")
    a.set_defaults(func=mode_ar)

    s = sub.add_parser("sweep", parents=[common, engine], help="batch x prefix x budget x gamma, AR and SD")
    s.add_argument("--batch_sizes", type=ints, default=[1, 8])
    s.add_argument("--prefixes", type=ints, default=[512, 4096])
    s.add_argument("--budgets", type=ints, default=[64, 256])
    s.add_argument("--gammas", type=ints, default=[1, 2, 3, 4])
    s.add_argument("--draft_kv", type=strs, default=["streaming", "snapkv"], help="streaming,snapkv[,full for a draft model]")
    s.add_argument("--draft_checkpoint_path", default=None, help="also sweep a standalone draft model")
    s.add_argument("--prompt_pool", type=int, default=0,
                   help="run every batch size over the same P prompts (P a multiple of each batch size), in P / "
                        "batch consecutive batches, so that acceptance is alike across batch sizes (0: one batch)")
    s.add_argument("--step_repeats", type=int, default=5)
    s.add_argument("--no_round_timing", action="store_true", help="skip timing whole speculation rounds")
    s.add_argument("--adapt_every", type=int, default=8, help="also run --gamma auto, re-choosing every N rounds (0: skip)")
    s.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="run AR again after every SD run and compare each with the AR runs around it")
    s.set_defaults(func=mode_sweep)

    g = sub.add_parser("gpu", parents=[common, engine], help="CUDA: bandwidth, SD/AR, 8B step ratios")
    g.add_argument("--ar_cases", default="smollm2:1x512,smollm2:64x8192,llama-3.1-8b:1x1024,llama-3.1-8b:16x16384",
                   help="model:BATCHxCONTEXT,... (smollm2 = the checkpoint; other names: random weights of model.CONFIGS shapes)")
    g.add_argument("--ratio_cases", default="llama-3.1-8b:1x16384,llama-3.1-8b:16x16384")
    g.add_argument("--ratio_gammas", type=ints, default=[1, 2, 3, 4, 5])
    g.add_argument("--ratio_budgets", type=ints, default=[256, 512])
    g.add_argument("--sd_batch_sizes", type=ints, default=[16, 64])
    g.add_argument("--sd_prefixes", type=ints, default=[2048, 8000], help="8000: SmolLM2's 8K context minus room to generate")
    g.add_argument("--budgets", type=ints, default=[256])
    g.add_argument("--gammas", type=ints, default=[2, 3, 4, 5])
    g.add_argument("--draft_kv", type=strs, default=["streaming"])
    g.add_argument("--step_repeats", type=int, default=10)
    g.add_argument("--no_round_timing", action="store_true")
    g.add_argument("--adapt_every", type=int, default=8, help="also run --gamma auto, re-choosing every N rounds (0: skip)")
    g.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="run AR again after every SD run and compare each with the AR runs around it")
    g.add_argument("--smoke", action="store_true", help="allow a non-CUDA device (pass tiny cases)")
    g.set_defaults(func=mode_gpu, max_new_tokens=128)

    q = sub.add_parser("peer", parents=[common, engine], help="transformers AR/assisted vs engine AR/SD")
    q.add_argument("--prefixes", type=ints, default=[512, 4096])
    q.add_argument("--ar_batch_sizes", type=ints, default=[8], help="AR is also compared at these batch sizes")
    q.add_argument("--gammas", type=ints, default=[2, 4])
    q.add_argument("--budgets", type=ints, default=[128])
    q.add_argument("--draft_kv", type=strs, default=["streaming", "snapkv"])
    q.add_argument("--early_exit", type=ints, default=[8, 16], help="transformers assistant_early_exit layers")
    q.add_argument("--hf_assistant", default=None, help="HF model dir of a draft for transformers' assistant_model")
    q.add_argument("--hf_assistant_gguf", default="", help="GGUF file inside --hf_assistant, if any")
    q.add_argument("--draft_checkpoint_path", default=None, help="the same draft for this engine (--speculate draft)")
    q.add_argument("--hf_compile", action="store_true",
                   help="also time transformers AR with its static cache and compiled decode step")
    q.set_defaults(func=mode_peer)

    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
