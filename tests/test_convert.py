# HF -> our checkpoint conversion, checked end to end against transformers on tiny random models.
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
import convert_hf_checkpoint as conv  # noqa: E402
from kv_cache import KVCache  # noqa: E402
from checkpoint import load_model, read_config  # noqa: E402
from model import ModelArgs  # noqa: E402

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=200, max_position_embeddings=512, rms_norm_eps=1e-6)
# With head_dim 16 and base 5e5 the pair wavelengths straddle 128/4 and 128, so the high-frequency,
# smoothed and fully scaled bands of llama3 scaling are all exercised.
LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=128)
PROMPT, STEPS = 20, 4


def randomize(model):
    # The default init (std 0.02, unit norms) gives nearly flat logits that would hide a misplaced
    # weight under 1e-4; spread everything so that any layout mistake moves the logits by O(1).
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def build(tmp, arch, shard=None, legacy_config=False, **cfg):
    torch.manual_seed(0)
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    hf = randomize(model_cls(config_cls(**TINY, **cfg))).eval()
    src = tmp / "hf"
    hf.save_pretrained(src, safe_serialization=True, **({"max_shard_size": shard} if shard else {}))
    if legacy_config:  # the form most hub checkpoints still ship: top-level rope_theta / rope_scaling
        c = json.loads((src / "config.json").read_text())
        rp = c.pop("rope_parameters")
        c["rope_theta"] = rp.pop("rope_theta")
        c["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}
        (src / "config.json").write_text(json.dumps(c))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).write_text("{}")
    out = tmp / "ours"
    conv.main(["--checkpoint_dir", str(src), "--out", str(out)])
    return hf, out


