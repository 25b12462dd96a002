# Attention backends against the SDPA reference (fp32): compiled FlexAttention (the query heads of
# each KV group folded into the query axis) for the target cache (ragged rows, decode and verify
# blocks, reading only each row's valid KV blocks) and for the StreamingLLM / SnapKV draft caches,
# for GQA ratios 1, 3, 4 and 7; on CUDA also in bf16, and flash-attn where it is installed.
import pytest
import torch

from kv_cache import FLEX_BLOCK, MATH_MAX_ROWS, DraftCache, DraftLayout, Explicit, KVCache
from model import attend, flash_attn_with_kvcache

B, HKV, D = 3, 2, 16


def attend_cache(cache, q, k, v, pos):
    """Each layer of the cache in turn, as in a forward -> [n_layer, B, Hq, T, D]."""
    return torch.stack([attend(q, *layer.update(pos, k, v)) for layer in cache.layers])


# flex runs only compiled (eager flex materialises the scores); outside compile the caches answer
# with SDPA's mask, which makes attend_cache itself the reference. A flex cache read through SDPA
# would meet its NaN blocks: no case can pass by falling back.
compiled_attend_cache = torch.compile(attend_cache, fullgraph=True, dynamic=False)


@pytest.fixture(scope="module", autouse=True)
def many_graphs():
    with torch._dynamo.config.patch(recompile_limit=64):  # one graph per case
        yield


