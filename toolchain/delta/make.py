"""``edgepack delta``: a base and a fine-tuned model in, a compressed delta out.

Flow: load both models → ΔW per linear layer (extract.py) → factor each at rank r (TruncSVD) or
r + c (MagTruncSVD, OSD) → keep entries within TruncSVD-at-r's bits (factorize.py), OSD scoring
them by Taylor importance from validation text (importance.py) → a ``Delta`` (runtime/delta_file.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from edgepack.runtime.delta_file import Delta, LayerDelta
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import budget, extract, factorize, importance
from tqdm import tqdm

METHODS = ("osd", "truncsvd", "magtruncsvd")


@dataclass(frozen=True)
class DeltaConfig:
    """``rank`` r sets the budget (TruncSVD at r); ``relax`` c the factor rank r + c of the sparse
    methods (default c = r). ``valid``: text for OSD's importance; None means the data-free fallback."""

    method: str = "osd"
    rank: int = 1
    relax: int | None = None
    valid: str | None = None
    windows: int = 8
    window_tokens: int = 256

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UsageError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.relax is not None and self.relax < 0:
            raise UsageError(f"--relax must be 0 or more, got {self.relax}")
        if self.windows < 1 or self.window_tokens < 2:
            raise UsageError("validation needs at least one window of at least 2 tokens")

    @property
    def factor_rank(self) -> int:
        if self.method == "truncsvd":
            return self.rank
        return self.rank + (self.rank if self.relax is None else self.relax)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make(base: str, finetuned: str, config: DeltaConfig) -> Delta:
    """Load ``base`` and ``finetuned`` (default / HF folder / GGUF) and compress their delta."""
    from edgepack.toolchain import sources

    base_model = sources.load(base)
    ft_model = sources.load(finetuned)
    raw = extract.extract(base_model.model, ft_model.model)
    del ft_model
    windows = _validation_windows(base_model.tokenizer, config) if config.method == "osd" else []
    return compress(base_model.model, raw, config, windows)


def compress(model: torch.nn.Module, raw: extract.RawDelta, config: DeltaConfig,
             windows: list[list[int]]) -> Delta:
    """Compress ``raw`` (the delta of ``model``'s fine-tune) as ``config`` says."""
    start = time.perf_counter()
    changed = {n: d for n, d in raw.linears.items() if bool(d.abs().max() > 0)}
    if not changed and not raw.dense:
        raise UsageError("the two models have identical weights: there is no delta to compress")
    factors = {n: factorize.svd_factors(d, config.factor_rank)
               for n, d in tqdm(changed.items(), desc="factorizing ΔW", unit="layer", file=sys.stderr)}
    scores, how = _scores(model, factors, config, windows)
    layers: dict[str, LayerDelta] = {}
    total_budget = 0
    for name, delta in changed.items():
        n_out, n_in = delta.shape
        allowed = budget.dense_bits(n_out, n_in, min(config.rank, n_out, n_in))
        total_budget += allowed
        if config.method == "truncsvd":
            layers[name] = factorize.dense_layer(name, delta, config.rank)
        else:
            u, v = factors[name]
            layers[name] = factorize.sparse_layer(name, u, v, *scores[name], allowed)
    info = {"method": config.method, "rank": config.rank, "relax": config.factor_rank - config.rank,
            "importance": how, "budget_bits": total_budget, "validation_windows": len(windows),
            "window_tokens": config.window_tokens, "seconds": round(time.perf_counter() - start, 1)}
    dense = {n: d.numpy() for n, d in raw.dense.items()}
    return Delta(raw.base_fingerprint, layers, dense, info)


def _scores(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: DeltaConfig,
            windows: list[list[int]]) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], str]:
    if config.method == "truncsvd":
        return {}, "none (dense factors)"
    magnitude = {n: (u.abs(), v.abs()) for n, (u, v) in factors.items()}
    if config.method == "magtruncsvd":
        return magnitude, "magnitude |θ|"
    if not windows:
        print("edgepack: no validation text given: OSD falls back to the data-free magnitude criterion "
              "(pass --valid FILE for Taylor importance)", file=sys.stderr)
        return magnitude, "magnitude |θ| (data-free fallback: no validation text)"
    layers = {n: m for n, m in extract.linear_layers(model).items() if n in factors}
    shifts = {n: u @ v.T for n, (u, v) in factors.items()}
    grads = importance.weight_gradients(model, layers, shifts, windows)
    return ({n: importance.taylor_scores(u, v, grads[n]) for n, (u, v) in factors.items()},
            "taylor |θ·∂L/∂θ| at base + rank-k delta")


def _validation_windows(tokenizer: Any, config: DeltaConfig) -> list[list[int]]:
    if config.valid is None:
        return []
    from edgepack.runtime.text import read_text
    from edgepack.toolchain.ressvd.calibration import calibration_windows

    return calibration_windows(tokenizer, read_text(config.valid), config.windows, config.window_tokens)
