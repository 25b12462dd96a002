"""Write a weight-only quantized copy of a checkpoint directory, which generate.py loads directly
(as --quantize would make it at load, without the dense weights ever being read again).

    python scripts/quantize.py --checkpoint_path checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct --scheme int8
    python scripts/quantize.py --checkpoint_path DIR --scheme int4 [--group_size 64] [--out DIR]

Every matrix of the model (each layer's projections and the output layer; a tied output gets its own
quantized copy) is stored as model.quantized_layout's tensors, device-independent, with scales in
fp32; the embedding and norms stay as they are. config.json gains "quantization"; the tokenizer
files are copied; manifest.json (each file's size and sha256) is written last.
"""
import argparse
import json
import os
import shutil
import sys

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from checkpoint import (MANIFEST, begin_checkpoint, check_state, finish_checkpoint, read_config,  # noqa: E402
                        read_manifest, read_quantization, verify_checkpoint, write_atomic, write_or_exit)
from model import QUANT_SCHEMES, check_quantization, default_group_size, quantize_weight  # noqa: E402

NOT_COPIED = ("model.pth", "config.json", MANIFEST)


def quantize_checkpoint(checkpoint_dir: str, out_dir: str, scheme: str, group_size: int = 0, force: bool = False) -> str:
    """-> out_dir. Everything is checked before anything is written."""
    if os.path.realpath(out_dir) == os.path.realpath(checkpoint_dir):
        raise ValueError(f"--out {out_dir} is the checkpoint itself: a quantized copy goes to a directory of its own")
    old = read_manifest(out_dir)
    if os.path.exists(os.path.join(out_dir, "model.pth")) and not force and not (old and old.get("writing")):
        raise ValueError(f"{out_dir} already has a model.pth; pass --force to replace it")
    for f in ("model.pth", "config.json"):
        if not os.path.isfile(os.path.join(checkpoint_dir, f)):
            raise FileNotFoundError(f"{checkpoint_dir}: missing {f}")
    if os.path.exists(os.path.join(checkpoint_dir, MANIFEST)):
        verify_checkpoint(checkpoint_dir)
    args = read_config(checkpoint_dir)
    if read_quantization(checkpoint_dir)[0] != "none":
        raise ValueError(f"{checkpoint_dir} is already quantized: quantize its dense original")
    group_size = (group_size or default_group_size(args)) if scheme == "int4" else 0
    check_quantization(args, scheme, group_size)
    path = os.path.join(checkpoint_dir, "model.pth")
    state = check_state(args, torch.load(path, mmap=True, weights_only=True, map_location="cpu"), path)
    for name in args.matmul_shapes():
        dense = state.pop(f"{name}.weight", None)
        dense = state["tok_embeddings.weight"] if dense is None else dense  # a tied output layer
        state |= {f"{name}.{suffix}": t for suffix, t in quantize_weight(dense, scheme, group_size).items()}
    check_state(args, state, "the quantized state", (scheme, group_size))  # what the loader will check
    with open(os.path.join(checkpoint_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization"] = {"scheme": scheme, "group_size": group_size}

    remake = (f"python scripts/quantize.py --checkpoint_path {checkpoint_dir} --out {out_dir} --scheme {scheme}"
              + (f" --group_size {group_size}" if group_size else "") + " --force")
    begin_checkpoint(out_dir, remake)
    write_atomic(os.path.join(out_dir, "model.pth"), lambda f: torch.save(state, f))
    write_atomic(os.path.join(out_dir, "config.json"), lambda f: f.write(json.dumps(cfg, indent=2).encode()))
    written = ["model.pth", "config.json"]
    for name in sorted(os.listdir(checkpoint_dir)):
        src = os.path.join(checkpoint_dir, name)
        if name in NOT_COPIED or name.endswith(".gguf") or not os.path.isfile(src):
            continue
        with open(src, "rb") as src_file:
            write_atomic(os.path.join(out_dir, name), lambda f: shutil.copyfileobj(src_file, f))
        written.append(name)
    finish_checkpoint(out_dir, written, {"checkpoint_dir": os.path.abspath(checkpoint_dir), "scheme": scheme,
                                         "group_size": group_size}, remake)
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint_path", required=True, help="a dense checkpoint directory (model.pth, config.json)")
    ap.add_argument("--scheme", required=True, choices=QUANT_SCHEMES)
    ap.add_argument("--group_size", type=int, default=0,
                    help="int4: weights per scale and zero point, 32/64/128/256 (default: 32, the measured best "
                         "for quality)")
    ap.add_argument("--out", default=None, help="output directory (default: the checkpoint's, plus -int8 / -int4)")
    ap.add_argument("--force", action="store_true", help="replace a model.pth already in the output directory")
    a = ap.parse_args(argv)
    out = a.out or os.path.normpath(a.checkpoint_path) + f"-{a.scheme}"
    if a.group_size and a.scheme != "int4":
        sys.exit("error: --group_size is for --scheme int4")
    write_or_exit(lambda: quantize_checkpoint(a.checkpoint_path, out, a.scheme, a.group_size, a.force))
    print(f"wrote {os.path.join(out, 'model.pth')}")


if __name__ == "__main__":
    main()
