# Batched generation: ragged prompts, chunked prefill, autoregressive or speculative decoding.
#   python generate.py --prompt "Hello" --max_new_tokens 64
#   python generate.py --prompt_file essay.txt --speculate self --draft_kv snapkv --draft_budget 256
#   torchrun --nproc_per_node=2 generate.py ...   (tensor parallel, see tp.py)
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

import spec
import tp
from kv_cache import DraftCache, KVCache, check_fits, snapkv_scores
from checkpoint import MANIFEST, load_model, read_config, verify_checkpoint, write_atomic
from model import Transformer, flash_attn_with_kvcache, run_block
from spec import Sampling

DEFAULT_CHECKPOINT = "checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class SpecArgs:
    mode: str = "none"  # none | self | draft
    gamma: int = 4
    draft_kv: str = "streaming"  # streaming | snapkv | full (full: standalone draft only)
    draft_budget: int = 256
    sinks: int = 16
    snapkv_window: int = 32  # observation window: the prompt's last queries that score the prefix
    snapkv_recent: int = 0  # recent positions the SnapKV draft keeps besides its picks (0: budget // 2)
    refresh: bool = True  # self-speculation: copy the target's verified K/V into the draft cache
    gamma_max: int = 0  # largest gamma any round may use: sizes the draft ring (0: gamma)
    adapt_every: int = 0  # > 0: re-choose gamma every this many rounds from the measured acceptance of each row
    planner: object = None  # costmodel.Planner that re-chooses gamma (with adapt_every)


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


def pad_prompts(prompts, device):
    """list of token-id lists -> right-padded tokens [B, T] and lengths [B]."""
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), int(lens.max()), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    return tokens, lens


