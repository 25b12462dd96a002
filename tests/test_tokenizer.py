import os

import pytest

from tokenizer import SentencePieceTokenizer, TiktokenTokenizer, load_tokenizer

N_CHARS = 200_000
EDGE_CASES = [
    "hi  5", " \n1984", "  12,345.67 ½ ² Ⅻ ٣٤", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "Hello <|endoftext|> x", "日本語のテキスト 🤗🚀", "tab\there\r\n\r\nend   ", "don't I'LL we've",
    "x = [1, 2, 3]\n    return x**2", "", " ", "\n\n\n", "$$$ ... !!! ???", "café naïve ÀÉÎ",
    "a\x04b",  # a byte SmolLM2 has no token for: dropped, as transformers drops it
]


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_dir, smollm2_gguf):
    """transformers' tokenizer from the same GGUF, with SmolLM2's own pre-tokenizer put back.

    transformers knows no split for llama.cpp's "smollm" pre-tokenizer and falls back to plain GPT-2
    splitting. SmolLM2 was trained (and llama.cpp runs it) with every digit isolated first, which
    differs wherever whitespace runs into a digit: " \\n1984" is "Ġ\\n" + digits for SmolLM2 but
    "Ġ" + "\\n" + digits under GPT-2 splitting. We follow SmolLM2, so the reference must too."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir, gguf_file=smollm2_gguf)
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tok


def test_ids_follow_merge_order(smollm2_dir, smollm2_gguf):
    # tiktoken picks merges by the rank (= id) of the merged token, transformers by merge-list order;
    # for those to agree each merge must yield a larger id than every earlier one.
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(os.path.join(smollm2_dir, smollm2_gguf))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = reader.fields["tokenizer.ggml.merges"].contents()
    ids = {t: i for i, t in enumerate(tokens)}
    produced = [ids[m.replace(" ", "")] for m in merges]
    assert all(a < b for a, b in zip(produced, produced[1:]))


def test_matches_transformers_on_essays(ours, reference, essay_text):
    text = essay_text[:N_CHARS]
    ids = ours.encode(text)
    expected = reference.encode(text, add_special_tokens=False)
    assert len(ids) == len(expected)
    first_diff = next((i for i, (a, b) in enumerate(zip(ids, expected)) if a != b), None)
    assert first_diff is None, f"first difference at token {first_diff}: {ids[first_diff:first_diff + 5]} " \
                               f"vs {expected[first_diff:first_diff + 5]} ({ours.decode(ids[first_diff - 3:first_diff + 5])!r})"
    assert ours.decode(ids) == text
    assert reference.decode(ids) == text


@pytest.mark.parametrize("text", EDGE_CASES)
def test_matches_transformers_on_edge_cases(ours, reference, text):
    assert ours.encode(text) == reference.encode(text, add_special_tokens=False)
    if "\x04" not in text:
        assert ours.decode(ours.encode(text)) == text


def test_smollm2_specifics(ours):
    assert isinstance(ours, TiktokenTokenizer)
    assert ours.vocab_size == 49152
    assert ours.bos_id == 1  # <|im_start|>
    assert ours.eos_ids == {0, 2}  # <|endoftext|> ends documents, <|im_end|> ends chat turns
    assert ours.encode("<|im_end|>") == [2]
    assert len(ours.encode("2024")) == 4  # digits are single tokens


def test_sentencepiece_backend(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    sentences = ["the quick brown fox jumps over the lazy dog", "a stitch in time saves nine",
                 "all that glitters is not gold", "the early bird catches the worm"] * 20
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=60, model_type="bpe", character_coverage=1.0,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, {2}, 60)
    text = "the lazy fox saves gold"
    ids = tok.encode(text)
    assert ids == spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).encode(text)
    assert tok.bos_id not in ids
    assert tok.decode(ids) == text


def test_tiktoken_backend(tmp_path):
    import base64
    merged = [b"he", b"ll", b"hell", b"hello", b" w", b"or"]
    ranks = [bytes([b]) for b in range(256)] + merged
    with open(tmp_path / "tokenizer.model", "w") as f:
        f.writelines(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(ranks))
    tok = load_tokenizer(str(tmp_path))
    assert isinstance(tok, TiktokenTokenizer)
    n = len(ranks)  # the Llama 3 special tokens follow the byte-level ones
    assert tok.vocab_size == n + 256
    assert tok.bos_id == n
    assert tok.eos_ids == {n + 1, n + 8, n + 9}  # end_of_text, eom, eot
    assert tok.encode("hello") == [259]
    assert tok.encode("hello world") == [259, 260, 261, ord("l"), ord("d")]
    assert tok.encode("<|begin_of_text|>hi<|eot_id|>") == [n, ord("h"), ord("i"), n + 9]
    assert tok.decode(tok.encode("hello world, 12345")) == "hello world, 12345"


def test_no_tokenizer(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path))
