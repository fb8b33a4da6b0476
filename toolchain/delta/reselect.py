"""One re-selection at the tuned point (``edgepack delta --reselect``): OSD's Fisher scored again where the
tune has taken the delta, then the pattern chosen anew at the same bit budget.

The one-shot pattern is chosen from the SVD's values with the gradient at the base; the tune then moves the
kept values, so the scores that chose them are stale. Here the factors are rebuilt at every position (the
tuned value where an entry was kept, the SVD's value elsewhere: a dropped entry's best guess is still the
value it had), the per-window gradients of the same loss are taken at base + the tuned sparse delta (the
model the tune produced), and the entries are chosen again by θ²·Σ_w g_w² under one global budget. The
caller then tunes the new pattern; with the first tune that makes two tunes, so compare against one tune of
twice the steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from edgepack.runtime.delta_file import LayerDelta
from edgepack.toolchain.delta import extract, factorize, importance
from edgepack.toolchain.delta.merge import added


def rebuilt_factors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]], tuned: dict[str, LayerDelta]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The rank-k factors with each tuned layer's kept entries replaced by their tuned values."""
    out = {}
    for name, (u, v) in factors.items():
        u, v = u.contiguous().clone(), v.contiguous().clone()  # flat indices are row-major
        layer = tuned.get(name)
        if layer is not None:
            for dense, part in ((u, layer.u), (v, layer.v)):
                if part.index is None:  # a dense factor: every entry was tuned
                    dense.copy_(torch.from_numpy(part.dense(*dense.shape)))
                else:
                    dense.view(-1)[torch.from_numpy(part.index)] = torch.from_numpy(part.values.astype("float32"))
        out[name] = (u, v)
    return out


def reselect(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
             tuned: dict[str, LayerDelta], dense: dict[str, torch.Tensor], windows: Sequence[Sequence[int]],
             budget_bits: int, loss_fn: Callable[[int, torch.Tensor], torch.Tensor] | None
             ) -> dict[str, LayerDelta]:
    """A new pattern within ``budget_bits`` for the delta whose tuned layers are ``tuned``: the Fisher of
    ``loss_fn`` (None: the windows' NLL) at base + ``tuned`` + ``dense``, on the rebuilt factors' entries."""
    rebuilt = rebuilt_factors(factors, tuned)
    layers = {n: m for n, m in extract.linear_layers(model).items() if n in rebuilt}
    shifts = {n: torch.from_numpy(tuned[n].matrix()) if n in tuned else torch.zeros(()) for n in rebuilt}
    with added(model, dense):
        stats = importance.factor_gradient_stats(model, layers, shifts, rebuilt, windows, loss_fn)
    scored = {n: (u, v, *importance.fisher_scores(u, v, *stats[n][2:])) for n, (u, v) in rebuilt.items()}
    return factorize.select_global(scored, budget_bits)


def overlap(before: dict[str, LayerDelta], after: dict[str, LayerDelta]) -> dict[str, int]:
    """Kept entries before and after the re-selection and how many of them both keep (for the metadata)."""
    def entries(layer: LayerDelta) -> set[tuple[int, int]]:
        return {(f, int(i)) for f, part in enumerate((layer.u, layer.v)) if part.index is not None for i in part.index}

    both = sum(len(entries(before[n]) & entries(layer)) for n, layer in after.items() if n in before)
    return {"kept_before": sum(b.u.kept + b.v.kept for b in before.values()),
            "kept_after": sum(a.u.kept + a.v.kept for a in after.values()), "kept_in_both": both}
