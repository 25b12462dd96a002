"""Convert a Llama-family GGUF (llama.cpp's format) into a checkpoint directory this engine loads.

    python scripts/convert_gguf.py PATH [--out DIR] [--force]

Writes into DIR (default: the GGUF's own directory):
  model.pth           fp32 state dict in model.py's layout (fused wqkv, interleaved RoPE)
  config.json         the Hugging Face config keys model.ModelArgs.from_hf_config reads
  bpe_tokenizer.json  a byte-level BPE vocabulary (Llama 3, Qwen2, SmolLM2), for tokenizer.load_byte_bpe;
  or tokenizer.model  a sentencepiece vocabulary (Llama 2, Mistral 7B), rebuilt as sentencepiece's own file
  chat_template.json  the GGUF's chat template with the special-token strings it may use (if it has one)
  manifest.json       size and sha256 of each file above and of the source GGUF, written last

Architectures: llama (also what llama.cpp writes for Mistral 7B and SmolLM2) and qwen2. Quantized
tensors are dequantized with gguf.quants.dequantize, so "the model" is the quantized one.

Nothing is written until everything the engine relies on is checked (metadata, tensor shapes and
offsets, vocabulary). Then a manifest saying "being written" goes first, each file is written under
a temporary name, fsynced and renamed, and the real manifest goes last: a directory with a manifest
that matches its files is a finished conversion, and one killed midway is refused by the engine.
verify_checkpoint() checks that; loading code can call it cheaply (sizes only), the prepare step
with hashes.
"""
import argparse
import base64
import json
import os
import struct
import sys

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
from checkpoint import (MANIFEST, begin_checkpoint, check_config, check_state, finish_checkpoint,  # noqa: E402
                        read_manifest, sha256_of, sync_dir, verify_checkpoint, write_atomic)
from tokenizer import LLAMA3_SPLIT  # noqa: E402  (the tokenizer reads the pattern we write)

TOKENIZER_FILE = "bpe_tokenizer.json"  # not "tokenizer.json": transformers would take that for its own format
CHAT_FILE = "chat_template.json"
SPM_FILE = "tokenizer.model"
OUTPUTS = ("model.pth", "config.json", TOKENIZER_FILE, SPM_FILE, CHAT_FILE)
HF_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# Split patterns by llama.cpp's pre-tokenizer name (tokenizer.ggml.pre). Each one is checked against
# the tokenizer transformers builds from the same GGUF (tests/test_convert_gguf.py), except "smollm",
# which transformers does not know (tests/test_tokenizer.py checks it against SmolLM2's own splitting).
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 was trained with every digit its own pre-token, then the GPT-2 split on the text between
# digits. In one regex: digits go first, and a whitespace run that ends right before a digit must
# still count as "at the end", so the lookahead lets digits through.
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLITS = {
    # "default" is what old llama.cpp converters wrote for a vocabulary they did not recognise;
    # transformers splits it like GPT-2 and so do we (llama.cpp itself uses a different cascade).
    "gpt2": GPT2_SPLIT, "default": GPT2_SPLIT,
    "smollm": SMOLLM_SPLIT,
    "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
    "dbrx": LLAMA3_SPLIT, "falcon3": LLAMA3_SPLIT,
    "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT, "megrez": QWEN2_SPLIT,
}
# Tokens that end a turn or a document, besides the GGUF's own eos id: SmolLM2 / Qwen and Llama 3.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
# llama.cpp's per-layer tensor names -> ours (the Q/K/V projections are fused separately)
LAYER_TENSORS = {"attn_output.weight": "attention.wo.weight", "ffn_gate.weight": "feed_forward.w1.weight",
                 "ffn_up.weight": "feed_forward.w3.weight", "ffn_down.weight": "feed_forward.w2.weight",
                 "attn_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight"}


# ---------------------------------------------------------------- reading the GGUF

