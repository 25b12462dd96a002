# Static-shape KV caches. Every cache answers one call from the model:
#   update(layer_id, input_pos [B, T], k [B, Hkv, T, D], v) -> (k_all [B, Hkv, S, D], v_all, mask [B, 1|Hkv, T, S])
# It writes the new entries, then returns everything the new queries may read with a boolean mask
# (True = attend). No shape depends on how many tokens a row holds: rows are ragged through masks.
#
# Rows never need explicit "lengths" to stay correct: a query at position p reads exactly the keys at
# positions <= p. Entries beyond a row's committed length (prefill padding, rejected draft tokens)
# are junk that is always overwritten, by the write of the same position, before any query can
# reach it. So rollback after a rejected speculation is free: the caller just does not advance.
#
# The mask takes the form the cache's attention backend reads (model.attend dispatches on it):
# "sdpa" a boolean tensor; "flex" a FlexAttention BlockMask built from tensors inside the compiled
# step, whose mask_mod (one function object per cache and layer, made once) reads this cache's
# buffers, the query positions among them, rewritten in place; "flash" (full cache only) the int32
# number of keys per row, for flash-attn's KV-cache kernel.
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

FLEX_BLOCK = 128
FLASH_MAX_T = 64  # flash-attn serves calls of up to this many queries (decode, verify); longer ones use SDPA


def flex_mask(mask_mod, n_full, full_indices, n_partial, partial_indices, q_len, kv_len):
    """BlockMask from tensors (create_block_mask would evaluate mask_mod densely): each row [B, 1, 1]
    reads n_full KV blocks whole and n_partial more through mask_mod, and no other block. Full blocks
    are also what keeps torch's CPU decode kernel compiling (it assumes they exist)."""
    return BlockMask.from_kv_blocks(n_partial, partial_indices, n_full, full_indices, BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len), compute_q_blocks=False)