def target_pair(S, starts, T, g, device="cpu", dtype=torch.float32):
    """SDPA and flex full caches (2 layers) with the same random history; in the flex cache every KV
    block past a row's last query position holds NaN, which reaches the output if flex reads it."""
    ref = KVCache(2, B, HKV, S, D, dtype=dtype, device=device)
    flex = KVCache(2, B, HKV, S, D, dtype=dtype, device=device, attn="flex", q_per_kv=g)
    pos = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)
    unread = torch.arange(S, device=device) >= (pos[:, -1:] // FLEX_BLOCK + 1) * FLEX_BLOCK  # [B, S]
    for r, f in zip(ref.layers, flex.layers):
        r.k.normal_(), r.v.normal_()
        f.k.copy_(r.k), f.v.copy_(r.v)
        f.k.transpose(1, 2)[unread] = float("nan")  # [B, S, Hkv, D] view, indexed by [B, S]
        f.v.transpose(1, 2)[unread] = float("nan")
    return ref, flex, pos


def qkv(g, T, device="cpu", dtype=torch.float32):
    return (torch.randn(B, h, T, D, device=device, dtype=dtype) for h in (HKV * g, HKV, HKV))


@pytest.mark.parametrize("g", [1, 3, 4, 7])
@pytest.mark.parametrize("T", [1, 5])
def test_flex_matches_sdpa_on_ragged_target_rows(T, g):
    torch.manual_seed(0)
    # row 0 reads one of three blocks, row 1 straddles the first block boundary, row 2 reads all
    ref, flex, pos = target_pair(300, [0, 126, 300 - T], T, g)
    q, k, v = qkv(g, T)
    want = attend_cache(ref, q, k, v, pos)
    got = compiled_attend_cache(flex, q, k, v, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def draft_pair(kind, T, g, device="cpu"):
    """SDPA and flex draft caches (2 layers) with the same random entries: positions drawn per layer,
    row, head and slot, some empty (-1) and some beyond the queries, so every visibility rule and the
    per-head SnapKV layout are exercised."""
    layout = DraftLayout.of(kind, 24, 3, sinks=4, recent=12)
    ref = DraftCache(layout, 2, B, HKV, D, dtype=torch.float32, device=device)
    flex = DraftCache(layout, 2, B, HKV, D, dtype=torch.float32, device=device, attn="flex", q_per_kv=g)
    pos = torch.tensor([3, 30, 47], device=device)[:, None] + torch.arange(T, device=device)
    for r, f in zip(ref.layers, flex.layers):
        r.k.normal_(), r.v.normal_()
        r.slot_pos.copy_(torch.randint(-1, int(pos.max()) + 3, r.slot_pos.shape, device=device))
        for name in ("k", "v", "slot_pos"):
            getattr(f, name).copy_(getattr(r, name))
    return ref, flex, pos


@pytest.mark.parametrize("g", [1, 3, 4, 7])
@pytest.mark.parametrize("kind,T", [("streaming", 2), ("snapkv", 1)])
def test_flex_matches_sdpa_on_draft_cache(kind, T, g):
    torch.manual_seed(1)
    ref, flex, pos = draft_pair(kind, T, g)
    q, k, v = qkv(g, T)
    want = attend_cache(ref, q, k, v, pos)
    got = compiled_attend_cache(flex, q, k, v, pos)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,g,compiled", [(1, 1, False), (5, 7, False), (1, 3, True), (5, 3, True)])
def test_math_matches_sdpa(T, g, compiled):
    """The math backend (softmax(QK^T)V written out) on ragged target rows and on both draft
    caches, eager and compiled; a prefill-sized block falls back to SDPA's mask."""
    torch.manual_seed(2)
    ref, _, pos = target_pair(300, [0, 126, 300 - T], T, g)
    caches = [(ref, KVCache(2, B, HKV, 300, D, dtype=torch.float32, device="cpu", attn="math", q_per_kv=g), pos)]
    for kind in ("streaming", "snapkv"):
        dref, _, dpos = draft_pair(kind, T, g)
        layout = DraftLayout.of(kind, 24, 3, sinks=4, recent=12)
        caches.append((dref, DraftCache(layout, 2, B, HKV, D, dtype=torch.float32, device="cpu", attn="math",
                                        q_per_kv=g), dpos))
    for want_cache, cache, p in caches:
        for r, m in zip(want_cache.layers, cache.layers):
            for name in ("k", "v", "slot_pos"):
                getattr(m, name).copy_(getattr(r, name))
        assert isinstance(cache.layers[0].update(p, *list(qkv(g, T))[1:])[2], Explicit)
        q, k, v = qkv(g, T)
        want = attend_cache(want_cache, q, k, v, p)
        got = (compiled_attend_cache if compiled else attend_cache)(cache, q, k, v, p)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    long = torch.arange(MATH_MAX_ROWS // g + 1)[None].expand(B, -1)
    assert not isinstance(caches[0][1].layers[0].update(long, *list(qkv(g, long.shape[1]))[1:])[2], Explicit)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["flex", "flash"])
@pytest.mark.parametrize("g", [1, 3, 4, 7])
def test_cuda_backends_match_sdpa(backend, g):
    if backend == "flash" and flash_attn_with_kvcache is None:
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(2)
    dtype, T = torch.bfloat16, 5
    ref, flex, pos = target_pair(1000, [5, 300, 996 - T], T, g, "cuda", dtype)
    cache = flex
    if backend == "flash":  # the same history without NaN blocks (and the flash cache's extra slots)
        cache = KVCache(2, B, HKV, 1000, D, dtype=dtype, device="cuda", attn="flash")
        for r, c in zip(ref.layers, cache.layers):
            c.k[..., :1000, :].copy_(r.k), c.v[..., :1000, :].copy_(r.v)
    q, k, v = qkv(g, T, "cuda", dtype)
    want = attend_cache(ref, q, k, v, pos)
    got = compiled_attend_cache(cache, q, k, v, pos)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    if backend == "flex":
        ref, flex, pos = draft_pair("snapkv", 1, g, "cuda")
        q, k, v = qkv(g, 1, "cuda")
        torch.testing.assert_close(compiled_attend_cache(flex, q, k, v, pos), attend_cache(ref, q, k, v, pos),
                                   atol=1e-4, rtol=1e-4)