def open_gguf(path: str):
    """A gguf.GGUFReader, or ValueError / FileNotFoundError with a one-line reason."""
    import gguf
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, not b'GGUF')")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader fails in many ways on a cut-off file (IndexError, reshape errors...)
        raise ValueError(f"{path}: truncated or corrupt GGUF ({type(e).__name__}: {e})") from None
    # The reader maps the file without checking that the last tensor's bytes are all there.
    size = os.path.getsize(path)
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ValueError(f"{path}: truncated GGUF (tensor {t.name} runs past the end of the file)")
    # nor that tensors keep to their own bytes: two that share some would load as each other's data
    placed = sorted(reader.tensors, key=lambda t: t.data_offset)
    for a, b in zip(placed, placed[1:]):
        if a.data_offset + a.n_bytes > b.data_offset:
            raise ValueError(f"{path}: tensors {a.name} and {b.name} overlap in the file (corrupt GGUF)")
    return reader


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def need(reader, key):
    value = field(reader, key)
    if value is None:
        raise ValueError(f"the GGUF lacks the key {key}")
    return value


def short_float(x) -> float:
    """GGUF stores float32; write the short decimal it came from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def interleave_halves(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # Hugging Face's Q/K layout rotates each head's first half against its second half ("NEOX");
    # model.py rotates adjacent pairs (0,1),(2,3).. Put row i of the second half next to row i of the first.
    # Works for weights [n_head*hd, dim] and biases [n_head*hd].
    rest = w.shape[1:]
    return w.reshape(n_head, 2, -1, *rest).transpose(1, 2).reshape(-1, *rest)


def llama3_rope_scaling(freq_factors: np.ndarray, head_dim: int, base: float) -> dict:
    """llama.cpp stores Llama 3.1-style RoPE scaling as a tensor of per-frequency divisors
    (rope_freqs.weight), not as settings. Recover the settings model.py takes: Llama 3.1 and 3.2
    use low 1, high 4, original context 8192 and differ only in the factor, the largest divisor.
    Recompute the divisors from those settings and refuse if they do not match."""
    scaling = {"rope_type": "llama3", "factor": float(freq_factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    inv_freq = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * np.pi / inv_freq
    old_ctx, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    smooth = (old_ctx / wavelen - low) / (high - low)
    divisor = np.where(wavelen < old_ctx / high, 1.0,
                       np.where(wavelen > old_ctx / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    if freq_factors.shape != divisor.shape or not np.allclose(freq_factors, divisor, rtol=1e-6, atol=0):
        raise ValueError("rope_freqs.weight is not Llama 3.1-style scaling (low 1, high 4, original context 8192); "
                         "this RoPE scaling is not supported")
    return scaling


# ---------------------------------------------------------------- weights and config

def convert_weights(reader, arch: str, n_head: int, n_kv: int) -> dict:
    import gguf
    tensors = {t.name: t for t in reader.tensors}
    taken = set()

    def take(name):
        if name not in tensors:
            raise ValueError(f"tensor {name} is missing from the GGUF")
        taken.add(name)
        t = tensors[name]
        try:
            w = gguf.quants.dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise ValueError(f"tensor {name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
        # GGUF lists dimensions innermost first; torch order is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape))
        if w.size != int(np.prod(shape)):
            raise ValueError(f"tensor {name} holds {w.size} values, its shape {list(shape)} says {int(np.prod(shape))}")
        w = np.ascontiguousarray(w).reshape(shape)
        return torch.from_numpy(w.astype(np.float32, copy=False).copy())  # copy: never a view of the mapped file

    # llama.cpp's converter reorders llama's Q and K rows into the interleaved RoPE layout model.py
    # uses, so those go in as they are. It leaves qwen2's in Hugging Face's half-split layout (it runs
    # them with NEOX RoPE), and those we reorder here.
    reorder = arch == "qwen2"
    sd = {"tok_embeddings.weight": take("token_embd.weight"), "norm.weight": take("output_norm.weight")}
    if "output.weight" in tensors:
        sd["output.weight"] = take("output.weight")
    n_layer = need(reader, f"{arch}.block_count")
    for i in range(n_layer):
        p, q = f"blk.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if p + "attn_q.bias" in tensors else ("weight",):
            wq, wk, wv = (take(f"{p}attn_{x}.{kind}") for x in "qkv")
            if reorder:
                wq, wk = interleave_halves(wq, n_head), interleave_halves(wk, n_kv)
            sd[f"{q}attention.wqkv.{kind}"] = torch.cat([wq, wk, wv])
        for theirs, ours in LAYER_TENSORS.items():
            sd[q + ours] = take(p + theirs)
    leftover = sorted(tensors.keys() - taken - {"rope_freqs.weight"})  # rope_freqs is read by make_config
    if leftover:  # e.g. output-projection or MLP biases: model.py has nowhere to put them
        raise ValueError(f"{len(leftover)} GGUF tensors have no place in this engine's model, e.g. {leftover[:3]}")
    return sd


def make_config(reader, arch: str, state: dict) -> dict:
    k = arch + "."
    dim, n_head = need(reader, k + "embedding_length"), need(reader, k + "attention.head_count")
    head_dim = field(reader, k + "attention.key_length") or field(reader, k + "rope.dimension_count") or dim // n_head
    rope_dims = field(reader, k + "rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ValueError(f"RoPE on {rope_dims} of {head_dim} head dimensions (partial rotary) is not supported")
    base = short_float(field(reader, k + "rope.freq_base", 10000.0))

    scaling = None
    kind = field(reader, k + "rope.scaling.type", "none")
    if kind == "linear":
        scaling = {"rope_type": "linear", "factor": short_float(field(reader, k + "rope.scaling.factor"))}
    elif field(reader, k + "rope.scale_linear") is not None:  # the key older converters wrote
        scaling = {"rope_type": "linear", "factor": short_float(field(reader, k + "rope.scale_linear"))}
    elif kind != "none":
        raise ValueError(f"RoPE scaling type {kind!r} is not supported (only linear and Llama 3.1-style)")
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        if scaling is not None:
            raise ValueError("the GGUF has both rope_freqs.weight and rope.scaling settings; not supported")
        scaling = llama3_rope_scaling(np.asarray(freqs.data, dtype=np.float32).reshape(-1), head_dim, base)

    bias = "layers.0.attention.wqkv.bias" in state
    tied = "output.weight" not in state
    config = {
        "architectures": [HF_ARCH[arch]],
        "model_type": arch,
        "hidden_size": dim,
        "num_hidden_layers": need(reader, k + "block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": field(reader, k + "attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "intermediate_size": need(reader, k + "feed_forward_length"),
        "vocab_size": state["tok_embeddings.weight"].shape[0],
        "max_position_embeddings": need(reader, k + "context_length"),
        "rope_theta": base,
        "rms_norm_eps": short_float(need(reader, k + "attention.layer_norm_rms_epsilon")),
        "hidden_act": "silu",
        "attention_bias": bias,
        "tie_word_embeddings": tied,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


# ---------------------------------------------------------------- tokenizer and chat template

def gpt2_byte_alphabet() -> dict:
    """GPT-2's printable stand-in character for each byte (how byte-level vocabularies are spelled)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return {c: b for b, c in table.items()}