CASES = {
    "llama_gqa_llama3": lambda tmp: build(tmp, "llama", rope_theta=500000.0, rope_scaling=dict(LLAMA3)),
    "llama_tied_linear": lambda tmp: build(tmp, "llama", legacy_config=True, tie_word_embeddings=True,
                                           rope_scaling=dict(rope_type="linear", factor=4.0)),
    "qwen2_sharded": lambda tmp: build(tmp, "qwen2", shard="40KB", rope_theta=1000000.0),
}
EXPECTED = {
    "llama_gqa_llama3": dict(rope_base=500000.0, rope_scaling=LLAMA3, qkv_bias=False, tie_embeddings=False),
    "llama_tied_linear": dict(rope_base=10000.0, rope_scaling={"type": "linear", "factor": 4.0},
                              qkv_bias=False, tie_embeddings=True),
    "qwen2_sharded": dict(rope_base=1000000.0, rope_scaling=None, qkv_bias=True, tie_embeddings=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def converted(request, tmp_path_factory):
    hf, out = CASES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, hf, out


def test_config_fields(converted):
    name, _, out = converted
    args = read_config(str(out))
    want = dict(dim=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=96, vocab_size=200,
                block_size=512, norm_eps=1e-6, **EXPECTED[name])
    assert {k: getattr(args, k) for k in want} == want
    assert sorted(os.listdir(out)) == ["config.json", "manifest.json", "model.pth", "tokenizer.json", "tokenizer_config.json"]


def test_logits_match_transformers(converted):
    name, hf, out = converted
    ours = load_model(str(out), "cpu", torch.float32)
    args = ours.args
    # Our scaled frequencies must be HF's; logits alone could let a small mismatch slip by.
    torch.testing.assert_close(ours.inv_freq, hf.model.rotary_emb.inv_freq.float(), rtol=1e-6, atol=0)
    assert hf.model.rotary_emb.attention_scaling == 1.0

    tokens = torch.randint(0, args.vocab_size, (2, PROMPT + STEPS), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(PROMPT + STEPS).expand(2, -1)
    cache = KVCache(args.n_layer, 2, args.n_kv_head, PROMPT + STEPS, args.head_dim, dtype=torch.float32, device="cpu")
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        prefill = ours(tokens[:, :PROMPT], pos[:, :PROMPT], cache)
        decode = torch.cat([ours(tokens[:, t:t + 1], pos[:, t:t + 1], cache) for t in range(PROMPT, PROMPT + STEPS)], 1)
    assert ref.std() > 1.0  # logits far from flat, so 1e-4 is a meaningful bound
    d_prefill = (prefill - ref[:, :PROMPT]).abs().max().item()
    d_decode = (decode - ref[:, PROMPT:]).abs().max().item()
    print(f"{name}: max |diff| prefill {d_prefill:.2e}, decode {d_decode:.2e}")
    assert d_prefill < 1e-4 and d_decode < 1e-4


def test_unpermute_inverts_hf_permute():
    n_head, hd, dim = 3, 8, 5
    w = torch.randn(n_head * hd, dim)
    # HF's export permutation: per head, interleaved pairs -> [first elements | second elements]
    hf = w.view(n_head, hd // 2, 2, dim).transpose(1, 2).reshape(n_head * hd, dim)
    torch.testing.assert_close(conv.unpermute(hf, n_head), w, rtol=0, atol=0)
    torch.testing.assert_close(conv.unpermute(hf[:, 0], n_head), w[:, 0], rtol=0, atol=0)


def test_cli_errors(tmp_path, one_line_error):
    assert "does not exist" in one_line_error(conv.main, ["--checkpoint_dir", str(tmp_path / "nope")])
    assert "no config.json" in one_line_error(conv.main, ["--checkpoint_dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="llama", **TINY)))
    assert "no *.safetensors" in one_line_error(conv.main, ["--checkpoint_dir", str(tmp_path)])
    (tmp_path / "config.json").write_text(json.dumps(dict(model_type="gemma", **TINY)))
    assert "not supported" in one_line_error(conv.main, ["--checkpoint_dir", str(tmp_path)])


def write_tiny_config(d):
    (d / "config.json").write_text(json.dumps(dict(model_type="llama", **TINY)))


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_load_refuses_pickled_code(tmp_path):
    write_tiny_config(tmp_path)
    torch.save({"tok_embeddings.weight": torch.zeros(2), "evil": Payload()}, tmp_path / "model.pth")
    with pytest.raises(ValueError, match="model.pth: refused: holds pickled objects") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_load_rejects_truncated_checkpoint(tmp_path):
    write_tiny_config(tmp_path)
    torch.save({"norm.weight": torch.ones(1000)}, tmp_path / "model.pth")
    data = (tmp_path / "model.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.pth: not a readable checkpoint") as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value)


def test_config_reads_nested_rope_parameters():
    # transformers >= 5 writes rope_theta / rope_scaling under rope_parameters
    base = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96, vocab_size=10)
    args = ModelArgs.from_hf_config(dict(base, rope_parameters=dict(LLAMA3, rope_theta=5e5)))
    assert args.rope_base == 5e5 and args.rope_scaling["rope_type"] == "llama3" and args.rope_scaling["factor"] == LLAMA3["factor"]
    args = ModelArgs.from_hf_config(dict(base, rope_parameters={"rope_type": "default", "rope_theta": 1.0}))
    assert args.rope_base == 1.0 and args.rope_scaling is None


def test_replacing_needs_force_and_leaves_a_fresh_manifest(tmp_path, one_line_error):
    from checkpoint import verify_checkpoint
    _, out = build(tmp_path, "llama")
    verify_checkpoint(str(out), hashes=True)  # files, config and the tokenizer files copied: all listed
    listed = json.loads((out / "manifest.json").read_text())["files"]
    assert {"model.pth", "config.json", "tokenizer.json", "tokenizer_config.json"} <= listed.keys()
    before = (out / "model.pth").stat().st_mtime_ns
    assert "pass --force" in one_line_error(conv.main, ["--checkpoint_dir", str(tmp_path / "hf"), "--out", str(out)])
    assert (out / "model.pth").stat().st_mtime_ns == before
    conv.main(["--checkpoint_dir", str(tmp_path / "hf"), "--out", str(out), "--force", "--dtype", "bfloat16"])
    verify_checkpoint(str(out), hashes=True)  # the manifest describes the new files, not the old ones
    assert load_model(str(out)).tok_embeddings.weight.dtype == torch.float32  # place() casts; the file is bf16
    assert torch.load(out / "model.pth", weights_only=True)["norm.weight"].dtype == torch.bfloat16


def test_a_config_the_engine_cannot_run_writes_nothing(tmp_path, one_line_error):
    hf, _ = build(tmp_path, "llama")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps(dict(cfg, num_key_value_heads=3)))
    msg = one_line_error(conv.main, ["--checkpoint_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "bad")])
    assert "num_key_value_heads" in msg or "not a multiple" in msg, msg
    assert not (tmp_path / "bad").exists()
