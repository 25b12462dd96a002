import json
import os
import sys

import pytest
import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # the engine is flat files at the repo root, not an installed package

from model import ModelArgs, Transformer, place  # noqa: E402

SMOLLM2_DIR = os.path.join(REPO_ROOT, "checkpoints", "HuggingFaceTB", "SmolLM2-135M-Instruct")
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