def make_tokenizer(reader) -> dict:
    """The byte-level BPE vocabulary (tokenizer.ggml.model = "gpt2") as bpe_tokenizer.json's dict."""
    model = field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {model!r} is not byte-level BPE ('gpt2')")
    pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre not in SPLITS:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (known: {', '.join(sorted(SPLITS))})")
    tokens, types = vocabulary(reader)
    ids = {t: i for i, t in enumerate(tokens)}
    # tiktoken merges the adjacent pair whose *result* has the lowest rank, and returns ranks as ids.
    # That equals the merge-list order only if each merge's result has a larger id than every earlier
    # merge's result; check it instead of assuming it.
    merges = need(reader, "tokenizer.ggml.merges")
    unknown = next((m for m in merges if "".join(m.split(" ")) not in ids), None)
    if unknown is not None:
        raise ValueError(f"tokenizer.ggml.merges: the merge {unknown!r} makes no token of the vocabulary")
    results = [ids["".join(m.split(" "))] for m in merges]
    if any(b <= a for a, b in zip(results, results[1:])):
        raise ValueError("token ids do not follow merge order; ids cannot serve as tiktoken ranks")
    byte_of = gpt2_byte_alphabet()
    ranks, special = {}, {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if kind in (3, 4):  # control and user-defined tokens are matched whole in the text
            special[tok] = i
        else:
            # a token spelled outside the byte alphabet is plain text (transformers reads it the same way)
            raw = bytes(byte_of[c] for c in tok) if set(tok) <= byte_of.keys() else tok.encode()
            ranks[base64.b64encode(raw).decode()] = i
    bos = field(reader, "tokenizer.ggml.bos_token_id")
    eos = {field(reader, "tokenizer.ggml.eos_token_id")} | {special[t] for t in END_TOKENS if t in special}
    eos |= {field(reader, f"tokenizer.ggml.{x}_token_id") for x in ("eot", "eom")} - {None}
    return {"type": "byte_bpe", "pattern": SPLITS[pre], "ranks": ranks, "special_tokens": special,
            "bos_id": bos, "eos_ids": sorted(eos - {None}), "vocab_size": len(tokens),
            "add_bos": bool(field(reader, "tokenizer.ggml.add_bos_token"))}


def vocabulary(reader):
    """(tokens, token types), with the ids that name tokens checked against them."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type") or []
    if not tokens:
        raise ValueError("tokenizer.ggml.tokens is empty: the GGUF has no vocabulary")
    if len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    for key in ("bos", "eos", "eot", "eom", "unknown", "padding"):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and not 0 <= i < len(tokens):
            raise ValueError(f"tokenizer.ggml.{key}_token_id is {i}, outside the {len(tokens)} tokens")
    return tokens, types


def protobuf_varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int32 values go out as 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def protobuf_int(number: int, value: int) -> bytes:
    return protobuf_varint(number << 3) + protobuf_varint(value)


def protobuf_bytes(number: int, value: bytes) -> bytes:
    return protobuf_varint(number << 3 | 2) + protobuf_varint(len(value)) + value


def make_sentencepiece_model(reader) -> bytes:
    """A sentencepiece vocabulary (tokenizer.ggml.model = "llama": Llama 2, Mistral 7B) written back as
    sentencepiece's own tokenizer.model, which tokenizer.SentencePieceTokenizer loads. The file is a
    protobuf ModelProto; we write the few fields encoding needs (field numbers from sentencepiece's
    sentencepiece_model.proto) so that no protobuf package is needed:
      pieces (1): piece (1), score (2), type (3), in id order; llama.cpp's token types use the same
        numbers as sentencepiece's (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
      trainer_spec (2): model_type (3) = BPE (merge by piece score, as llama.cpp does), vocab_size (4),
        byte_fallback (35), unk/bos/eos/pad ids (40-43)
      normalizer_spec (3): name (1) "identity", add_dummy_prefix (3), remove_extra_whitespaces (4),
        escape_whitespaces (5): Llama's settings, with the prefix space as the GGUF says."""
    tokens, types = vocabulary(reader)
    scores = need(reader, "tokenizer.ggml.scores")
    if len(scores) != len(tokens):
        raise ValueError(f"tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
    if field(reader, "tokenizer.ggml.precompiled_charsmap"):
        raise ValueError("sentencepiece vocabularies with a normalization map (precompiled_charsmap) "
                         "are not supported")
    unk = field(reader, "tokenizer.ggml.unknown_token_id")
    unk = unk if unk is not None else next((i for i, k in enumerate(types) if k == 2), None)
    if unk is None:
        raise ValueError("the sentencepiece vocabulary has no unknown token, which sentencepiece requires")
    ids = [(n, field(reader, f"tokenizer.ggml.{key}_token_id")) for n, key in ((41, "bos"), (42, "eos"), (43, "padding"))]
    pieces = b"".join(protobuf_bytes(1, protobuf_bytes(1, t.encode()) + protobuf_varint(2 << 3 | 5) +
                                     struct.pack("<f", s) + protobuf_int(3, k))
                      for t, s, k in zip(tokens, scores, types))
    trainer = (protobuf_int(3, 2) + protobuf_int(4, len(tokens)) + protobuf_int(35, int(6 in types)) +
               protobuf_int(40, unk) + b"".join(protobuf_int(n, -1 if i is None else i) for n, i in ids))
    prefix = field(reader, "tokenizer.ggml.add_space_prefix", True)
    normalizer = (protobuf_bytes(1, b"identity") + protobuf_int(3, int(prefix)) + protobuf_int(4, 0) +
                  protobuf_int(5, 1))
    return pieces + protobuf_bytes(2, trainer) + protobuf_bytes(3, normalizer)


def make_chat_template(reader):
    """The template plus the special-token strings templates refer to (bos_token, eos_token...), as
    transformers hands them to the template; None if the GGUF has no template."""
    template = field(reader, "tokenizer.chat_template")
    if not template:
        return None
    tokens = field(reader, "tokenizer.ggml.tokens")
    chat = {"chat_template": template}
    for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding")):
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            chat[name] = tokens[i]
    return chat


# ---------------------------------------------------------------- writing and verifying

def write_json(path: str, obj, indent=None) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=indent).encode()))


