"""``plan``: from a model's shape and a device profile, the least lossy package that fits.

Candidates are dtype ∈ {float32, int4} × ResSVD ratio ∈ {0, 0.1, 0.2, 0.3, 0.4}. A ratio R is spread
over the last k = ⌈n·R / 0.5⌉ layers (each of them loses about half its linear parameters; the README's
k search found the final hidden-state error flat from k ≈ 13 to 26 at R = 0.2), at the ranks of the
last-k rule. Each candidate's peak memory comes from ``edgepack.runtime.memory`` and its quality cost
from ``quality``. Dominated candidates (costlier and no smaller) are dropped; the plan is the cheapest
remaining one whose peak fits the profile's app memory and whose size fits its storage, so a smaller
budget never yields a larger package. When the context was not given and nothing fits at 2048, the
context is halved (down to 256), uncompressed plans first, then compressed ones, before giving up.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from edgepack.runtime import memory
from edgepack.runtime.errors import UsageError
from edgepack.runtime.profiles import MB, DeviceProfile
from edgepack.toolchain.planner import quality

DTYPES = ("float32", "int4")
GRAPHS = ("fused", "optimum")
RATIOS = (0.0, 0.1, 0.2, 0.3, 0.4)
LAYER_SHARE = 0.5  # each compressed layer loses about this share of its linear parameters
MIN_CONTEXT = 256
CHUNK = 256  # longest prefill fed in one forward (what the memory model assumes; see chunk_for)


class PlanError(UsageError):
    """No candidate fits the device."""


@dataclass(frozen=True)
class Plan:
    """A chosen build for one device; round-trips through JSON (``to_dict`` / ``from_dict``)."""

    model: str
    device: str
    dtype: str
    ratio: float
    k: int
    ranks: dict[str, int]
    context: int
    package_bytes: int
    peak_bytes: int
    budget_bytes: int
    storage_bytes: int
    expected_ppl_ratio: float
    memory: dict[str, int] = field(default_factory=dict)
    quality_basis: str = quality.BASIS
    notes: tuple[str, ...] = ()
    version: int = 1
    graph: str = "optimum"  # "fused": edgepack's fused graph (plans made before it existed lack the field)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UsageError(f"plan: unknown dtype {self.dtype!r}")
        if self.graph not in GRAPHS:
            raise UsageError(f"plan: unknown graph {self.graph!r} (one of {', '.join(GRAPHS)})")
        object.__setattr__(self, "notes", tuple(self.notes))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["notes"] = list(self.notes)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        known = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) - known:
            raise UsageError(f"plan: unknown field(s) {sorted(set(data) - known) if isinstance(data, dict) else data}")
        return cls(**data)


@dataclass(frozen=True)
class _Candidate:
    dtype: str
    ratio: float
    k: int
    ranks: dict[str, int]
    estimate: memory.MemoryEstimate
    cost: float

    @property
    def size(self) -> int:
        return self.estimate.stored_weights


class _Linear:
    """What ResSVD's selection rules read of an ``nn.Linear``, from shapes alone."""

    def __init__(self, out: int, inner: int) -> None:
        self.out_features, self.in_features = out, inner
        self.weight = self

    def numel(self) -> int:
        return self.out_features * self.in_features


