import base64
import json
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # the engine is flat files at the repo root, not an installed package

from checkpoint import DEFAULT_CHECKPOINT  # noqa: E402
from model import ModelArgs, Transformer, place  # noqa: E402

SMOLLM2_DIR = DEFAULT_CHECKPOINT
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ESSAYS = os.path.join(REPO_ROOT, "data", "PaulGrahamEssays.json")
TINY_VOCAB = 64


def tiny_model(seed, n_layer=3, dim=64, n_head=4, n_kv_head=2):
    """A small random Llama (fp32, CPU) with wide weights: peaked, position-dependent logits rather
    than flat noise, so that greedy decoding and draft acceptance are not decided by ties."""
    torch.manual_seed(seed)
    m = place(Transformer(ModelArgs(dim=dim, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, intermediate_size=128,
                                    vocab_size=TINY_VOCAB, rope_base=100.0)), "cpu", torch.float32)
    for p in m.parameters():
        p.data.normal_(0, 0.35)
    return m


# A checkpoint directory as the command line loads it, with no download behind it: a byte-level BPE
# vocabulary of the 256 bytes and three ChatML control tokens, a ChatML chat template, and a random
# 2-layer model with wide weights (peaked logits: greedy tokens far from ties).
TINY_CKPT_VOCAB = 259  # 256 bytes + 3 special tokens
TINY_SPECIAL = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
TINY_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TINY_CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=TINY_CKPT_VOCAB, rope_theta=100.0, max_position_embeddings=2048)


def write_tiny_checkpoint(d, state=None, seed=0, template=True, std=0.35, **config):
    """A checkpoint directory at d: config.json (TINY_CONFIG with `config`'s changes), model.pth (state,
    or random weights of that config), bpe_tokenizer.json and, with template, chat_template.json."""
    cfg = dict(TINY_CONFIG, **config)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    if state is None:
        torch.manual_seed(seed)
        state = Transformer(ModelArgs.from_hf_config(cfg)).state_dict()
        for v in state.values():
            v.normal_(0, std)
    torch.save(state, os.path.join(d, "model.pth"))
    ranks = {base64.b64encode(bytes([b])).decode(): b for b in range(256)}
    with open(os.path.join(d, "bpe_tokenizer.json"), "w") as f:
        json.dump(dict(type="byte_bpe", pattern=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
                       ranks=ranks, special_tokens=TINY_SPECIAL, bos_id=257, eos_ids=[256, 258],
                       vocab_size=cfg["vocab_size"], add_bos=False), f)
    if template:
        with open(os.path.join(d, "chat_template.json"), "w") as f:
            json.dump(dict(chat_template=TINY_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>"), f)
    return str(d)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The tiny checkpoint the command-line tests load: see write_tiny_checkpoint."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_checkpoint") / "tiny")


@pytest.fixture(scope="session")
def one_line_error():
    """check(main, argv): a converter's main(argv) must exit with exactly one line, 'error: ...'; -> that line."""
    def check(main, argv):
        with pytest.raises(SystemExit) as e:
            main(argv)
        msg = str(e.value.code)
        assert msg.startswith("error: ") and "\n" not in msg
        return msg
    return check


@pytest.fixture
def refused_before_loading(monkeypatch, capsys):
    """check(argv, expected): generate.cli(argv) must exit with code 2 and one line holding `expected`,
    before any weights load."""
    import generate

    def check(argv, expected):
        monkeypatch.setattr(generate, "load_model", lambda *a, **k: pytest.fail("loaded before the flags were checked"))
        with pytest.raises(SystemExit) as e:
            generate.cli(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and "\n" not in err and expected in err, err
    return check


@pytest.fixture(scope="session")
def tiny():
    """The tiny models the engine tests share: target (3 layers) and a standalone draft (1 layer)."""
    return tiny_model(0), tiny_model(1, n_layer=1, dim=32)


@pytest.fixture(scope="session")
def tiny_prompts():
    """Three ragged prompts (7, 61 and 26 tokens) over the tiny vocabulary."""
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in (7, 61, 26)]


@pytest.fixture(scope="session")
def smollm2_dir():
    needed = ("model.pth", "config.json", "bpe_tokenizer.json", SMOLLM2_GGUF)
    missing = [f for f in needed if not os.path.exists(os.path.join(SMOLLM2_DIR, f))]
    if missing:
        pytest.fail(f"{SMOLLM2_DIR} lacks {', '.join(missing)}; run `python scripts/prepare_smollm2.py` first",
                    pytrace=False)
    return SMOLLM2_DIR


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_dir):
    """File name of the GGUF inside smollm2_dir (transformers loads from_pretrained(dir, gguf_file=name))."""
    return SMOLLM2_GGUF


@pytest.fixture(scope="session")
def essays_path():
    return ESSAYS


@pytest.fixture(scope="session")
def essay_text(essays_path):
    with open(essays_path) as f:
        return json.load(f)["text"]