def remove(path: str) -> None:
    if os.path.exists(path):
        os.remove(path)
        sync_dir(os.path.dirname(os.path.abspath(path)))


def convert(gguf_path: str, out_dir: str = None, force: bool = False, remake: str = None) -> str:
    """Convert gguf_path into out_dir (default: the GGUF's directory) and return out_dir.

    Without force, a directory already holding a verified conversion of this same GGUF is left as it
    is, and one holding anything else that looks like a checkpoint is refused rather than overwritten.
    remake: the command manifest.json names to redo this directory (verify_checkpoint's hint)."""
    out_dir = out_dir or os.path.dirname(os.path.abspath(gguf_path))
    reader = open_gguf(gguf_path)
    arch = field(reader, "general.architecture")
    if arch not in HF_ARCH:
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only llama and qwen2; "
                         "Llama, Mistral 7B and SmolLM2 GGUFs are stored as llama)")
    source = {"file": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path), "sha256": sha256_of(gguf_path)}
    if os.path.realpath(os.path.dirname(os.path.abspath(gguf_path))) != os.path.realpath(out_dir):
        source["file"] = os.path.abspath(gguf_path)  # recorded, but only checked when it sits in out_dir

    old = read_manifest(out_dir)
    if old and old.get("writing"):
        print(f"{out_dir}: finishing a conversion that stopped before it finished")
    elif old and not force:
        same = {k: v for k, v in (old.get("source") or {}).items() if k != "file"} == \
               {k: v for k, v in source.items() if k != "file"}
        if not same:
            raise ValueError(f"{out_dir} holds a checkpoint converted from {(old.get('source') or {}).get('file')}; "
                             "pass --force to replace it")
        try:
            verify_checkpoint(out_dir, hashes=True, fix="")
            print(f"{out_dir}: already converted from {source['file']} and verified (use --force to redo)")
            return out_dir
        except ValueError as e:
            print(f"converting again: {e}")
    elif old is None and not force and os.path.exists(os.path.join(out_dir, "model.pth")):
        raise ValueError(f"{out_dir} already has a model.pth that no finished conversion wrote (no {MANIFEST}); "
                         "pass --force to replace it")

    n_head = need(reader, f"{arch}.attention.head_count")
    n_kv = field(reader, f"{arch}.attention.head_count_kv", n_head)
    for key, n in (("head_count", n_head), ("head_count_kv", n_kv)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{arch}.attention.{key} must be a positive integer, found {n!r}")
    if n_head % n_kv:
        raise ValueError(f"{arch}.attention.head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    vocab_kind = field(reader, "tokenizer.ggml.model")
    if vocab_kind not in ("gpt2", "llama"):
        raise ValueError(f"{gguf_path}: vocabulary type {vocab_kind!r} is not supported "
                         "(only byte-level BPE 'gpt2' and sentencepiece 'llama')")
    # the tokenizer first: it is quick, and its errors should not wait for the weights
    tok = make_tokenizer(reader) if vocab_kind == "gpt2" else make_sentencepiece_model(reader)
    chat = make_chat_template(reader)
    state = convert_weights(reader, arch, n_head, n_kv)
    config = make_config(reader, arch, state)
    # everything the engine will rely on, checked with the engine's own checks before anything is written
    args = check_config(config, f"{gguf_path}'s metadata")
    check_state(args, state, gguf_path)
    n_tokens = len(field(reader, "tokenizer.ggml.tokens"))
    if n_tokens > args.vocab_size:
        raise ValueError(f"{gguf_path}: the vocabulary has {n_tokens} tokens, token_embd.weight rows for {args.vocab_size}")

    path = {name: os.path.join(out_dir, name) for name in OUTPUTS}
    remake = remake or f"python scripts/convert_gguf.py {gguf_path} --out {out_dir} --force"
    # From here until the new manifest is written, the directory says it is being written.
    begin_checkpoint(out_dir, remake)
    write_atomic(path["model.pth"], lambda f: torch.save(state, f))
    n_params = sum(v.numel() for v in state.values())
    print(f"wrote {path['model.pth']} ({len(state)} fp32 tensors, {n_params / 1e6:.1f}M parameters, "
          f"{'tied' if config['tie_word_embeddings'] else 'separate'} output embedding)")
    write_json(path["config.json"], config, indent=2)
    print("wrote", path["config.json"])
    if vocab_kind == "gpt2":
        write_json(path[TOKENIZER_FILE], tok)
        print(f"wrote {path[TOKENIZER_FILE]} ({len(tok['ranks'])} BPE tokens, {len(tok['special_tokens'])} special)")
        written = ["model.pth", "config.json", TOKENIZER_FILE]
    else:
        write_atomic(path[SPM_FILE], lambda f: f.write(tok))
        print(f"wrote {path[SPM_FILE]} (sentencepiece, {len(field(reader, 'tokenizer.ggml.tokens'))} pieces)")
        written = ["model.pth", "config.json", SPM_FILE]
    if chat is not None:
        write_json(path[CHAT_FILE], chat, indent=2)
        written.append(CHAT_FILE)
        print("wrote", path[CHAT_FILE])
    # what an earlier conversion left that does not belong to this model (load_tokenizer would pick
    # bpe_tokenizer.json over tokenizer.model, and any template would be another model's)
    for name in (TOKENIZER_FILE, SPM_FILE, CHAT_FILE):
        if name not in written:
            remove(path[name])

    finish_checkpoint(out_dir, written, source, remake)
    print("wrote", os.path.join(out_dir, MANIFEST))
    return out_dir


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", help="the .gguf file")
    ap.add_argument("--out", default=None, help="checkpoint directory to write (default: the GGUF's directory)")
    ap.add_argument("--force", action="store_true", help="convert even if DIR already holds a checkpoint")
    a = ap.parse_args(argv)
    try:
        convert(a.path, a.out, a.force)
    except KeyboardInterrupt:
        sys.exit("interrupted; nothing partial was left under the final names (rerun to finish)")
    except (OSError, ValueError, KeyError, TypeError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"the GGUF lacks a key or tensor: {e}"
        sys.exit(f"error: {msg}".replace("\n", " "))


if __name__ == "__main__":
    main()
