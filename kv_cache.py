# Static-shape KV caches. A cache holds one cache per layer in `cache.layers`, and the model calls
# each layer cache through three members, the whole protocol:
#   update(input_pos [B, T], k [B, Hkv, T, D], v) -> (k_all [B, Hkv, S, D], v_all, mask)
#       writes the new entries, then returns everything the new queries may read and the mask
#       saying which of it they read (the attention layer's one call);
#   write(input_pos, k, v)      writes without attending (a draft cache refreshed by the verify step);
#   bool_mask(input_pos)        the boolean mask [B, 1 | Hkv, T, S] (scores for SnapKV's picks).
# Each layer owns its own buffers and no layer index appears anywhere, so one compiled transformer
# block serves every layer (see model.run_block).
#
# This file also owns what the caches cost: kv_bytes() and DraftLayout are the one place their
# sizes are computed (the engine's memory plan and the cost model use them).
#
# Rows never need explicit "lengths" to stay correct: a query at position p reads exactly the keys at
# positions <= p. Entries beyond a row's committed length (prefill padding, rejected draft tokens)
# are junk that is always overwritten, by the write of the same position, before any query can
# reach it. So rollback after a rejected speculation is free: the caller just does not advance.
#
# The mask takes the form the cache's attention backend reads (model.attend dispatches on it):
# "sdpa" a boolean tensor [B, 1 | Hkv, T, S] (True = attend); "math" the same tensor wrapped in
# Explicit (softmax(QK^T)V written out, for blocks of up to MATH_MAX_ROWS folded queries); "flex" a
# FlexAttention BlockMask built from tensors inside the compiled step, over the query heads of each
# KV group folded into the query axis; "flash" (full cache only) the int32 number of keys per row,
# for flash-attn's KV-cache kernel. Flex runs only inside compiled steps (eager flex materialises
# every score): outside them, and for blocks longer than one flex query block (prefill chunks), the
# same cache answers with SDPA's boolean mask, as math does for prefill chunks.
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

FLEX_BLOCK = 128
FLASH_MAX_T = 64  # flash-attn serves calls of up to this many queries (decode, verify); longer ones use SDPA
MATH_MAX_ROWS = 128  # "math" serves blocks of up to this many folded queries (its fp32 scores: rows x S per KV head)


class Explicit(NamedTuple):
    """The mask of the "math" backend: attention computed from its softmax weights (model.attend)."""
    keep: torch.Tensor  # bool [B, 1 | Hkv, T, S], True = attend


