# Our model against transformers' LlamaForCausalLM, both in fp32 and both loaded from the same GGUF,
# so any difference is in the forward pass (layout of Q/K, RoPE, GQA, norms), not in the weights.
import pytest
import torch

from kv_cache import KVCache
from checkpoint import load_model
from tokenizer import load_tokenizer

N_TOKENS = 512
N_NEW = 32


@pytest.fixture(scope="module")
def prompt(smollm2_dir, essay_text):
    ids = load_tokenizer(smollm2_dir).encode(essay_text[:20 * N_TOKENS])[:N_TOKENS]
    assert len(ids) == N_TOKENS
    return torch.tensor([ids])


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_model(smollm2_dir, "cpu", torch.float32)


@pytest.fixture(scope="module")
def reference(smollm2_dir, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, gguf_file=smollm2_gguf, torch_dtype=torch.float32)
    return model.eval().requires_grad_(False)


def new_cache(model, max_seq_len):
    a = model.args
    return KVCache(a.n_layer, 1, a.n_kv_head, max_seq_len, a.head_dim, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def logits(ours, reference, prompt):
    pos = torch.arange(N_TOKENS)[None]
    with torch.no_grad():
        mine = ours(prompt, pos, new_cache(ours, N_TOKENS))
        theirs = reference(prompt).logits.float()
    return mine, theirs


def perplexity(logits, tokens):
    return torch.exp(torch.nn.functional.cross_entropy(logits[0, :-1], tokens[0, 1:])).item()


def test_logits_match(logits):
    mine, theirs = logits
    assert mine.shape == theirs.shape == (1, N_TOKENS, 49152)
    diff = (mine - theirs).abs().max().item()
    print(f"max abs logit diff over {N_TOKENS} tokens: {diff:.2e}")
    assert diff < 1e-3


def test_perplexity(logits, prompt):
    mine, theirs = logits
    ppl = perplexity(mine, prompt)
    print(f"perplexity on {N_TOKENS} essay tokens: {ppl:.3f}")
    # about 24 for this Q4_1 SmolLM2 on the first essay; far off means wrong weights or a broken model
    assert 15 < ppl < 35
    assert ppl == pytest.approx(perplexity(theirs, prompt), rel=1e-4)


def test_greedy_continuation_matches(ours, reference, prompt):
    with torch.no_grad():
        out = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N_NEW,
                                 do_sample=False, pad_token_id=reference.config.eos_token_id)
    expected = out[0, N_TOKENS:].tolist()

    cache = new_cache(ours, N_TOKENS + N_NEW)
    got = []
    with torch.no_grad():
        logits = ours(prompt, torch.arange(N_TOKENS)[None], cache, logits_idx=torch.tensor([[N_TOKENS - 1]]))
        for step in range(N_NEW):
            token = int(logits[0, -1].argmax())
            got.append(token)
            pos = torch.tensor([[N_TOKENS + step]])
            logits = ours(torch.tensor([[token]]), pos, cache)
    assert got == expected
