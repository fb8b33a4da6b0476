"""The decode loop for edgepack's fused graph (``export/fused``): GroupQueryAttention with a KV cache
that is one preallocated buffer per layer and kind, shared by the graph's past input and present
output, so a step writes its new keys/values in place and nothing is reallocated per token.

The buffers hold the package's whole context from the start, in one anonymous memory map: its
pages are zero until written and only become resident when a position is first written, so a short
chat pays only for the positions it uses (a full 2048-position cache of the default model is 94 MB)
and a long one never reallocates or copies its cache. (Measured, #7: growing numpy buffers by doubling
peaked 13 MB higher on a 256-token prompt, the old and new buffers living side by side during the
copy.) ``initial_capacity`` set lower makes the buffers start smaller and double on demand.

While and after loading, the resident pages of the weights file are given back (runtime/pages.py):
prepacking reads all of it, but only the embedding table is read again, a few rows per token.

Same interface as ``decoder.Decoder``: ``new_cache()``, ``forward(tokens, cache, all_logits)``,
``kv_heads``, ``head_dim``, ``num_layers``.
"""

from __future__ import annotations

import mmap
import re
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from edgepack.runtime.decoder import KVCache, SessionSettings
from edgepack.runtime.delta import DeltaSlots
from edgepack.runtime.errors import PackageError, UsageError
from edgepack.runtime.pages import released_while

GRAPH_NAME = "fused"
CONTEXT_KEY = "edgepack.context_length"
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# LFM2's and Mamba's convolution states and Mamba's SSM states (export/fused/mamba.py)
_STATE = re.compile(r"^past_(conv|ssm)\.(\d+)$")
_REQUIRED = ("input_ids", "seqlens_k", "total_sequence_length")
LOGITS_KEEP = "logits_to_keep"  # optional input: logits of the last k positions only


