# Checkpoint files: config.json read defensively, model.pth loaded as plain tensors (weights_only)
# and checked against the config tensor by tensor, and the manifest that scripts/convert_gguf.py
# writes last (each file's size and SHA-256), which decides whether a directory counts as prepared.
# A converter replacing a checkpoint first puts a manifest saying "being written" (begin_checkpoint),
# so a directory it was killed in is refused by name, never run as a mix of old and new files.
# write_atomic is how every output file of this project is written: a reader sees the old file or
# the whole new one, never a part; write_output and ResultsLog add what a user's output path may be
# (a symlink, /dev/stdout, one of the run's inputs, a results file that a rerun resumes).
import errno
import hashlib
import json
import os
import pickle
import stat
import sys
import tempfile

import torch

from model import (INT4_GROUP_SIZES, QUANT_SCHEMES, ModelArgs, QuantLinear, Transformer, check_quantization, place,
                   quantized_layout, rope_inv_freq, set_matrix)


# A checkpoint written by scripts/quantize.py says so in config.json ("quantization": {"scheme",
# "group_size"}) and holds each matrix of ModelArgs.matmul_shapes as model.quantized_layout's tensors.

# the embedded default model, where scripts/prepare_smollm2.py puts it
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "HuggingFaceTB",
                                  "SmolLM2-135M-Instruct")
MANIFEST = "manifest.json"  # written last by the converters: each file's size and sha256


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


def is_stream(path: str) -> bool:
    """An existing output that is not a regular file (/dev/null, /dev/stdout, a FIFO): it is written
    in place, never replaced by a file of ours."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)  # through links: /dev/stdout may lead to a pipe
    except FileNotFoundError:
        return False


def check_output(flag: str, path: str, inputs=()) -> None:
    """Before any work: refuse (ValueError, one line) an output that is a directory or one of the
    run's inputs, and prove it can be written by creating a file beside it (os.access believes root
    can write anywhere, /proc and /sys included); a stream must open for writing."""
    real = os.path.realpath(path)
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path}: is a directory; give a file path")
    for other in inputs:
        if os.path.exists(other) and os.path.exists(path) and os.path.samefile(path, other):
            raise ValueError(f"{flag} {path}: is the input {other}; writing it would destroy it")
    try:
        if is_stream(path):
            os.close(os.open(path, os.O_WRONLY))
        else:
            if not os.path.isdir(os.path.dirname(real)):
                raise ValueError(f"{flag} {path}: directory {os.path.dirname(real)} does not exist")
            fd, probe = tempfile.mkstemp(dir=os.path.dirname(real), prefix=".write-probe-")
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be written ({e.strerror})") from None


def write_output(path: str, data: bytes) -> None:
    """A whole output file: atomically through write_atomic where path is (or links to) a regular
    file or nothing yet, so a symlink keeps pointing at the new file; a stream in place."""
    if is_stream(path):
        with open(path, "wb") as f:
            f.write(data)
    else:
        write_atomic(os.path.realpath(path), lambda f: f.write(data))


class ResultsLog:
    """An output of one JSON line per finished request, each line written whole or not at all: the
    lines go to PATH.partial (fsynced one by one), which becomes PATH when the run ends; a stream
    gets them directly. A run that stops early leaves PATH.partial holding every result it finished;
    resume=True keeps those (dropping a last line a kill cut short) and appends, and done_ids says
    which requests need no rerun. Without resume an existing PATH.partial is refused, not truncated."""

    def __init__(self, path: str, resume: bool = False):
        self.final = os.path.realpath(path)
        self.partial, self.done_ids = None, set()
        if is_stream(path):
            self.fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            return
        self.partial = self.final + ".partial"
        if os.path.exists(self.partial):
            if not resume:
                raise ValueError(f"{self.partial} holds the results of an interrupted run: add --resume to keep them "
                                 f"and serve only the other requests, or remove it")
            with open(self.partial, "rb") as f:
                data = f.read()
            keep = data[: data.rfind(b"\n") + 1]  # complete lines only
            try:
                self.done_ids = {json.loads(line)["id"] for line in keep.splitlines()}
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{self.partial}: not a results file of this program; remove it") from None
            with open(self.partial, "r+b") as f:
                f.truncate(len(keep))
        self.fd = os.open(self.partial, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        end = os.lseek(self.fd, 0, os.SEEK_END) if self.partial else None
        try:
            if os.write(self.fd, line) != len(line):
                raise OSError(errno.ENOSPC, "No space left on device")
            if self.partial:
                os.fsync(self.fd)
        except OSError:
            if self.partial:  # a line cut short (a full disk) goes: the file keeps whole lines only
                os.ftruncate(self.fd, end)
            raise

    def close(self, finished: bool) -> None:
        """finished: the run is complete, and PATH.partial becomes PATH."""
        os.close(self.fd)
        if finished and self.partial:
            os.replace(self.partial, self.final)
            sync_dir(os.path.dirname(self.final))


def write_or_exit(write, lacking: str = "a key"):
    """A converter's command line around write() -> its result: each fault ends the process with one
    line naming it (a KeyError: what `lacking` the input lacks), an interruption too."""
    try:
        return write()
    except KeyError as e:
        sys.exit(f"error: {lacking} lacks key {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted; the output directory's manifest says so until a rerun with --force finishes")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}".replace("\n", " "))


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


def begin_checkpoint(out_dir: str, remake: str) -> None:
    """Mark out_dir as being written before the first file of a conversion replaces anything there."""
    os.makedirs(out_dir, exist_ok=True)
    write_atomic(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(
        {"format": 1, "writing": True, "files": {}, "remake": f"run {remake}"}, indent=2).encode()))


def finish_checkpoint(out_dir: str, written: list, source: dict, remake: str) -> None:
    """The manifest of a finished conversion: the size and sha256 of each file written, last."""
    files = {name: {"size": os.path.getsize(os.path.join(out_dir, name)), "sha256": sha256_of(os.path.join(out_dir, name))}
             for name in written}
    write_atomic(os.path.join(out_dir, MANIFEST), lambda f: f.write(json.dumps(
        {"format": 1, "source": source, "files": files, "remake": f"run {remake}"}, indent=2).encode()))


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
    if manifest.get("writing"):
        raise ValueError(f"{checkpoint_dir}: a conversion into it stopped before it finished, so its files may be "
                         f"a mix of two checkpoints{fix}")
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
    return check_config(cfg, path)


def check_config(cfg, where: str) -> ModelArgs:
    """What the engine needs of a config, checked; the converters run it before they write one."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(cfg).__name__}")
    for key, required in CONFIG_INTS.items():
        value = cfg.get(key)
        if value is None and not required:
            continue
        if value is None:
            raise ValueError(f"{where}: missing key {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}: {key!r} must be a positive integer, found {value!r}")
    for key in ("rope_theta", "rms_norm_eps"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0
                                  or value == float("inf")):
            raise ValueError(f"{where}: {key!r} must be a positive number, found {value!r}")
    try:
        args = ModelArgs.from_hf_config(cfg)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise ValueError(f"{where}: {e}") from None
    if args.n_head * args.head_dim != args.dim and not cfg.get("head_dim"):
        raise ValueError(f"{where}: hidden_size {args.dim} is not num_attention_heads {args.n_head} x a head size")
    if args.n_head % args.n_kv_head:
        raise ValueError(f"{where}: num_attention_heads {args.n_head} is not a multiple of num_key_value_heads "
                         f"{args.n_kv_head}")
    if args.head_dim % 2:
        raise ValueError(f"{where}: the head size {args.head_dim} is odd; RoPE rotates pairs")
    return args


