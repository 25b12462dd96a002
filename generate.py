# Batched generation: ragged prompts, chunked prefill, autoregressive or speculative decoding.
#   python generate.py --prompt "Hello" --max_new_tokens 64
#   python generate.py --prompt_file essay.txt --speculate self --draft_kv snapkv --draft_budget 256
#   torchrun --nproc_per_node=2 generate.py ...   (tensor parallel, see tp.py)
import argparse
import json
import math
import os
import signal
import statistics
import sys
import threading
import time

import torch

import costmodel
import tp
from checkpoint import (DEFAULT_CHECKPOINT, MANIFEST, ResultsLog, check_output, is_stream, load_model, read_config,
                        read_quantization, verify_checkpoint, write_output)
from engine import Engine, Request, SpecArgs, auto_attn, device_name, generate, memory_plan, serve
from kv_cache import DraftLayout, check_fits
from model import (QUANT_SCHEMES, check_quantization, default_group_size, flash_attn_with_kvcache, quantize,
                   quantized_copy)
from spec import Sampling

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


def parser(serving=False, description="Batched autoregressive or MagicDec-style speculative generation."):
    """The command line's flags. serving (server.py): the model, precision, compile, sampling and
    speculation flags, without the prompt and output ones, and with slots and cache sized by flags."""
    p = Parser(description=f"{description} Every rule stated below is checked before any weights load.")
    p.serving = serving
    io = p if not serving else argparse.ArgumentParser(add_help=False)  # where the prompt and output flags go
    p.add_argument("--checkpoint_path", default=DEFAULT_CHECKPOINT, help="directory with model.pth, config.json, tokenizer")
    io.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable: one row each)")
    io.add_argument("--prompt_file", action="append", default=[], help="a UTF-8 file whose text is one prompt (repeatable)")
    io.add_argument("--requests", default=None, metavar="FILE.jsonl",
                   help="serve a stream of requests through --batch_size slots (continuous batching): one JSON "
                        "object per line with 'prompt' (text), optional 'max_new_tokens' (>= 1, default "
                        "--max_new_tokens), 'stop' (strings that end the answer) and 'id' (default: the line number)")
    io.add_argument("--results", default=None, metavar="FILE.jsonl",
                   help="with --requests: one JSON line per finished request, in completion order, flushed as each "
                        "finishes into FILE.jsonl.partial, which becomes FILE.jsonl when the run ends (without it: "
                        "each request's text is printed as it finishes)")
    io.add_argument("--resume", action="store_true",
                   help="with --results: keep the results an interrupted run left in FILE.jsonl.partial and serve only "
                        "the requests it had not finished")
    io.add_argument("--chat", action="store_true", help="wrap each prompt in the checkpoint's chat template as a user turn")
    if serving:
        p.add_argument("--batch_size", type=int, default=8, help="slots: requests decoded together, >= 1")
        p.add_argument("--max_new_tokens", type=int, default=128, help="max_tokens of a request that gives none, >= 1")
    else:
        p.add_argument("--batch_size", type=int, default=0,
                       help="rows (with --requests: slots); >= 0, 0: one per prompt or request; prompts repeat cyclically to fill")
        p.add_argument("--max_new_tokens", type=int, default=128, help=">= 1")
    io.add_argument("--num_samples", type=int, default=1,
                   help="generate the batch this many times (>= 1, after one uncounted warm-up with --compile) and "
                        "report each one's speed, the bandwidth achieved and the peak memory")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy; finite and >= 0; a tiny temperature approaches greedy (ties split evenly)")
    p.add_argument("--top_k", type=int, default=0, help=">= 0, 0 = off")
    p.add_argument("--top_p", type=float, default=1.0, help="in (0, 1], 1.0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 on CPU, where greedy speculation equals autoregressive "
                        "decoding bit for bit. bfloat16 is faster at 8 x 4K on every CPU measured; at batch 1 "
                        "float32 was 1.14-1.23x faster on a Xeon with AMX and bfloat16 1.6-1.8x faster on an AMD "
                        "EPYC (benchmarks/README.md)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile one transformer block that every layer and step reuses (on CUDA also "
                        "CUDA graphs of whole steps)")
    p.add_argument("--attn", default="auto", choices=["auto", "sdpa", "math", "flex", "flash"],
                   help="attention backend. math writes softmax(QK^T)V out for decode, draft and verify steps "
                        "(prefill chunks use sdpa), which inductor fuses: on the CPU with bfloat16 it makes a "
                        "compiled decode step at 8 x 4K 1.8x faster than sdpa's kernel. flex reads only each row's "
                        "valid KV blocks, inside compiled steps (needs --compile); flash needs the flash-attn "
                        "package, CUDA and fp16/bf16. auto: flex on CUDA with --compile; on the CPU math with "
                        "--compile and bfloat16/float16, else sdpa (faster in float32, and eager)")
    if serving:
        p.add_argument("--max_seq_len", type=int, default=2048,
                       help="KV cache positions per slot, >= 1: a request's prompt plus its max_tokens must fit")
    else:
        p.add_argument("--max_seq_len", type=int, default=0,
                       help="KV cache positions per row, >= 0 (0: the longest prompt + max_new_tokens)")
    p.add_argument("--prefill_chunk", type=int, default=512, help="prompt tokens per prefill forward, 1-65536")
    io.add_argument("--json", default=None, metavar="PATH",
                   help="write tokens, timings and acceptance here (atomically; the directory must exist)")
    p.add_argument("--speculate", default="none", choices=["none", "self", "draft"])
    p.add_argument("--gamma", type=int_or_auto, default=4,
                   help=f"draft tokens per round, 1-{MAX_GAMMA} (lowered, with a note, to what --max_new_tokens can keep); auto: "
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
    p.add_argument("--draft_reselect", type=int, default=0, metavar="R",
                   help="self-speculation: every R rounds (>= 0, 0: never) a scored verify re-picks the draft cache's "
                        "fixed entries (SnapKV's picks, or StreamingLLM's sink slots) as the positions the target's "
                        "verify queries attend to most")
    p.add_argument("--draft_checkpoint_path", default=None, help="standalone draft model (--speculate draft)")
    p.add_argument("--quantize", default="none", choices=["none", *QUANT_SCHEMES],
                   help="weight-only quantization of the target's matrices at load: int8 (a scale per output "
                        "channel) or int4 (a scale and zero point per --group_size weights); the embedding stays "
                        "dense, a tied output layer gets a quantized copy. A checkpoint written by "
                        "scripts/quantize.py is quantized already and needs no flag")
    p.add_argument("--draft_quantize", default="none", choices=["none", *QUANT_SCHEMES],
                   help="--speculate self: the draft runs a quantized copy of the target's matrices (its other "
                        "weights shared) while the target verifies at its own precision: the output is unchanged, "
                        "the draft step reads 2x (int8) to 4x (int4) fewer weight bytes")
    p.add_argument("--group_size", type=int, default=0,
                   help="int4: weights per scale and zero point, one of 32, 64, 128, 256 (default 0: 32, the "
                        "measured best for quality; shown in the run's summary)")
    return p


def parse_args(argv=None, p=None):
    """The flags of argv (with p: server.py's parser), every rule checked -> args."""
    p = p or parser()
    args = p.parse_args(argv)
    serving = p.serving

    def check(ok, msg):
        if not ok:
            raise UsageError(msg)

    check(args.max_new_tokens >= 1, f"--max_new_tokens must be >= 1 (got {args.max_new_tokens})")
    if not serving:
        check(args.num_samples >= 1, f"--num_samples must be >= 1 (got {args.num_samples})")
        check(args.num_samples == 1 or not args.requests, "--num_samples is for a batch of prompts, not --requests")
    check(math.isfinite(args.temperature) and args.temperature >= 0,
          f"--temperature must be finite and >= 0 (got {args.temperature}; 0 is greedy)")
    check(math.isfinite(args.top_p) and 0 < args.top_p <= 1, f"--top_p must be in (0, 1] (got {args.top_p})")
    check(args.top_k >= 0, f"--top_k must be >= 0 (got {args.top_k})")
    least = int(serving)  # a server sizes its slots and cache by flags alone
    check(args.batch_size >= least, f"--batch_size must be >= {least} (got {args.batch_size})")
    check(1 <= args.prefill_chunk <= 65536, f"--prefill_chunk must be in 1-65536 (got {args.prefill_chunk})")
    check(args.max_seq_len >= least, f"--max_seq_len must be >= {least} (got {args.max_seq_len})")
    if not serving:
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
        floor = args.sinks if args.draft_kv == "streaming" else args.snapkv_recent
        if args.draft_budget == "auto":
            check(args.draft_kv != "full", "--draft_budget auto needs a sparse --draft_kv")
            check(max(costmodel.PRIOR_ACCEPTANCE) > floor,
                  f"--draft_budget auto chooses among {', '.join(map(str, costmodel.PRIOR_ACCEPTANCE))}, none above "
                  f"--{'sinks' if args.draft_kv == 'streaming' else 'snapkv_recent'} {floor}: lower it or give a budget")
        elif args.draft_kv != "full":
            check(args.draft_budget >= 1, f"--draft_budget must be >= 1 or auto (got {args.draft_budget})")
            try:
                DraftLayout.of(args.draft_kv, args.draft_budget, 1, args.sinks, args.snapkv_recent)
            except ValueError as e:
                raise UsageError(str(e)) from None
    check(not (args.speculate == "self" and args.draft_kv == "full"),
          "--speculate self needs a sparse --draft_kv (a full cache makes the draft the target itself)")
    check(args.draft_reselect >= 0, f"--draft_reselect must be >= 0 (got {args.draft_reselect})")
    check(not args.draft_reselect or args.speculate == "self",
          "--draft_reselect needs --speculate self (it re-picks the draft's entries from the target's own K/V)")
    check(args.speculate == "draft" or not args.draft_checkpoint_path, "--draft_checkpoint_path needs --speculate draft")
    check(args.draft_quantize == "none" or args.speculate == "self",
          "--draft_quantize needs --speculate self (the draft is a quantized copy of the target's own weights)")
    check(args.group_size >= 0, f"--group_size must be >= 0 (got {args.group_size}; 0: chosen per model)")
    check(not args.group_size or "int4" in (args.quantize, args.draft_quantize),
          "--group_size is for int4: add --quantize int4 or --draft_quantize int4")
    check(args.speculate != "draft" or args.draft_checkpoint_path, "--speculate draft needs --draft_checkpoint_path")
    if not serving:
        check(not args.resume or args.results, "--resume needs --results")
    args.device = parse_device(args.device)
    if args.device.type == "cuda" and "int4" in (args.quantize, args.draft_quantize):
        check((args.dtype or "bfloat16") == "bfloat16",
              f"int4 on CUDA takes bfloat16 activations only (torch's _weight_int4pack_mm), not --dtype {args.dtype}: "
              f"drop --dtype, or use int8")
        cap = torch.cuda.get_device_capability(args.device)
        check(cap >= (8, 0), f"int4 on CUDA needs compute capability 8.0 or newer (torch's _weight_int4pack_mm); "
                             f"{args.device} has {cap[0]}.{cap[1]}: use int8")
    if not serving:
        inputs = args.prompt_file + ([args.requests] if args.requests else [])
        for f in inputs:
            check(os.path.isfile(f) and os.access(f, os.R_OK), f"{f}: no such readable file")
        outputs = [(flag, path) for flag, path in (("--json", args.json), ("--results", args.results)) if path]
        for i, (flag, path) in enumerate(outputs):
            try:
                check_output(flag, path, inputs + [p for _, p in outputs[:i]])
            except ValueError as e:
                raise UsageError(str(e)) from None
        if args.results and not args.resume and not is_stream(args.results):
            partial = os.path.realpath(args.results) + ".partial"
            check(not os.path.exists(partial), f"--results {args.results}: {partial} holds the results of an interrupted "
                                               f"run: add --resume to keep them and serve only the other requests, or remove it")
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
    """-> [(id, text, max_new_tokens, where, stop strings)] from --prompt / --prompt_file or the --requests file,
    each bad line refused by its number."""
    if not args.requests:
        out = [(i, t, args.max_new_tokens, f"prompt {i}", ()) for i, t in enumerate(args.prompt)]
        for f in args.prompt_file:
            try:
                with open(f, encoding="utf-8") as fh:
                    out.append((len(out), fh.read(), args.max_new_tokens, f"--prompt_file {f}", ()))
            except UnicodeDecodeError:
                raise UsageError(f"--prompt_file {f}: not UTF-8 text") from None
        return out
    out = []
    with open(args.requests, encoding="utf-8", errors="strict") as fh:
        try:
            lines = fh.read().splitlines()
        except UnicodeDecodeError:
            raise UsageError(f"--requests {args.requests}: not UTF-8 text") from None
    seen = {}
    for n, line in enumerate(lines, 1):
        where = f"--requests {args.requests} line {n}"
        if not line.strip():
            continue
        try:
            req = json.loads(line, parse_constant=refuse_constant)
        except ValueError as e:
            raise UsageError(f"{where}: not valid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(req, dict):
            raise UsageError(f"{where}: expected a JSON object with a 'prompt'")
        if not isinstance(req.get("prompt"), str):
            raise UsageError(f"{where}: 'prompt' must be a string")
        new = req.get("max_new_tokens", args.max_new_tokens)
        if isinstance(new, bool) or not isinstance(new, int) or new < 1:
            raise UsageError(f"{where}: 'max_new_tokens' must be an integer >= 1 (got {new!r})")
        stop = req.get("stop", [])
        if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
            raise UsageError(f"{where}: 'stop' must be a list of non-empty strings (got {stop!r})")
        unknown = set(req) - {"prompt", "max_new_tokens", "id", "stop"}
        if unknown:
            raise UsageError(f"{where}: unknown keys {sorted(unknown)}")
        rid = req.get("id", n)
        if isinstance(rid, bool) or not isinstance(rid, (int, str)):
            raise UsageError(f"{where}: 'id' must be a string or an integer (got {rid!r})")
        if rid in seen:
            raise UsageError(f"{where}: id {rid!r} is also the id of line {seen[rid]}; result lines could not be told apart")
        seen[rid] = n
        out.append((rid, req["prompt"], new, where, tuple(stop)))
    if not out:
        raise UsageError(f"--requests {args.requests}: no requests")
    return out


def refuse_constant(name):
    raise ValueError(f"{name} is not standard JSON")


def tokenize(args, tokenizer, texts) -> list:
    """-> [Request] with token ids; empty prompts refused by where they came from."""
    requests = []
    for rid, text, new, where, stop in texts:
        try:
            ids = prompt_ids(tokenizer, [{"role": "user", "content": text}] if args.chat else text)
        except ChatTemplateError as e:
            raise UsageError(f"--chat: {e}") from None
        if not ids:
            raise UsageError(f"{where} is empty")
        requests.append(Request(rid, ids, new, where, stop))
    return requests


class ChatTemplateError(ValueError):
    """The checkpoint's chat template refused a conversation (or there is none): its message, one line."""


def prompt_ids(tokenizer, prompt) -> list:
    """A prompt's token ids as the model reads them: text with the tokenizer's BOS first where it uses
    one, or a conversation ([{"role", "content"}]) rendered by the checkpoint's chat template (which
    writes its own BOS, if any). [] for text that encodes to nothing."""
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt)
        bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
        return bos + ids if ids else []
    try:
        return tokenizer.encode_chat(prompt)  # special-token strings in the contents stay text
    except ValueError as e:  # bad templates (one line already), and contents a template cannot keep as text
        raise ChatTemplateError(str(e)) from None


def main(argv=None):
    args = parse_args(argv)
    device, dtype, cfg, dcfg, tokenizer, say = setup(args)
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
    most_new = max(r.max_new_tokens for r in requests)
    if args.speculate != "none" and args.gamma != "auto" and args.gamma >= most_new > 1:
        say(f"note: --gamma {args.gamma} drafts more than --max_new_tokens {most_new} can keep: gamma "
            f"{most_new - 1} instead", file=sys.stderr)
        args.gamma = most_new - 1
    engine = load_engine(args, cfg, dcfg, device=device, dtype=dtype, batch=B, max_seq_len=max_seq_len,
                         longest_prompt=max(len(r.prompt) for r in requests), streams=bool(args.requests), say=say)
    s = Sampling(args.temperature, args.top_k, args.top_p)
    if args.requests:
        run_requests(args, engine, requests, tokenizer, s, say)
    else:
        run_batch(args, engine, requests, tokenizer, s, say, dtype, tp.rank_and_world()[1])
    tp.finish()


def setup(args):
    """What comes before any prompt is read: the device and dtype, the seed, the configs and the
    tokenizer, each fault a UsageError -> (device, dtype, cfg, draft cfg or None, tokenizer, say),
    say: print on rank 0, nothing on the others."""
    from tokenizer import load_tokenizer

    device = tp.rank_device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    torch.manual_seed(args.seed)
    rank, world = tp.rank_and_world()
    say = print if rank == 0 else (lambda *a, **k: None)
    try:
        cfg = read_config(args.checkpoint_path)
        tp.check_divisible(cfg, world)
        scheme, group_size = read_quantization(args.checkpoint_path)
        if scheme != "none":  # written by scripts/quantize.py
            if args.quantize not in ("none", scheme):
                raise ValueError(f"--quantize {args.quantize}: {args.checkpoint_path} is quantized as {scheme} already")
            if world > 1:
                raise ValueError(f"{args.checkpoint_path} is quantized: tensor parallelism shards a dense checkpoint "
                                 f"(quantize it at load with --quantize {scheme} instead)")
            if args.draft_quantize != "none":
                raise ValueError("--draft_quantize copies a dense target's weights; this checkpoint is quantized already")
        else:  # --quantize at load, and --draft_quantize, on this rank's shard
            group_size = args.group_size or default_group_size(cfg, world)
            scheme = args.quantize
        args.quantization = (scheme, group_size if scheme == "int4" else 0)
        args.draft_quantization = (args.draft_quantize, group_size if args.draft_quantize == "int4" else 0)
        for scheme, group_size in (args.quantization, args.draft_quantization):
            check_quantization(cfg, scheme, group_size, world)
        dcfg = None
        if args.speculate == "draft":
            dcfg = read_config(args.draft_checkpoint_path)
            if world > 1 and read_quantization(args.draft_checkpoint_path)[0] != "none":
                raise ValueError(f"{args.draft_checkpoint_path} is quantized: tensor parallelism shards a dense "
                                 f"checkpoint")
            tp.check_divisible(dcfg, world, "draft model")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if dcfg is not None and dcfg.vocab_size != cfg.vocab_size:
        raise UsageError(f"draft vocabulary ({dcfg.vocab_size}) differs from the target's ({cfg.vocab_size})")
    try:
        tokenizer = load_tokenizer(args.checkpoint_path)
    except (OSError, ValueError) as e:
        raise UsageError(f"{args.checkpoint_path}: tokenizer: {e}") from None
    return device, dtype, cfg, dcfg, tokenizer, say


def load_engine(args, cfg, dcfg, *, device, dtype, batch, max_seq_len, longest_prompt, streams, say) -> Engine:
    """The engine the flags describe, for batch rows (or slots) of max_seq_len positions: its caches
    checked against the device's memory before any weights load, then the models loaded (sharded
    under torchrun) and, with --gamma / --draft_budget auto, the cost model's choice made for prompts
    of longest_prompt tokens. streams: room for the one-row caches a request stream prefills into."""
    B, world = batch, tp.rank_and_world()[1]
    speculating = args.speculate != "none"
    attn = args.attn if args.attn != "auto" else auto_attn(device, dtype, args.compile)
    # the largest caches this run may allocate: --draft_budget auto's largest budget, --gamma auto's largest gamma
    sa = SpecArgs(args.speculate, gamma=max(costmodel.GAMMAS) if args.gamma == "auto" else args.gamma,
                  draft_kv=args.draft_kv, sinks=args.sinks, snapkv_window=args.snapkv_window,
                  snapkv_recent=args.snapkv_recent, refresh=args.draft_refresh and args.speculate == "self",
                  reselect=args.draft_reselect,
                  draft_budget=max(costmodel.PRIOR_ACCEPTANCE) if args.draft_budget == "auto" else args.draft_budget)
    plan = memory_plan(cfg, batch=B, max_seq_len=max_seq_len, itemsize=dtype.itemsize, attn=attn, sa=sa, draft=dcfg,
                       world=world, streams=streams, weights_on_device=device.type == "cuda",
                       quantization=args.quantization, draft_quantization=args.draft_quantization)
    try:
        check_fits(sum(plan.values()), device,
                   f"{B} rows x {max_seq_len} positions" + (" with the draft's caches" if speculating else ""),
                   "lower --batch_size or --max_seq_len" + (", or --draft_budget" if speculating else ""))
    except MemoryError as e:
        raise UsageError(str(e)) from None

    tp.maybe_init_distributed(device)
    where = (device, dtype) if world == 1 else ("cpu", None)  # TP: shard before anything reaches the device
    model = tp.shard(load_model(args.checkpoint_path, *where), device, dtype)
    if model.quantization[0] == "none" and args.quantization[0] != "none":
        quantize(model, *args.quantization)
    draft_model = None
    if args.speculate == "draft":
        draft_model = tp.shard(load_model(args.draft_checkpoint_path, *where), device, dtype)
    elif args.draft_quantization[0] != "none":
        draft_model = quantized_copy(model, *args.draft_quantization)

    if speculating and "auto" in (args.gamma, args.draft_budget):
        planner, sa.gamma, sa.draft_budget, predicted = choose_speculation(
            args, model, draft_model, B, max_seq_len, longest_prompt, dtype, world)
        say(f"cost model: gamma {sa.gamma}, draft budget {sa.draft_budget}, predicted speedup {predicted:.2f}")
        if args.gamma == "auto":
            sa.gamma_max, sa.adapt_every, sa.planner = max(planner.gammas), args.adapt_every, planner
    return Engine(model, B, max_seq_len, sa=sa, draft_model=draft_model, attn=attn, compile=args.compile,
                  prefill_chunk=args.prefill_chunk)


def run_batch(args, engine, requests, tokenizer, s, say, dtype, world):
    """--num_samples generations of the batch (after an uncounted one when compiling), each printed
    with its speed; then the bandwidth the steps achieved and the peak memory, as gpt-fast reports."""
    device, sa, eos = engine.device, engine.sa, tokenizer.eos_ids
    prompts = [r.prompt for r in requests]
    if args.compile:  # compiles (and on CUDA captures) every step the samples use
        generate(engine, prompts, args.max_new_tokens, eos, s)
    samples = []
    for i in range(args.num_samples):
        show = Progress(tokenizer, engine.batch_size == 1 and sys.stdout.isatty() and i == 0, say)
        res = generate(engine, prompts, args.max_new_tokens, eos, s, show,
                       prefill_progress(say) if sys.stderr.isatty() else None)
        tp.check_agree(res.tokens)
        if i == 0 and not show.streamed:
            for row, ids in enumerate(res.tokens):
                say(f"--- row {row} ({len(prompts[row])} prompt tokens, {len(ids)} generated)\n{text_of(tokenizer, ids)}")
        say(f"\n{'' if args.num_samples == 1 else f'sample {i}: '}prefill {res.prefill_s:.3f} s, decode "
            f"{res.decode_s:.3f} s for {sum(map(len, res.tokens))} tokens: {res.tokens_per_s:.1f} tokens/s "
            f"({engine.batch_size} rows, {device}, {dtype}, {engine.attn} attention{weights_note(engine)})")
        samples.append(res)
    if sa.mode != "none":
        gammas = f"auto: first {res.gammas[0]}, last {res.gammas[-1]}" if sa.planner and res.gammas else sa.gamma
        say(f"acceptance per draft token {res.acceptance:.3f}, tokens per round {res.tokens_per_round:.2f} "
            f"(gamma {gammas}, {sa.draft_kv}, budget {sa.draft_budget})")
    # bytes a step (or round) reads: the weights and the valid KV entries at the run's mean context
    context = statistics.mean(len(p) for p in prompts) + statistics.mean(map(len, res.tokens)) / 2
    gamma = round(statistics.mean(res.gammas)) if res.gammas else 0
    draft = engine.draft_model.args if sa.mode == "draft" else None
    nbytes = costmodel.round_bytes(engine.model.args, batch=engine.batch_size, slots=round(context),
                                   itemsize=dtype.itemsize, gamma=gamma, draft=draft,
                                   draft_slots=round(context) if sa.draft_kv == "full" else sa.draft_budget,
                                   quantization=engine.model.quantization,
                                   draft_quantization=engine.draft_model.quantization if gamma else ("none", 0))
    round_s = statistics.median(t for r in samples for t in r.round_s) if res.rounds else float("nan")
    say(f"bandwidth achieved {nbytes / round_s / 1e9:.1f} GB/s ({nbytes / 1e6:.1f} MB a {'round' if gamma else 'step'} "
        f"in a median {round_s * 1e3:.2f} ms), peak memory {peak_memory(device) / 1e9:.2f} GB"
        + (f", median {statistics.median(r.tokens_per_s for r in samples):.1f} tokens/s over {len(samples)} samples"
           if len(samples) > 1 else ""))
    if args.json and tp.rank_and_world()[0] == 0:
        write_output(args.json, json.dumps(dict(
            tokens=res.tokens, tokens_per_s=res.tokens_per_s, prefill_s=res.prefill_s, decode_s=res.decode_s,
            rounds=res.rounds, acceptance=res.acceptance, tokens_per_round=res.tokens_per_round,
            device=device_name(device), dtype=str(dtype), world_size=world, batch_size=engine.batch_size,
            gamma_per_round=res.gammas, draft_budget=sa.draft_budget, samples_tokens_per_s=[r.tokens_per_s for r in samples],
            bandwidth_GBps=nbytes / round_s / 1e9, peak_memory_bytes=peak_memory(device),
            args={k: str(v) for k, v in vars(args).items()}), indent=1).encode())


def weights_note(engine) -> str:
    """How the target's and the draft's matrices are stored, where either is quantized."""
    def name(q):
        return f"{q[0]}" + (f" in groups of {q[1]}" if q[0] == "int4" else "")
    target, draft = engine.model.quantization, engine.draft_model.quantization if engine.draft_model else ("none", 0)
    return (f", {name(target)} weights" if target[0] != "none" else "") + \
        (f", {name(draft)} draft weights" if draft[0] != "none" and engine.draft_model is not engine.model else "")


def peak_memory(device) -> int:
    """Peak bytes this process held: the CUDA allocator's peak, or on the CPU the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def text_of(tokenizer, ids):
    """What a user reads: the tokens' text without the end-of-sequence token that stopped them."""
    return tokenizer.decode([t for t in ids if t not in tokenizer.eos_ids])


def run_requests(args, engine, requests, tokenizer, s, say):
    """--requests: each result is printed, or written to --results the moment it finishes (ResultsLog:
    whole lines in FILE.partial, which becomes FILE when the stream ends)."""
    rank, world = tp.rank_and_world()
    log = ResultsLog(args.results, args.resume) if args.results and rank == 0 else None
    done_ids = [log.done_ids if log else set()]
    if world > 1:  # every rank serves the same requests
        torch.distributed.broadcast_object_list(done_ids, src=0)
    if done_ids[0]:
        say(f"resuming: {len(done_ids[0])} of {len(requests)} requests are done in {log.partial}", file=sys.stderr)
        requests = [r for r in requests if r.id not in done_ids[0]]
    finished = []

    def on_finish(req, record):
        finished.append((record["id"], record["tokens"]))
        if log is not None:
            log.write(record)
        elif args.results is None:
            say(f"--- request {record['id']} ({record['prompt_tokens']} prompt tokens, {len(record['tokens'])} "
                f"generated, {record['tokens_per_s']:.1f} tokens/s)\n{record['text']}")

    complete = False
    try:
        totals = serve(engine, requests, tokenizer.eos_ids, s, on_finish, decode=lambda ids: text_of(tokenizer, ids))
        tp.check_agree(finished)
        complete = True
    finally:
        if log is not None:
            log.close(finished=complete)
    seconds = max(totals["seconds"], 1e-9)
    say(f"\n{totals['requests']} requests, {totals['tokens']} tokens in {totals['seconds']:.2f} s: "
        f"{totals['requests'] / seconds:.2f} requests/s, {totals['tokens'] / seconds:.1f} tokens/s "
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
    floor = args.sinks if args.draft_kv == "streaming" else args.snapkv_recent
    budgets = [b for b in costmodel.PRIOR_ACCEPTANCE if b > floor] or [max(costmodel.PRIOR_ACCEPTANCE)]
    choice = list(costmodel.auto_plan(model.args, batch, max_seq_len, dtype=dtype, device=args.device,
                                      gamma=args.gamma, budget=args.draft_budget, budgets=budgets,
                                      prompt_len=prompt_len, draft=draft_model.args if args.speculate == "draft" else None,
                                      quantization=args.quantization, draft_quantization=args.draft_quantization,
                                      draft_full_cache=args.draft_kv == "full", compiled=args.compile))
    if world > 1:
        torch.distributed.broadcast_object_list(choice, src=0)
    return choice


def cli(argv=None) -> int:
    """main() with its errors as one line on stderr (under torchrun, from rank 0): exit code 2 for bad
    flags, files and requests, 1 for failures after loading began, 130 / 143 when SIGINT / SIGTERM
    stopped it (what a stream finished stays in its --results FILE.partial, whole lines only)."""
    def terminated(signum, frame):
        raise KeyboardInterrupt(signum)
    previous = signal.signal(signal.SIGTERM, terminated) if threading.current_thread() is threading.main_thread() else None
    try:
        main(argv)
        return 0
    except UsageError as e:
        message, code = f"error: {e}", 2
    except (ValueError, MemoryError, OSError) as e:  # bad checkpoints, budgets, memory: one line
        message, code = f"error: {e}".replace("\n", " "), 1
    except KeyboardInterrupt as e:
        signum = e.args[0] if e.args else signal.SIGINT
        kept = " (the results finished so far are in --results' .partial file: rerun with --resume)" \
            if argv_has(argv, "--results") else ""
        message, code = f"error: stopped by {signal.Signals(signum).name}{kept}", 128 + signum
    finally:
        # restored before tp.fail: a rank waiting there for torchrun's SIGTERM must just end
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    tp.fail(message, code)


def argv_has(argv, flag):
    return flag in (sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(cli())