def decode_step(model, cache, cur, pos, s: Sampling, block=run_block):
    """One autoregressive step for every row: cur, pos [B] -> next token [B]."""
    return spec.next_token(model(cur[:, None], pos[:, None], cache, block=block)[:, -1], s)


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
    to generate() as often as it likes (caches and captured graphs outlive the call).

    compile: one torch.compile'd transformer block (model.run_block) that every layer of every step
    reuses, so compile time does not grow with depth: one graph per step kind (prefill chunk, decode,
    draft, verify at each gamma), fullgraph, static shapes. cuda_graphs (default: compile on CUDA):
    each decode, draft and verify step, all layers plus sampling and acceptance, is captured once per
    shape as one CUDA graph and replayed. backend: torch.compile's (tests trace with "aot_eager").
    Reuse is safe: nothing reads a slot before the generation at hand writes it (a query reads
    positions <= its own, all written by prefill or decode; DraftCache.fill rewrites every slot)."""

    def __init__(self, model: Transformer, batch_size: int, max_seq_len: int, sa: Optional[SpecArgs] = None,
                 draft_model: Optional[Transformer] = None, attn: str = "sdpa", compile: bool = False,
                 prefill_chunk: int = 512, cuda_graphs: Optional[bool] = None, backend: str = "inductor"):
        self.model, self.sa = model, sa or SpecArgs()
        self.device = model.tok_embeddings.weight.device
        self.batch_size, self.max_seq_len, self.attn, self.prefill_chunk = batch_size, max_seq_len, attn, prefill_chunk
        self.compiled = compile
        self.cache = self.full_cache(model, batch_size)
        self.draft_model, self.draft_cache = None, None
        sa = self.sa
        if sa.mode != "none":
            self.draft_model = model if sa.mode == "self" else draft_model
            if sa.draft_kv == "full":
                self.draft_cache = self.full_cache(self.draft_model, batch_size)
            else:
                a, heads = self.draft_model.args, self.draft_model.layers[0].attention
                self.draft_cache = DraftCache(sa.draft_kv, a.n_layer, batch_size, heads.n_kv_head, a.head_dim,
                                              sa.draft_budget, max(sa.gamma, sa.gamma_max),
                                              self.draft_model.tok_embeddings.weight.dtype, self.device,
                                              sinks=sa.sinks, recent=sa.snapkv_recent, attn=attn,
                                              q_per_kv=heads.n_head // heads.n_kv_head)
        self.refresh = sa.mode == "self" and sa.refresh
        if compile:
            # every step kind and gamma is one more graph of the same run_block code
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            if self.device.type == "cpu" and torch._inductor.config.cpp.vec_isa_ok is None:
                # Inductor would prove each vector ISA the CPU reports by building a test library and
                # loading it in a fresh Python process: ~7 s on an empty cache, ~2 s on every later
                # start. The base AVX2/AVX-512 builds it skips need only a compiler from the last
                # decade; its narrower checks (VNNI, bf16, AMX) still run. TORCHINDUCTOR_VEC_ISA_OK
                # overrides this.
                torch._inductor.config.cpp.vec_isa_ok = True
            self.block = torch.compile(run_block, fullgraph=True, dynamic=False, backend=backend)
        else:
            self.block = run_block
        if cuda_graphs is None:
            cuda_graphs = compile and self.device.type == "cuda"
        self.graphs = {} if cuda_graphs else None
        self.pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.scratches = {}

    def full_cache(self, model, batch_size):
        a, heads = model.args, model.layers[0].attention  # heads: this rank's share under TP
        return KVCache(a.n_layer, batch_size, heads.n_kv_head, self.max_seq_len, a.head_dim,
                       model.tok_embeddings.weight.dtype, self.device, self.attn, heads.n_head // heads.n_kv_head)

    def run(self, key, fn, *args):
        """fn(*args), or on CUDA with graphs its graph for these shapes, captured on first use."""
        if self.graphs is None:
            return fn(*args)
        key = (key, *(None if a is None else tuple(a.shape) for a in args))
        if key not in self.graphs:
            self.graphs[key] = CudaGraph(fn, args, self.pool)
        return self.graphs[key](*args)

    @property
    def capture_s(self):  # seconds spent capturing CUDA graphs (their warm-up calls apart)
        return sum(g.capture_s for g in (self.graphs or {}).values())

    def decode(self, cur, pos, s: Sampling):
        return self.run(("decode", s), lambda c, p: decode_step(self.model, self.cache, c, p, s, self.block), cur, pos)

    def draft(self, tokens, input_pos, s: Sampling):
        return self.run(("draft", s), lambda t, p: spec.draft_step(self.draft_model, self.draft_cache, t, p, s, self.block),
                        tokens, input_pos)

    def verify(self, cur, drafts, q, pos, s: Sampling):
        refresh = self.draft_cache if self.refresh else None
        return self.run(("verify", s), lambda c, d, q_, p: spec.verify_step(self.model, self.cache, c, d, q_, p, s,
                                                                             refresh, self.block), cur, drafts, q, pos)

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
            out = model(tokens[:, start : start + chunk].contiguous(), input_pos, cache, idx, block=self.block)[:, 0]
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
            full = self.scratch("draft") if one_row else self.full_cache(self.draft_model, tokens.shape[0])
            self.prefill(tokens, prompt_lens, self.draft_model, full)
            if sa.draft_kv == "full":
                self.draft_cache.copy_row(rows[0], full)
                return
        scores = None
        if sa.draft_kv == "snapkv":
            scores = snapkv_scores(self.draft_model, full, tokens, prompt_lens, sa.snapkv_window)
        self.draft_cache.fill(full, prompt_lens, scores, rows)

    def scratch(self, which):
        """A one-row full cache of the target's or the standalone draft's: where a new request is
        prefilled on its own before it joins the batch (one more compiled prefill shape, kept)."""
        if which not in self.scratches:
            self.scratches[which] = self.full_cache(self.model if which == "target" else self.draft_model, 1)
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


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def calibrate_gamma(engine: Engine, pos, s: Sampling) -> int:
    """--gamma auto: time this run's own target step, verify step (at the planner's first gamma) and
    draft step, so that the planner's step ratios are measured ones, and return the starting gamma
    they give at the prior acceptance. The steps write junk K/V at positions >= pos [B]; decoding
    writes each of those positions before any query reads it (see kv_cache.py), in the draft cache
    too. Under tensor parallelism every rank takes rank 0's timings, so all choose alike."""
    import costmodel

    sa = engine.sa
    B, g, V = pos.shape[0], sa.gamma, engine.model.args.vocab_size
    cur = torch.zeros(B, dtype=torch.long, device=pos.device)
    drafts = torch.zeros(B, g, dtype=torch.long, device=pos.device)
    q = None if s.temperature == 0 else torch.nn.functional.one_hot(drafts, V).float()
    t_t = costmodel.median_time(lambda: engine.decode(cur, pos, s), pos.device, 3)
    t_v = costmodel.median_time(lambda: engine.verify(cur, drafts, q, pos, s), pos.device, 3)
    t_d = costmodel.median_time(lambda: engine.draft(cur[:, None], pos[:, None], s), pos.device, 3)
    times = [t_t, t_v, t_d]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(times, src=0)
    sa.planner.calibrate(times[0], times[1], g, times[2], sa.draft_budget)
    return sa.planner.choose_gamma(sa.planner.alpha, sa.draft_budget)[0]


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

    @classmethod
    def empty(cls, B, max_new, width, device):
        z = torch.zeros(B, dtype=torch.long, device=device)
        # a row that never held a prompt idles at position 0
        return cls(torch.ones_like(z), torch.zeros(B, 2, dtype=torch.long, device=device), z.clone(), z.clone(),
                   torch.ones(B, dtype=torch.bool, device=device),
                   torch.zeros(B, max_new + width, dtype=torch.long, device=device),
                   torch.zeros(3, B, dtype=torch.long, device=device))

    def start(self, rows, prompt_lens, last_prompt, first, max_new, eos):
        """Rows `rows` begin after prefill: first [b] is each one's first token."""
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


