"""Which layers to compress and at which ranks: the last-k rule and its search."""

from __future__ import annotations

import math
from collections.abc import Sequence

from edgepack.runtime.errors import UnsupportedArchitecture, UsageError
from edgepack.toolchain.ressvd.layers import rank_for_ratio
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's stack of decoder blocks (the ModuleList as long as the config's layer count)."""
    count = getattr(model.config, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise UnsupportedArchitecture(f"cannot find the decoder layers of {type(model).__name__} for compression")


def target_linears(model: nn.Module, targets: Sequence[str]) -> list[list[tuple[str, nn.Linear]]]:
    """Per decoder layer, the (full name, module) of each target linear layer, in order."""
    layers = decoder_layers(model)
    prefix = {id(m): n for n, m in model.named_modules()}[id(layers)]
    out = []
    for i, layer in enumerate(layers):
        found = [(f"{prefix}.{i}.{n}", m) for n, m in layer.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets and not _routed(n)]
        if not found:
            raise UnsupportedArchitecture(
                f"decoder layer {i} of {type(model).__name__} has none of the linear layers ResSVD compresses "
                f"({', '.join(targets)}): build or evaluate it without --ratio")
        out.append(found)
    return out


def _routed(name: str) -> bool:
    """A mixture-of-experts expert: it sees only the tokens routed to it, and the routing of the compressed
    model differs from the dense one's, so calibration and correction statistics would not line up."""
    return "experts" in name.split(".")


def untouched_linears(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Linear layers of the first decoder layer that compression leaves dense (experts, routers, other names)."""
    layer = decoder_layers(model)[0]
    kept = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear)
            and n.rsplit(".", 1)[-1] in targets and not _routed(n)}
    return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in kept]


def params(linears: Sequence[tuple[str, nn.Linear]]) -> int:
    return sum(m.weight.numel() for _, m in linears)


def min_layers(per_layer: Sequence[Sequence[tuple[str, nn.Linear]]], ratio: float) -> int:
    """The fewest last layers that can still remove ``ratio`` of all target parameters."""
    total = sum(params(layer) for layer in per_layer)
    for k in range(1, len(per_layer) + 1):
        kept = sum(params(layer) for layer in per_layer[-k:])
        if ratio * total / kept < 0.95:  # a layer kept at under 5 % is no longer a model
            return k
    raise UsageError(f"a ratio of {ratio} cannot be met even by compressing all {len(per_layer)} layers")


def last_k_ranks(per_layer: Sequence[Sequence[tuple[str, nn.Linear]]], ratio: float, k: int) -> dict[str, int]:
    """Ranks for the last ``k`` layers at the raised per-layer ratio R·P_total / P_last_k."""
    layer_ratio = last_k_ratio(per_layer, ratio, k)
    ranks = {}
    for layer in per_layer[len(per_layer) - k:]:
        for name, m in layer:
            ranks[name] = max(1, rank_for_ratio(m.out_features, m.in_features, layer_ratio))
    return ranks


def last_k_ratio(per_layer: Sequence[Sequence[tuple[str, nn.Linear]]], ratio: float, k: int) -> float:
    """The per-layer ratio R·P_total / P_last_k that removes ``ratio`` of all target parameters from the
    last ``k`` layers; refuses a k that cannot."""
    n = len(per_layer)
    if not 1 <= k <= n:
        raise UsageError(f"--layers {k} is out of range for a model with {n} decoder layers")
    total = sum(params(layer) for layer in per_layer)
    layer_ratio = ratio * total / sum(params(layer) for layer in per_layer[n - k:])
    if layer_ratio >= 0.95:
        need = min_layers(per_layer, ratio)
        raise UsageError(
            f"removing {ratio:.0%} of the parameters from the last {k} layers would remove {layer_ratio:.0%} of "
            f"each; use --layers {need} or more (or a smaller --ratio)")
    return layer_ratio


def half_k(per_layer: Sequence[Sequence[tuple[str, nn.Linear]]], ratio: float) -> int:
    """k = ⌈2·N·R⌉: each of the last k layers loses about half its parameters (the planner's rule, and
    ``layers="auto"`` with propagation, which replaces the non-propagated k search)."""
    return min(len(per_layer), max(min_layers(per_layer, ratio), math.ceil(2 * len(per_layer) * ratio)))


def removed_share(per_layer: Sequence[Sequence[tuple[str, nn.Linear]]], ranks: dict[str, int],
                  groups: Sequence[Sequence[str]] = ()) -> float:
    """Share of the target parameters removed; each of ``groups`` (joint.py) shares one in→r factor,
    counted once."""
    modules = {n: m for layer in per_layer for n, m in layer}
    total = sum(m.weight.numel() for m in modules.values())
    grouped = {n for g in groups for n in g}
    removed = sum(modules[n].weight.numel() - r * (modules[n].in_features + modules[n].out_features)
                  for n, r in ranks.items() if n not in grouped)
    for g in groups:
        removed += sum(modules[n].weight.numel() for n in g)
        removed -= ranks[g[0]] * (modules[g[0]].in_features + sum(modules[n].out_features for n in g))
    return removed / total


def search_candidates(n: int, minimum: int) -> list[int]:
    """A handful of k values from the fewest possible to all layers, denser near the small end."""
    steps = sorted({minimum, n, *(minimum + math.ceil((n - minimum) * f) for f in (0.1, 0.25, 0.4, 0.6, 0.8))})
    return [k for k in steps if minimum <= k <= n]
