# Llama-family decoder (Llama 2/3/3.1/3.2, Mistral, Qwen2.5, SmolLM2) in the gpt-fast layout:
# fused wqkv, interleaved ("Meta") RoPE, caches passed in from outside so that one set of weights
# can run against the full target cache or a sparse draft cache (self-speculation).
import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from kv_cache import Explicit


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int = 32
    head_dim: int = 0  # 0: dim // n_head
    intermediate_size: int = 11008
    vocab_size: int = 32000
    block_size: int = 4096  # trained context length
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    rope_scaling: Optional[dict] = None  # HF style: {"rope_type": "llama3" | "linear", "factor": ..., ...}
    qkv_bias: bool = False
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")

    def matmul_shapes(self) -> dict:
        """State-dict name -> (out, in) of each matrix one forward multiplies by: every layer's wqkv,
        wo, w1, w3, w2, then the output layer (a tied output is the embedding matrix, read once as the
        output layer; the embedding lookup itself reads only B*T rows). These are the layers
        weight-only quantization replaces."""
        hd, ff = self.head_dim, self.intermediate_size
        layer = {"attention.wqkv": ((self.n_head + 2 * self.n_kv_head) * hd, self.dim),
                 "attention.wo": (self.dim, self.n_head * hd), "feed_forward.w1": (ff, self.dim),
                 "feed_forward.w3": (ff, self.dim), "feed_forward.w2": (self.dim, ff)}
        shapes = {f"layers.{i}.{name}": shape for i in range(self.n_layer) for name, shape in layer.items()}
        return shapes | {"output": (self.vocab_size, self.dim)}

    def n_matmul_params(self) -> int:
        return sum(n * k for n, k in self.matmul_shapes().values())

    def matmul_bytes(self, itemsize: int, scheme: str = "none", group_size: int = 0) -> int:
        """Bytes of those matrices as stored: dense in itemsize, or weight-only quantized with their
        scales (and zero points) in itemsize (quantized_layout)."""
        if scheme == "none":
            return itemsize * self.n_matmul_params()
        return sum(math.prod(shape) * (dtype.itemsize if dtype else itemsize)
                   for n, k in self.matmul_shapes().values()
                   for shape, dtype in quantized_layout(n, k, scheme, group_size).values())

    def n_params(self) -> int:
        """Parameters stored: the matrices, a separate embedding unless tied, norms and biases."""
        bias = self.n_layer * (self.n_head + 2 * self.n_kv_head) * self.head_dim if self.qkv_bias else 0
        norms = (2 * self.n_layer + 1) * self.dim
        return self.n_matmul_params() + (0 if self.tie_embeddings else self.vocab_size * self.dim) + bias + norms

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in CONFIGS:
            raise ValueError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        # transformers >= 5 nests the RoPE settings under "rope_parameters"
        rope = cfg.get("rope_parameters") or {}
        nested = {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = cfg.get("rope_scaling") or (nested if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            scaling = None
        return cls(
            dim=cfg["hidden_size"],
            n_layer=cfg["num_hidden_layers"],
            n_head=cfg["num_attention_heads"],
            n_kv_head=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            head_dim=cfg.get("head_dim") or 0,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            block_size=cfg.get("max_position_embeddings", 4096),
            rope_base=cfg.get("rope_theta") or rope.get("rope_theta", 10000.0),
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_scaling=scaling,
            qkv_bias=cfg.get("attention_bias", False) or cfg.get("model_type") == "qwen2",
            tie_embeddings=cfg.get("tie_word_embeddings", False),
        )


_LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIGS = {
    "llama-2-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=32, intermediate_size=11008, vocab_size=32000),
    "llama-2-7b-32k": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=32, intermediate_size=11008, vocab_size=32000,
                           block_size=32768, rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "llama-3-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=128256,
                       block_size=8192, rope_base=500000.0),
    "llama-3.1-8b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=128256,
                         block_size=131072, rope_base=500000.0, rope_scaling=_LLAMA3_SCALING),
    "llama-3.1-70b": dict(dim=8192, n_layer=80, n_head=64, n_kv_head=8, intermediate_size=28672, vocab_size=128256,
                          block_size=131072, rope_base=500000.0, rope_scaling=_LLAMA3_SCALING),
    "llama-3.2-1b": dict(dim=2048, n_layer=16, n_head=32, n_kv_head=8, intermediate_size=8192, vocab_size=128256,
                         block_size=131072, rope_base=500000.0, tie_embeddings=True,
                         rope_scaling=dict(_LLAMA3_SCALING, factor=32.0)),
    "qwen2.5-7b": dict(dim=3584, n_layer=28, n_head=28, n_kv_head=4, intermediate_size=18944, vocab_size=152064,
                       block_size=32768, rope_base=1000000.0, norm_eps=1e-6, qkv_bias=True),
    "mistral-7b": dict(dim=4096, n_layer=32, n_head=32, n_kv_head=8, intermediate_size=14336, vocab_size=32000,
                       block_size=32768, rope_base=1000000.0),
    "smollm2-135m": dict(dim=576, n_layer=30, n_head=9, n_kv_head=3, intermediate_size=1536, vocab_size=49152,
                         block_size=8192, rope_base=100000.0, tie_embeddings=True),
}


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim // 2], with Llama-3.1 or linear context scaling."""
    inv_freq = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim))
    s = args.rope_scaling
    if s is None:
        return inv_freq.float()
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return (inv_freq / s["factor"]).float()
    if kind == "llama3":
        old_ctx = s["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_ctx / s["low_freq_factor"], old_ctx / s["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
        mid = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
        out = torch.where(wavelen < high_wavelen, inv_freq, torch.where(wavelen > low_wavelen, inv_freq / s["factor"], mid))
        return out.float()
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, T, H, D]; cos, sin [B, T, 1, D/2]; pairs (2i, 2i+1) rotate together (interleaved layout)
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2).type_as(x)


