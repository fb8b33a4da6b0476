"""The runtime's user API: ``load`` a package, ``generate`` from it, or keep a chat ``Session``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from edgepack.runtime.decoder import KVCache, SessionSettings
from edgepack.runtime.delta import load_delta
from edgepack.runtime.delta_file import Delta
from edgepack.runtime.errors import PackageError, UsageError
from edgepack.runtime.fused_decoder import decoder_class
from edgepack.runtime.generation import GenerationResult, stream_tokens
from edgepack.runtime.package import Package, open_package
from edgepack.runtime.sampling import Sampler, SamplingConfig
from edgepack.runtime.tokenizer import Message, Tokenizer

Prompt = str | Sequence[Message]
# Prompt tokens fed per forward. A prefill's activations (and onnxruntime's arena, which grows to hold them)
# scale with it: #7, default int4 model, 256-token prompt, 2 threads: peak RSS 259 / 249 / 243 MB and time
# to first token 1.00 / 1.03 / 1.11x at chunks of 256 / 128 / 64 (interleaved, loaded machine).
DEFAULT_PREFILL_CHUNK = 64


class Model:
    """A loaded package: tokenizer, chat template and an onnxruntime decoder."""

    def __init__(self, package: Package, settings: SessionSettings | None = None) -> None:
        self.package = package
        gen = package.generation
        self.generation = gen
        # plan.graph: absent for optimum's export, "fused" for edgepack's own graph (export/fused).
        self.decoder = decoder_class(package.manifest.plan.get("graph"))(package.model_path, settings)
        # After the decoder: the load's peak (weights prepacked while their file pages are resident) is
        # over by now, so the tokenizer's ~29 MB and its libraries' imports do not stack on it (#7).
        self.tokenizer = Tokenizer(
            package.tokenizer_path, package.chat_template, gen.bos_token, gen.eos_token
        )
        # A device plan budgets memory for prompts fed this many tokens at a time.
        device_memory = (package.manifest.plan.get("device") or {}).get("memory") or {}
        self.prefill_chunk = int(device_memory.get("chunk") or DEFAULT_PREFILL_CHUNK)

    @property
    def delta(self) -> Delta | None:
        """The fine-tune delta applied now (None: the base model)."""
        slots = getattr(self.decoder, "delta", None)
        return slots.current if slots is not None else None

    @property
    def delta_version(self) -> int:
        slots = getattr(self.decoder, "delta", None)
        return slots.version if slots is not None else 0

    def apply_delta(self, delta: str | Path | Delta | None) -> None:
        """Apply a fine-tune delta file (or remove it with None) without reloading the base model.
        KV caches made before the switch are stale: ``Session`` notices and starts a fresh one."""
        slots = getattr(self.decoder, "delta", None)
        if slots is None or not slots.available:
            if delta is None:
                return
            raise PackageError(f"package {self.package.path} has no delta slots; rebuild it with "
                               "`edgepack build ... --delta-slots` to apply deltas")
        slots.set(None if delta is None else load_delta(delta, self.package.manifest.model.get("weights_fingerprint")))

    def encode_prompt(self, prompt: Prompt, chat: bool | None = None) -> list[int]:
        """Token ids for a prompt: messages always go through the chat template; a plain string
        does too when the package has one (unless ``chat=False``), as a single user message."""
        if not isinstance(prompt, str):
            return self.tokenizer.encode_chat(prompt)
        use_chat = self.tokenizer.has_chat_template if chat is None else chat
        if use_chat:
            return self.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        return self.tokenizer.encode(prompt)

    def stream(
        self,
        prompt: Prompt,
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        chat: bool | None = None,
        cache: KVCache | None = None,
        result: GenerationResult | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[str]:
        """Yield the answer's text piece by piece as it is generated."""
        ids = self.encode_prompt(prompt, chat)
        return self.stream_ids(ids, max_new_tokens=max_new_tokens, sampling=sampling, stop=stop, cache=cache,
                               result=result, ignore_eos=ignore_eos)

    def stream_ids(
        self,
        ids: Sequence[int],
        *,
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        stop: Sequence[str] = (),
        cache: KVCache | None = None,
        result: GenerationResult | None = None,
        ignore_eos: bool = False,
    ) -> Iterator[str]:
        """As ``stream`` from token ids; ``ignore_eos`` runs to ``max_new_tokens`` (for benchmarks)."""
        return stream_tokens(
            self.decoder,
            self.tokenizer,
            cache if cache is not None else self.decoder.new_cache(),
            ids,
            Sampler(sampling or SamplingConfig()),
            max_new_tokens=max_new_tokens,
            context_length=self.generation.context_length,
            stop_token_ids=() if ignore_eos else self.generation.eos_token_ids,
            stop_strings=stop,
            result=result,
            prefill_chunk=self.prefill_chunk,
        )

    def generate(self, prompt: Prompt, **kwargs) -> GenerationResult:
        """Generate a whole answer; keyword arguments as for ``stream``."""
        result = GenerationResult()
        for _ in self.stream(prompt, result=result, **kwargs):
            pass
        return result

    def session(self, system: str | None = None) -> Session:
        return Session(self, system)


