# Checkpoint files: config.json read defensively, model.pth loaded as plain tensors (weights_only)
# and checked against the config tensor by tensor, and the manifest that scripts/convert_gguf.py
# writes last (each file's size and SHA-256), which decides whether a directory counts as prepared.
# write_atomic is how every output of this project is written: a reader sees the old file or the
# whole new one, never a part.
import hashlib
import json
import os
import pickle

import torch

from model import ModelArgs, Transformer, place, rope_inv_freq


# the embedded default model, where scripts/prepare_smollm2.py puts it
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "HuggingFaceTB",
                                  "SmolLM2-135M-Instruct")
MANIFEST = "manifest.json"  # written last by scripts/convert_gguf.py: each file's size and sha256


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sync_dir(path: str) -> None:
    # the rename itself is only durable once the directory entry is on disk
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, write) -> None:
    """write(f) into a temporary file beside path, fsync it, then rename it over path: a reader sees
    the old file or the whole new one, never a part."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a failed or interrupted write leaves no half file behind (a kill -9 still can)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    sync_dir(os.path.dirname(os.path.abspath(path)))


def read_manifest(checkpoint_dir: str):
    path = os.path.join(checkpoint_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not isinstance(manifest.get("files"), dict):
            raise ValueError
    except ValueError:
        return {}  # present but unreadable: nothing in the directory counts as verified
    return manifest


def verify_checkpoint(checkpoint_dir: str, hashes: bool = False, fix: str = None) -> None:
    """Raise ValueError (one line, naming the file and the fix) unless manifest.json matches the files.

    Sizes only by default: a few stat calls, cheap enough for every load, and they catch the usual
    damage (a copy or download cut short). hashes=True also compares sha256 (about a second per
    500 MB): for the prepare step, which decides once whether a directory needs redoing. The source
    GGUF is checked too when it lies in the same directory. fix: the repair hint that ends the message
    (default: the command manifest.json records; "" for none)."""
    manifest = read_manifest(checkpoint_dir)
    if fix is None:
        fix = (manifest or {}).get("remake") or "convert it again with scripts/convert_gguf.py --force"
    fix = f"; {fix}" if fix else ""
    where = os.path.join(checkpoint_dir, MANIFEST)
    if manifest is None:
        raise ValueError(f"{where} is missing (a conversion that never finished, or none was made){fix}")
    if not manifest:
        raise ValueError(f"{where} is unreadable{fix}")
    entries = dict(manifest["files"])
    source = manifest.get("source") or {}
    if source.get("file") and os.path.dirname(source["file"]) == "" and \
            os.path.exists(os.path.join(checkpoint_dir, source["file"])):
        entries[source["file"]] = source
    for name, want in entries.items():
        path = os.path.join(checkpoint_dir, name)
        if not os.path.exists(path):
            raise ValueError(f"{path} is missing{fix}")
        size = os.path.getsize(path)
        if size != want["size"]:
            raise ValueError(f"{path} has {size} bytes, {MANIFEST} says {want['size']} (truncated or changed){fix}")
        if hashes and sha256_of(path) != want["sha256"]:
            raise ValueError(f"{path} does not match its sha256 in {MANIFEST} (corrupt or changed){fix}")


CONFIG_INTS = {"hidden_size": True, "num_hidden_layers": True, "num_attention_heads": True, "intermediate_size": True,
               "vocab_size": True, "num_key_value_heads": False, "head_dim": False, "max_position_embeddings": False}


def read_config(checkpoint_dir: str) -> ModelArgs:
    """config.json -> ModelArgs; anything missing or malformed is one ValueError naming the key."""
    path = os.path.join(checkpoint_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})".splitlines()[0]) from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    for key, required in CONFIG_INTS.items():
        value = cfg.get(key)
        if value is None and not required:
            continue
        if value is None:
            raise ValueError(f"{path}: missing key {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{path}: {key!r} must be a positive integer, found {value!r}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise ValueError(f"{path}: {key!r} must be a positive number, found {value!r}")
    try:
        args = ModelArgs.from_hf_config(cfg)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"{path}: {e}") from None
    if args.n_head * args.head_dim != args.dim and not cfg.get("head_dim"):
        raise ValueError(f"{path}: hidden_size {args.dim} is not num_attention_heads {args.n_head} x a head size")
    return args


def load_model(checkpoint_dir: str, device="cpu", dtype=torch.float32) -> Transformer:
    """Build on the meta device and assign the weights: no second copy of the model in memory.
    weights_only=True refuses anything but plain tensors (no pickled code)."""
    path = os.path.join(checkpoint_dir, "model.pth")
    args = read_config(checkpoint_dir)
    with torch.device("meta"):
        model = Transformer(args)
    try:
        state = torch.load(path, mmap=True, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise ValueError(f"{path}: refused: holds pickled objects, not just tensors (loaded with weights_only=True)") from None
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}); re-create it") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict of tensors")
    if args.tie_embeddings:
        state.pop("output.weight", None)
    shapes = {k: v.shape for k, v in model.state_dict().items() if not (args.tie_embeddings and k == "output.weight")}
    missing, unexpected = shapes.keys() - state.keys(), state.keys() - shapes.keys()
    if missing or unexpected:
        raise ValueError(f"{path}: state dict does not match config.json "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for k, shape in shapes.items():
        if state[k].shape != shape:
            raise ValueError(f"{path}: tensor {k} has shape {list(state[k].shape)}, config.json implies {list(shape)}")
    model.load_state_dict(state, assign=True, strict=False)
    model.inv_freq = rope_inv_freq(args)  # a non-persistent buffer: still on the meta device
    if args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return place(model, device, dtype)
