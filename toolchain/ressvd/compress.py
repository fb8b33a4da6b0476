"""``compress_``: replace chosen linear layers of a model, in place, by truncated factor pairs."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.toolchain.ressvd import factorize, joint, quant, selection, tune
from edgepack.toolchain.ressvd.allocator import freed_memory_kept
from edgepack.toolchain.ressvd.calibration import GramCollector
from edgepack.toolchain.ressvd.config import ResSVDConfig
from edgepack.toolchain.ressvd.layers import factorized_linear, set_module
from edgepack.toolchain.ressvd.sequential import compress_sequential_
from torch import nn
from tqdm import tqdm


@dataclass
class CompressionReport:
    config: dict[str, Any]
    ranks: dict[str, int]
    layers_compressed: int
    removed_share: float  # of the decoder's target linear parameters
    params_before: int
    params_after: int
    groups: list[list[str]] = field(default_factory=list)  # joint groups: one shared factor pair each (joint.py)
    search: list[dict[str, float]] = field(default_factory=list)  # k → final hidden-state error
    corrections: list[dict] = field(default_factory=list)  # propagation: per group, the ridge and its curve
    tune_loss: list[float] = field(default_factory=list)  # the factor tune's loss at every step
    calibration_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Whitened:
    """Per-module SVD of W·S, computed once and truncated at any rank (the k search reuses it)."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, damping: float) -> None:
        self.weight = weight.detach().double()
        self.s = factorize.whitening(gram, damping)
        with factorize.one_thread():
            self.u, self.sig, self.vh = torch.linalg.svd(self.weight @ self.s, full_matrices=False)

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return factorize.unwhiten(self.u, self.sig, self.vh, self.s, rank)


def compress_(model: nn.Module, config: ResSVDConfig, windows: Sequence[Sequence[int]] = ()) -> CompressionReport:
    """Compress ``model`` in place following ``config``; ``windows`` are calibration token windows
    (needed by every method but plain ``svd``)."""
    with freed_memory_kept():  # allocator.py: tens of seconds of page faults otherwise
        return _compress(model, config, windows)


def _compress(model: nn.Module, config: ResSVDConfig, windows: Sequence[Sequence[int]]) -> CompressionReport:
    start = time.perf_counter()
    per_layer = selection.target_linears(model, config.targets)
    untouched = selection.untouched_linears(model, config.targets)
    if untouched and not config.rank_map:
        print(f"edgepack: ResSVD leaves {len(untouched)} linear layers of each decoder layer dense "
              f"({', '.join(untouched[:4])}{', ...' if len(untouched) > 4 else ''}); --ratio counts only the "
              "ones it compresses", file=sys.stderr)
    modules = {n: m for layer in per_layer for n, m in layer}
    missing = [n for n in config.rank_map if n not in modules]
    if missing:  # the planner names Llama-style modules (runtime/memory.py ModelShape.linears)
        raise UnsupportedArchitecture(f"the ResSVD ranks name layers {type(model).__name__} does not have (e.g. "
                                      f"{missing[0]}): device plans describe Llama-style blocks; build it without "
                                      "--device")
    before = sum(p.numel() for p in model.parameters())
    candidates = _candidate_modules(per_layer, config)
    grams: dict[str, torch.Tensor] = {}
    tokens = sum(len(w) for w in windows) if config.method != "svd" else 0
    if config.method != "svd" and not windows:
        raise ValueError(f"method {config.method!r} needs calibration windows")
    # The k search scores candidates without propagation (a proxy); with propagation, whose own
    # statistics are gathered layer by layer, "auto" is the half rule instead: no dense X·Xᵀ of all
    # layers, no SVD of every module (the search's 4-7 GB and most of its time).
    propagating = config.propagate and config.method != "svd"
    searching = config.layers == "auto" and not config.rank_map and not propagating
    if config.method != "svd" and (searching or not propagating):
        collector = GramCollector(model, candidates)
        grams = collector.run(model, windows)
    whitened = {n: _Whitened(modules[n].weight, grams[n], config.damping)
                for n in tqdm(candidates, desc="decomposing", unit="layer")} if grams else {}
    search: list[dict[str, float]] = []
    corrections: list[dict] = []
    tuned: list[float] = []
    mode = "none" if config.quant_aware == "auto" else config.quant_aware  # auto: see compress_loaded
    groups: list[list[str]] = []
    if config.rank_map:
        ranks = dict(config.rank_map)
    elif searching:
        ranks, search = _search_k(model, per_layer, config, whitened, windows)
    else:
        k = (selection.half_k(per_layer, config.ratio) if config.layers == "auto"
             else len(per_layer) if config.layers == "all" else int(config.layers))
        if config.joint:
            ranks, groups = joint.last_k_ranks(per_layer, config.ratio, k)
        else:
            ranks = selection.last_k_ranks(per_layer, config.ratio, k)
    if propagating:
        truncate = None
        if config.method == "ressvd" and config.residual_share > 0:
            def truncate(w, rank, s):
                return factorize.residual(w, rank, s, config.residual_share)
        traces: list = []
        corrections = compress_sequential_(model, ranks, windows, config.damping, truncate, config.ridge,
                                           traces if config.tune_steps else None, groups,
                                           allocate=config.allocation == "spectrum")
        if config.tune_steps and traces:
            tuned = tune.tune_(model, traces[0], tune.TuneSettings(config.tune_steps, config.tune_lr,
                                                                    config.tune_batch, bf16=config.tune_bf16,
                                                                    quant=mode))
    else:
        for name, rank in tqdm(ranks.items(), desc="factorizing", unit="layer"):
            a, b = _factors(config, modules[name], rank, whitened.get(name))
            set_module(model, name, factorized_linear(a, b, modules[name].bias, modules[name].weight.dtype))
    if not (tuned and mode != "none"):
        # Exact in float, and the package rounds balanced factors better (quant.balance_: on the default model at
        # 20 %, int4 perplexity 28.88 -> 25.27 in PyTorch). Not after a quant-aware tune: it would move the block
        # scales whose codes that tune trained (balancing before such a tune is not measured yet).
        quant.balance_([m for m in model.modules() if isinstance(m, nn.Sequential)])
    return CompressionReport(
        config=config.to_dict(), ranks=ranks, groups=groups,
        layers_compressed=len({n.rsplit(".", 2)[0] for n in ranks}),
        removed_share=selection.removed_share(per_layer, ranks, groups), params_before=before,
        params_after=sum(p.numel() for p in model.parameters()), search=search, corrections=corrections,
        tune_loss=[round(v, 5) for v in tuned],
        calibration_tokens=tokens,
        seconds=round(time.perf_counter() - start, 1),
    )


