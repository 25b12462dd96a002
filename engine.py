# The engine: the caches of one batch shape, the steps that run on them (eager, compiled, or replayed
# as CUDA graphs), the two kinds of round side by side, and the loops over them: generate() for a
# static batch, serve() for a stream of requests through fixed slots.
#
#   engine = Engine(model, batch_size=8, max_seq_len=4096, sa=SpecArgs("self", gamma=3), compile=True)
#   result = generate(engine, prompts, max_new_tokens=256, eos_ids=tokenizer.eos_ids, s=Sampling())
#
# A round reads nothing back to the host but one termination check; everything per row (positions,
# lengths, accept counts, done flags) lives in device tensors (Rows).
import contextlib
import os
import platform
import threading
import time
from collections import deque
from dataclasses import KW_ONLY, dataclass, replace
from typing import Optional

import torch

import costmodel
import spec
from kv_cache import DraftCache, DraftLayout, KVCache, Reselect, check_fits, full_slots, kv_bytes, snapkv_scores
from model import ModelArgs, Transformer, run_block
from spec import RowSampling, Sampling, widest_kind

RECOMPILE_LIMIT = 64  # graphs of the one shared block: every step kind, shape and gamma is one more


@dataclass
class SpecArgs:
    mode: str = "none"  # none | self | draft
    _: KW_ONLY
    gamma: int = 4
    draft_kv: str = "streaming"  # streaming | snapkv | full (full: standalone draft only)
    draft_budget: int = 256
    sinks: int = 16
    snapkv_window: int = 32  # observation window: the prompt's last queries that score the prefix
    snapkv_recent: int = 0  # recent positions the SnapKV draft keeps besides its picks (0: budget // 2)
    refresh: bool = True  # self-speculation: copy the target's verified K/V into the draft cache
    reselect: int = 0  # self-speculation: every this many rounds a scored verify re-picks the draft's fixed entries
    reselect_policy: Reselect = Reselect()  # which verify queries score, and how (kv_cache.Reselect)
    gamma_max: int = 0  # largest gamma any round may use: sizes the draft ring (0: gamma)
    adapt_every: int = 0  # > 0: re-choose gamma every this many rounds from the measured acceptance of each row
    planner: object = None  # costmodel.Planner that re-chooses gamma (with adapt_every)

    @property
    def ring_gamma(self) -> int:  # the largest round the draft ring must hold
        return max(self.gamma, self.gamma_max)

    def draft_layout(self) -> DraftLayout:
        return DraftLayout.of(self.draft_kv, self.draft_budget, self.ring_gamma, self.sinks, self.snapkv_recent)

    def scored(self, rounds_done: int) -> bool:
        """Whether the next round's verify is a scored one: every reselect-th round."""
        return self.reselect > 0 and (rounds_done + 1) % self.reselect == 0


@dataclass
class Result:
    tokens: list  # per row, generated ids (up to and including its EOS)
    prefill_s: float
    decode_s: float
    rounds: int  # decode steps (autoregressive) or speculation rounds
    accepted: int = 0  # accepted draft tokens, over active rows
    evaluated: int = 0  # draft tokens verified up to and including each round's first rejection
    row_rounds: int = 0  # (row, round) pairs with the row still active
    gammas: list = None  # gamma of each round
    round_s: list = None  # wall seconds of each step or round (each ends at the host sync of the next)

    @property
    def tokens_per_s(self):
        """Decode tokens per second, the one definition the CLI and the benchmarks use: the tokens
        the decode loop made (each row's first token comes from prefill) over its seconds."""
        return (sum(map(len, self.tokens)) - len(self.tokens)) / self.decode_s

    @property
    def acceptance(self):  # per-token acceptance rate alpha
        return self.accepted / max(self.evaluated, 1)

    @property
    def tokens_per_round(self):  # mean tokens a row gains per round: accepted drafts + 1
        return (self.accepted + self.row_rounds) / max(self.row_rounds, 1)


