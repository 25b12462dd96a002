# One tokenizer interface over the three vocabularies the supported checkpoints ship:
#   sentencepiece `tokenizer.model` (Llama 2, Mistral), tiktoken `tokenizer.model` (Llama 3.x),
#   bpe_tokenizer.json (byte-level BPE taken out of a GGUF by scripts/convert_gguf.py).
# encode() never adds BOS: whether a prompt starts with one is the caller's decision.
# A checkpoint may also carry a chat template (chat_template.json, from the GGUF; or the
# chat_template key of a Hugging Face tokenizer_config.json), rendered by apply_chat_template().
import base64
import json
import os
from datetime import datetime
from typing import Iterable, Optional

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Llama 3.1 names; 3.0 calls a few of the reserved slots differently, but the ids that matter
# (begin/end of text, headers, eom, eot) are the same in both.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
LLAMA3_N_SPECIAL = 256


class Tokenizer:
    bos_id: Optional[int]
    add_bos = True  # whether prompts start with bos_id (SmolLM2's GGUF says no)
    eos_ids: set
    vocab_size: int
    chat_template: Optional[str] = None  # Jinja source, set by load_tokenizer when the checkpoint has one
    template_tokens: dict = {}  # bos_token, eos_token... as strings: templates write them into the text

    def encode(self, text: str) -> list:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role": "system" | "user" | "assistant", "content": str}, ...]) into
        the prompt text the model was tuned on; encode() then turns its special-token strings into ids.
        add_generation_prompt: end with the opening of an assistant turn, for the model to complete."""
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (no chat_template.json, and no chat_template "
                             "in tokenizer_config.json); prompt it with plain text instead")
        # plain copies: the template sees data, never the caller's objects
        plain = [{str(k): v for k, v in m.items()} for m in messages]
        return compile_chat_template(self.chat_template).render(  # compiling takes a millisecond: no cache
            messages=plain, add_generation_prompt=add_generation_prompt, **self.template_tokens)


def compile_chat_template(source: str):
    """Chat templates come with downloaded checkpoints, so they are untrusted code: render them in
    Jinja's immutable sandbox, with the settings and helpers transformers gives them (templates are
    written against transformers, and must render the same text here)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class SentencePieceTokenizer(Tokenizer):
    def __init__(self, path: str):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor(model_file=path)
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
        self.eos_ids = {self.sp.eos_id()} if self.sp.eos_id() >= 0 else set()
        self.vocab_size = self.sp.vocab_size()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids])


class TiktokenTokenizer(Tokenizer):
    """Byte-level BPE with tiktoken's merge rule: the adjacent pair whose merged bytes have the lowest
    rank goes first, and ranks are token ids. Special-token strings in the text are encoded as the
    special tokens (chat templates are written that way)."""

    def __init__(self, name, pattern, ranks: dict, special: dict, bos_id, eos_ids, vocab_size):
        import tiktoken
        self.vocab_size = vocab_size
        # tiktoken needs every single byte in its table; some vocabularies lack a few (SmolLM2 has no
        # token for 0x04 or for bytes that never occur in UTF-8). Such a byte gets a stand-in id past
        # the vocabulary, which no merge can reach, and is dropped after encoding, as transformers
        # drops bytes it has no token for.
        ranks = dict(ranks)
        spare = max([*ranks.values(), *special.values()]) + 1
        for b in range(256):
            if bytes([b]) not in ranks:
                ranks[bytes([b])] = spare
                spare += 1
        self.enc = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.bos_id, self.eos_ids = bos_id, set(eos_ids)

    def encode(self, text):
        ids = self.enc.encode(text, allowed_special="all")
        return [i for i in ids if i < self.vocab_size]

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])


def load_byte_bpe(path: str) -> TiktokenTokenizer:
    with open(path) as f:
        spec = json.load(f)
    ranks = {base64.b64decode(k): v for k, v in spec["ranks"].items()}
    tok = TiktokenTokenizer(os.path.basename(os.path.dirname(os.path.abspath(path))), spec["pattern"], ranks,
                            spec["special_tokens"], spec["bos_id"], spec["eos_ids"], spec["vocab_size"])
    tok.add_bos = spec.get("add_bos", False)
    return tok


def load_llama3(path: str) -> TiktokenTokenizer:
    from tiktoken.load import load_tiktoken_bpe
    ranks = load_tiktoken_bpe(path)
    n = len(ranks)
    names = LLAMA3_SPECIAL + [f"<|reserved_special_token_{i}|>" for i in range(2, LLAMA3_N_SPECIAL - len(LLAMA3_SPECIAL) + 2)]
    special = {s: n + i for i, s in enumerate(names)}
    eos = {special[s] for s in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")}
    return TiktokenTokenizer("llama3", LLAMA3_SPLIT, ranks, special, special["<|begin_of_text|>"], eos, n + len(names))


def is_tiktoken_file(path: str) -> bool:
    """A tiktoken rank file is text lines "<base64 bytes> <rank>"; a sentencepiece model is protobuf."""
    with open(path, "rb") as f:
        parts = f.readline().split()
    if len(parts) != 2 or not parts[1].isdigit():
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except ValueError:
        return False
    return True


def read_chat_template(checkpoint_dir: str):
    """(template, {"bos_token": ..., "eos_token": ...}) from chat_template.json (written by
    scripts/convert_gguf.py) or from a Hugging Face tokenizer_config.json; (None, {}) if neither has one."""
    ours = os.path.join(checkpoint_dir, "chat_template.json")
    hf = os.path.join(checkpoint_dir, "tokenizer_config.json")
    for path in (ours, hf):
        if not os.path.exists(path):
            continue
        with open(path) as f:
            spec = json.load(f)
        template = spec.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one is for chat
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if not isinstance(template, str):
            continue
        tokens = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = spec.get(name)
            value = value.get("content") if isinstance(value, dict) else value  # HF may store an AddedToken dict
            if isinstance(value, str):
                tokens[name] = value
        return template, tokens
    return None, {}


def load_tokenizer(checkpoint_dir: str) -> Tokenizer:
    bpe = os.path.join(checkpoint_dir, "bpe_tokenizer.json")
    model = os.path.join(checkpoint_dir, "tokenizer.model")
    if os.path.exists(bpe):
        tok = load_byte_bpe(bpe)
    elif os.path.exists(model):
        tok = load_llama3(model) if is_tiktoken_file(model) else SentencePieceTokenizer(model)
    else:
        raise FileNotFoundError(f"{checkpoint_dir}: no tokenizer (expected bpe_tokenizer.json or tokenizer.model)")
    tok.chat_template, tok.template_tokens = read_chat_template(checkpoint_dir)
    return tok