def read_quantization(checkpoint_dir: str) -> tuple:
    """config.json's "quantization" -> (scheme, group size); ("none", 0) for a dense checkpoint."""
    path = os.path.join(checkpoint_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        q = json.load(f).get("quantization")
    if q is None:
        return "none", 0
    scheme, group_size = (q.get("scheme"), q.get("group_size", 0)) if isinstance(q, dict) else (None, None)
    if scheme not in QUANT_SCHEMES or not isinstance(group_size, int) or \
            (scheme == "int4" and group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"{path}: \"quantization\" must be {{\"scheme\": int8 or int4, \"group_size\": one of "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))} (int4)}}, found {q!r}")
    return scheme, group_size


def check_state(args: ModelArgs, state: dict, where: str, quantization=("none", 0)) -> dict:
    """-> the state dict the model takes (a tied output copy dropped), or ValueError naming the first
    tensor missing, unexpected or of the wrong shape or type. quantization (scheme, group size): each
    matrix is expected as quantized_layout's tensors. The converters run it before they write one."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{where}: expected a dict of tensors")
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), None) for k, v in Transformer(args).state_dict().items()}
    scheme, group_size = quantization
    if args.tie_embeddings:
        shapes.pop("output.weight", None)
        if scheme == "none":
            state = {k: v for k, v in state.items() if k != "output.weight"}
    if scheme != "none":
        try:
            check_quantization(args, scheme, group_size)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        for name, (n, k) in args.matmul_shapes().items():
            shapes.pop(f"{name}.weight", None)
            shapes |= {f"{name}.{suffix}": spec for suffix, spec in quantized_layout(n, k, scheme, group_size).items()}
    missing, unexpected = shapes.keys() - state.keys(), state.keys() - shapes.keys()
    if missing or unexpected:
        raise ValueError(f"{where}: state dict does not match config.json "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for k, (shape, dtype) in shapes.items():
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{where}: tensor {k} has shape {list(state[k].shape)}, config.json implies {list(shape)}")
        if state[k].dtype != dtype and (dtype is not None or not state[k].is_floating_point()):
            raise ValueError(f"{where}: tensor {k} is {state[k].dtype}, config.json implies "
                             f"{dtype or 'a floating-point type'}")
    return state


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
    quantization = read_quantization(checkpoint_dir)
    state = check_state(args, state, path, quantization)
    matrices = tuple(f"{name}." for name in args.matmul_shapes()) if quantization[0] != "none" else ()
    model.load_state_dict({k: v for k, v in state.items() if not k.startswith(matrices)}, assign=True, strict=False)
    model.inv_freq = rope_inv_freq(args)  # a non-persistent buffer: still on the meta device
    scheme, group_size = quantization
    if scheme != "none":  # built on the device: packed int4 weights are the device kernel's layout
        dtype = dtype or state["tok_embeddings.weight"].dtype
        for name, (n, k) in args.matmul_shapes().items():
            tensors = {suffix: state[f"{name}.{suffix}"] for suffix in quantized_layout(n, k, scheme, group_size)}
            set_matrix(model, name, QuantLinear(tensors, scheme, group_size, state.get(f"{name}.bias"), device, dtype))
        model.quantization = quantization
    elif args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return place(model, device, dtype)
