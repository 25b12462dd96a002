# Attention backends against the SDPA reference (fp32): compiled FlexAttention on CPU for the target
# cache (ragged rows, decode and verify blocks, reading only each row's valid KV blocks) and for the
# StreamingLLM / SnapKV draft caches; on CUDA, flex and flash-attn where available.
import pytest
import torch

from kv_cache import FLEX_BLOCK, DraftCache, KVCache
from model import attend, flash_attn_with_kvcache

B, HQ, HKV, D = 3, 4, 2, 16


def attend_cache(cache, q, k, v, pos):
    """Each layer of the cache in turn, first to last as in a forward -> [n_layer, B, Hq, T, D]."""
    return torch.stack([attend(q, *cache.update(i, pos, k, v)) for i in range(cache.k.shape[0])])


# flex must run compiled (eager flex materialises the scores); one compiled function for every case
compiled_attend_cache = torch.compile(attend_cache, fullgraph=True, dynamic=False)


def target_pair(S, starts, T, device="cpu", dtype=torch.float32):
    """SDPA and flex full caches (2 layers) with the same random history; in the flex cache every KV
    block past a row's last query position holds NaN, which reaches the output if flex reads it."""
    ref = KVCache(2, B, HKV, S, D, dtype, device)
    flex = KVCache(2, B, HKV, S, D, dtype, device, attn="flex")
    ref.k.normal_(), ref.v.normal_()
    flex.k.copy_(ref.k), flex.v.copy_(ref.v)
    pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
    unread = torch.arange(S, device=device) >= (pos[:, -1:] // FLEX_BLOCK + 1) * FLEX_BLOCK  # [B, S]
    flex.k.transpose(2, 3)[:, unread] = float("nan")  # [L, B, S, Hkv, D] view, indexed by [B, S]
    flex.v.transpose(2, 3)[:, unread] = float("nan")
    return ref, flex, pos


@pytest.mark.parametrize("T", [1, 4])
def test_flex_matches_sdpa_on_ragged_target_rows(T):
    torch.manual_seed(0)
    # row 0 reads one of three blocks, row 1 straddles the first block boundary, row 2 reads all
    ref, flex, pos = target_pair(300, [0, 126, 300 - T], T)
    q, k, v = torch.randn(B, HQ, T, D), torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    want = attend_cache(ref, q, k, v, pos)
    got = compiled_attend_cache(flex, q, k, v, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def draft_pair(kind, T, device="cpu"):
    """SDPA and flex draft caches (2 layers) with the same random entries: positions drawn per layer,
    row, head and slot, some empty (-1) and some beyond the queries, so every visibility rule and the
    per-head SnapKV layout are exercised."""
    args = (kind, 2, B, HKV, D, 24, 3, torch.float32, device)
    ref = DraftCache(*args, sinks=4, recent=12)
    flex = DraftCache(*args, sinks=4, recent=12, attn="flex", q_per_kv=HQ // HKV)
    start = torch.tensor([3, 30, 47], device=device)
    pos = start[:, None] + torch.arange(T, device=device)
    ref.k.normal_(), ref.v.normal_()
    hi = int(pos.max()) + 3
    ref.slot_pos.copy_(torch.randint(-1, hi, ref.slot_pos.shape, device=device))
    for name in ("k", "v", "slot_pos"):
        getattr(flex, name).copy_(getattr(ref, name))
    return ref, flex, pos


@pytest.mark.parametrize("kind,T", [("streaming", 2), ("snapkv", 1)])
def test_flex_matches_sdpa_on_draft_cache(kind, T):
    torch.manual_seed(1)
    ref, flex, pos = draft_pair(kind, T)
    q, k, v = torch.randn(B, HQ, T, D), torch.randn(B, HKV, T, D), torch.randn(B, HKV, T, D)
    want = attend_cache(ref, q, k, v, pos)
    got = compiled_attend_cache(flex, q, k, v, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_cuda_backends_match_sdpa(backend):
    if backend == "flash" and flash_attn_with_kvcache is None:
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(2)
    dtype, T = torch.bfloat16, 4
    ref, flex, pos = target_pair(1000, [5, 300, 996 - T], T, "cuda", dtype)
    cache = flex
    if backend == "flash":  # the same history without NaN blocks (and the flash cache's extra slots)
        cache = KVCache(2, B, HKV, 1000, D, dtype, "cuda", attn="flash")
        cache.k[..., :1000, :].copy_(ref.k), cache.v[..., :1000, :].copy_(ref.v)
    q, k, v = (torch.randn(B, h, T, D, device="cuda", dtype=dtype) for h in (HQ, HKV, HKV))
    want = attend_cache(ref, q, k, v, pos)
    got = compiled_attend_cache(cache, q, k, v, pos)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if backend == "flex":
        ref, flex, pos = draft_pair("snapkv", 1, "cuda")
        q, k, v = (torch.randn(B, h, 1, D, device="cuda") for h in (HQ, HKV, HKV))
        torch.testing.assert_close(compiled_attend_cache(flex, q, k, v, pos), attend_cache(ref, q, k, v, pos),
                                   atol=1e-4, rtol=1e-4)
