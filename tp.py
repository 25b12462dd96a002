# Tensor parallelism for torchrun (Megatron-style, as in gpt-fast): wqkv, w1, w3 split by output
# (column-wise), wo, w2 split by input (row-wise) with a sum all-reduce of their outputs. Each rank
# holds n_kv_head / world KV heads, so every KV cache (target and draft) shards by KV head on its own:
# the caches are sized from the sharded attention modules. Embedding and output layer are replicated,
# so every rank computes the same full-vocabulary logits and, with the same seed, samples the same
# tokens: argmax and sampling need no extra communication.
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed import _functional_collectives as funcol  # traceable by torch.compile

from model import ModelArgs, Transformer, place


def rank_and_world():
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun each rank drives its own GPU, the one of its local rank."""
    if device.type == "cuda" and rank_and_world()[1] > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def fail(message: str, code: int = 1):
    """Exit with code on every rank with the message printed once, by rank 0. A rank that exited
    first would get rank 0 killed by torchrun before it printed, so the others wait: at a barrier
    when a process group exists, else until torchrun stops them once rank 0 has exited."""
    rank = rank_and_world()[0]
    if rank == 0:
        print(message, file=sys.stderr, flush=True)
    if dist.is_initialized():
        finish()
    elif rank > 0:
        time.sleep(60)
    sys.exit(code)


def check_divisible(args: ModelArgs, world: int, what: str = "model"):
    """Runs on every rank before any process group exists, so a bad world size cannot hang."""
    bad = [f"{name}={n}" for name, n in (("n_head", args.n_head), ("n_kv_head", args.n_kv_head),
                                         ("intermediate_size", args.intermediate_size)) if n % world]
    if bad:
        raise ValueError(f"tensor-parallel world size {world} does not divide the {what}'s {', '.join(bad)} "
                         f"(it must divide n_head, n_kv_head and intermediate_size)")


def maybe_init_distributed(device: torch.device):
    """-> (rank, world). Without torchrun: (0, 1) and nothing is initialised."""
    rank, world = rank_and_world()
    if world == 1:
        return 0, 1
    extra = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        extra["device_id"] = device  # binds NCCL to this GPU now, not at the first collective
    # a rank that dies or diverges leaves the others waiting in a collective for this long
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world,
                            timeout=timedelta(minutes=float(os.environ.get("TP_TIMEOUT_MIN", 10))), **extra)
    return rank, world


def finish():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def check_agree(tokens: list):
    """Ranks sample on their own from logits that should be bitwise equal; if they ever are not,
    the ranks' outputs silently differ, so compare them once at the end."""
    if not dist.is_initialized():
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, tokens)
    if any(t != tokens for t in every):
        fail("error: tensor-parallel ranks generated different tokens (their logits differ)")


def _all_reduce_output(_module, _inputs, output):
    # eagerly this is an AsyncCollectiveTensor, which waits for the reduction on its first use
    # (the residual add); under torch.compile the wait is a node of the graph
    return funcol.all_reduce(output, "sum", dist.group.WORLD)


def _take(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return t.chunk(world, dim)[rank].clone()  # clone: no view keeps the full tensor alive


def shard(model: Transformer, device: torch.device, dtype: torch.dtype) -> Transformer:
    """This rank's shard of a model loaded on the CPU (memory-mapped, in the checkpoint's dtype), placed
    on device: a device only ever holds its shard, never the full model. Without torchrun: the model."""
    rank, world = rank_and_world()
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
        # on the modules whose last matmul is wo / w2, so that quantize() may replace those matrices
        attn.register_forward_hook(_all_reduce_output)
        ff.register_forward_hook(_all_reduce_output)
    return place(model, device, dtype)