def decode_round(engine: Engine, rows: Rows, gamma: int, s: Sampling, eos) -> None:
    """One decode step (autoregressive) or speculation round for every row: the one place where a
    round happens, for static batches and request streams alike. Updates rows in place."""
    pos = rows.prompt_lens + rows.n_gen - 1
    if engine.sa.mode == "none":
        emitted = engine.decode(rows.last2[:, 1].contiguous(), pos, s)[:, None]
        n_emit = torch.ones_like(rows.n_gen)
    else:
        emitted, n_emit = spec.speculate_round(engine, rows.last2, pos, gamma, s)
        n_acc = n_emit - 1
        rows.stats += torch.stack([n_acc, torch.clamp(n_emit, max=gamma), torch.ones_like(n_acc)]) * (~rows.done)
    n_emit = torch.where(rows.done, 0, n_emit)
    # a done row writes past its own end, which Rows.tokens drops
    c = torch.arange(emitted.shape[1], device=pos.device)
    rows.out.scatter_(1, (rows.n_gen[:, None] + c).clamp(max=rows.out.shape[1] - 1), emitted)
    hit_eos = (torch.isin(emitted, eos) & (c < n_emit[:, None])).any(1)
    rows.last2 = torch.cat([rows.last2, emitted], 1).gather(1, n_emit[:, None] + torch.arange(2, device=pos.device))
    rows.n_gen += n_emit
    rows.done |= hit_eos | (rows.n_gen >= rows.max_new)


def replan(engine: Engine, rows: Rows) -> int:
    """--gamma auto: the gamma that finishes the slowest active row soonest, from each row's acceptance
    so far and the tokens it still has to make (one host sync)."""
    acc, ev, left = torch.stack([rows.stats[0], rows.stats[1], torch.where(rows.done, 0, rows.max_new - rows.n_gen)]).tolist()
    active = [(a / e, n) for a, e, n in zip(acc, ev, left) if e and n > 0]
    return engine.sa.planner.choose_gamma_for_rows(active, engine.sa.draft_budget) if active else None


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
    first = spec.next_token(engine.prefill(tokens, prompt_lens, progress=on_prefill), s)
    gamma = sa.gamma
    if sa.mode != "none":
        engine.setup_draft(tokens, prompt_lens)
        if sa.planner is not None:
            gamma = calibrate_gamma(engine, prompt_lens, s)
    rows = Rows.empty(B, max(news), max(sa.gamma, sa.gamma_max) + 1, device)
    everyone = torch.arange(B, device=device)
    last_prompt = tokens.gather(1, (prompt_lens - 1)[:, None])[:, 0]
    rows.start(everyone, prompt_lens, last_prompt, first, torch.tensor(news, device=device), eos)
    sync(device)
    t1 = time.perf_counter()

    rounds, gammas, marks = 0, [], []
    while not bool(rows.done.all()):  # the one host sync per step/round
        marks.append(time.perf_counter())
        decode_round(engine, rows, gamma, s, eos)
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


@torch.no_grad()
def serve(engine: Engine, requests: list, eos_ids, s: Sampling, on_finish) -> dict:
    """Continuous batching: the engine's rows are slots; a request waits for a free slot, is prefilled
    on its own into it (Engine.refill) and decodes with whatever else is running; the moment it is
    done its slot takes the next waiting request. Every request arrives at the start.
    on_finish(request, record) gets each finished request's tokens and timings, in completion order.
    -> run totals (requests, tokens, seconds)."""
    sa, device = engine.sa, engine.device
    B = engine.batch_size
    eos = torch.tensor(sorted(eos_ids), device=device)
    width = max(sa.gamma, sa.gamma_max) + 1
    rows = Rows.empty(B, max(r.max_new_tokens for r in requests), width, device)
    waiting = list(requests)
    slot_of = [None] * B  # the request in each slot, and when it got its slot and its first token
    gamma, rounds, n_tokens, calibrated = sa.gamma, 0, 0, False
    sync(device)
    t_start = time.perf_counter()
    while waiting or any(slot_of):
        for row in range(B):
            if slot_of[row] is None and waiting:
                req = waiting.pop(0)
                t_slot = time.perf_counter()
                first = spec.next_token(engine.refill(row, req.prompt), s)
                r = torch.tensor([row], device=device)
                rows.start(r, torch.tensor([len(req.prompt)], device=device),
                           torch.tensor([req.prompt[-1]], device=device), first[None],
                           torch.tensor([req.max_new_tokens], device=device), eos)
                sync(device)
                slot_of[row] = (req, t_slot, time.perf_counter())
        if sa.planner is not None and not calibrated:
            gamma, calibrated = calibrate_gamma(engine, rows.prompt_lens + rows.n_gen - 1, s), True
        # some slot is busy here; a row done at its first token just idles through this round
        decode_round(engine, rows, gamma, s, eos)
        rounds += 1
        if sa.adapt_every and rounds % sa.adapt_every == 0:
            gamma = replan(engine, rows) or gamma
        done = rows.done.tolist()  # the one host sync per round
        t = time.perf_counter()
        for row in range(B):
            if slot_of[row] is not None and done[row]:
                req, t_slot, t_first = slot_of[row]
                ids = rows.tokens(row, eos_ids)
                acc, ev, rr = rows.stats[:, row].tolist()
                record = dict(id=req.id, tokens=ids, prompt_tokens=len(req.prompt), queue_s=t_slot - t_start,
                              ttft_s=t_first - t_start, decode_s=t - t_first,
                              tokens_per_s=(len(ids) - 1) / max(t - t_first, 1e-9))
                if sa.mode != "none":
                    record.update(acceptance=acc / max(ev, 1), rounds=rr)
                n_tokens += len(ids)
                slot_of[row] = None
                on_finish(req, record)
    return dict(requests=len(requests), tokens=n_tokens, seconds=time.perf_counter() - t_start, rounds=rounds)