def memory_plan(target: ModelArgs, *, batch: int, max_seq_len: int, itemsize: int, attn: str = "sdpa",
                sa: Optional[SpecArgs] = None, draft: Optional[ModelArgs] = None, world: int = 1,
                streams: bool = True, weights_on_device: bool = False, quantization=("none", 0),
                draft_quantization=("none", 0)) -> dict:
    """Bytes of every buffer an Engine allocates, by name: the one account that the engine checks
    before each allocation and the command line checks, all together, before any weights load.
    Under tensor parallelism each rank holds n_kv_head / world KV heads. streams: include the one-row
    scratch caches a request stream prefills into. weights_on_device: include the weights (a GPU; on
    the CPU they stay memory-mapped from the checkpoint, but matrices quantized at load are made in
    memory). quantization: (scheme, group size) of the target's matrices; draft_quantization: of
    self-speculation's quantized copy of them (model.quantized_copy), whose other weights are shared."""
    sa = sa or SpecArgs()

    def full(a, rows):
        return kv_bytes(a.n_layer, rows, a.n_kv_head // world, full_slots(max_seq_len, attn), a.head_dim, itemsize)

    plan = {"target cache": full(target, batch)}
    if streams:
        plan["target scratch row"] = full(target, 1)
    d = draft or target
    if sa.mode != "none":
        if sa.draft_kv == "full":
            plan["draft cache"] = full(d, batch)
        else:
            plan["draft cache"] = sa.draft_layout().nbytes(d.n_layer, batch, d.n_kv_head // world, d.head_dim, itemsize)
        if sa.mode == "draft":  # its own full cache, from which its sparse one is built
            plan["draft full cache, while building the sparse one"] = full(d, batch) if sa.draft_kv != "full" else 0
            if streams:
                plan["draft scratch row"] = full(d, 1)
    tokens = batch * (sa.ring_gamma + 1 if sa.mode != "none" else 1)
    plan["logits"] = 3 * tokens * target.vocab_size * 4  # fp32 logits, probabilities, the acceptance test's copies
    if sa.reselect or attn == "math":  # the attention weights of a scored verify or a math step over the
        # whole cache (products, fp32 softmax), one layer's at a time
        plan["one layer's attention weights"] = tokens * target.n_head // world * full_slots(max_seq_len, attn) \
            * (itemsize + 8)
    def weights(a, scheme, group_size, dense_too):
        # tp.py shards each layer's matrices and replicates the output layer, embedding and norms
        output = replace(a, n_layer=0).matmul_bytes(itemsize, scheme, group_size)  # the output layer's alone
        matrices = (a.matmul_bytes(itemsize, scheme, group_size) - output) // world + output
        embedding = 0 if a.tie_embeddings and scheme == "none" else a.vocab_size * a.dim * itemsize
        return matrices + (embedding + (2 * a.n_layer + 1) * a.dim * itemsize if dense_too else 0)

    if weights_on_device or quantization[0] != "none":
        plan["target weights"] = weights(target, *quantization, weights_on_device)
    if draft is not None and weights_on_device:
        plan["draft weights"] = weights(draft, "none", 0, True)
    if draft_quantization[0] != "none":
        plan["draft's quantized matrices"] = weights(target, *draft_quantization, False)
    return plan


def auto_attn(device, dtype, compile: bool) -> str:
    """--attn auto: the attention backend measured fastest for this device, precision and compile mode
    (benchmarks/README.md): flex on CUDA with compilation; on the CPU math with compilation in
    bfloat16/float16 (its compiled decode step at 8 x 4K is 1.8x sdpa's); sdpa otherwise."""
    if not compile:
        return "sdpa"
    if torch.device(device).type == "cuda":
        return "flex"
    return "sdpa" if dtype == torch.float32 else "math"


def pad_prompts(prompts, device):
    """list of token-id lists -> right-padded tokens [B, T] and lengths [B]."""
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lens


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class CudaGraph:
    """fn(*args) captured once as one CUDA graph over static input and output buffers, then replayed.
    Outputs are those buffers: the next replay overwrites them. warmup_s (the first call, which
    compiles) and capture_s are timed apart."""

    def __init__(self, fn, args, pool):
        self.inputs = [a.clone() if a is not None else None for a in args]
        t0 = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles, autotunes and allocates workspaces
            fn(*self.inputs)  # writes the same cache entries as the step it stands for
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = fn(*self.inputs)
        torch.cuda.synchronize()
        self.warmup_s, self.capture_s = t1 - t0, time.perf_counter() - t1

    def __call__(self, *args):
        for buf, a in zip(self.inputs, args):
            if buf is not None:
                buf.copy_(a)
        self.graph.replay()
        return self.outputs


class Engine:
    """The caches of one batch shape and the steps that run on them; the caller holds it and passes it
    to generate() or serve() as often as it likes (caches and captured graphs outlive the call).

    compile: one torch.compile'd transformer block (model.run_block) that every layer of every step
    reuses, so compile time does not grow with depth: one graph per step kind (prefill chunk, decode,
    draft, verify at each gamma), fullgraph, static shapes. cuda_graphs (default: compile on CUDA):
    each decode, draft and verify step, all layers plus sampling and acceptance, is captured once per
    shape as one CUDA graph and replayed. backend: torch.compile's (tests trace with "aot_eager").
    Building an engine changes no process-wide setting: the compiler settings it needs are scoped to
    its own steps. Reuse is safe: nothing reads a slot before the generation at hand writes it (a
    query reads positions <= its own, all written by prefill or decode; DraftCache.fill rewrites
    every slot)."""

    def __init__(self, model: Transformer, batch_size: int, max_seq_len: int, *, sa: Optional[SpecArgs] = None,
                 draft_model: Optional[Transformer] = None, attn: str = "sdpa", compile: bool = False,
                 prefill_chunk: int = 512, cuda_graphs: Optional[bool] = None, backend: str = "inductor"):
        self.model, self.sa = model, sa or SpecArgs()
        self.device = model.tok_embeddings.weight.device
        self.batch_size, self.max_seq_len, self.attn, self.prefill_chunk = batch_size, max_seq_len, attn, prefill_chunk
        self.compiled = compile
        sa = self.sa
        # self-speculation's draft: the target itself, or a quantized copy of it (model.quantized_copy)
        self.draft_model = None if sa.mode == "none" else (draft_model or model) if sa.mode == "self" else draft_model
        world = model.args.n_kv_head // model.layers[0].attention.n_kv_head  # tp.py shards the heads
        self.plan = memory_plan(model.args, batch=batch_size, max_seq_len=max_seq_len, world=world, attn=attn, sa=sa,
                                itemsize=model.tok_embeddings.weight.dtype.itemsize,
                                draft=self.draft_model.args if sa.mode == "draft" else None)
        self.cache = self.full_cache(model, batch_size, "target cache")
        self.draft_cache = None
        if sa.mode != "none":
            if sa.draft_kv == "full":
                self.draft_cache = self.full_cache(self.draft_model, batch_size, "draft cache")
            else:
                heads = self.draft_model.layers[0].attention
                self.check("draft cache")
                self.draft_cache = DraftCache(sa.draft_layout(), self.draft_model.args.n_layer, batch_size,
                                              heads.n_kv_head, heads.head_dim,
                                              dtype=self.draft_model.tok_embeddings.weight.dtype, device=self.device,
                                              attn=attn, q_per_kv=heads.n_head // heads.n_kv_head,
                                              policy=sa.reselect_policy)
        self.refresh = sa.mode == "self" and sa.refresh
        if compile:
            options = None
            if self.device.type == "cpu" and backend == "inductor" and torch._inductor.config.cpp.vec_isa_ok is None:
                # Inductor would prove each vector ISA the CPU reports by building a test library and
                # loading it in a fresh Python process: ~7 s on an empty cache, ~2 s on every later
                # start. The base AVX2/AVX-512 builds it skips need only a compiler from the last
                # decade; its narrower checks (VNNI, bf16, AMX) still run. TORCHINDUCTOR_VEC_ISA_OK
                # overrides this. An option of this compile only, not a process-wide setting.
                options = {"cpp.vec_isa_ok": True}
            self.block = torch.compile(run_block, fullgraph=True, dynamic=False, backend=backend, options=options)
        else:
            self.block = run_block
        if cuda_graphs is None:
            cuda_graphs = compile and self.device.type == "cuda"
        self.graphs = {} if cuda_graphs else None
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.scratches = {}

    def check(self, name):
        check_fits(self.plan[name], self.device, name, "lower --batch_size or --max_seq_len")

    def full_cache(self, model, batch_size, name):
        self.check(name)
        heads = model.layers[0].attention  # this rank's share under TP
        return KVCache(model.args.n_layer, batch_size, heads.n_kv_head, self.max_seq_len, heads.head_dim,
                       dtype=model.tok_embeddings.weight.dtype, device=self.device, attn=self.attn,
                       q_per_kv=heads.n_head // heads.n_kv_head)

    def compiling(self):
        """Dynamo's limit of graphs per code object (8) is raised while this engine's steps run, and
        only then: every step kind, shape and gamma is one more graph of the same run_block."""
        if not self.compiled:
            return contextlib.nullcontext()
        return torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT))

    def run(self, key, fn, *args):
        """fn(*args), or on CUDA with graphs its graph for these shapes, captured on first use."""
        if self.graphs is None:
            with self.compiling():
                return fn(*args)
        key = (key, *(None if a is None else tuple(a.shape) for a in args))
        if key not in self.graphs:
            with self.compiling():
                self.graphs[key] = CudaGraph(fn, args, self.pool)
        return self.graphs[key](*args)

    @property
    def capture_s(self):  # seconds spent capturing CUDA graphs (their warm-up calls apart)
        return sum(g.capture_s for g in (self.graphs or {}).values())

    # each step is one graph per sampling kind: the rows' settings are tensors among its inputs
    def decode(self, cur, pos, rs: RowSampling):
        return self.run(("decode", rs.kind), lambda c, p, *r: spec.decode_step(
            self.model, self.cache, c, p, RowSampling(*r, rs.kind), self.block), cur, pos, *rs.tensors)

    def draft(self, tokens, input_pos, rs: RowSampling):
        return self.run(("draft", rs.kind), lambda t, p, *r: spec.draft_step(
            self.draft_model, self.draft_cache, t, p, RowSampling(*r, rs.kind), self.block),
            tokens, input_pos, *rs.tensors)

    def verify(self, cur, drafts, q, pos, rs: RowSampling, scored: bool = False):
        """scored: a scored verify, which also re-picks the draft cache's fixed entries (--draft_reselect)."""
        refresh = self.draft_cache if self.refresh else None
        reselect = self.draft_cache if scored else None
        return self.run(("verify", rs.kind, scored), lambda c, d, q_, p, *r: spec.verify_step(
            self.model, self.cache, c, d, q_, p, RowSampling(*r, rs.kind), refresh=refresh, reselect=reselect,
            block=self.block), cur, drafts, q, pos, *rs.tensors)

    @torch.no_grad()
    def prefill(self, tokens, prompt_lens, model=None, cache=None, progress=None):
        """Write the prompts into the cache chunk by chunk (peak activations bounded by the chunk) and
        return the logits at each row's last prompt token [B, V]. Compiled, every chunk has one static
        shape whatever the prompt length; rows shorter than the chunk write padding past their end,
        which later writes overwrite. progress(done, total): called after each chunk (a host sync)."""
        model, cache = model or self.model, cache or self.cache
        B, T = tokens.shape
        chunk = min(self.prefill_chunk, cache.max_seq_len if self.compiled else T)
        tokens = torch.nn.functional.pad(tokens, (0, -T % chunk))
        last = prompt_lens - 1
        logits = None
        for start in range(0, tokens.shape[1], chunk):
            input_pos = start + torch.arange(chunk, device=tokens.device).expand(B, -1)
            idx = (last - start).clamp(0, chunk - 1)[:, None]
            with self.compiling():
                out = model(tokens[:, start: start + chunk].contiguous(), input_pos, cache, idx, block=self.block)[:, 0]
            in_chunk = ((last >= start) & (last < start + chunk))[:, None]
            logits = out if logits is None else torch.where(in_chunk, out, logits)
            if progress is not None:
                sync(self.device)
                progress(B * min(start + chunk, T), B * T)
        return logits

    @torch.no_grad()
    def setup_draft(self, tokens, prompt_lens, full=None, rows=None):
        """Build the draft's cache from the prompts (full: the target cache holding them, by default
        the engine's), into rows `rows` of the draft cache (default: all). Self-speculation
        compresses the target's full cache; a standalone draft prefills a full cache of its own first
        (kept only as --draft_kv full)."""
        sa = self.sa
        if sa.mode == "self":
            full = self.cache if full is None else full
        else:
            one_row = rows is not None
            if sa.draft_kv == "full" and not one_row:
                self.prefill(tokens, prompt_lens, self.draft_model, self.draft_cache)
                return
            full = self.scratch("draft") if one_row else \
                self.full_cache(self.draft_model, tokens.shape[0], "draft full cache, while building the sparse one")
            self.prefill(tokens, prompt_lens, self.draft_model, full)
            if sa.draft_kv == "full":
                self.draft_cache.copy_row(rows[0], full)
                return
        scores = None
        if sa.draft_kv == "snapkv":  # self-speculation: the target's own queries score its cache
            scores = snapkv_scores(self.model if sa.mode == "self" else self.draft_model, full, tokens, prompt_lens,
                                   sa.snapkv_window)
        self.draft_cache.fill(full, prompt_lens, scores, rows)

    def scratch(self, which):
        """A one-row full cache of the target's or the standalone draft's: where a new request is
        prefilled on its own before it joins the batch (one more compiled prefill shape, kept)."""
        if which not in self.scratches:
            model = self.model if which == "target" else self.draft_model
            self.scratches[which] = self.full_cache(model, 1, f"{which} scratch row")
        return self.scratches[which]

    @torch.no_grad()
    def refill(self, row: int, prompt: list):
        """Prefill one prompt on its own and move it into row `row` of every cache, the other rows
        untouched -> logits at its last token [V]. A refilled row holds what a batch prefill of the
        same prompt would: its full cache row, and a draft cache rebuilt from it."""
        tokens = torch.tensor([prompt], device=self.device)
        lens = torch.tensor([len(prompt)], device=self.device)
        scratch = self.scratch("target")
        logits = self.prefill(tokens, lens, cache=scratch)
        if self.sa.mode != "none":  # first: SnapKV's observation pass rewrites the prompt's last K/V
            self.setup_draft(tokens, lens, scratch, [row])
        self.cache.copy_row(row, scratch)
        return logits[0]


@dataclass
class Rows:
    """What the decode loop knows of every row, on the device. A row is active until its EOS or its
    own max_new; a done row idles (static shapes): it does not advance and writes only at or past
    its own end, which nothing reads before a write of the same position (or a refill) replaces it."""
    prompt_lens: torch.Tensor  # [B]
    last2: torch.Tensor  # [B, 2] the last two tokens; the second, at position pos, is in no cache yet
    n_gen: torch.Tensor  # [B] tokens generated so far
    max_new: torch.Tensor  # [B]
    done: torch.Tensor  # [B] bool
    out: torch.Tensor  # [B, max max_new + gamma_max + 1] generated tokens
    stats: torch.Tensor  # [3, B] per row: accepted drafts, drafts evaluated, rounds active
    sampling: RowSampling  # each row's own settings (its kind is the most general a step may need)

    @classmethod
    def empty(cls, B, max_new, width, device):
        z = torch.zeros(B, dtype=torch.long, device=device)
        # a row that never held a prompt idles at position 0
        return cls(torch.ones_like(z), torch.zeros(B, 2, dtype=torch.long, device=device), z.clone(), z.clone(),
                   torch.ones(B, dtype=torch.bool, device=device),
                   torch.zeros(B, max_new + width, dtype=torch.long, device=device),
                   torch.zeros(3, B, dtype=torch.long, device=device), RowSampling.of(Sampling(), B, device))

    @property
    def pos(self):  # [B] the position of each row's newest token, the one no cache holds yet
        return self.prompt_lens + self.n_gen - 1

    def start(self, rows, prompt_lens, last_prompt, first, max_new, eos, s: Sampling):
        """Rows `rows` begin after prefill, sampling as s says: first [b] is each one's first token."""
        for mine, value in zip(self.sampling.tensors, (s.temperature, s.top_k, s.top_p)):
            mine[rows] = value
        self.prompt_lens[rows] = prompt_lens
        self.last2[rows] = torch.stack([last_prompt, first], 1)
        self.n_gen[rows] = 1
        self.max_new[rows] = max_new
        self.done[rows] = torch.isin(first, eos) | (max_new <= 1)
        self.out[rows] = 0
        self.out[rows, 0] = first
        self.stats[:, rows] = 0

    def tokens(self, row, eos_ids):
        """Row's generated ids, up to and including its EOS (one host transfer)."""
        n = int(self.n_gen[row].clamp(max=self.max_new[row]))
        ids = self.out[row, :n].tolist()
        stop = next((i for i, t in enumerate(ids) if t in eos_ids), None)
        return ids if stop is None else ids[: stop + 1]


# ---------------------------------------------------------------- the two rounds

def autoregressive_round(engine: Engine, rows: Rows, rs: RowSampling):
    """One decode step for every row -> emitted [B, 1], n_emit [B] (ones)."""
    emitted = engine.decode(rows.last2[:, 1].contiguous(), rows.pos, rs)[:, None]
    return emitted, torch.ones_like(rows.n_gen)


def speculative_round(engine: Engine, rows: Rows, gamma: int, rs: RowSampling, scored: bool = False):
    """gamma draft steps, then one verify step (scored: one that also re-picks the draft cache's
    fixed entries), for every row -> emitted [B, gamma+1] (the first n_emit of each row are new
    tokens) and n_emit = n_accept + 1 [B].

    The draft must hold every position < pos before drafting. If the last round accepted all its
    drafts, the draft never saw the last one: without refresh the first draft step re-feeds the
    previous token too ([B, 2] at pos-1, pos; rewriting an entry the draft already holds is
    harmless). With refresh (self-speculation) the verify step writes the target's K/V of the
    verified positions into the draft cache as well, which covers that token and replaces the
    draft's own sparse-attention K/V with the target's."""
    last2, pos = rows.last2, rows.pos
    B = pos.shape[0]
    # compiled steps guard on strides: contiguous inputs keep to one graph per shape
    tokens = (last2[:, 1:] if engine.refresh else last2).contiguous()
    input_pos = pos[:, None] - tokens.shape[1] + 1 + torch.arange(tokens.shape[1], device=pos.device)
    # each draft step's outputs are copied out at once: a step replayed as a CUDA graph overwrites them
    drafts = torch.empty(B, gamma, dtype=torch.long, device=pos.device)
    qs = None
    if rs.kind != "greedy":
        qs = torch.empty(B, gamma, engine.draft_model.args.vocab_size, dtype=torch.float32, device=pos.device)
    for i in range(gamma):
        d, q = engine.draft(tokens, input_pos, rs)
        drafts[:, i] = d
        if qs is not None:
            qs[:, i] = q
        tokens, input_pos = drafts[:, i: i + 1].contiguous(), (pos + i + 1)[:, None]
    n_accept, next_token = engine.verify(last2[:, 1].contiguous(), drafts, qs, pos, rs, scored)
    emitted = torch.cat([drafts, drafts[:, :1]], 1).scatter(1, n_accept[:, None], next_token[:, None])
    return emitted, n_accept + 1


def decode_round(engine: Engine, rows: Rows, gamma: int, kind: str, eos, scored: bool = False):
    """One round of either kind for every row, then its bookkeeping: the one place where a round
    happens, for static batches and request streams alike. kind: the most general sampling kind
    among the active rows (spec.KINDS), which the host knows without asking the device. Updates rows
    in place -> emitted [B, width] and n_emit [B]: the first n_emit of each row are its new tokens
    (0 for a done row)."""
    rs = replace(rows.sampling, kind=kind)
    if engine.sa.mode == "none":
        emitted, n_emit = autoregressive_round(engine, rows, rs)
    else:
        emitted, n_emit = speculative_round(engine, rows, gamma, rs, scored)
        n_acc = n_emit - 1
        rows.stats += torch.stack([n_acc, torch.clamp(n_emit, max=gamma), torch.ones_like(n_acc)]) * (~rows.done)
    n_emit = torch.where(rows.done, 0, n_emit)
    # a done row writes past its own end, which Rows.tokens drops
    c = torch.arange(emitted.shape[1], device=emitted.device)
    rows.out.scatter_(1, (rows.n_gen[:, None] + c).clamp(max=rows.out.shape[1] - 1), emitted)
    hit_eos = (torch.isin(emitted, eos) & (c < n_emit[:, None])).any(1)
    rows.last2 = torch.cat([rows.last2, emitted], 1).gather(1, n_emit[:, None] + torch.arange(2, device=emitted.device))
    rows.n_gen += n_emit
    rows.done |= hit_eos | (rows.n_gen >= rows.max_new)
    return emitted, n_emit


# ---------------------------------------------------------------- --gamma auto

@torch.no_grad()
def calibrate_gamma(engine: Engine, pos, rs: RowSampling) -> int:
    """--gamma auto: time this run's own target step, verify step (at the planner's first gamma) and
    draft step, so that the planner's step ratios are measured ones, and return the starting gamma
    they give at the prior acceptance. The steps write junk K/V at positions >= pos [B]; decoding
    writes each of those positions before any query reads it (see kv_cache.py), in the draft cache
    too. Under tensor parallelism every rank takes rank 0's timings, so all choose alike."""
    sa = engine.sa
    B, g, V = pos.shape[0], sa.gamma, engine.model.args.vocab_size
    cur = torch.zeros(B, dtype=torch.long, device=pos.device)
    drafts = torch.zeros(B, g, dtype=torch.long, device=pos.device)
    q = None if rs.kind == "greedy" else torch.nn.functional.one_hot(drafts, V).float()
    t_t = costmodel.median_time(lambda: engine.decode(cur, pos, rs), pos.device, 3)
    t_v = costmodel.median_time(lambda: engine.verify(cur, drafts, q, pos, rs), pos.device, 3)
    if sa.reselect:  # one verify in reselect is a scored one: the planner sees the mean cost
        t_scored = costmodel.median_time(lambda: engine.verify(cur, drafts, q, pos, rs, scored=True), pos.device, 3)
        t_v += (t_scored - t_v) / sa.reselect
    t_d = costmodel.median_time(lambda: engine.draft(cur[:, None], pos[:, None], rs), pos.device, 3)
    times = [t_t, t_v, t_d]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(times, src=0)
    sa.planner.calibrate(times[0], times[1], g, times[2], sa.draft_budget)
    return sa.planner.choose_gamma(sa.planner.alpha, sa.draft_budget)[0]


def replan(engine: Engine, rows: Rows) -> int:
    """--gamma auto: the gamma that finishes the slowest active row soonest, from each row's acceptance
    so far and the tokens it still has to make (one host sync)."""
    acc, ev, left = torch.stack([rows.stats[0], rows.stats[1],
                                 torch.where(rows.done, 0, rows.max_new - rows.n_gen)]).tolist()
    active = [(a / e, n) for a, e, n in zip(acc, ev, left) if e and n > 0]
    return engine.sa.planner.choose_gamma_for_rows(active, engine.sa.draft_budget) if active else None


# ---------------------------------------------------------------- the loops

@torch.no_grad()
def generate(engine: Engine, prompts: list, max_new_tokens, eos_ids, s: Sampling, on_round=None,
             on_prefill=None) -> Result:
    """Generate for a static batch of ragged prompts (lists of token ids, one per engine row). Each
    row stops at its own EOS or after max_new_tokens (an int, or one per row); the batch runs until
    its last row is done. The prefill time includes the draft cache's setup and, with sa.planner
    (--gamma auto), the timing of the steps that calibrates it. on_round(rows) runs after every
    round (streamed output), on_prefill(tokens done, tokens in all) after every prefill chunk."""
    sa, device = engine.sa, engine.device
    if len(prompts) != engine.batch_size:
        raise ValueError(f"{len(prompts)} prompts for an engine of {engine.batch_size} rows")
    news = max_new_tokens if isinstance(max_new_tokens, (list, tuple)) else [max_new_tokens] * len(prompts)
    for p, n in zip(prompts, news):
        if len(p) + n > engine.max_seq_len:
            raise ValueError(f"a prompt of {len(p)} tokens plus {n} new ones does not fit the cache's "
                             f"{engine.max_seq_len} positions")
    tokens, prompt_lens = pad_prompts(prompts, device)
    B = tokens.shape[0]
    eos = torch.tensor(sorted(eos_ids), device=device)

    sync(device)
    t0 = time.perf_counter()
    rs = RowSampling.of(s, B, device)
    first = spec.next_token(engine.prefill(tokens, prompt_lens, progress=on_prefill), rs)
    gamma = sa.gamma
    if sa.mode != "none":
        engine.setup_draft(tokens, prompt_lens)
        if sa.planner is not None:
            gamma = calibrate_gamma(engine, prompt_lens, rs)
    rows = Rows.empty(B, max(news), sa.ring_gamma + 1, device)
    everyone = torch.arange(B, device=device)
    last_prompt = tokens.gather(1, (prompt_lens - 1)[:, None])[:, 0]
    rows.start(everyone, prompt_lens, last_prompt, first, torch.tensor(news, device=device), eos, s)
    sync(device)
    t1 = time.perf_counter()

    rounds, gammas, marks = 0, [], []
    while not bool(rows.done.all()):  # the one host sync per step/round
        marks.append(time.perf_counter())
        decode_round(engine, rows, gamma, s.kind, eos, sa.scored(rounds))
        gammas.append(gamma)
        rounds += 1
        if sa.adapt_every and rounds % sa.adapt_every == 0:
            gamma = replan(engine, rows) or gamma
        if on_round is not None:
            on_round(rows)
    sync(device)
    t2 = time.perf_counter()
    round_s = [b - a for a, b in zip(marks, marks[1:] + [t2])]
    acc, ev, rr = rows.stats.sum(1).tolist()
    return Result([rows.tokens(i, eos_ids) for i in range(B)], t1 - t0, t2 - t1, rounds, acc, ev, rr,
                  gammas if sa.mode != "none" else [], round_s)


@dataclass
class Request:
    id: object
    prompt: list  # token ids
    max_new_tokens: int
    where: str = ""  # where it came from, for error messages
    stop: tuple = ()  # strings that end the request once its text holds one (checked once per round)
    arrived: Optional[float] = None  # time.perf_counter() at arrival; None: when serve() starts
    sampling: Optional[Sampling] = None  # None: serve()'s
    cancelled: bool = False  # set from any thread: the request ends at the next round, its slot freed


class RequestQueue:
    """Requests waiting for a slot, oldest first, fed from any thread while serve() runs. submit()
    refuses (returns False) when max_waiting requests already wait, or after close(); serve() ends
    once the queue is closed and every request it took is done."""

    def __init__(self, requests=(), max_waiting: int = 0, closed: bool = False):
        self.waiting, self.max_waiting, self.closed = deque(requests), max_waiting, closed
        self.cond = threading.Condition()

    def submit(self, req: Request) -> bool:
        with self.cond:
            if self.closed or (self.max_waiting and len(self.waiting) >= self.max_waiting):
                return False
            req.arrived = time.perf_counter() if req.arrived is None else req.arrived
            self.waiting.append(req)
            self.cond.notify()
            return True

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()

    def take(self, wait: bool) -> Optional[Request]:
        """The oldest waiting request, or None: none waits (with wait, not until one arrives or the
        queue closes, sleeping meanwhile: an idle engine does not spin)."""
        with self.cond:
            while wait and not self.waiting and not self.closed:
                self.cond.wait()
            return self.waiting.popleft() if self.waiting else None

    def exhausted(self) -> bool:
        with self.cond:
            return self.closed and not self.waiting


@dataclass
class Slot:
    """What the host knows of the request in one row: its tokens so far, and when it got its slot
    and its first token."""
    req: Request
    t_slot: float
    t_first: float
    tokens: list


@torch.no_grad()
def serve(engine: Engine, requests, eos_ids, s: Sampling, on_finish, *, on_tokens=None, decode=None) -> dict:
    """Continuous batching: the engine's rows are slots; a request waits for a free slot, is prefilled
    on its own into it (Engine.refill) and decodes with whatever else is running; the moment it is
    done its slot takes the oldest waiting request. requests: a list (all arrive at the start) or a
    RequestQueue that other threads feed while this runs. A request ends at its EOS, its
    max_new_tokens, a stop string (decode(ids) -> text is needed for those), or its cancellation,
    and its tokens are the ones it gets alone: nothing it shares a round with changes them (a sampled
    request's draws from the random stream aside). Each request samples as its own .sampling says,
    or as s when it has none.
    on_tokens(request, new_ids) gets each request's tokens once per round as they are made (its
    first from prefill); on_finish(request, record) each finished request's tokens, text (with
    decode), finish_reason and timings, in completion order. The one host sync per round carries
    every row's new tokens. -> run totals (requests, tokens, seconds, rounds)."""
    sa, device = engine.sa, engine.device
    queue = requests if isinstance(requests, RequestQueue) else RequestQueue(requests, closed=True)
    B = engine.batch_size
    eos = torch.tensor(sorted(eos_ids), device=device)
    rows = Rows.empty(B, engine.max_seq_len, sa.ring_gamma + 1, device)
    slots = [None] * B
    gamma, rounds, n_done, n_tokens, calibrated = sa.gamma, 0, 0, 0, False
    sync(device)
    t_start = time.perf_counter()

    def finish(row, reason):
        nonlocal n_done, n_tokens
        slot, t = slots[row], time.perf_counter()
        req, ids = slot.req, slot.tokens
        arrived = t_start if req.arrived is None else req.arrived
        record = dict(id=req.id, tokens=ids, prompt_tokens=len(req.prompt), finish_reason=reason,
                      queue_s=slot.t_slot - arrived, ttft_s=slot.t_first - arrived, decode_s=t - slot.t_first,
                      tokens_per_s=(len(ids) - 1) / max(t - slot.t_first, 1e-9))
        if decode is not None:
            record["text"] = text_until_stop(decode(ids), req.stop)[0]
        if sa.mode != "none":
            acc, ev, rr = rows.stats[:, row].tolist()
            record.update(acceptance=acc / max(ev, 1), rounds=rr, accepted=acc, evaluated=ev)
        n_done, n_tokens, slots[row] = n_done + 1, n_tokens + len(ids), None
        rows.done[row] = True  # a stop string or a cancellation ends a row the device still runs
        on_finish(req, record)

    def take_tokens(row, new):
        """New ids of the request in row -> whether it is done, and why; clipped at its EOS, its
        length limit and its first stop string."""
        slot = slots[row]
        room = slot.req.max_new_tokens - len(slot.tokens)
        new = new[:room]
        stop = next((i for i, t in enumerate(new) if t in eos_ids), None)
        new = new if stop is None else new[:stop + 1]
        slot.tokens += new
        if on_tokens is not None and new:
            on_tokens(slot.req, new)
        if stop is not None:
            return "stop"
        if slot.req.stop and text_until_stop(decode(slot.tokens), slot.req.stop)[1]:
            return "stop"
        return "length" if len(slot.tokens) >= slot.req.max_new_tokens else None

    while True:
        for row in range(B):  # free slots take the oldest waiting requests; with none busy, wait for one
            while slots[row] is None:
                req = queue.take(wait=not any(slots))
                if req is None:
                    break
                if req.cancelled:
                    continue
                if req.stop and decode is None:
                    raise ValueError(f"request {req.id!r} has stop strings: serve() needs decode to check them")
                t_slot = time.perf_counter()
                mine = req.sampling or s
                first = spec.next_token(engine.refill(row, req.prompt)[None], RowSampling.of(mine, 1, device))
                rows.start(torch.tensor([row], device=device), torch.tensor([len(req.prompt)], device=device),
                           torch.tensor([req.prompt[-1]], device=device), first,
                           torch.tensor([req.max_new_tokens], device=device), eos, mine)
                slots[row] = Slot(req, t_slot, time.perf_counter(), [])
                reason = take_tokens(row, [int(first[0])])
                slots[row].t_first = time.perf_counter()
                if reason is not None:
                    finish(row, reason)
        if not any(slots):
            if queue.exhausted():
                break
            continue
        kind = widest_kind(x.req.sampling or s for x in slots if x is not None)
        if sa.planner is not None and not calibrated:
            gamma, calibrated = calibrate_gamma(engine, rows.pos, replace(rows.sampling, kind=kind)), True
        emitted, n_emit = decode_round(engine, rows, gamma, kind, eos, sa.scored(rounds))
        rounds += 1
        if sa.adapt_every and rounds % sa.adapt_every == 0:
            gamma = replan(engine, rows) or gamma
        new = torch.cat([n_emit[:, None], emitted], 1).tolist()  # the one host sync per round
        for row, (n, *ids) in enumerate(new):
            if slots[row] is None:
                continue
            reason = "cancelled" if slots[row].req.cancelled else take_tokens(row, ids[:n])
            if reason is not None:
                finish(row, reason)
    return dict(requests=n_done, tokens=n_tokens, seconds=time.perf_counter() - t_start, rounds=rounds)


def text_until_stop(text: str, stop) -> tuple:
    """(text up to its first stop string, whether one occurs): a stop string is not part of the answer."""
    at = min((i for i in (text.find(x) for x in stop) if i >= 0), default=-1)
    return (text, False) if at < 0 else (text[:at], True)


def device_name(device):
    """The device as results name it: the GPU's name, or the CPU's model, its bf16 units and cores
    (which precision and kernels run fastest differs between CPU models)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = dict(map(str.strip, line.split(":", 1)) for line in f.read().split("\n\n")[0].splitlines()
                        if ":" in line)
        model, flags = info.get("model name", model), set(info.get("flags", "").split())
    except OSError:
        pass
    bf16 = "+".join(x for x in ("avx512_bf16", "amx_bf16") if x in flags)
    return f"cpu: {model}{f' ({bf16})' if bf16 else ''}, {os.cpu_count()} cores"
