import json
import os
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)  # the engine is flat files at the repo root, not an installed package

SMOLLM2_DIR = os.path.join(REPO_ROOT, "checkpoints", "HuggingFaceTB", "SmolLM2-135M-Instruct")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    path = os.environ.get("ESSAYS_PATH") or os.path.join(REPO_ROOT, "..", "shared", "data", "PaulGrahamEssays.json")
    if not os.path.exists(path):
        pytest.fail(f"essays not found at {os.path.abspath(path)}; set ESSAYS_PATH to PaulGrahamEssays.json",
                    pytrace=False)
    return path


@pytest.fixture(scope="session")
def essay_text(essays_path):
    with open(essays_path) as f:
        return json.load(f)["text"]