class UsageError(ValueError):
    """A bad flag, file or request: one line and exit code 2, before any weights load."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not the usage block
        raise UsageError(f"{message} (see --help)")


def int_or_auto(text):
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None


def parse_args(argv=None):
    p = Parser(description="Batched autoregressive or MagicDec-style speculative generation. Every rule stated "
                           "below is checked before any weights load.")
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT, help="directory with model.pth, config.json, tokenizer")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one row each)")
    p.add_argument("--prompt_file", action="append", default=[], help="a UTF-8 file whose text is one prompt (repeatable)")
    p.add_argument("--requests", default=None, metavar="FILE.jsonl",
                   help="serve a stream of requests through --batch_size slots (continuous batching): one JSON "
                        "object per line with 'prompt' (text), optional 'max_new_tokens' (>= 1, default "
                        "--max_new_tokens) and 'id' (default: the line number)")
    p.add_argument("--results", default=None, metavar="FILE.jsonl",
                   help="with --requests: one JSON line per finished request, in completion order, flushed as each "
                        "finishes into FILE.jsonl.partial, which becomes FILE.jsonl when the run ends (without it: "
                        "each request's text is printed as it finishes)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template as a user turn")
    p.add_argument("--batch_size", type=int, default=0,
                   help="rows (with --requests: slots); >= 0, 0: one per prompt or request; prompts repeat cyclically to fill")
    p.add_argument("--max_new_tokens", type=int, default=128, help=">= 1")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; finite and >= 0; a tiny temperature approaches greedy (ties split evenly)")
    p.add_argument("--top_k", type=int, default=0, help=">= 0, 0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="in (0, 1], 1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile one transformer block that every layer and step reuses (on CUDA also "
                        "CUDA graphs of whole steps)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "flex", "flash"],
                   help="attention backend. flex reads only each row's valid KV blocks, inside compiled steps "
                        "(needs --compile); flash needs the flash-attn package, CUDA and fp16/bf16. auto: flex on "
                        "CUDA with --compile, else sdpa (on CPU sdpa measured as fast or faster)")
    p.add_argument("--max_seq_len", type=int, default=0,
                   help="KV cache positions per row, >= 0 (0: the longest prompt + max_new_tokens)")
    p.add_argument("--prefill_chunk", type=int, default=512, help="prompt tokens per prefill forward, 1-65536")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write tokens, timings and acceptance here (atomically; the directory must exist)")
    p.add_argument("--speculate", default="none", choices=["none", "self", "draft"])
    p.add_argument("--gamma", type=int_or_auto, default=4,
                   help=f"draft tokens per round, 1-{MAX_GAMMA} and below --max_new_tokens (unless that is 1); auto: "
                        "chosen by the cost model (costmodel.py), then re-chosen every --adapt_every rounds")
    p.add_argument("--draft_kv", default="streaming", choices=["streaming", "snapkv", "full"])
    p.add_argument("--draft_budget", type=int_or_auto, default=256,
                   help="KV entries the draft attends to, >= 1 and above --sinks (streaming) or --snapkv_recent "
                        "(snapkv); auto: chosen by the cost model among 128, 256, 512, 1024")
    p.add_argument("--adapt_every", type=int, default=8, help="rounds between gamma re-choices with --gamma auto, >= 1")
    p.add_argument("--sinks", type=int, default=16, help="StreamingLLM sink tokens, >= 0")
    p.add_argument("--snapkv_window", type=int, default=32,
                   help="SnapKV observation window, >= 1; a prompt shorter than it observes from its start")
    p.add_argument("--snapkv_recent", type=int, default=0,
                   help="SnapKV recent window kept during decode, >= 0 (0: budget/2)")
    p.add_argument("--draft_refresh", action=argparse.BooleanOptionalAction, default=True,
                   help="self-speculation: copy the target's verified K/V into the draft cache")
    p.add_argument("--draft_checkpoint_path", default=None, help="standalone draft model (--speculate draft)")
    args = p.parse_args(argv)

    def check(ok, msg):
        if not ok:
            raise UsageError(msg)

    check(args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    check(math.isfinite(args.temperature) and args.temperature >= 0,
          f"--temperature must be finite and >= 0 (got {args.temperature}; 0 is greedy)")
    check(math.isfinite(args.top_p) and 0 < args.top_p <= 1, f"--top_p must be in (0, 1] (got {args.top_p})")
    check(args.top_k >= 0, f"--top_k must be >= 0 (got {args.top_k})")
    check(args.batch_size >= 0, f"--batch_size must be >= 0 (got {args.batch_size})")
    check(1 <= args.prefill_chunk <= 65536, f"--prefill_chunk must be in 1-65536 (got {args.prefill_chunk})")
    check(args.max_seq_len >= 0, f"--max_seq_len must be >= 0 (got {args.max_seq_len})")
    check(bool(args.prompt or args.prompt_file) != bool(args.requests),
          "give --prompt / --prompt_file, or --requests, not both" if args.requests else
          "give at least one --prompt or --prompt_file, or --requests")
    check(args.results is None or args.requests, "--results needs --requests")
    check(args.attn != "flash" or flash_attn_with_kvcache is not None,
          "--attn flash needs the flash-attn package (pip install flash-attn, CUDA only)")
    check(args.attn != "flex" or args.compile, "--attn flex runs inside compiled steps: add --compile")
    check(args.adapt_every >= 1, f"--adapt_every must be >= 1 (got {args.adapt_every})")
    check(args.sinks >= 0, f"--sinks must be >= 0 (got {args.sinks})")
    check(args.snapkv_window >= 1, f"--snapkv_window must be >= 1 (got {args.snapkv_window})")
    check(args.snapkv_recent >= 0, f"--snapkv_recent must be >= 0 (got {args.snapkv_recent})")
    if args.speculate != "none":
        if args.gamma != "auto":
            check(1 <= args.gamma <= MAX_GAMMA, f"--gamma must be in 1-{MAX_GAMMA} or auto (got {args.gamma})")
            check(args.gamma < args.max_new_tokens or args.max_new_tokens == 1,
                  f"--gamma {args.gamma} drafts more than --max_new_tokens {args.max_new_tokens} can keep: lower --gamma")
        floor = args.sinks if args.draft_kv == "streaming" else args.snapkv_recent
        if args.draft_budget == "auto":
            import costmodel
            check(args.draft_kv != "full", "--draft_budget auto needs a sparse --draft_kv")
            check(max(costmodel.PRIOR_ACCEPTANCE) > floor,
                  f"--draft_budget auto chooses among {', '.join(map(str, costmodel.PRIOR_ACCEPTANCE))}, none above "
                  f"--{'sinks' if args.draft_kv == 'streaming' else 'snapkv_recent'} {floor}: lower it or give a budget")
        elif args.draft_kv != "full":
            check(args.draft_budget >= 1, f"--draft_budget must be >= 1 or auto (got {args.draft_budget})")
            recent = args.snapkv_recent or args.draft_budget // 2
            if args.draft_kv == "streaming":
                check(args.draft_budget > args.sinks,
                      f"--draft_budget {args.draft_budget} must be larger than --sinks {args.sinks}")
            else:
                check(0 < recent < args.draft_budget,
                      f"--draft_budget {args.draft_budget} must be larger than --snapkv_recent {recent} (and >= 2)")
    check(not (args.speculate == "self" and args.draft_kv == "full"),
          "--speculate self needs a sparse --draft_kv (a full cache makes the draft the target itself)")
    check(args.speculate == "draft" or not args.draft_checkpoint_path, "--draft_checkpoint_path needs --speculate draft")
    check(args.speculate != "draft" or args.draft_checkpoint_path, "--speculate draft needs --draft_checkpoint_path")
    args.device = parse_device(args.device)
    for flag, path in (("--json", args.json), ("--results", args.results)):
        if path:
            check_writable(flag, path)
    for f in args.prompt_file + ([args.requests] if args.requests else []):
        check(os.path.isfile(f) and os.access(f, os.R_OK), f"{f}: no such readable file")
    args.checkpoint_path = checkpoint_dir(args.checkpoint_path, "checkpoint")
    if args.draft_checkpoint_path:
        args.draft_checkpoint_path = checkpoint_dir(args.draft_checkpoint_path, "draft checkpoint")
    return args


MAX_GAMMA = 32  # beyond this the chance of keeping the last drafts is nil and a verify block costs a prefill


def parse_device(text):
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"--device {text!r} is not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: CUDA is not available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"--device {text}: only cpu and cuda are supported")
    return device


def check_writable(flag, path):
    """Create nothing, but make sure the file can be written when the time comes."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file path")
    if not os.path.isdir(d):
        raise UsageError(f"{flag} {path}: directory {d} does not exist")
    if not os.access(d, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"{flag} {path}: not writable")