try:  # optional, CUDA only: flash-attn's KV-cache kernel (untested in this repository's CI)
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

if flash_attn_with_kvcache is not None:
    # a custom op, so that torch.compile keeps the call in the graph instead of breaking on it
    @torch.library.custom_op("magicdec::flash_kvcache", mutates_args=())
    def flash_kvcache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        # q [B, T, Hq, D]; k, v [B, S, Hkv, D] (strided views of the cache, already written): nothing appended
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=lens, causal=True)

    @flash_kvcache.register_fake
    def _(q, k, v, lens):
        return torch.empty_like(q)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
    """q [B, Hq, T, D], k/v [B, Hkv, S, D] -> [B, Hq, T, D]. mask, as the cache returns it: boolean
    [B, 1 or Hkv, T, S] (True = attend) for SDPA; the same wrapped in Explicit for the math backend;
    a BlockMask for FlexAttention; int32 valid key counts [B] for flash-attn (the keys of each row
    are positions 0..n-1, queries the last T of them).

    SDPA and flex: GQA is folded into the query length: the g query heads sharing a KV head become
    g*T query rows, so each KV head is read once, a one-token decode step is a g-row attention, and
    flex sees one query head per KV head (its decode kernel wants a power-of-two group)."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.int32:
        if flash_attn_with_kvcache is None:
            raise RuntimeError("attention backend 'flash' needs the flash-attn package (CUDA)")
        return flash_kvcache(q.transpose(1, 2).contiguous(), k.transpose(1, 2), v.transpose(1, 2), mask).transpose(1, 2)
    if isinstance(mask, Explicit):
        return weighted_values(attention_weights(q, k, mask.keep), v)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    q = q.reshape(B, Hkv, g * T, D)
    if isinstance(mask, BlockMask):
        scale = None
        if q.device.type == "cpu":  # torch's CPU flex kernel takes q only from a 4-d buffer of its own
            q, scale = q * D ** -0.5, 1.0
        y = flex_attention(q, k, v, block_mask=mask, scale=scale)
    else:
        mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(B, mask.shape[1], g * T, -1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return y.reshape(B, Hq, T, D)  # CUDA kernels may return [B, T, H, D]-strided outputs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        # n_head / n_kv_head are this process's share of heads; tp.py lowers them when sharding
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        qkv_out = (args.n_head + 2 * args.n_kv_head) * args.head_dim
        self.wqkv = nn.Linear(args.dim, qkv_out, bias=args.qkv_bias)
        self.wo = nn.Linear(args.n_head * args.head_dim, args.dim, bias=False)

    def forward(self, x, cos, sin, input_pos, cache, refresh=None, reselect=None, scores=None):
        """cache: this layer's cache. refresh: this layer's draft cache, which also gets the new K/V
        (self-speculation's verify step copies the target's K/V of the verified positions into the
        draft). reselect: this layer's draft cache, whose fixed entries are re-picked from this
        step's attention (a scored verify step). scores: a list that gets this layer's
        attention_probs (SnapKV's observation pass)."""
        B, T, _ = x.shape
        hd = self.head_dim
        q, k, v = self.wqkv(x).split([self.n_head * hd, self.n_kv_head * hd, self.n_kv_head * hd], dim=-1)
        q = apply_rope(q.view(B, T, self.n_head, hd), cos, sin).transpose(1, 2)
        k = apply_rope(k.view(B, T, self.n_kv_head, hd), cos, sin).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, hd).transpose(1, 2)
        if refresh is not None:
            refresh.write(input_pos, k, v)
        k_all, v_all, mask = cache.update(input_pos, k, v)
        if scores is not None:
            scores.append(attention_probs(q, k_all, cache.bool_mask(input_pos)))
        if reselect is not None:
            # one pass over K and V: the attention weights give both this step's output and the
            # scores that re-pick the draft's entries (as Vegas exports them from its verify kernel)
            weights = attention_weights(q, k_all, cache.bool_mask(input_pos))  # [B, Hkv, g, T, S]
            y = weighted_values(weights, v_all)
            last = reselect.policy.queries == "last"
            reselect.repick(input_pos, (weights[:, :, :, -1:] if last else weights).sum((2, 3)), k_all, v_all)
        else:
            y = attend(q, k_all, v_all, mask)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * hd))


