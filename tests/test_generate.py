# End-to-end generation on SmolLM2 (fp32) and the CLI's handling of bad input.
import json
import os
import subprocess
import sys

import pytest
import torch

import generate as G
from engine import Engine, SpecArgs, generate
from checkpoint import load_model
from spec import Sampling
from tokenizer import load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smollm(smollm2_dir):
    return load_model(smollm2_dir, "cpu", torch.float32), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def essay_prompts(smollm, essay_text):
    _, tok = smollm
    ids = tok.encode(essay_text[:20000])
    return [ids[100:130], ids[1000:1190], ids[3000:3077]]  # ragged: 30, 190 and 77 tokens


@pytest.fixture(scope="module")
def ar_tokens(smollm, essay_prompts):
    model, tok = smollm
    return generate(Engine(model, 3, 256), essay_prompts, 24, set(), Sampling()).tokens


def test_ragged_batch_equals_each_row_alone(smollm, essay_prompts, ar_tokens):
    model, _ = smollm
    for p, row in zip(essay_prompts, ar_tokens):
        assert generate(Engine(model, 1, 256), [p], 24, set(), Sampling()).tokens[0] == row
    assert all(len(r) == 24 for r in ar_tokens)


def test_chunked_prefill_equals_one_pass(smollm, essay_prompts):
    model, _ = smollm
    from engine import pad_prompts

    tokens, lens = pad_prompts(essay_prompts, "cpu")
    outs = []
    for chunk in (256, 64, 48):  # one pass, aligned chunks, chunks that do not divide the prompt
        outs.append(Engine(model, 3, 256, prefill_chunk=chunk).prefill(tokens, lens))
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,budget", [("streaming", 48), ("snapkv", 96)])
def test_self_speculation_equals_autoregressive_on_smollm2(smollm, essay_prompts, ar_tokens, kind, budget):
    model, _ = smollm
    sa = SpecArgs("self", gamma=3, draft_kv=kind, draft_budget=budget, sinks=16, snapkv_window=16)
    r = generate(Engine(model, 3, 256, sa=sa, prefill_chunk=64), essay_prompts, 24, set(), Sampling())
    assert r.tokens == ar_tokens
    assert 0.3 < r.acceptance < 1.0  # a real, imperfect draft


def test_sampling_is_reproducible_and_differs_from_greedy(smollm, essay_prompts, ar_tokens):
    model, _ = smollm
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95)
    runs, engine = [], Engine(model, 3, 256)
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(generate(engine, essay_prompts, 24, set(), s).tokens)
    assert runs[0] == runs[1] and runs[0] != ar_tokens


def run_cli(*args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    return subprocess.run([sys.executable, "generate.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_cli_writes_json_and_speculation_matches(tmp_path, smollm2_dir):
    common = ["--checkpoint_path", smollm2_dir, "--prompt", "The capital of France is", "--prompt",
              "def fibonacci(n):", "--max_new_tokens", "16"]
    ar = run_cli(*common, "--json", str(tmp_path / "ar.json"))
    assert ar.returncode == 0, ar.stderr
    sd = run_cli(*common, "--speculate", "self", "--draft_budget", "24", "--sinks", "4", "--json", str(tmp_path / "sd.json"))
    assert sd.returncode == 0, sd.stderr
    a, s = json.loads((tmp_path / "ar.json").read_text()), json.loads((tmp_path / "sd.json").read_text())
    assert a["tokens"] == s["tokens"] and len(a["tokens"]) == 2
    for key in ("tokens_per_s", "prefill_s", "decode_s", "device"):
        assert key in a
    assert 0 < s["acceptance"] <= 1 and s["tokens_per_round"] >= 1
    assert "tokens/s" in ar.stdout and "acceptance per draft token" in sd.stdout


def test_chat_flag_gives_the_templates_tokens(smollm2_dir, smollm2_gguf):
    """--chat wraps the prompt as transformers' apply_chat_template does with the same GGUF's template."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=smollm2_gguf)
    question = "What is the capital of France?"
    want = ref.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    args = G.parse_args(["--checkpoint_path", smollm2_dir, "--chat", "--prompt", question])
    (req,) = G.tokenize(args, load_tokenizer(smollm2_dir), G.read_texts(args))
    assert req.prompt == want
    assert load_tokenizer(smollm2_dir).decode(want).endswith("<|im_start|>assistant\n")
