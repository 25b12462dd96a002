"""Convert a Hugging Face Llama / Mistral / Qwen2 checkpoint (safetensors) into the layout model.py loads:
model.pth (plain dict of tensors, fused wqkv, interleaved RoPE) plus config.json and the tokenizer files.

    python scripts/convert_hf_checkpoint.py --checkpoint_dir checkpoints/meta-llama/Llama-3.2-1B [--out DIR] [--force]

Everything is checked with the engine's own checks before anything is written. A directory that
already holds a model.pth is replaced only with --force; while it is replaced its manifest says so,
and manifest.json (each file's size and sha256) is written last, as scripts/convert_gguf.py does.
"""
import argparse
import json
import os
import shutil
import sys

import torch
from safetensors import SafetensorError, safe_open

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from checkpoint import (begin_checkpoint, check_config, check_state, finish_checkpoint, read_manifest,  # noqa: E402
                        write_atomic, write_or_exit)

SUPPORTED = ("llama", "mistral", "qwen2")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# HF name suffix -> ours, for every tensor that needs no fusing or permuting
RENAMES = {"self_attn.o_proj.weight": "attention.wo.weight", "mlp.gate_proj.weight": "feed_forward.w1.weight",
           "mlp.up_proj.weight": "feed_forward.w3.weight", "mlp.down_proj.weight": "feed_forward.w2.weight",
           "input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF reorders each head's rows from interleaved pairs (0,1),(2,3).. into halves [evens | odds] so that
    # rotate_half works; undo it per head. Works for weights [n_head*hd, dim] and biases [n_head*hd].
    rest = w.shape[1:]
    return w.reshape(n_head, 2, -1, *rest).transpose(1, 2).reshape(-1, *rest)


def open_weights(checkpoint_dir: str) -> dict:
    """name -> open safetensors handle, covering a single file or an index of shards."""
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(f for f in os.listdir(checkpoint_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {checkpoint_dir} (.bin checkpoints are not supported)")
    handles = {}
    for name in files:
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is listed in model.safetensors.index.json but missing")
        try:
            h = safe_open(path, framework="pt")
        except SafetensorError as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from None
        handles.update((k, h) for k in h.keys())
    return handles


def convert(checkpoint_dir: str, out_dir: str = None, dtype: str = "auto", force: bool = False) -> str:
    out_dir = out_dir or checkpoint_dir
    old = read_manifest(out_dir)
    if os.path.exists(os.path.join(out_dir, "model.pth")) and not force and not (old and old.get("writing")):
        raise ValueError(f"{out_dir} already has a model.pth; pass --force to replace it")
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint dir {checkpoint_dir} does not exist")
    if not os.path.isfile(os.path.join(checkpoint_dir, "config.json")):
        raise FileNotFoundError(f"no config.json in {checkpoint_dir}")
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        cfg = json.load(f)
    if cfg.get("model_type") not in SUPPORTED:
        raise ValueError(f"model_type {cfg.get('model_type')!r} is not supported (only {', '.join(SUPPORTED)})")
    args = check_config(cfg, os.path.join(checkpoint_dir, "config.json"))  # before any weight is read
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window and window < cfg.get("max_position_embeddings", 0):
        print(f"warning: sliding_window={window} is ignored; attention is full-context", file=sys.stderr)

    src = open_weights(checkpoint_dir)
    taken = set()

    def get(name):
        if name not in src:
            raise ValueError(f"weight {name} missing from {checkpoint_dir}")
        taken.add(name)
        return src[name].get_tensor(name)

    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    state = {"tok_embeddings.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.get("tie_word_embeddings", False):
        state["output.weight"] = get("lm_head.weight")
    elif "lm_head.weight" in src:
        taken.add("lm_head.weight")  # a tied copy some exporters still write
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias") if f"{p}self_attn.q_proj.bias" in src else ("weight",):
            q, k, v = (get(f"{p}self_attn.{x}_proj.{kind}") for x in "qkv")
            state[f"layers.{i}.attention.wqkv.{kind}"] = torch.cat([unpermute(q, n_head), unpermute(k, n_kv), v])
        for hf, ours in RENAMES.items():
            state[f"layers.{i}.{ours}"] = get(p + hf)
    leftover = sorted(k for k in src.keys() - taken if not k.endswith("rotary_emb.inv_freq"))
    if leftover:  # e.g. o_proj or mlp biases: our model has nowhere to put them
        raise ValueError(f"{len(leftover)} weights have no place in our model, e.g. {leftover[:3]}")

    if DTYPES[dtype] is not None:
        state = {k: v.to(DTYPES[dtype]) for k, v in state.items()}
    check_state(args, state, checkpoint_dir)

    remake = f"python scripts/convert_hf_checkpoint.py --checkpoint_dir {checkpoint_dir} --out {out_dir} --force"
    begin_checkpoint(out_dir, remake)
    write_atomic(os.path.join(out_dir, "model.pth"), lambda f: torch.save(state, f))
    write_atomic(os.path.join(out_dir, "config.json"), lambda f: f.write(json.dumps(cfg, indent=2).encode()))
    written = ["model.pth", "config.json"]
    for name in TOKENIZER_FILES:
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            continue
        if os.path.realpath(out_dir) != os.path.realpath(checkpoint_dir):
            with open(path, "rb") as src_file:
                write_atomic(os.path.join(out_dir, name), lambda f: shutil.copyfileobj(src_file, f))
        written.append(name)
    finish_checkpoint(out_dir, written, {"checkpoint_dir": os.path.abspath(checkpoint_dir)}, remake)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint_dir", required=True, help="HF directory with config.json and *.safetensors")
    ap.add_argument("--out", default=None, help="output directory (default: --checkpoint_dir)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES, help="auto keeps the checkpoint's dtype")
    ap.add_argument("--force", action="store_true", help="replace a model.pth already in the output directory")
    a = ap.parse_args(argv)
    out = write_or_exit(lambda: convert(a.checkpoint_dir, a.out, a.dtype, a.force), "config.json or the shard index")
    print(f"wrote {os.path.join(out, 'model.pth')}")


if __name__ == "__main__":
    main()
