# Tensor parallelism for torchrun (Megatron-style, as in gpt-fast): wqkv, w1, w3 split by output
# (column-wise), wo, w2 split by input (row-wise) with a sum all-reduce of their outputs. Each rank
# holds n_kv_head / world KV heads, so every KV cache (target and draft) shards by KV head on its own:
# the caches are sized from the sharded attention modules. Embedding and output layer are replicated,
# so every rank computes the same full-vocabulary logits and, with the same seed, samples the same
# tokens: argmax and sampling need no extra communication.
import os
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from model import ModelArgs, Transformer


def rank_and_world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def check_divisible(args: ModelArgs, world: int):
    """Runs on every rank before any process group exists, so a bad world size cannot hang."""
    bad = [f"{name}={n}" for name, n in (("n_head", args.n_head), ("n_kv_head", args.n_kv_head),
                                         ("intermediate_size", args.intermediate_size)) if n % world]
    if bad:
        if rank_and_world()[0] == 0:
            print(f"error: world size {world} does not divide {', '.join(bad)}; use a world size that divides "
                  f"n_kv_head={args.n_kv_head}", flush=True)
        raise SystemExit(1)


def maybe_init_distributed(device: torch.device):
    """-> (rank, world). Without torchrun: (0, 1) and nothing is initialised."""
    rank, world = rank_and_world()
    if world == 1:
        return 0, 1
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(minutes=int(os.environ.get("TP_TIMEOUT_MIN", 10))))
    return rank, world


def finish():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _all_reduce_output(_module, _inputs, output):
    from torch.distributed import _functional_collectives as funcol  # traceable by torch.compile

    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def _take(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim)[rank].clone()  # clone: no view keeps the full tensor alive


def shard(model: Transformer, rank: int, world: int) -> Transformer:
    if world == 1:
        return model
    hd = model.args.head_dim
    for layer in model.layers:
        attn, ff = layer.attention, layer.feed_forward
        sizes = [attn.n_head * hd, attn.n_kv_head * hd, attn.n_kv_head * hd]
        # q, k and v are split separately so each rank gets whole heads of each, in GQA order
        w = torch.cat([_take(part, 0, rank, world) for part in attn.wqkv.weight.split(sizes)])
        attn.wqkv.weight = nn.Parameter(w, requires_grad=False)
        if attn.wqkv.bias is not None:
            b = torch.cat([_take(part, 0, rank, world) for part in attn.wqkv.bias.split(sizes)])
            attn.wqkv.bias = nn.Parameter(b, requires_grad=False)
        attn.wo.weight = nn.Parameter(_take(attn.wo.weight, 1, rank, world), requires_grad=False)
        attn.n_head //= world
        attn.n_kv_head //= world
        for lin, dim in ((ff.w1, 0), (ff.w3, 0), (ff.w2, 1)):
            lin.weight = nn.Parameter(_take(lin.weight, dim, rank, world), requires_grad=False)
        attn.wo.register_forward_hook(_all_reduce_output)
        ff.w2.register_forward_hook(_all_reduce_output)
    return model