def flex_mask(mask_mod, n_full, full_indices, n_partial, partial_indices, q_len, kv_len):
    """BlockMask from tensors (create_block_mask would evaluate mask_mod densely): each row [B, 1, 1]
    reads n_full KV blocks whole and n_partial more through mask_mod, and no other block. Full blocks
    are also what keeps torch's CPU decode kernel compiling (it assumes they exist)."""
    return BlockMask.from_kv_blocks(n_partial, partial_indices, n_full, full_indices, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def uses_flex(attn, q_per_kv, T):
    # one query block of folded queries: decode and verify steps, not prefill chunks
    return attn == "flex" and q_per_kv * T <= FLEX_BLOCK and torch.compiler.is_compiling()


def bool_or_explicit(attn, q_per_kv, mask):
    """A boolean mask [B, 1 | Hkv, T, S] as the backend reads it: Explicit for "math" steps
    (decode, draft, verify), the tensor itself for SDPA (and for math's prefill chunks)."""
    return Explicit(mask) if attn == "math" and q_per_kv * mask.shape[2] <= MATH_MAX_ROWS else mask


def free_memory(device) -> int:
    """Bytes this process may still allocate on device. On the CPU that is the smallest of the
    machine's available memory, the cgroup's remaining allowance and the address-space rlimit."""
    device = torch.device(device)
    if device.type == "cuda":
        # blocks the caching allocator holds but no tensor uses are free to this process too
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    free = [os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2, then v1
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as f, open(usage) as g:
                text = f.read().strip()
                if text != "max":
                    free.append(int(text) - int(g.read()))
            break
        except (OSError, ValueError):
            continue
    import resource
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        with open("/proc/self/statm") as f:
            free.append(soft - int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE"))
    return max(min(free), 0)


def kv_bytes(n_layer, rows, n_kv_head, slots, head_dim, itemsize) -> int:
    """Bytes of K and V for `slots` entries per layer, row and KV head."""
    return 2 * n_layer * rows * n_kv_head * slots * head_dim * itemsize


SLOT_POS_BYTES = 8  # a draft entry's absolute position (int64 slot_pos)


def full_slots(max_seq_len: int, attn: str) -> int:
    """Slots per row of a full cache: flash-attn gets room for a verify block past the end, because
    it cannot clamp positions as the other backends do (see LayerKV.update)."""
    return max_seq_len + (FLASH_MAX_T if attn == "flash" else 0)


@dataclass(frozen=True)
class DraftLayout:
    """Slot layout of a sparse draft cache (see DraftCache): n_keep fixed slots (sinks or picks), then
    a ring of `ring` slots for the last `window` positions and one round's gamma + 1 new ones."""
    kind: str
    n_keep: int
    window: int
    ring: int
    n_sink_pos: int  # positions below this live in fixed slot = position (StreamingLLM's sinks)

    @classmethod
    def of(cls, kind, draft_budget, gamma, sinks=16, recent=0) -> "DraftLayout":
        if kind == "streaming":
            if draft_budget <= sinks:
                raise ValueError(f"--draft_budget {draft_budget} must be larger than --sinks {sinks}")
            window = draft_budget - sinks
        else:  # snapkv: the selected prompt entries plus a ring of the most recent `recent` positions
            window = recent or draft_budget // 2
            if not 0 < window < draft_budget:
                raise ValueError(f"--draft_budget {draft_budget} must be larger than --snapkv_recent {window} (and >= 2)")
        n_keep = draft_budget - window
        # streaming: positions below n_keep go to slot = position; snapkv: fixed slots are filled once
        return cls(kind, n_keep, window, window + gamma + 1, n_keep if kind == "streaming" else 0)

    @property
    def n_slots(self) -> int:  # = draft_budget + gamma + 1: what one draft step reads
        return self.n_keep + self.ring

    def nbytes(self, n_layer, rows, n_kv_head, head_dim, itemsize) -> int:
        return kv_bytes(n_layer, rows, n_kv_head, self.n_slots, head_dim, itemsize) \
            + n_layer * rows * n_kv_head * self.n_slots * SLOT_POS_BYTES


def check_fits(nbytes: int, device, what: str, fix: str = "lower --batch_size or --max_seq_len") -> None:
    """Refuse an allocation that cannot fit, before trying it."""
    free = free_memory(device)
    if nbytes > free:
        raise MemoryError(f"{what} needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB) but only "
                          f"{free:,} bytes are free to this process on {device}; {fix}")


class LayerKV(nn.Module):
    """One layer of the target's full cache: k, v [B, Hkv, S, D]; position s lives in slot s."""

    def __init__(self, batch_size, n_kv_head, max_seq_len, head_dim, dtype, device, attn, q_per_kv):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("slot_pos", torch.arange(max_seq_len, device=device))
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None])
        n_blocks = -(-max_seq_len // FLEX_BLOCK)
        self.register_buffer("kv_indices", torch.arange(n_blocks, dtype=torch.int32, device=device)
                             .expand(batch_size, 1, 1, n_blocks).contiguous())
        self.max_seq_len, self.attn, self.q_per_kv = max_seq_len, attn, q_per_kv

    def update(self, input_pos, k, v):
        # Positions past the end (padding of the last prefill chunk, a verify block that runs over)
        # land in the last slot; only queries at or past that position could read it.
        S, T = self.max_seq_len, input_pos.shape[1]
        slot = input_pos.clamp(max=S - 1)
        self.k[self.rows, :, slot] = k.transpose(1, 2)  # indexed view is [B, T, Hkv, D]
        self.v[self.rows, :, slot] = v.transpose(1, 2)
        if uses_flex(self.attn, self.q_per_kv, T):
            return self.k, self.v, self.flex_mask(input_pos)
        if self.attn == "flash" and T <= FLASH_MAX_T:
            # causal bottom-right aligned on the row's key count: right for contiguous positions that
            # were not clamped, which the extra slots guarantee for blocks of up to FLASH_MAX_T
            return self.k, self.v, (input_pos[:, -1] + 1).int()
        return self.k, self.v, bool_or_explicit(self.attn, self.q_per_kv, self.bool_mask(input_pos))

    def bool_mask(self, input_pos):
        return self.slot_pos <= input_pos[:, None, :, None]  # [B, 1, T, S]

    def flex_mask(self, input_pos):
        """Reads the KV blocks up to each row's last query position, no further (flash-decoding splits
        what it reads across thread blocks). Folded query q_idx is query head q_idx // T, token q_idx % T."""
        T = input_pos.shape[1]
        n_blocks = self.kv_indices.shape[-1]
        n = (input_pos.amax(1) // FLEX_BLOCK + 1).clamp(max=n_blocks).int()[:, None, None]
        full = ((input_pos.amin(1) + 1) // FLEX_BLOCK).int()[:, None, None].clamp(max=n)  # seen whole by all
        partial = (self.kv_indices + full[..., None]).clamp(max=n_blocks - 1)
        mask_mod = lambda b, h, q, kv: kv <= input_pos[b, q % T]  # noqa: E731
        return flex_mask(mask_mod, full, self.kv_indices, n - full, partial, self.q_per_kv * T, self.max_seq_len)


class KVCache(nn.Module):
    """Full cache of the target: one LayerKV per layer."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_seq_len, head_dim, *, dtype, device, attn="sdpa",
                 q_per_kv=1):
        super().__init__()
        max_seq_len = full_slots(max_seq_len, attn)
        self.layers = nn.ModuleList(LayerKV(batch_size, n_kv_head, max_seq_len, head_dim, dtype, device, attn, q_per_kv)
                                    for _ in range(n_layer))
        self.max_seq_len = max_seq_len

    def copy_row(self, row: int, src: "KVCache", src_row: int = 0):
        """Row `row` of every layer := row `src_row` of src (same max_seq_len): how a prompt prefilled
        on its own joins a running batch."""
        for dst, s in zip(self.layers, src.layers):
            dst.k[row].copy_(s.k[src_row])
            dst.v[row].copy_(s.v[src_row])


@dataclass(frozen=True)
class Reselect:
    """How a scored verify step re-picks a draft cache's fixed entries from the target's attention
    (LayerDraftKV.repick). The defaults are the measured best (benchmarks/README.md)."""
    queries: str = "all"  # which verify queries score: "all" gamma + 1 of them, or the "last"
    scope: str = "head"  # "head": picks per KV head; "layer": one set per layer, shared by its KV heads
    pool: int = 1  # average-pooling kernel over neighbouring positions (1: none; SnapKV's is 5)
    sinks: int = 0  # positions 0 .. sinks-1 are always among the picks


class LayerDraftKV(nn.Module):
    """One layer of a sparse draft cache: k, v [B, Hkv, N, D]; slot_pos [B, Hkv, N] holds each
    entry's absolute position (-1 = empty). See DraftCache for the slot layout."""

    def __init__(self, layout: DraftLayout, batch_size, n_kv_head, head_dim, *, dtype, device, attn, q_per_kv,
                 policy: Reselect):
        super().__init__()
        n_keep, n_slots = layout.n_keep, layout.n_slots
        shape = (batch_size, n_kv_head, n_slots, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("slot_pos", torch.full(shape[:-1], -1, dtype=torch.long, device=device))
        self.register_buffer("is_fixed", torch.arange(n_slots, device=device) < n_keep)
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None])
        n_blocks = -(-n_slots // FLEX_BLOCK)
        # every block is read (the cache is the budget); no block is seen whole (the CPU kernel
        # cannot take the same index tensor twice)
        self.register_buffer("kv_indices", torch.arange(n_blocks, dtype=torch.int32, device=device)
                             .expand(batch_size, 1, 1, n_blocks).contiguous())
        self.register_buffer("kv_blocks", self.kv_indices.new_full((batch_size, 1, 1), n_blocks))
        self.register_buffer("no_blocks", torch.zeros_like(self.kv_blocks))
        self.register_buffer("no_indices", torch.zeros_like(self.kv_indices))
        self.n_keep, self.window, self.ring, self.n_sink_pos = n_keep, layout.window, layout.ring, layout.n_sink_pos
        self.attn = "sdpa" if attn == "flash" else attn  # flash-attn cannot express sinks + window
        self.q_per_kv, self.policy = q_per_kv, policy

    def slot_of(self, pos):
        return torch.where(pos < self.n_sink_pos, pos, self.n_keep + pos % self.ring)

    def write(self, input_pos, k, v):
        slot = self.slot_of(input_pos)  # [B, T]
        self.k[self.rows, :, slot] = k.transpose(1, 2)
        self.v[self.rows, :, slot] = v.transpose(1, 2)
        self.slot_pos[self.rows, :, slot] = input_pos[:, :, None]

    def sees(self, s, q, fixed):
        """Whether a query at position q reads the entry at position s (fixed: in a fixed slot)."""
        return (s >= 0) & (s <= q) & (fixed | (s > q - self.window))

    def bool_mask(self, input_pos):
        """[B, Hkv, T, N]"""
        return self.sees(self.slot_pos[:, :, None, :], input_pos[:, None, :, None], self.is_fixed)

    def update(self, input_pos, k, v):
        self.write(input_pos, k, v)
        T = input_pos.shape[1]
        if uses_flex(self.attn, self.q_per_kv, T):
            slot_pos = self.slot_pos

            def mask_mod(b, h, q, kv):  # h is a KV head: the query heads of its group are folded into q
                return self.sees(slot_pos[b, h, kv], input_pos[b, q % T], kv < self.n_keep)
            return self.k, self.v, flex_mask(mask_mod, self.no_blocks, self.no_indices, self.kv_blocks,
                                             self.kv_indices, self.q_per_kv * T, self.k.shape[2])
        return self.k, self.v, bool_or_explicit(self.attn, self.q_per_kv, self.bool_mask(input_pos))

    def repick(self, input_pos, scores, k_all, v_all):
        """Scored verify: the fixed slots := the n_keep positions that this step's verify queries
        (input_pos [B, T]) attended to most, scores [B, Hkv, S] (model.attention_weights summed, over the
        target cache), with their K/V from it (k_all, v_all [B, Hkv, S, D]). Only positions the ring
        will not show the next round's queries compete: at most the first verified position + 1 -
        window (the next round starts past it), and StreamingLLM's sink positions, which never enter
        the ring; all are committed, whatever this round accepts. Static shapes, no host sync."""
        p = self.policy
        s = torch.arange(scores.shape[-1], device=scores.device)
        first = input_pos[:, :1, None]  # [B, 1, 1]
        candidates = ((s <= first + 1 - self.window) | (s < self.n_sink_pos)) & (s <= first)
        if p.scope == "layer":
            scores = scores.sum(1, keepdim=True).expand_as(scores)
        picks = pick_positions(scores, candidates, self.n_keep, p.pool, forced=s < p.sinks)  # [B, Hkv, n_keep]
        idx = picks.clamp(min=0)[..., None].expand(-1, -1, -1, k_all.shape[-1])
        self.k[:, :, :self.n_keep] = k_all.gather(2, idx)
        self.v[:, :, :self.n_keep] = v_all.gather(2, idx)
        self.slot_pos[:, :, :self.n_keep] = picks


class DraftCache(nn.Module):
    """Sparse draft cache, O(draft_budget) in memory and per-step reads, whatever the context length.

    Slots [0, n_keep) are fixed: the StreamingLLM sinks (positions 0..sinks-1) or the SnapKV picks.
    Slots [n_keep, N) are a ring for the most recent `window` positions; position p always lands in
    ring slot p % ring, and the ring has gamma + 1 spare slots so the entries of one speculation
    round never evict positions that a rejection makes current again. A query at position q sees
    fixed entries at positions <= q and ring entries in (q - window, q]: exactly n_keep + window
    = draft_budget entries, the same after any rollback. Keys keep their absolute RoPE positions,
    so target keys can be copied in as they are.
    """

    def __init__(self, layout: DraftLayout, n_layer, batch_size, n_kv_head, head_dim, *, dtype, device, attn="sdpa",
                 q_per_kv=1, policy: Reselect = Reselect()):
        super().__init__()
        self.layout = layout
        self.kind, self.window, self.n_keep, self.ring, self.n_sink_pos = (
            layout.kind, layout.window, layout.n_keep, layout.ring, layout.n_sink_pos)
        self.layers = nn.ModuleList(
            LayerDraftKV(layout, batch_size, n_kv_head, head_dim, dtype=dtype, device=device, attn=attn,
                         q_per_kv=q_per_kv, policy=policy) for _ in range(n_layer))

    def fill(self, full: KVCache, prompt_lens, scores=None, rows=None):
        """Build the draft cache from a full cache holding the prompts (lengths prompt_lens [b]), into
        rows `rows` [b] of this cache (default: all, b = B). scores [n_layer, b, Hkv, S] (SnapKV
        only): observation-window attention to each prefix position."""
        last = (prompt_lens - 1)[:, None]  # [b, 1]
        b, H = last.shape[0], self.layers[0].k.shape[1]
        r = torch.arange(self.ring, device=last.device)
        ring_pos = last - (last - r).remainder(self.ring)  # newest position <= last in each ring slot
        ring_pos = torch.where(ring_pos >= self.n_sink_pos, ring_pos, -1)[:, None].expand(-1, H, -1)  # [b, H, ring]
        if self.kind == "streaming":
            sink_pos = torch.arange(self.n_keep, device=last.device).expand(b, -1)
            keep_pos = torch.where(sink_pos <= last, sink_pos, -1)[:, None].expand(-1, H, -1)
        rows = slice(None) if rows is None else rows
        for i, (layer, src) in enumerate(zip(self.layers, full.layers)):
            if self.kind == "snapkv":
                keep_pos = snapkv_select(scores[i], prompt_lens, self.n_keep, self.window)
            pos = torch.cat([keep_pos, ring_pos], -1)  # [b, H, N]
            idx = pos.clamp(min=0)[..., None].expand(-1, -1, -1, layer.k.shape[-1])
            layer.k[rows] = src.k.gather(2, idx)
            layer.v[rows] = src.v.gather(2, idx)
            layer.slot_pos[rows] = pos


def pick_positions(scores, candidates, n_keep, pool_kernel=1, forced=None):
    """The n_keep candidate positions with the highest scores, after average pooling over
    neighbouring positions: scores [B, H, S], candidates (bool, broadcast to it), forced (bool, kept
    first when candidates) -> positions [B, H, n_keep], -1 where fewer candidates exist."""
    B, H, S = scores.shape
    if pool_kernel > 1:
        scores = F.avg_pool1d(scores.reshape(-1, 1, S), pool_kernel, stride=1, padding=pool_kernel // 2).view(B, H, S)
    if forced is not None:
        scores = scores.masked_fill(forced, float("inf"))
    scores = scores.masked_fill(~candidates, float("-inf"))
    top, pos = scores.topk(min(n_keep, S), dim=-1)
    pos = torch.where(top > float("-inf"), pos, -1)
    return F.pad(pos, (0, n_keep - pos.shape[-1]), value=-1)  # a budget beyond the cache keeps everything


def snapkv_select(scores, prompt_lens, n_keep, window, pool_kernel=5):
    """SnapKV: per row and KV head keep the n_keep positions before the last `window` prompt
    positions (those go to the ring) that the observation queries attend to most, after average
    pooling over neighbouring positions. scores [B, H, S] -> positions [B, H, n_keep] (-1 where the
    prefix is shorter)."""
    in_prefix = torch.arange(scores.shape[-1], device=scores.device) < (prompt_lens - window)[:, None, None]
    return pick_positions(scores, in_prefix, n_keep, pool_kernel)


@torch.no_grad()
def snapkv_scores(model, cache, tokens, prompt_lens, window=32):
    """Observation pass: re-run each row's last `window` prompt tokens (rewriting the same K/V) and
    collect their attention to every cache position, summed over the window's queries and the query
    heads of each KV group -> [n_layer, B, Hkv, S]. tokens [B, T] right-padded prompts; a window
    longer than the longest prompt observes from its start."""
    window = min(window, tokens.shape[1])
    pos = (prompt_lens[:, None] - window + torch.arange(window, device=tokens.device)).clamp(min=0)
    scores = []
    model(tokens.gather(1, pos), pos, cache, logits_idx=pos[:, :1] * 0, scores=scores)
    # rows shorter than the window repeat position 0; they have no prefix to select from anyway
    return torch.stack(scores)
