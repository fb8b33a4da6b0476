"""An onnxruntime decoder with a KV cache: feed tokens, get next-token logits.

The graph contract is the one of Hugging Face style exports (optimum's ``text-generation-with-past``):
inputs ``input_ids``, optionally ``attention_mask`` and ``position_ids``, and per layer
``past_key_values.N.key`` / ``.value`` shaped [batch, kv_heads, past_len, head_dim]; outputs
``logits`` and ``present.N.key`` / ``.value``. The cache is kept as onnxruntime values bound with
IO binding, so it goes from one step's outputs to the next step's inputs without a numpy copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from edgepack.runtime.delta import DeltaSlots
from edgepack.runtime.errors import PackageError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class SessionSettings:
    """onnxruntime session options exposed to users; ``threads=0`` lets onnxruntime choose."""

    threads: int = 0
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    optimization: str = "all"  # disable | basic | extended | all
    cpu_arena: bool = True  # False: no CPU memory arena (measured here: slower, and a higher peak on long prompts)
    # None: the decoder's choice. The fused graph runs without pre-planned activation buffers: with them a
    # second prompt of a length allocates its planned block beside the first one's arena chunks (#7: peak
    # RSS 269 -> 257 MB over three 256-token prompts, default int4 model; CPU time per token unchanged).
    memory_pattern: bool | None = None
    prepacking: bool = True  # False: no re-laid-out weight copies at load (int4 decode becomes ~15x slower)

    def to_ort(self, memory_pattern: bool = True) -> ort.SessionOptions:
        """onnxruntime's options; ``memory_pattern`` is the decoder's default when the field is None."""
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        opts = ort.SessionOptions()
        opts.graph_optimization_level = levels[self.optimization]
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        opts.enable_cpu_mem_arena = self.cpu_arena
        opts.enable_mem_pattern = memory_pattern if self.memory_pattern is None else self.memory_pattern
        if not self.prepacking:
            opts.add_session_config_entry("session.disable_prepacking", "1")
        return opts


@dataclass
class KVCache:
    """The decoder state of one conversation: cached keys/values and how many positions they hold."""

    values: list[ort.OrtValue]
    length: int = 0
    tokens: list[int] = field(default_factory=list)

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` positions (for reusing a shared prefix)."""
        if length >= self.length:
            return
        self.values = [
            ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v.numpy()[:, :, :length]))
            for v in self.values
        ]
        self.length = length
        del self.tokens[length:]


class Decoder:
    def __init__(self, model_path: Path, settings: SessionSettings | None = None) -> None:
        self.settings = settings or SessionSettings()
        try:
            self.session = ort.InferenceSession(
                str(model_path), self.settings.to_ort(), providers=list(self.settings.providers)
            )
        except Exception as e:  # onnxruntime raises its own untyped errors for bad graphs
            raise PackageError(f"onnxruntime cannot load {model_path}: {e}") from None
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "input_ids" not in inputs:
            raise PackageError("the model graph has no 'input_ids' input; not a causal LM export")
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        past = sorted(
            (int(m.group(1)), m.group(2), name) for name in inputs if (m := _PAST.match(name))
        )
        if not past:
            raise PackageError("the model graph has no past_key_values inputs; it was exported without a KV cache")
        self.past_names = [name for _, _, name in past]
        self.present_names = [n.replace("past_key_values", "present") for n in self.past_names]
        outputs = {o.name for o in self.session.get_outputs()}
        missing = [n for n in ["logits", *self.present_names] if n not in outputs]
        if missing:
            raise PackageError(f"the model graph lacks outputs {missing[:3]}; not a supported export")
        first = inputs[self.past_names[0]]
        self._cache_dtype = _NP_TYPES.get(first.type)
        if self._cache_dtype is None:
            raise PackageError(f"unsupported KV cache type {first.type}")
        self.kv_heads, self.head_dim = (int(d) for d in first.shape[1:4:2])
        self.num_layers = len(self.past_names) // 2
        self.delta = DeltaSlots(self.session)  # side branches a --delta-slots build added (none: no inputs)

    def new_cache(self) -> KVCache:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), dtype=self._cache_dtype)
        return KVCache(values=[ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names])

    def forward(self, tokens: list[int], cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Run ``tokens`` after what ``cache`` holds; update the cache in place.

        Returns the logits of the last position (1-D), or of every new position (2-D).
        """
        n = len(tokens)
        if n == 0:
            raise ValueError("forward() needs at least one token")
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", np.asarray([tokens], dtype=np.int64))
        if self._has_mask:
            binding.bind_cpu_input("attention_mask", np.ones((1, cache.length + n), dtype=np.int64))
        if self._has_positions:
            positions = np.arange(cache.length, cache.length + n, dtype=np.int64)[None, :]
            binding.bind_cpu_input("position_ids", positions)
        for name, value in zip(self.past_names, cache.values):
            binding.bind_ortvalue_input(name, value)
        self.delta.bind(binding)
        binding.bind_output("logits")
        for name in self.present_names:
            binding.bind_output(name)
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        cache.values = list(outputs[1:])
        cache.length += n
        cache.tokens.extend(tokens)
        logits = outputs[0].numpy()[0]
        return logits if all_logits else logits[-1]