@dataclass
class FusedKVCache(KVCache):
    """Cache buffers of the full context; ``length`` says how many positions are valid.

    ``binding`` is the IO binding of single-token steps, made once per cache: its inputs are numpy
    arrays updated in place, its outputs preallocated.
    """

    arrays: list[np.ndarray] | None = None  # the memory behind ``values`` (onnxruntime writes into it)
    binding: Any = None
    step: dict[str, np.ndarray] | None = None
    delta_version: int = -1  # the decoder's delta when ``binding`` was made (a switch rebuilds it)
    # convolution and SSM states (LFM2, Mamba), each bound as its layer's past and present: they hold the latest
    # positions only, or a summary of all of them
    states: list[np.ndarray] = field(default_factory=list)
    state_values: list[ort.OrtValue] = field(default_factory=list)
    room: int = 0  # the capacity of a cache without KV buffers (Mamba): the context

    @property
    def capacity(self) -> int:
        return self.arrays[0].shape[2] if self.arrays else self.room

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions: later ones are simply overwritten by the next steps. A convolution
        or SSM state cannot go back to an earlier position, so with one the cache starts over (``length`` becomes 0)."""
        if length >= self.length:
            return
        if self.states:
            for state in self.states:
                state[...] = 0.0
            length = 0
        self.length = length
        del self.tokens[length:]


class FusedDecoder:
    initial_capacity: int | None = None  # KV positions of new_cache() (None: the context); doubled on demand

    def __init__(self, model_path: Path, settings: SessionSettings | None = None) -> None:
        self.settings = settings or SessionSettings()
        data = Path(str(model_path) + ".data")
        try:
            with released_while(data) if data.is_file() else nullcontext():
                options = self.settings.to_ort(memory_pattern=False)
                self.session = ort.InferenceSession(str(model_path), options, providers=list(self.settings.providers))
        except Exception as e:  # onnxruntime raises its own untyped errors for bad graphs
            raise PackageError(f"onnxruntime cannot load {model_path}: {e}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        missing = [n for n in _REQUIRED if n not in inputs]
        if missing:
            raise PackageError(f"the model graph lacks inputs {missing}; not an edgepack fused graph")
        past = sorted((int(m.group(1)), m.group(2), n) for n in inputs if (m := _PAST.match(n)))
        self.past_names = [n for _, _, n in past]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        states = sorted((int(m.group(2)), m.group(1), n) for n in inputs if (m := _STATE.match(n)))
        self.state_names = [n for _, _, n in states]
        self.state_presents = [n.replace("past_", "present_", 1) for n in self.state_names]
        self.state_shapes = [tuple(int(d) for d in inputs[n].shape) for n in self.state_names]
        if not self.past_names and not self.state_names:
            raise PackageError("the fused graph has no past_key_values (or state) inputs")
        self.kv_heads = self.head_dim = 0  # a model of state-space layers only (Mamba) has no KV cache
        if self.past_names:
            shape = inputs[self.past_names[0]].shape
            if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise PackageError(f"the fused graph's KV cache needs fixed head counts and sizes, got {shape}")
            self.kv_heads, self.head_dim = int(shape[1]), int(shape[3])
        context = self.session.get_modelmeta().custom_metadata_map.get(CONTEXT_KEY)
        if context is None or not context.isdigit():
            raise PackageError(f"the fused graph does not record its context length ({CONTEXT_KEY})")
        self.context_length = int(context)
        self.num_layers = len(self.past_names) // 2
        outputs = {o.name: o for o in self.session.get_outputs()}
        if "logits" not in outputs:
            raise PackageError("the fused graph has no 'logits' output")
        self.vocab_size = int(outputs["logits"].shape[-1])
        self.keeps_logits = LOGITS_KEEP in inputs  # graphs built before it compute logits everywhere
        self.delta = DeltaSlots(self.session)

    def new_cache(self) -> FusedKVCache:
        cache = FusedKVCache(values=[])
        self._allocate(cache, min(self.initial_capacity or self.context_length, self.context_length))
        cache.states = [np.zeros(shape, np.float32) for shape in self.state_shapes]
        cache.state_values = [ort.OrtValue.ortvalue_from_numpy(a) for a in cache.states]  # shares their memory
        return cache

    def _allocate(self, cache: FusedKVCache, capacity: int) -> None:
        """(Re)allocate the buffers with room for ``capacity`` positions, keeping the valid prefix."""
        cache.room = capacity
        if not self.past_names:
            cache.arrays, cache.values = [], []
            return
        shape = (1, self.kv_heads, capacity, self.head_dim)
        size = int(np.prod(shape))
        # An anonymous map is zero-filled and backed only where written (np.zeros may reuse heap pages
        # and touch all of them); the arrays keep it alive.
        block = mmap.mmap(-1, size * 4 * len(self.past_names))
        arrays = [np.frombuffer(block, np.float32, size, i * size * 4).reshape(shape)
                  for i in range(len(self.past_names))]
        for new, old in zip(arrays, cache.arrays or []):
            new[:, :, :cache.length] = old[:, :, :cache.length]
        cache.arrays = arrays
        cache.values = [ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]  # shares the arrays' memory
        cache.binding = None  # the step binding points at the old buffers

    def forward(self, tokens: list[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``tokens`` after what ``cache`` holds; update the cache in place.

        Returns the logits of the last position (1-D), or of every new position (2-D).
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        if not isinstance(cache, FusedKVCache):
            raise UsageError("this cache was not made by this decoder's new_cache()")
        total = cache.length + n
        if total > self.context_length:
            raise UsageError(f"{total} positions exceed this package's context of {self.context_length}")
        if total > cache.capacity:
            self._allocate(cache, min(self.context_length, max(total, 2 * cache.capacity)))
        if n == 1:
            logits = self._step(tokens[0], cache, total)
        else:
            logits = self._prefill(tokens, cache, total, n if all_logits else 1)
        cache.length = total
        cache.tokens.extend(tokens)
        return logits if all_logits else logits[-1]

    def _bind_cache(self, binding: ort.IOBinding, cache: FusedKVCache) -> None:
        # The same buffer is past and present: GroupQueryAttention then appends in place.
        for past, present, value in zip(self.past_names, self.present_names, cache.values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        for past, present, value in zip(self.state_names, self.state_presents, cache.state_values):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def _prefill(self, tokens: list[int], cache: FusedKVCache, total: int, keep: int) -> np.ndarray:
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        binding.bind_cpu_input("seqlens_k", np.asarray([total - 1], dtype=np.int32))
        binding.bind_cpu_input("total_sequence_length", np.asarray(total, dtype=np.int32))
        if self.keeps_logits:
            binding.bind_cpu_input(LOGITS_KEEP, np.asarray([keep], dtype=np.int64))
        binding.bind_output("logits")  # first, so it is the first of get_outputs()
        self._bind_cache(binding, cache)
        self.delta.bind(binding)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[0]

    def _step(self, token: int, cache: FusedKVCache, total: int) -> np.ndarray:
        if cache.binding is None or cache.delta_version != self.delta.version:
            cache.step = {
                "input_ids": np.zeros((1, 1), np.int64),
                "seqlens_k": np.zeros((1,), np.int32),
                "total_sequence_length": np.zeros((), np.int32),
                "logits": np.zeros((1, 1, self.vocab_size), np.float32),
                LOGITS_KEEP: np.ones((1,), np.int64),
            }
            binding = self.session.io_binding()
            for name in _REQUIRED:  # OrtValues over the numpy arrays: updating the arrays updates the inputs
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(cache.step[name]))
            if self.keeps_logits:
                binding.bind_ortvalue_input(LOGITS_KEEP, ort.OrtValue.ortvalue_from_numpy(cache.step[LOGITS_KEEP]))
            self._bind_cache(binding, cache)
            self.delta.bind(binding)
            binding.bind_ortvalue_output("logits", ort.OrtValue.ortvalue_from_numpy(cache.step["logits"]))
            cache.binding, cache.delta_version = binding, self.delta.version
        step = cache.step
        step["input_ids"][0, 0] = token
        step["seqlens_k"][0] = total - 1
        step["total_sequence_length"][...] = total
        self.session.run_with_iobinding(cache.binding)
        return step["logits"][0].copy()


def decoder_class(graph: str | None) -> type:
    """The decoder for a package's ``plan.graph`` (absent: optimum's export)."""
    from edgepack.runtime.decoder import Decoder

    return FusedDecoder if graph == GRAPH_NAME else Decoder
