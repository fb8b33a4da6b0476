"""ResSVD's configuration: a frozen, versioned dataclass that round-trips to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgepack.runtime.errors import UsageError

METHODS = ("svd", "svd-llm", "ressvd")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   # the same projections in other families: Phi-3; GPT-NeoX / Falcon / BLOOM; OPT / Phi / GPT-J;
                   # GPT-2 (its Conv1D seen as nn.Linear: toolchain/conv1d.py)
                   "qkv_proj", "gate_up_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
                   "out_proj", "fc1", "fc2", "fc_in", "fc_out", "c_attn", "c_proj", "c_fc",
                   # LFM2: its MLP (w1 gate, w3 up, w2 down) and its convolution layers' input projection; MPT's q/k/v
                   "w1", "w2", "w3", "in_proj", "Wqkv")
# The factor tune's default length: on the default model at 20 % it takes perplexity 26.3 -> 21.9 (1.48x dense).
DEFAULT_TUNE_STEPS = 64
QUANT_MODES = ("auto", "none", "int4", "int8")
ALLOCATIONS = ("uniform", "spectrum")


@dataclass(frozen=True)
class ResSVDConfig:
    """How to compress.

    ratio: share of the decoder's target linear parameters to remove, over the whole model.
    method: ``svd`` (plain, data-free), ``svd-llm`` (whitened by calibration activations), or
        ``ressvd`` (whitened, plus a residual stage of ``residual_share`` of the rank).
    layers: ``"auto"`` compresses the last k = ⌈2·N·ratio⌉ layers with propagation (each loses about
        half), and searches k by the final hidden-state error without it; an int compresses that many
        last layers; ``"all"`` compresses every layer at the overall ratio.
    rank_map: explicit ``{module name: rank}``; overrides ``ratio`` and ``layers`` (the planner's way).
    """

    ratio: float = 0.2
    method: str = "ressvd"
    layers: str | int = "auto"
    residual_share: float = 0.05
    damping: float = 1e-4  # relative to the mean diagonal of X·Xᵀ, added only when Cholesky fails
    calib_windows: int = 64
    calib_length: int = 256
    targets: tuple[str, ...] = DEFAULT_TARGETS
    rank_map: dict[str, int] = field(default_factory=dict)
    # Correct each layer for the compression error upstream (sequential.py, correction.py), with a ridge
    # chosen on held-out windows. Unregularized it broke the planner's Pi Zero plan under int4
    # (perplexity 1.9e5 with int4-rounded weights, 27.8 in float32); with the ridge: 36.4 / 28.5.
    propagate: bool = True
    # Ridge of the propagation's least-squares map, relative to mean diag(X̂ᵀX̂): "auto" picks it per
    # group of layers on held-out calibration windows (correction.py), a number fixes it. 0.1 by default:
    # "auto" chose it for most groups of the default model, its held-out curves are flat around it, and
    # the search took ~35 s of a 3:09 compression (20 %, quiet; with 0.1: 2:25, perplexity 22.08 vs 21.90).
    ridge: float | str = 0.1
    # Knowledge-distillation steps on the factors after propagation (tune.py; 0 = none): AdamW at
    # ``tune_lr``, ``tune_batch`` calibration windows a step. None: DEFAULT_TUNE_STEPS with propagation, else 0.
    tune_steps: int | None = None
    tune_lr: float = 1e-4
    tune_batch: int = 4
    tune_bf16: bool = True  # the tune's matrix products in bfloat16 (tune.py: 38 % less CPU, same perplexity)
    # Tune the factors through the int4 / int8 rounding the package will apply to them (quant.py); "auto": the
    # package's factor width when ``build`` compresses inline (compression.compress_loaded), else "none".
    quant_aware: str = "auto"
    # One shared factor pair for the linears that read one input (q/k/v; gate/up: joint.py), rank r costing
    # r·(in + Σout): fewer ops in the exported graph. Needs propagation and the last-k rule (no rank_map).
    joint: bool = False
    # How a compressed layer's parameters are spread over its linear layers: "uniform" (each loses the same
    # share) or "spectrum" (allocation.py: by their whitened spectra, same parameters per layer).
    allocation: str = "uniform"
    version: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.rank_map and not 0.0 < self.ratio < 1.0:
            raise UsageError(f"--ratio must be between 0 and 1 (share of parameters removed), got {self.ratio}")
        if isinstance(self.layers, str) and self.layers not in ("auto", "all"):
            try:
                object.__setattr__(self, "layers", int(self.layers))
            except ValueError:
                raise UsageError(f"--layers must be 'auto', 'all' or a number, got {self.layers!r}") from None
        if isinstance(self.layers, int) and self.layers < 1:
            raise UsageError(f"--layers must be at least 1, got {self.layers}")
        if not 0.0 <= self.residual_share < 1.0:
            raise UsageError(f"residual_share must be in [0, 1), got {self.residual_share}")
        if self.ridge != "auto" and (isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float))
                                     or not self.ridge >= 0):
            raise UsageError(f"ridge must be 'auto' or a number >= 0, got {self.ridge!r}")
        if self.tune_steps is None:
            object.__setattr__(self, "tune_steps", DEFAULT_TUNE_STEPS if self.propagate and self.method != "svd" else 0)
        if isinstance(self.tune_steps, bool) or not isinstance(self.tune_steps, int) or self.tune_steps < 0:
            raise UsageError(f"--tune-steps must be a whole number >= 0, got {self.tune_steps!r}")
        if self.tune_steps and not (self.propagate and self.method != "svd"):
            raise UsageError("--tune-steps needs propagation (drop --no-propagate; not with --method svd)")
        if not isinstance(self.tune_bf16, bool):
            raise UsageError(f"tune_bf16 must be true or false, got {self.tune_bf16!r}")
        if not (isinstance(self.tune_lr, (int, float)) and 0 < self.tune_lr < 1) or self.tune_batch < 1:
            raise UsageError(f"tune_lr must be in (0, 1) and tune_batch >= 1, got {self.tune_lr}, {self.tune_batch}")
        if not isinstance(self.joint, bool):
            raise UsageError(f"joint must be true or false, got {self.joint!r}")
        if self.joint and (self.rank_map or not self.propagate or self.method == "svd"):
            raise UsageError("--joint needs propagation and a ratio (not --no-propagate, --method svd or a rank map)")
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "uniform" and (self.rank_map or self.joint or not self.propagate
                                             or self.method == "svd"):
            raise UsageError("--allocation spectrum needs propagation and a ratio (not --no-propagate, --method "
                             "svd, --joint or a rank map)")
        if self.quant_aware not in QUANT_MODES:
            raise UsageError(f"--quant-aware must be one of {', '.join(QUANT_MODES)}, got {self.quant_aware!r}")
        if self.quant_aware in ("int4", "int8") and not self.tune_steps:
            raise UsageError("--quant-aware trains the factors in the tune: it needs --tune-steps above 0")
        if self.calib_windows < 1 or self.calib_length < 2:
            raise UsageError("calibration needs at least 1 window of at least 2 tokens")
        object.__setattr__(self, "targets", tuple(self.targets))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResSVDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise UsageError(f"unknown ResSVD config field(s): {sorted(unknown)}")
        return cls(**data)