class Session:
    """A multi-turn chat whose KV cache survives between turns: each turn feeds only new tokens."""

    def __init__(self, model: Model, system: str | None = None) -> None:
        self.model = model
        self.messages: list[Message] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.cache = model.decoder.new_cache()
        self.delta_version = model.delta_version
        self.last: GenerationResult | None = None

    def send(self, content: str, *, max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer; the answer joins the history.

        When the history and the answer's budget no longer fit the context, the oldest turns are
        dropped (the system message stays) and the cache keeps only what still matches.
        """
        self.messages.append({"role": "user", "content": content})
        result = GenerationResult()
        self.last = result
        if self.delta_version != self.model.delta_version:  # the cache holds keys of the old delta
            self.cache, self.delta_version = self.model.decoder.new_cache(), self.model.delta_version
        try:
            ids = self._fit_history(max_new_tokens)
            yield from self.model.stream_ids(ids, max_new_tokens=max_new_tokens, cache=self.cache, result=result,
                                             **kwargs)
        except BaseException:
            self.messages.pop()
            raise
        self.messages.append({"role": "assistant", "content": result.text})

    def _fit_history(self, max_new_tokens: int) -> list[int]:
        budget = self.model.generation.context_length - max_new_tokens
        ids = self.model.tokenizer.encode_chat(self.messages)
        first = 1 if self.messages[0]["role"] == "system" else 0
        while len(ids) > budget and len(self.messages) - first > 1:
            del self.messages[first]  # the oldest turn goes first
            ids = self.model.tokenizer.encode_chat(self.messages)
        if len(ids) > budget:
            raise UsageError(f"this message is {len(ids)} tokens with the history that must stay; the context "
                             f"is {self.model.generation.context_length} with {max_new_tokens} kept for the answer")
        return ids

    def ask(self, content: str, **kwargs) -> str:
        return "".join(self.send(content, **kwargs))

    def reset(self) -> None:
        system = [m for m in self.messages[:1] if m["role"] == "system"]
        self.messages = system
        self.cache = self.model.decoder.new_cache()


def load(package: Path | str, *, verify: bool = True, settings: SessionSettings | None = None,
         delta: str | Path | Delta | None = None, check_memory: bool = True) -> Model:
    """Open, verify and load a package for generation, with a fine-tune ``delta`` file applied.

    With ``check_memory``, a package whose predicted peak memory exceeds what is available is refused
    (``ResourceError``, with the figures) before onnxruntime allocates anything."""
    opened = open_package(package, verify=verify)
    if check_memory:
        from edgepack.runtime.resources import check_memory as fits

        fits(opened)
    model = Model(opened, settings)
    model.apply_delta(delta)
    return model


def generate(model: Model, prompt: Prompt, **kwargs) -> GenerationResult:
    """Module-level verb mirroring ``Model.generate``."""
    return model.generate(prompt, **kwargs)


def apply_delta(model: Model, delta: str | Path | Delta | None) -> None:
    """Module-level verb mirroring ``Model.apply_delta``."""
    model.apply_delta(delta)