def flex_buffers(module, batch_size, q_cap, kv_len, device):
    # q_pos: the query positions mask_mod reads. Layer 0 writes them, once per forward: a write per
    # layer would leave the earlier values unrealised intermediates, which inductor's CPU flex kernel
    # cannot take as inputs.
    module.register_buffer("q_pos", torch.zeros(batch_size, q_cap, dtype=torch.long, device=device))
    n = -(-kv_len // FLEX_BLOCK)
    idx = torch.arange(n, dtype=torch.int32, device=device).expand(batch_size, 1, 1, n).contiguous()
    module.register_buffer("kv_indices", idx)


def layer_views(module, *names):
    """Register each layer's slice of the [n_layer, ...] buffers as a buffer of its own (a view: no
    memory). Compiled steps write and read through these, so the graph gets every layer as an input
    of its own: a layer view taken inside the graph is copied whole on each write (functionalisation
    does not write the slice back in place), and torch's CPU flex kernel reads it at offset 0.
    The views share memory with the stacked buffers, so a cache is built on its device, never moved."""
    for name in names:
        for i, t in enumerate(getattr(module, name).unbind(0)):
            module.register_buffer(f"{name}{i}", t, persistent=False)


def check_fits(nbytes: int, device: torch.device, what: str) -> None:
    """Refuse an allocation that cannot fit, before trying it."""
    device = torch.device(device)
    if device.type == "cuda":
        # blocks the caching allocator holds but no tensor uses are free to this process too
        free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if nbytes > free:
        raise MemoryError(f"{what} needs {nbytes:,} bytes ({nbytes / 2**30:.2f} GiB) but only "
                          f"{free:,} bytes are free on {device}; lower --batch_size or --max_seq_len")


class KVCache(nn.Module):
    """Full cache of the target: k, v [n_layer, B, Hkv, S, D]; position s lives in slot s."""

    def __init__(self, n_layer, batch_size, n_kv_head, max_seq_len, head_dim, dtype, device, attn="sdpa"):
        super().__init__()
        if attn == "flash":  # room for a verify block past the end: flash cannot clamp (see update)
            max_seq_len += FLASH_MAX_T
        shape = (n_layer, batch_size, n_kv_head, max_seq_len, head_dim)
        check_fits(2 * torch.Size(shape).numel() * dtype.itemsize, device, "the KV cache")
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))
        layer_views(self, "k", "v")
        self.register_buffer("slot_pos", torch.arange(max_seq_len, device=device))
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None])
        self.max_seq_len = max_seq_len
        self.attn = attn
        if attn == "flex":
            flex_buffers(self, batch_size, max_seq_len, max_seq_len, device)
            self.mask_mod = lambda b, h, q, kv: kv <= self.q_pos[b, q]

    def update(self, layer_id, input_pos, k, v):
        # Positions past the end (padding of the last prefill chunk, a verify block that runs over)
        # land in the last slot; only queries at or past that position could read it.
        S, T = self.max_seq_len, input_pos.shape[1]
        slot = input_pos.clamp(max=S - 1)
        k_all, v_all = self.layer(layer_id)
        k_all[self.rows, :, slot] = k.transpose(1, 2)  # indexed view is [B, T, Hkv, D]
        v_all[self.rows, :, slot] = v.transpose(1, 2)
        if self.attn == "flex":  # reads the blocks up to each row's last query position, no further
            if layer_id == 0:  # one write per forward (see flex_buffers)
                self.q_pos[:, :T] = input_pos
            n_blocks = self.kv_indices.shape[-1]
            n = (input_pos.amax(1) // FLEX_BLOCK + 1).clamp(max=n_blocks).int()[:, None, None]
            full = ((input_pos.amin(1) + 1) // FLEX_BLOCK).int()[:, None, None].clamp(max=n)  # seen whole by all
            partial = (self.kv_indices + full[..., None]).clamp(max=n_blocks - 1)
            return k_all, v_all, flex_mask(self.mask_mod, full, self.kv_indices, n - full, partial, T, S)
        if self.attn == "flash" and T <= FLASH_MAX_T:
            # causal bottom-right aligned on the row's key count: right for contiguous positions that
            # were not clamped, which the extra slots guarantee for blocks of up to FLASH_MAX_T
            return k_all, v_all, (input_pos[:, -1] + 1).int()
        return k_all, v_all, self.slot_pos <= input_pos[:, None, :, None]  # [B, 1, T, S]

    def layer(self, layer_id):
        return getattr(self, f"k{layer_id}"), getattr(self, f"v{layer_id}")


class DraftCache(nn.Module):
    """Sparse draft cache, O(draft_budget) in memory and per-step reads, whatever the context length.

    Slots [0, n_keep) are fixed: the StreamingLLM sinks (positions 0..sinks-1) or the SnapKV picks.
    Slots [n_keep, N) are a ring for the most recent `window` positions; position p always lands in
    ring slot p % ring, and the ring has gamma + 1 spare slots so the entries of one speculation
    round never evict positions that a rejection makes current again. A query at position q sees
    fixed entries at positions <= q and ring entries in (q - window, q]: exactly n_keep + window
    = draft_budget entries, the same after any rollback.
    k, v [n_layer, B, Hkv, N, D]; slot_pos [n_layer, B, Hkv, N] holds each entry's absolute position
    (-1 = empty). Keys keep their absolute RoPE positions, so target keys can be copied in as they are.
    """

    def __init__(self, kind, n_layer, batch_size, n_kv_head, head_dim, draft_budget, gamma, dtype, device,
                 sinks=16, recent=0, attn="sdpa", q_per_kv=1):
        super().__init__()
        if kind == "streaming":
            if draft_budget <= sinks:
                raise ValueError(f"--draft_budget {draft_budget} must be larger than --sinks {sinks}")
            self.window = draft_budget - sinks
        else:  # snapkv: the selected prompt entries plus a ring of the most recent `recent` positions
            self.window = recent or draft_budget // 2
            if not 0 < self.window < draft_budget:
                raise ValueError(f"--draft_budget {draft_budget} must be larger than the SnapKV recent window {self.window}")
        self.kind = kind
        self.n_keep = draft_budget - self.window
        # streaming: positions below n_keep go to slot = position; snapkv: fixed slots are filled once
        self.n_sink_pos = self.n_keep if kind == "streaming" else 0
        self.ring = self.window + gamma + 1
        n_slots = self.n_keep + self.ring
        shape = (n_layer, batch_size, n_kv_head, n_slots, head_dim)
        check_fits(2 * torch.Size(shape).numel() * dtype.itemsize, device, "the draft KV cache")
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device))
        self.register_buffer("slot_pos", torch.full(shape[:-1], -1, dtype=torch.long, device=device))
        layer_views(self, "k", "v", "slot_pos")
        self.register_buffer("is_fixed", torch.arange(n_slots, device=device) < self.n_keep)
        self.register_buffer("rows", torch.arange(batch_size, device=device)[:, None])
        # flash-attn cannot express sinks + window, so only flex replaces SDPA here. All blocks are read
        # (the cache is the budget); each layer has its own mask_mod, made once, read by compiled steps.
        self.flex = attn == "flex"
        if self.flex:
            flex_buffers(self, batch_size, n_slots, n_slots, device)
            self.register_buffer("kv_blocks", self.kv_indices.new_full((batch_size, 1, 1), self.kv_indices.shape[-1]))
            # no block is seen whole (the CPU kernel cannot take the same index tensor twice)
            self.register_buffer("no_blocks", torch.zeros_like(self.kv_blocks))
            self.register_buffer("no_indices", torch.zeros_like(self.kv_indices))
            self.mask_mods = [self.flex_mask_mod(layer_id, q_per_kv) for layer_id in range(n_layer)]

    def flex_mask_mod(self, layer_id, q_per_kv):
        def mask_mod(b, h, q, kv):  # h is a query head
            return self.sees(self.layer(layer_id)[2][b, h // q_per_kv, kv], self.q_pos[b, q], kv < self.n_keep)
        return mask_mod

    def layer(self, layer_id):
        return getattr(self, f"k{layer_id}"), getattr(self, f"v{layer_id}"), getattr(self, f"slot_pos{layer_id}")

    def slot_of(self, pos):
        return torch.where(pos < self.n_sink_pos, pos, self.n_keep + pos % self.ring)

    def write(self, layer_id, input_pos, k, v):
        slot = self.slot_of(input_pos)  # [B, T]
        k_all, v_all, slot_pos = self.layer(layer_id)
        k_all[self.rows, :, slot] = k.transpose(1, 2)
        v_all[self.rows, :, slot] = v.transpose(1, 2)
        slot_pos[self.rows, :, slot] = input_pos[:, :, None]

    def sees(self, s, q, fixed):
        """Whether a query at position q reads the entry at position s (fixed: in a fixed slot)."""
        return (s >= 0) & (s <= q) & (fixed | (s > q - self.window))

    def visible(self, slot_pos, query_pos):
        """slot_pos [B, Hkv, N], query_pos [B, T] -> [B, Hkv, T, N]"""
        return self.sees(slot_pos[:, :, None, :], query_pos[:, None, :, None], self.is_fixed)

    def update(self, layer_id, input_pos, k, v):
        self.write(layer_id, input_pos, k, v)
        k, v, slot_pos = self.layer(layer_id)
        # outside a compiled step flex would compile once per layer's mask_mod: SDPA computes the same there
        if self.flex and torch.compiler.is_compiling():
            T = input_pos.shape[1]
            if layer_id == 0:
                self.q_pos[:, :T] = input_pos
            return k, v, flex_mask(self.mask_mods[layer_id], self.no_blocks, self.no_indices, self.kv_blocks,
                                   self.kv_indices, T, k.shape[2])
        return k, v, self.visible(slot_pos, input_pos)

    def copy_from(self, full: KVCache, pos):
        """Overwrite the entries at positions pos [B, T] with the full cache's (the target's verified K/V)."""
        slot = pos.clamp(max=full.max_seq_len - 1)
        for layer_id in range(self.k.shape[0]):
            k, v = full.layer(layer_id)
            self.write(layer_id, pos, k[self.rows, :, slot].transpose(1, 2), v[self.rows, :, slot].transpose(1, 2))

    def fill(self, full: KVCache, prompt_lens, scores=None):
        """Build the draft cache from a full cache holding the prompts (lengths prompt_lens [B]).
        scores [n_layer, B, Hkv, S] (SnapKV only): observation-window attention to each prefix position."""
        L, B, H, N, _ = self.k.shape
        last = (prompt_lens - 1)[:, None]  # [B, 1]
        r = torch.arange(self.ring, device=last.device)
        ring_pos = last - (last - r).remainder(self.ring)  # newest position <= last in each ring slot
        ring_pos = torch.where(ring_pos >= self.n_sink_pos, ring_pos, -1)  # [B, ring]
        if self.kind == "streaming":
            sink_pos = torch.arange(self.n_keep, device=last.device).expand(B, -1)
            keep_pos = torch.where(sink_pos <= last, sink_pos, -1)[None, :, None].expand(L, B, H, -1)
        else:
            keep_pos = snapkv_select(scores, prompt_lens, self.n_keep, self.window)
        pos = torch.cat([keep_pos, ring_pos[None, :, None].expand(L, B, H, -1)], -1)  # [L, B, H, N]
        idx = pos.clamp(min=0)[..., None].expand(-1, -1, -1, -1, self.k.shape[-1])
        self.k.copy_(full.k.gather(3, idx))
        self.v.copy_(full.v.gather(3, idx))
        self.slot_pos.copy_(pos)


def snapkv_select(scores, prompt_lens, n_keep, window, pool_kernel=5):
    """SnapKV: per layer, row and KV head keep the n_keep positions before the last `window` prompt
    positions (those go to the ring) that the observation queries attend to most, after average
    pooling over neighbouring positions. scores [L, B, H, S] -> positions [L, B, H, n_keep] (-1 where the prefix is shorter)."""
    L, B, H, S = scores.shape
    pooled = F.avg_pool1d(scores.reshape(-1, 1, S), pool_kernel, stride=1, padding=pool_kernel // 2).view(L, B, H, S)
    in_prefix = torch.arange(S, device=scores.device) < (prompt_lens - window)[:, None, None]  # [B, 1, S]
    pooled = pooled.masked_fill(~in_prefix, float("-inf"))
    top, pos = pooled.topk(min(n_keep, S), dim=-1)
    pos = torch.where(top > float("-inf"), pos, -1)
    return F.pad(pos, (0, n_keep - pos.shape[-1]), value=-1)  # a budget beyond the cache keeps everything


@torch.no_grad()
def snapkv_scores(model, cache, tokens, prompt_lens, window=32):
    """Observation pass: re-run each row's last `window` prompt tokens (rewriting the same K/V) and
    collect their attention to every cache position, summed over the window's queries and the query
    heads of each KV group -> [n_layer, B, Hkv, S]. tokens [B, T] right-padded prompts."""
    pos = (prompt_lens[:, None] - window + torch.arange(window, device=tokens.device)).clamp(min=0)
    attn = [layer.attention for layer in model.layers]
    for a in attn:
        a.capture_scores = True
    # dense scores need the boolean mask anyway, and rows shorter than the window repeat positions,
    # which flash-attn's length-based causal mask cannot express
    backend, cache.attn = cache.attn, "sdpa"
    try:
        model(tokens.gather(1, pos), pos, cache, logits_idx=pos[:, :1] * 0)
    finally:
        cache.attn = backend
        for a in attn:
            a.capture_scores = False
    # rows shorter than the window repeat position 0; they have no prefix to select from anyway
    return torch.stack([a.scores for a in attn])