def checkpoint_dir(path, what):
    d = path if os.path.isdir(path) else os.path.dirname(path)
    for f in ("model.pth", "config.json"):
        if not os.path.isfile(os.path.join(d, f)):
            raise UsageError(f"{what} {path}: missing {f} (run: python scripts/prepare_smollm2.py for the default "
                             f"model, or scripts/convert_gguf.py / scripts/convert_hf_checkpoint.py for others)")
    if os.path.exists(os.path.join(d, MANIFEST)):  # converted here: the files must be the ones it wrote
        try:
            verify_checkpoint(d)
        except ValueError as e:
            raise UsageError(str(e)) from None
    return d


def read_texts(args) -> list:
    """-> [(id, text, max_new_tokens, where)] from --prompt / --prompt_file or the --requests file,
    each bad line refused by its number."""
    if not args.requests:
        out = [(i, t, args.max_new_tokens, f"prompt {i}") for i, t in enumerate(args.prompt)]
        for f in args.prompt_file:
            try:
                with open(f, encoding="utf-8") as fh:
                    out.append((len(out), fh.read(), args.max_new_tokens, f"--prompt_file {f}"))
            except UnicodeDecodeError:
                raise UsageError(f"--prompt_file {f}: not UTF-8 text") from None
        return out
    out = []
    with open(args.requests, encoding="utf-8", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--requests {args.requests}: not UTF-8 text") from None
    for n, line in enumerate(lines, 1):
        where = f"--requests {args.requests} line {n}"
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(req, dict):
            raise UsageError(f"{where}: expected a JSON object with a 'prompt'")
        if not isinstance(req.get("prompt"), str):
            raise UsageError(f"{where}: 'prompt' must be a string")
        new = req.get("max_new_tokens", args.max_new_tokens)
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise UsageError(f"{where}: 'max_new_tokens' must be an integer >= 1 (got {new!r})")
        unknown = set(req) - {"prompt", "max_new_tokens", "id"}
        if unknown:
            raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
        out.append((req.get("id", n), req["prompt"], new, where))
    if not out:
        raise UsageError(f"--requests {args.requests}: no requests")
    return out


def tokenize(args, tokenizer, texts) -> list:
    """-> [Request] with token ids; empty prompts refused by where they came from."""
    requests = []
    for rid, text, new, where in texts:
        if args.chat:
            try:
                text = tokenizer.apply_chat_template([{"role": "user", "content": text}])
            except Exception as e:  # the template is the checkpoint's code: whatever it raises is one line
                raise UsageError(f"--chat: {e}".splitlines()[0]) from None
        ids = tokenizer.encode(text)
        if not ids:
            raise UsageError(f"{where} is empty")
        bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None and not args.chat else []
        requests.append(Request(rid, bos + ids, new, where))
    return requests


def memory_needed(args, cfg, dcfg, B, max_seq_len, dtype, world) -> int:
    """Bytes this run allocates on the device beyond the weights' file: target and draft caches (the
    one-row scratch caches of a request stream too), the weights where they live on a GPU, and the
    largest step's logits."""
    itemsize = dtype.itemsize

    def kv(c, rows, slots):
        return 2 * c.n_layer * rows * (c.n_kv_head // world) * slots * c.head_dim * itemsize

    rows = B + (1 if args.requests else 0)
    need = kv(cfg, rows, max_seq_len)
    gamma = MAX_GAMMA if args.gamma == "auto" else args.gamma
    if args.speculate != "none":
        d = dcfg or cfg
        if args.draft_kv == "full":
            need += kv(d, rows, max_seq_len)
        else:
            budget = 1024 if args.draft_budget == "auto" else args.draft_budget
            need += kv(d, B, budget + gamma + 1) + d.n_layer * B * (d.n_kv_head // world) * (budget + gamma + 1) * 8
            if args.speculate == "draft":
                need += kv(d, rows if args.requests else B, max_seq_len)  # its full cache while building the sparse one
    steps = B * ((gamma + 1) if args.speculate != "none" else 1)
    need += 3 * steps * cfg.vocab_size * 4  # fp32 logits, probabilities, the acceptance test's copies
    if args.device.type == "cuda":
        n_params = cfg.n_layer * (cfg.dim * (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim + cfg.n_head * cfg.head_dim
                                  * cfg.dim + 3 * cfg.dim * cfg.intermediate_size) + 2 * cfg.vocab_size * cfg.dim
        need += n_params * itemsize // world
    return need


def main(argv=None):
    from tokenizer import load_tokenizer

    args = parse_args(argv)
    device = tp.rank_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    rank, world = tp.rank_and_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        cfg = read_config(args.checkpoint_path)
        tp.check_divisible(cfg, world)
        dcfg = None
        if args.speculate == "draft":
            dcfg = read_config(args.draft_checkpoint_path)
            tp.check_divisible(dcfg, world, "draft model")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if dcfg is not None and dcfg.vocab_size != cfg.vocab_size:
        raise UsageError(f"draft vocabulary ({dcfg.vocab_size}) differs from the target's ({cfg.vocab_size})")
    try:
        tokenizer = load_tokenizer(args.checkpoint_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{args.checkpoint_path}: tokenizer: {e}") from None

    requests = tokenize(args, tokenizer, read_texts(args))
    B = args.batch_size or len(requests)
    if not args.requests:  # a static batch: prompts repeat cyclically to fill the rows
        requests = [requests[i % len(requests)] for i in range(B)]
    need = max(len(r.prompt) + r.max_new_tokens for r in requests)
    max_seq_len = args.max_seq_len or need
    for r in requests:
        if len(r.prompt) + r.max_new_tokens > max_seq_len:
            raise UsageError(f"{r.where}: {len(r.prompt)} prompt tokens plus max_new_tokens {r.max_new_tokens} need "
                             f"{len(r.prompt) + r.max_new_tokens} positions, more than --max_seq_len {max_seq_len}")
    if need > cfg.block_size:
        say(f"warning: up to {need} positions, past the model's trained context of {cfg.block_size}; "
            f"text beyond it may degrade", file=sys.stderr)
    try:
        speculating = args.speculate != "none"
        check_fits(memory_needed(args, cfg, dcfg, B, max_seq_len, dtype, world), device,
                   f"{B} rows x {max_seq_len} positions" + (" with the draft's caches" if speculating else ""),
                   "lower --batch_size or --max_seq_len" + (", or --draft_budget" if speculating else ""))
    except MemoryError as e:
        raise UsageError(str(e)) from None

    tp.maybe_init_distributed(device)
    where = (device, dtype) if world == 1 else ("cpu", None)  # TP: shard before anything reaches the device
    model = tp.shard(load_model(args.checkpoint_path, *where), device, dtype)
    draft_model = None
    if args.speculate == "draft":
        draft_model = tp.shard(load_model(args.draft_checkpoint_path, *where), device, dtype)

    gamma, budget, planner = args.gamma, args.draft_budget, None
    if args.speculate != "none" and "auto" in (gamma, budget):
        planner, gamma, budget, predicted = choose_speculation(args, model, draft_model, B, max_seq_len,
                                                               max(len(r.prompt) for r in requests), dtype, world)
        say(f"cost model: gamma {gamma}, draft budget {budget}, predicted speedup {predicted:.2f}")
    sa = SpecArgs(args.speculate, gamma, args.draft_kv, budget, args.sinks, args.snapkv_window,
                  args.snapkv_recent, args.draft_refresh and args.speculate == "self")
    if args.gamma == "auto":
        sa.gamma_max, sa.adapt_every, sa.planner = max(planner.gammas), args.adapt_every, planner
    s = Sampling(args.temperature, args.top_k, args.top_p)
    attn = args.attn if args.attn != "auto" else ("flex" if device.type == "cuda" and args.compile else "sdpa")
    engine = Engine(model, B, max_seq_len, sa, draft_model, attn, args.compile, args.prefill_chunk)
    if args.requests:
        run_requests(args, engine, requests, tokenizer, s, say)
    else:
        run_batch(args, engine, requests, tokenizer, s, say, device, dtype, world, budget)
    tp.finish()


def run_batch(args, engine, requests, tokenizer, s, say, device, dtype, world, budget):
    show = Progress(tokenizer, engine.batch_size == 1 and sys.stdout.isatty(), say)
    res = generate(engine, [r.prompt for r in requests], args.max_new_tokens, tokenizer.eos_ids, s, show,
                   prefill_progress(say) if sys.stderr.isatty() else None)
    tp.check_agree(res.tokens)
    if not show.streamed:
        for i, row in enumerate(res.tokens):
            say(f"--- row {i} ({len(requests[i].prompt)} prompt tokens, {len(row)} generated)\n{tokenizer.decode(row)}")
    n_tokens = sum(map(len, res.tokens))
    say(f"\nprefill {res.prefill_s:.3f} s, decode {res.decode_s:.3f} s for {n_tokens} tokens: {res.tokens_per_s:.1f} "
        f"tokens/s ({engine.batch_size} rows, {device}, {dtype})")
    if args.speculate != "none":
        say(f"acceptance per draft token {res.acceptance:.3f}, tokens per round {res.tokens_per_round:.2f} "
            f"(gamma {f'auto: first {res.gammas[0]}, last {res.gammas[-1]}' if args.gamma == 'auto' and res.gammas else args.gamma}, "
            f"{args.draft_kv}, budget {budget})")
    if args.json and tp.rank_and_world()[0] == 0:
        write_atomic(args.json, lambda f: f.write(json.dumps(dict(
            tokens=res.tokens, tokens_per_s=res.tokens_per_s, prefill_s=res.prefill_s, decode_s=res.decode_s,
            rounds=res.rounds, acceptance=res.acceptance, tokens_per_round=res.tokens_per_round,
            device=device_name(device), dtype=str(dtype), world_size=world, batch_size=engine.batch_size,
            gamma_per_round=res.gammas, draft_budget=budget, args={k: str(v) for k, v in vars(args).items()}),
            indent=1).encode()))


def run_requests(args, engine, requests, tokenizer, s, say):
    rank = tp.rank_and_world()[0]
    sink = None
    if args.results and rank == 0:
        partial = args.results + ".partial"
        sink = open(partial, "w", encoding="utf-8")

    finished = []

    def on_finish(req, record):
        finished.append((record["id"], record["tokens"]))
        record["text"] = tokenizer.decode(record["tokens"])
        if sink is not None:  # one write per finished request, flushed to disk before the next round
            sink.write(json.dumps(record) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
        else:
            say(f"--- request {record['id']} ({record['prompt_tokens']} prompt tokens, {len(record['tokens'])} "
                f"generated, {record['tokens_per_s']:.1f} tokens/s)\n{record['text']}")

    totals = serve(engine, requests, tokenizer.eos_ids, s, on_finish)
    tp.check_agree(finished)
    if sink is not None:
        sink.close()
        os.replace(partial, args.results)
    say(f"\n{totals['requests']} requests, {totals['tokens']} tokens in {totals['seconds']:.2f} s: "
        f"{totals['requests'] / totals['seconds']:.2f} requests/s, {totals['tokens'] / totals['seconds']:.1f} tokens/s "
        f"({engine.batch_size} slots, {totals['rounds']} rounds)")


def prefill_progress(say, min_tokens=4096):
    """A progress line on stderr for prefills of at least min_tokens: tokens done, tokens/s and ETA."""
    t0 = time.perf_counter()

    def show(done, total):
        if total < min_tokens:
            return
        rate = done / max(time.perf_counter() - t0, 1e-9)
        end = "\n" if done == total else ""
        say(f"\rprefill {done:,}/{total:,} tokens, {rate:,.0f} tokens/s, ETA {(total - done) / rate:.0f} s ",
            end=end, file=sys.stderr, flush=True)
    return show


class Progress:
    """generate()'s per-round hook: the text of a single row streamed as it is made (on a terminal)."""

    def __init__(self, tokenizer, stream, say):
        self.tokenizer, self.stream, self.say, self.streamed, self.text = tokenizer, stream, say, False, ""

    def __call__(self, rows):
        if not self.stream:
            return
        text = self.tokenizer.decode(rows.tokens(0, self.tokenizer.eos_ids))
        self.say(text[len(self.text):], end="", flush=True)
        self.text, self.streamed = text, True


def choose_speculation(args, model, draft_model, batch, max_seq_len, prompt_len, dtype, world):
    """--gamma/--draft_budget auto -> (planner, gamma, budget, predicted speedup). Every rank must run
    the same gamma, so rank 0's choice (measured on its device) is the one all ranks use."""
    import costmodel

    floor = args.sinks if args.draft_kv == "streaming" else args.snapkv_recent
    budgets = [b for b in costmodel.PRIOR_ACCEPTANCE if b > floor] or [max(costmodel.PRIOR_ACCEPTANCE)]
    choice = list(costmodel.auto_plan(model.args, batch, max_seq_len, dtype, args.device, args.gamma, args.draft_budget,
                                      budgets, prompt_len, draft_model.args if draft_model else None,
                                      args.draft_kv == "full", args.compile))
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def cli(argv=None) -> int:
    """main() with its errors as one line on stderr (under torchrun, from rank 0): exit code 2 for bad
    flags, files and requests, 1 for failures after loading began."""
    try:
        main(argv)
    except UsageError as e:
        tp.fail(f"error: {e}", 2)
    except (ValueError, MemoryError, OSError) as e:  # bad checkpoints, budgets, memory: one line
        tp.fail(f"error: {e}".replace("\n", " "), 1)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