def attention_weights(q, k, mask):
    """Softmax attention weights [B, Hkv, g, T, S] (fp32), the g query heads sharing a KV head side
    by side; mask bool [B, 1 or Hkv, T, S]. The products run in the cache's dtype (an fp32 copy of K
    would triple the pass's memory traffic); the softmax in fp32."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    s = torch.einsum("bkgtd,bksd->bkgts", q.view(B, Hkv, Hq // Hkv, T, D).to(k.dtype), k).float() / math.sqrt(D)
    return s.masked_fill(~mask[:, :, None], float("-inf")).softmax(-1)


def weighted_values(weights, v):
    """Attention weights [B, Hkv, g, T, S] (attention_weights) and values [B, Hkv, S, D] -> the
    attention output [B, Hkv * g, T, D], the products in the values' dtype."""
    B, Hkv, g, T, _ = weights.shape
    return torch.einsum("bkgts,bksd->bkgtd", weights.to(v.dtype), v).reshape(B, Hkv * g, T, v.shape[-1])


def attention_probs(q, k, mask):
    """Softmax attention weights summed over all queries and the query heads of each KV group:
    [B, Hkv, S] (fp32): SnapKV's observation pass over a prompt."""
    return attention_weights(q, k, mask).sum((2, 3))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos, cache, refresh=None, reselect=None, scores=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, cache, refresh, reselect, scores)
        return h + self.feed_forward(self.ffn_norm(h))


def run_block(layer, x, cos, sin, input_pos, cache, refresh, reselect):
    """One layer: the unit that torch.compile compiles once and every layer of a step reuses (regional
    compilation). Layer and caches are arguments, so their weights and buffers are graph inputs and
    no layer index is baked into the graph."""
    return layer(x, cos, sin, input_pos, cache, refresh, reselect)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.quantization = ("none", 0)  # (scheme, group size) of the matrices: see quantize()

    def forward(self, tokens, input_pos, cache, logits_idx=None, refresh=None, reselect=None, block=run_block,
                scores=None):
        """tokens, input_pos [B, T] (each row has its own positions); cache: kv_cache.KVCache or a draft
        cache; refresh: a draft cache that also gets the new K/V; reselect: a draft cache whose fixed
        entries are re-picked from this forward's attention. logits_idx [B, K]: compute logits only
        at these positions of each row -> [B, K, V]; None -> logits for all T positions. block: how
        each layer runs (run_block, or a compiled run_block)."""
        angles = input_pos[..., None].float() * self.inv_freq  # [B, T, D/2]
        cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
        x = self.tok_embeddings(tokens)
        none = [None] * len(self.layers)
        refreshes, reselects = (none if c is None else c.layers for c in (refresh, reselect))
        for layer, layer_cache, layer_refresh, layer_reselect in zip(self.layers, cache.layers, refreshes, reselects):
            if scores is None:
                x = block(layer, x, cos, sin, input_pos, layer_cache, layer_refresh, layer_reselect)
            else:
                x = layer(x, cos, sin, input_pos, layer_cache, layer_refresh, layer_reselect, scores)
        if logits_idx is not None:
            x = x.gather(1, logits_idx[..., None].expand(-1, -1, x.shape[-1]))
        return self.output(self.norm(x)).float()