def chunk_for(context: int) -> int:
    """The longest prefill the plan budgets for: 256 tokens, or half the context when that is less."""
    return min(CHUNK, max(1, context // 2))


def layers_for(n: int, ratio: float) -> int:
    return min(n, max(1, math.ceil(n * ratio / LAYER_SHARE)))


def ranks_for(shape: memory.ModelShape, ratio: float) -> tuple[int, dict[str, int]]:
    if ratio <= 0:
        return 0, {}
    from edgepack.toolchain.ressvd import selection

    per_layer = [[(name, _Linear(o, i)) for name, o, i in layer] for layer in shape.linears()]
    k = max(layers_for(shape.layers, ratio), selection.min_layers(per_layer, ratio))
    return k, selection.last_k_ranks(per_layer, ratio, k)


def candidates(shape: memory.ModelShape, context: int, graph: str = "optimum") -> list[_Candidate]:
    """Every candidate, cheapest first, with dominated ones removed."""
    found = []
    for ratio in RATIOS:
        k, ranks = ranks_for(shape, ratio)
        for dtype in DTYPES:
            est = memory.estimate_plan(shape, dtype, context, ranks, chunk_for(context), graph)
            found.append(_Candidate(dtype, ratio, k, ranks, est, quality.expected_cost(dtype, ratio, graph)))
    found.sort(key=lambda c: (c.cost, c.estimate.peak))
    frontier: list[_Candidate] = []
    for c in found:
        if all(c.estimate.peak < f.estimate.peak and c.size < f.size for f in frontier):
            frontier.append(c)
    return frontier


def make_plan(shape: memory.ModelShape, profile: DeviceProfile, model: str = "model",
              context: int | None = None, max_context: int = 2048, graph: str = "optimum") -> Plan:
    """The cheapest candidate that fits ``profile`` on ``graph``; raise ``PlanError`` with figures if
    none does. Without a given context, an uncompressed plan at a shorter context comes before any
    compressed one: ResSVD costs ×2-3 perplexity, a shorter context only limits how much is kept."""
    contexts = [context] if context else _halvings(max_context)
    options = {ctx: candidates(shape, ctx, graph) for ctx in contexts}
    for compressed in (False, True):
        for ctx in contexts:
            for c in options[ctx]:
                if (c.ratio > 0) == compressed and _fits(c, profile):
                    notes = [] if context or ctx == contexts[0] else [
                        f"context lowered from {contexts[0]} to {ctx} tokens to fit (pass --context to choose)"]
                    return _plan(c, profile, model, ctx, notes, graph)
    c, ctx = min(((opts[-1], ctx) for ctx, opts in options.items()), key=lambda pair: pair[0].estimate.peak)
    raise PlanError(
        f"{model} cannot fit {profile.name}: the smallest plan ({c.dtype}, ResSVD {c.ratio:.0%} over the last "
        f"{c.k} layers, context {ctx}) needs {c.estimate.peak / MB:.0f} MiB peak memory and "
        f"{stored_bytes(c.size, profile) / MB:.1f} MiB of storage; the device allows "
        f"{profile.app_memory_mb:g} MiB of memory and {profile.storage_mb:g} MiB of storage")


def _fits(c: _Candidate, profile: DeviceProfile) -> bool:
    return c.estimate.peak <= profile.budget_bytes and stored_bytes(c.size, profile) <= profile.storage_bytes


def stored_bytes(weights: int, profile: DeviceProfile) -> int:
    """Weights on the device's storage: a phone package also carries model.ort, a second copy of them."""
    return weights * (2 if profile.mobile else 1)


def _halvings(top: int) -> list[int]:
    out, ctx = [], top
    while ctx >= MIN_CONTEXT:
        out.append(ctx)
        ctx //= 2
    return out or [top]


def _plan(c: _Candidate, profile: DeviceProfile, model: str, context: int, notes: list[str], graph: str) -> Plan:
    return Plan(
        model=model, device=profile.name, dtype=c.dtype, ratio=c.ratio, k=c.k, ranks=dict(c.ranks),
        context=context, package_bytes=c.size, peak_bytes=c.estimate.peak, budget_bytes=profile.budget_bytes,
        storage_bytes=profile.storage_bytes, expected_ppl_ratio=round(c.cost, 3), memory=c.estimate.to_dict(),
        notes=tuple(notes), graph=graph, quality_basis=quality.basis(graph),
    )


def model_config(spec: str) -> dict[str, Any]:
    """The config of a model source ('default', HF folder, .gguf) without loading its weights."""
    from pathlib import Path

    from edgepack.toolchain import sources

    source = sources.resolve(spec)
    copy = sources.gguf_copy(source)  # a GGUF loaded before: its copy's config.json, as repaired then
    if source.gguf_file and copy is None:
        from edgepack.toolchain import gguf_repair
        from transformers import AutoConfig

        # as sources.py reads it: with what transformers' GGUF reader leaves out (a head size, an expert width, ...)
        gguf_repair.mend_reader()
        config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file, local_files_only=True)
        gguf_repair.repair_config(config, gguf_repair.read_header(Path(source.path) / source.gguf_file), spec)
        return config.to_dict() | {"model_type": config.model_type}
    cfg = json.loads(((copy or Path(source.path)) / "config.json").read_text())
    if "text_config" in cfg:  # a multimodal checkpoint: what is packaged is its language model (sources.py)
        from transformers import AutoConfig

        text = sources.language_model_config(AutoConfig.for_model(**cfg), spec, quiet=True)
        cfg = text.to_dict() | {"model_type": text.model_type}
    return cfg


def model_shape(spec: str) -> memory.ModelShape:
    return _shape(model_config(spec), spec)


def _shape(cfg: dict[str, Any], spec: str) -> memory.ModelShape:
    """The memory model's view of ``cfg``, or a refusal by name of what it cannot describe."""
    from edgepack.toolchain.planner import shape

    return shape.from_config(cfg, spec)


def plan_for(spec: str, profile: DeviceProfile, context: int | None = None) -> Plan:
    """``make_plan`` for a model source, never above the model's own maximum context."""
    cfg = model_config(spec)
    top = min(2048, int(cfg.get("max_position_embeddings") or 2048))
    shape = _shape(cfg, spec)
    graph = graph_for(cfg)
    if graph == "optimum":  # a plan for a model no build can export would only fail later
        from types import SimpleNamespace

        from edgepack.export.onnx_export import check_exportable

        check_exportable(SimpleNamespace(**cfg))
    return make_plan(shape, profile, spec, min(context, top) if context else None, max_context=top,
                     graph=graph)


def graph_for(cfg: dict[str, Any]) -> str:
    """The fused graph when the architecture has one (faster, and less memory: README, #7), else optimum's."""
    from types import SimpleNamespace

    from edgepack.export import fused
    from edgepack.runtime.errors import UnsupportedArchitecture

    try:
        fused.check_supported(SimpleNamespace(**cfg))
    except UnsupportedArchitecture:
        return "optimum"
    return "fused"
