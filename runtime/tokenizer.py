"""Tokenizing, chat templates and streaming detokenization, on `tokenizers` and jinja2 alone.

Both are imported when a tokenizer is made, not with this module: ``Model`` makes its tokenizer after
onnxruntime has loaded the weights and given their pages back, so neither library (jinja2 ~6 MB,
tokenizers ~5 MB of RSS) stacks on the load's transient peak (#7).
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Sequence
from pathlib import Path

from edgepack.runtime.errors import PackageError, UsageError
from edgepack.runtime.pages import trim_heap

Message = dict[str, str]

_MERGES = re.compile(r'"merges"\s*:\s*\[(?=\s*\[)')
_PART = r'"((?:[^"\\ ]|\\[^u]|\\u(?!0020)[0-9a-fA-F]{4})*)"'  # a JSON string holding no space
_PAIR = re.compile(r"\s*\[\s*" + _PART + r"\s*,\s*" + _PART + r"\s*\]\s*(,?)\s*")


def compact_merges(text: str) -> str:
    """A BPE tokenizer.json with its merges as "a b" strings (the format ``tokenizers`` also reads)
    instead of ["a", "b"] pairs: the same tokenizer, but parsing it needs ~15 MB less transient memory
    for the default model's 48,900 merges (#7: 42 -> 27 MB; +0.1 s). Unchanged when any merge part
    holds a space (the string form could not say where it splits) or the merges are not pairs."""
    found = _MERGES.search(text)
    if not found:
        return text
    pos, parts = found.end(), []
    while True:
        pair = _PAIR.match(text, pos)
        if pair is None:
            return text
        parts.append(f'"{pair[1]} {pair[2]}"')
        pos = pair.end()
        if not pair[3]:
            break
    if not text.startswith("]", pos):
        return text
    return text[:found.end()] + ",".join(parts) + text[pos:]


def _raise_exception(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


def compile_chat_template(source: str):
    """Compile a Hugging Face style chat template in a sandbox (templates come with packages,
    so they must not reach Python internals). The environment mirrors what transformers offers
    templates: trimmed blocks, loop controls, ``raise_exception`` and ``strftime_now``."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise PackageError(f"the package's chat template does not compile: {e}") from None


class Tokenizer:
    """A ``tokenizers`` tokenizer plus the package's chat template and special tokens."""

    def __init__(
        self,
        path: Path,
        chat_template: str | None = None,
        bos_token: str | None = None,
        eos_token: str | None = None,
    ) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(compact_merges(Path(path).read_text(encoding="utf-8")))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files; OSError, bad UTF-8
            raise PackageError(f"cannot read tokenizer {path}: {e}") from None
        trim_heap()  # the JSON parse's ~25 MB of freed buffers would otherwise stay in the process's heap
        self._template = compile_chat_template(chat_template) if chat_template else None
        self.bos_token = bos_token
        self.eos_token = eos_token

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        if self._template is None:
            raise UsageError("this package has no chat template; pass raw text instead of messages")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise UsageError(f"a chat message needs 'role' and 'content', got {m!r}")
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TemplateError as e:
            raise UsageError(f"the chat template refused these messages: {e}") from None

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        # The rendered template already holds every special token it wants, as transformers assumes.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_special_tokens=False)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns tokens into text as they come, holding back bytes that do not yet form a character.

    Decoding a window that starts a few tokens back (rather than each token alone) keeps the
    spaces and merges that depend on the previous token right.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :]