def place(model: Transformer, device, dtype) -> Transformer:
    """Move to device/dtype; RoPE frequencies stay fp32 (bf16 frequencies put long positions off by radians)."""
    model = model.to(device=device, dtype=dtype).requires_grad_(False)
    model.inv_freq = rope_inv_freq(model.args).to(device)
    return model


# ---------------------------------------------------------------- weight-only quantization
# int8: one symmetric scale per output channel. int4: groups of group_size consecutive input weights
# of a row, each group with a scale and a zero point, in the layout of PyTorch's int4 kernels (and
# gpt-fast's): w = (q - 8) * scale + zero, q in 0..15. Activations stay in the model's dtype.

QUANT_SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what PyTorch's int4 kernels take


def quantized_layout(n: int, k: int, scheme: str, group_size: int = 0) -> dict:
    """The tensors a quantized [n, k] weight is stored as: suffix -> (shape, integer dtype, or None
    for a floating-point tensor in the model's dtype). int4 packs two 4-bit values a byte, the even
    column in the high nibble."""
    if scheme == "int8":
        return {"weight": ((n, k), torch.int8), "scales": ((n,), None)}
    return {"weight": ((n, k // 2), torch.uint8), "scales_and_zeros": ((k // group_size, n, 2), None)}


def quantize_weight(w: torch.Tensor, scheme: str, group_size: int = 0) -> dict:
    """A dense weight [n, k] -> its tensors of quantized_layout (scales in fp32), device-independent:
    what a quantized checkpoint stores and what QuantLinear is built from. The rounding error of a
    weight is at most half its scale: max|row| / 254 for int8, (max - min of its group) / 30 for int4."""
    w = w.float()
    if scheme == "int8":
        scales = w.abs().amax(1).clamp(min=1e-12) / 127
        return {"weight": (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8), "scales": scales}
    n, k = w.shape
    g = w.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-12) / 15
    q = ((g - lo) / scale).round().clamp(0, 15).to(torch.uint8).reshape(n, k)
    scales_and_zeros = torch.cat([scale, lo + 8 * scale], -1).transpose(0, 1).contiguous()  # [k/group, n, 2]
    return {"weight": q[:, ::2] << 4 | q[:, 1::2], "scales_and_zeros": scales_and_zeros}


def dequantize_weight(t: dict, scheme: str, group_size: int = 0) -> torch.Tensor:
    """quantize_weight's tensors -> the dense fp32 weight [n, k] they stand for (the reference the
    kernels are tested against)."""
    if scheme == "int8":
        return t["weight"].float() * t["scales"].float()[:, None]
    q = torch.stack([t["weight"] >> 4, t["weight"] & 15], -1).flatten(1).float()  # [n, k]
    n, k = q.shape
    sz = t["scales_and_zeros"].float().transpose(0, 1)  # [n, k/group, 2]
    return ((q.reshape(n, -1, group_size) - 8) * sz[..., :1] + sz[..., 1:]).reshape(n, k)


class QuantLinear(nn.Module):
    """A linear layer with a weight-only quantized weight, multiplied by PyTorch's own kernels: int8
    by `_weight_int8pack_mm` on the CPU and elsewhere by gpt-fast's form (the int8 weight converted
    inside the matmul, which torch.compile fuses); int4 by `_weight_int4pack_mm_for_cpu` (CPU) or
    `_weight_int4pack_mm` (CUDA) on the packed layout each wants, made here for the device. So it is
    built where it runs: a packed int4 weight does not move between devices. On the CPU it computes
    in bfloat16 whatever the model's dtype: torch's CPU kernels run 5-30x slower on float32
    activations (benchmarks/README.md), so a float32 model's activations are rounded to bfloat16 for
    these matmuls and their outputs converted back."""

    def __init__(self, tensors: dict, scheme: str, group_size: int, bias, device, dtype):
        super().__init__()
        device = torch.device(device)
        self.scheme, self.group_size = scheme, group_size
        # the matmuls' dtype and their scales': bfloat16 on the CPU, else the activations' own
        self.compute_dtype = torch.bfloat16 if device.type == "cpu" else None
        w = tensors["weight"].to(device)
        self.out_features = w.shape[0]
        self.bias = None if bias is None else nn.Parameter(bias.to(device, dtype), requires_grad=False)
        if scheme == "int8":
            self.register_buffer("weight", w)
            self.register_buffer("scales", tensors["scales"].to(device, self.compute_dtype or dtype))
            return
        k = 2 * w.shape[1]
        sz = tensors["scales_and_zeros"].to(device, self.compute_dtype or dtype)
        pad = -self.out_features % 16  # the kernels take whole tiles of 16 (CPU) or 8 (CUDA) output rows
        if pad:  # padded rows compute outputs that forward cuts off
            w, sz = F.pad(w, (0, 0, 0, pad)), F.pad(sz, (0, 0, 0, pad))
        inner_k_tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2  # k is a multiple of the group size
        if device.type == "cpu":
            q = torch.stack([w >> 4, w & 15], -1).flatten(1).to(torch.int32)  # [n, k] values 0..15
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, inner_k_tiles)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack(w.contiguous(), inner_k_tiles)
        self.register_buffer("weight", packed)
        self.register_buffer("scales_and_zeros", sz)

    def _apply(self, fn, recurse=True):
        # a model-wide .to(dtype) sets the activations' dtype; the CPU kernels' scales keep theirs
        super()._apply(fn, recurse)
        if self.compute_dtype is not None:
            for name in ("scales", "scales_and_zeros"):
                if hasattr(self, name):
                    setattr(self, name, getattr(self, name).to(self.compute_dtype))
        return self

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1]).to(self.compute_dtype or x.dtype).contiguous()
        if self.scheme == "int8":
            if x.device.type == "cpu":
                y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
            else:
                y = F.linear(x2, self.weight.to(x.dtype)) * self.scales
        else:
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
            y = mm(x2, self.weight, self.group_size, self.scales_and_zeros)[:, :self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def check_quantization(args: ModelArgs, scheme: str, group_size: int, world: int = 1) -> None:
    """ValueError (one line) unless every matrix of matmul_shapes, as this rank's shard holds it
    (tp.py splits wo and w2 by input), can be quantized so: before any weights load."""
    if scheme != "int4":
        return
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"--group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))} for int4 "
                         f"(got {group_size})")
    widths = {name: k // world if name.endswith(("wo", "w2")) else k for name, (n, k) in args.matmul_shapes().items()}
    bad = sorted({f"{name.rpartition('.')[2]} ({k})" for name, k in widths.items() if k % group_size})
    if bad:
        raise ValueError(f"--group_size {group_size} does not divide the input width of {', '.join(bad)}"
                         + (f" on each of {world} ranks" if world > 1 else "") + f": choose one that does")


def default_group_size(args: ModelArgs, world: int = 1) -> int:
    """The int4 group size when none is given: 32, which every Llama-family width (and shard) takes.
    On SmolLM2 it keeps held-out perplexity at 26.9 (bf16 25.6) where groups of 64 give 39.1
    (benchmarks/README.md); larger groups save only scale bytes (5 bits a weight at 32, 4.5 at 64)."""
    return 32


def quantize(model: Transformer, scheme: str, group_size: int = 0, output: bool = True) -> Transformer:
    """Replace each matrix of matmul_shapes by a QuantLinear, in place and one at a time (so at most
    one dense matrix is held twice) -> model. The embedding stays dense (a lookup reads B*T rows of
    it); a tied output layer gets a quantized copy of it. output=False keeps the output layer dense
    (measured against the default in benchmarks/quant.py quality)."""
    weight = model.tok_embeddings.weight
    for name in model.args.matmul_shapes():
        if name == "output" and not output:
            continue
        lin = model.get_submodule(name)
        set_matrix(model, name, QuantLinear(quantize_weight(lin.weight, scheme, group_size), scheme, group_size,
                                            lin.bias, weight.device, weight.dtype))
    model.quantization = (scheme, group_size)
    return model


def set_matrix(model: Transformer, name: str, module: nn.Module) -> None:
    """Put module where matmul_shapes' name says (quantize(), and a quantized checkpoint's loading)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantized_copy(model: Transformer, scheme: str, group_size: int = 0) -> Transformer:
    """A copy of model with its matrices quantized and everything else (embedding, norms, RoPE
    frequencies, tensor-parallel hooks) shared with model, not copied: self-speculation's quantized
    draft, whose extra memory is the quantized matrices alone."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return quantize(copy.deepcopy(model, memo=shared), scheme, group_size)
