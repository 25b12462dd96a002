# One tokenizer interface over the three vocabularies the supported checkpoints ship:
#   sentencepiece `tokenizer.model` (Llama 2, Mistral), tiktoken `tokenizer.model` (Llama 3.x),
#   bpe_tokenizer.json (byte-level BPE taken out of a GGUF by scripts/convert_gguf.py).
# encode() never adds BOS: whether a prompt starts with one is the caller's decision.
# A checkpoint may also carry a chat template (chat_template.json, from the GGUF; or the
# chat_template key of a Hugging Face tokenizer_config.json), rendered by apply_chat_template().
import base64
import json
import os
import re
import sys
import time
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
# A chat template renders in about a millisecond. Its loops, and the strings and numbers its operators
# build, are bounded so that a hostile one ends with an error instead of running forever.
TEMPLATE_SECONDS = 2.0
TEMPLATE_CHARS = 1 << 20  # longest text a template may render, and longest string or list * may build
TEMPLATE_POWER_BITS = 1 << 12  # largest integer ** may build


class Tokenizer:
    bos_id: Optional[int]
    add_bos = True  # whether prompts start with bos_id (SmolLM2's GGUF says no)
    eos_ids: set
    vocab_size: int
    chat_template: Optional[str] = None  # Jinja source, set by load_tokenizer when the checkpoint has one
    chat_template_error: Optional[str] = None  # why the checkpoint's template could not be read: told at use
    template_tokens: dict = {}  # bos_token, eos_token... as strings: templates write them into the text

    def encode(self, text: str) -> list:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def encode_ordinary(self, text: str) -> list:
        """Text as text: special-token strings in it are encoded like any other characters."""
        return self.encode(text)

    def special_strings(self) -> dict:
        """Special-token string -> id, for the strings encode() turns into special tokens."""
        return {}

    def apply_chat_template(self, messages: list, add_generation_prompt: bool = True) -> str:
        """Render a conversation ([{"role": "system" | "user" | "assistant", "content": str}, ...]) into
        the prompt text the model was tuned on. add_generation_prompt: end with the opening of an
        assistant turn, for the model to complete. ValueError (one line) for a template that fails."""
        return self.render_chat(messages, add_generation_prompt)[0]

    def render_chat(self, messages, add_generation_prompt, mark_content=False):
        """-> (text, [(start, end) of each message's content in text]); the spans only with mark_content."""
        if self.chat_template_error:
            raise ValueError(self.chat_template_error)
        if not self.chat_template:
            raise ValueError("this checkpoint has no chat template (no chat_template.json, and no chat_template "
                             "in tokenizer_config.json); prompt it with plain text instead")
        # plain copies: the template sees data, never the caller's objects. With mark_content each
        # content is first a marker (private-use characters no template changes), so that where the
        # template put it is known; then the markers are replaced by the contents.
        plain = [{str(k): v for k, v in m.items()} for m in messages]
        marker = lambda i: f"\ue000{i}\ue001"  # noqa: E731
        contents = [m.get("content") for m in plain]
        if mark_content:
            for i, m in enumerate(plain):
                if isinstance(m.get("content"), str):
                    m["content"] = marker(i)
        text = render_bounded(compile_chat_template(self.chat_template),  # compiling takes a millisecond: no cache
                              dict(messages=plain, add_generation_prompt=add_generation_prompt, **self.template_tokens))
        if not mark_content:
            return text, []
        out, spans, placed, at = [], [], set(), 0
        for match in re.finditer("\ue000(\\d+)\ue001", text):
            i = int(match.group(1))
            out.append(text[at:match.start()])
            start = sum(map(len, out))
            out.append(contents[i])
            spans.append((start, start + len(contents[i])))
            placed.add(i)
            at = match.end()
        out.append(text[at:])
        if any(isinstance(c, str) for i, c in enumerate(contents) if i not in placed):
            # the template transformed a content (or dropped it): render the contents themselves, which
            # keeps them apart from the template's special tokens only if they add none
            plain_text = self.render_chat(messages, add_generation_prompt)[0]
            if [m.group() for m in self.find_special(plain_text)] != [m.group() for m in self.find_special(text)]:
                raise ValueError("this chat template transforms message contents, and with this conversation's "
                                 "they make special tokens, which cannot be kept as text")
            return plain_text, []
        return "".join(out), spans

    def find_special(self, text: str) -> list:
        """The special-token strings in text, in order, longest first where they overlap."""
        special = self.special_strings()
        if not special:
            return []
        return list(re.finditer("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)), text))

    def encode_chat(self, messages: list, add_generation_prompt: bool = True) -> list:
        """The conversation's prompt ids. Special-token strings the template writes become special
        tokens; inside a message's content they stay text (as transformers' split_special_tokens
        does), so a user cannot forge a system or assistant turn by typing its control tokens."""
        text, spans = self.render_chat(messages, add_generation_prompt, mark_content=True)
        special = self.special_strings()
        if not special:
            return self.encode(text)
        ids, at = [], 0
        for match in self.find_special(text):
            if any(a < match.end() and match.start() < b for a, b in spans):
                continue  # written by the user: text
            ids += self.encode_ordinary(text[at:match.start()]) + [special[match.group()]]
            at = match.end()
        return ids + self.encode_ordinary(text[at:])


def render_bounded(template, context: dict) -> str:
    """template.render(context) within TEMPLATE_SECONDS and TEMPLATE_CHARS. The clock is checked on
    every line the template's compiled code runs (a trace function for this thread only, removed
    after), so a loop that runs forever is stopped; the operators that could build something huge in
    one step are bounded by the environment (compile_chat_template)."""
    from jinja2.exceptions import TemplateError
    deadline = time.monotonic() + TEMPLATE_SECONDS

    def check(frame, event, arg):
        if time.monotonic() > deadline:
            raise TemplateError(f"the chat template ran longer than {TEMPLATE_SECONDS:g} s (a loop without end?)")
        return check if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(check)
    try:
        parts, size = [], 0
        for part in template.generate(**context):
            size += len(part)
            if size > TEMPLATE_CHARS:
                raise TemplateError(f"the chat template rendered more than {TEMPLATE_CHARS} characters")
            parts.append(part)
        return "".join(parts)
    except TemplateError as e:
        raise ValueError(f"chat template: {one_line(e)}") from None
    except (RecursionError, MemoryError, OverflowError, ArithmeticError, TypeError, ValueError, LookupError,
            AttributeError) as e:  # the template is the checkpoint's code: whatever it raises is one line
        raise ValueError(f"chat template: {one_line(e)}") from None
    finally:
        sys.settrace(previous)


def one_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type's name if it has none."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def compile_chat_template(source: str):
    """Chat templates come with downloaded checkpoints, so they are untrusted code: render them in
    Jinja's immutable sandbox, with the settings and helpers transformers gives them (templates are
    written against transformers, and must render the same text here), and with * and ** bounded."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > TEMPLATE_CHARS:
                        raise TemplateError(f"the chat template builds a sequence longer than {TEMPLATE_CHARS}")
            elif isinstance(left, int) and isinstance(right, int) and right > 0 and \
                    abs(left).bit_length() * right > TEMPLATE_POWER_BITS:
                raise TemplateError(f"the chat template builds an integer over {TEMPLATE_POWER_BITS} bits")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Jinja's own tojson escapes HTML characters (<, >, &, '), which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise ValueError(f"chat template: {one_line(e)}") from None


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
        self.special = dict(special)
        self.spelled = {i for i in [*ranks.values(), *special.values()] if i < vocab_size}
        self.bos_id, self.eos_ids = bos_id, set(eos_ids)

    def encode(self, text):
        ids = self.enc.encode(text, allowed_special="all")
        return [i for i in ids if i < self.vocab_size]

    def encode_ordinary(self, text):
        return [i for i in self.enc.encode_ordinary(text) if i < self.vocab_size]

    def special_strings(self):
        return self.special

    def decode(self, ids):
        # a model's vocabulary may have rows no token spells (padding to a round size): they are no text
        return self.enc.decode([int(i) for i in ids if int(i) in self.spelled])


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
        try:
            with open(path, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not readable JSON ({one_line(e)})") from None
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: expected a JSON object, found {type(spec).__name__}")
        template = spec.get("chat_template")
        if isinstance(template, list):  # several named templates: the default one is for chat
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
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
    try:
        tok.chat_template, tok.template_tokens = read_chat_template(checkpoint_dir)
    except ValueError as e:  # only chat needs the template: plain prompts still run
        tok.chat_template_error = str(e)
    return tok
