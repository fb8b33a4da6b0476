"""The decode loop: prefill once, then one token per step, streaming text and honouring stops."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from edgepack.runtime.decoder import Decoder, KVCache
from edgepack.runtime.errors import UsageError
from edgepack.runtime.sampling import Sampler
from edgepack.runtime.tokenizer import Tokenizer


@dataclass
class GenerationResult:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish_reason: str = ""  # "stop" (stop token or string), "length" (max tokens), "context"
    prompt_tokens: int = 0
    first_token_s: float = 0.0  # prefill plus the first sampled token
    decode_s: float = 0.0  # every later token

    @property
    def tokens_per_s(self) -> float:
        later = len(self.tokens) - 1
        return later / self.decode_s if later > 0 and self.decode_s > 0 else 0.0


def reuse_prefix(cache: KVCache, prompt: Sequence[int]) -> list[int]:
    """Drop the part of ``cache`` that disagrees with ``prompt``; return the tokens still to feed.

    At least one token is always left to feed, since its logits are what we sample from.
    """
    common = 0
    for a, b in zip(cache.tokens, prompt):
        if a != b:
            break
        common += 1
    common = min(common, len(prompt) - 1)
    cache.truncate(common)
    return list(prompt[cache.length:])  # a cache that cannot go back (a convolution state) starts over


class _StopText:
    """Finds stop strings in streamed text, holding back a tail that might begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        self.pending += piece
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def stream_tokens(
    decoder: Decoder,
    tokenizer: Tokenizer,
    cache: KVCache,
    prompt: Sequence[int],
    sampler: Sampler,
    *,
    max_new_tokens: int,
    context_length: int,
    stop_token_ids: Sequence[int] = (),
    stop_strings: Sequence[str] = (),
    result: GenerationResult | None = None,
    on_token: Callable[[int], None] | None = None,
    prefill_chunk: int = 256,
) -> Iterator[str]:
    """Yield text pieces as they are generated; fill ``result`` with tokens, reason and timings.

    ``cache`` may already hold a prefix of ``prompt`` (from an earlier turn): only the rest is fed.
    """
    result = result if result is not None else GenerationResult()
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt:
        raise UsageError("the prompt is empty after tokenization")
    if len(prompt) >= context_length:
        raise UsageError(
            f"the prompt is {len(prompt)} tokens; this package's context is {context_length} tokens"
        )
    result.prompt_tokens = len(prompt)
    stops = set(stop_token_ids)
    detok = tokenizer.stream_decoder()
    stop_text = _StopText(stop_strings)
    start = time.perf_counter()
    rest = reuse_prefix(cache, prompt)
    # A long prompt goes in chunks: the logits and attention buffers of one forward grow with the
    # tokens fed at once, and device plans budget for at most ``prefill_chunk`` of them.
    for i in range(0, len(rest), prefill_chunk):
        logits = decoder.forward(rest[i:i + prefill_chunk], cache)
    first_at = 0.0
    hit_stop_string = False
    while True:
        token = sampler(logits)
        if not result.tokens:
            first_at = time.perf_counter()
            result.first_token_s = first_at - start
        if token in stops:
            result.finish_reason = "stop"
            break
        result.tokens.append(token)
        if on_token:
            on_token(token)
        piece, stopped = stop_text.feed(detok.push(token))
        if piece:
            result.text += piece
            yield piece
        if stopped:
            result.finish_reason = "stop"
            hit_stop_string = True
            break
        if len(result.tokens) >= max_new_tokens:
            result.finish_reason = "length"
            break
        if cache.length + 1 >= context_length:
            result.finish_reason = "context"
            break
        logits = decoder.forward([token], cache)
    if not hit_stop_string:
        tail, _ = stop_text.feed(detok.flush())
        tail += stop_text.flush()
        if tail:
            result.text += tail
            yield tail
    result.decode_s = time.perf_counter() - first_at if first_at else 0.0