def _candidate_modules(per_layer, config: ResSVDConfig) -> list[str]:
    if config.rank_map:
        return list(config.rank_map)
    if config.layers == "auto":
        k = len(per_layer)
    elif config.layers == "all":
        k = len(per_layer)
    else:
        k = int(config.layers)
        selection.last_k_ranks(per_layer, config.ratio, k)  # refuse an impossible k before calibrating
    return [n for layer in per_layer[len(per_layer) - k:] for n, _ in layer]


def _factors(config: ResSVDConfig, module: nn.Linear, rank: int, white: _Whitened | None):
    if config.method == "svd":
        return factorize.plain(module.weight.detach(), rank)
    if config.method == "ressvd" and config.residual_share > 0:
        return factorize.residual(module.weight.detach(), rank, white.s, config.residual_share, white.factors)
    return white.factors(rank)


def _final_hidden(model: nn.Module, windows: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [model(torch.tensor([list(w)]), output_hidden_states=True, use_cache=False).hidden_states[-1]
                for w in windows]


def _search_k(model, per_layer, config: ResSVDConfig, whitened: dict[str, _Whitened], windows):
    """Try several k; keep the one whose final hidden states move least (relative squared error)."""
    n = len(per_layer)
    probe = list(windows[: max(1, min(8, len(windows)))])
    reference = _final_hidden(model, probe)
    curve, best = [], None
    for k in tqdm(selection.search_candidates(n, selection.min_layers(per_layer, config.ratio)),
                  desc="searching k", unit="k"):
        ranks = selection.last_k_ranks(per_layer, config.ratio, k)
        originals = {}
        for name, rank in ranks.items():
            module = model.get_submodule(name)
            originals[name] = module
            if config.method == "svd":
                a, b = factorize.plain(module.weight.detach(), rank)
            else:
                a, b = whitened[name].factors(rank)
            set_module(model, name, factorized_linear(a, b, module.bias, module.weight.dtype))
        hidden = _final_hidden(model, probe)
        for name, module in originals.items():
            set_module(model, name, module)
        err = float(sum(((h - r) ** 2).sum() for h, r in zip(hidden, reference))
                    / sum((r ** 2).sum() for r in reference))
        curve.append({"k": k, "hidden_error": err})
        if best is None or err < best[1]:
            best = (ranks, err)
    return best[0], curve
