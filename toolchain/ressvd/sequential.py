"""Propagation-aware truncation: compress layer by layer, correcting each for the errors upstream.

Two streams of calibration activations run through the decoder side by side: the dense model's
(X) and the partly compressed model's (X̂). For each chosen linear layer the best replacement W'
given the inputs it will really see minimizes ‖X·Wᵀ − X̂·W'ᵀ‖. With G = X̂ᵀX̂ and C = XᵀX̂ this
splits exactly into the least-squares map W* = W·C·G⁻¹ (a closed-form correction of upstream error)
plus a rank-r truncation of W* whitened by G (S·Sᵀ = G). Layers are treated in execution order
(q/k/v, then o, then gate/up, then down), so each sees the inputs its compressed predecessors make.

The decoder layers are run one at a time with the arguments captured at the first layer's call,
as GPTQ-style tools do, which works for any architecture whose layers share one call signature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from edgepack.toolchain.ressvd import factorize, selection
from edgepack.toolchain.ressvd.calibration import cross_f64, gram_f64
from edgepack.toolchain.ressvd.layers import factorized_linear, set_module
from torch import nn
from tqdm import tqdm


class _Stop(Exception):
    pass


def _capture_first_layer(model: nn.Module, layers: nn.ModuleList, windows: Sequence[Sequence[int]]):
    captured = {}

    def hook(module, args, kwargs):
        captured["hidden"] = args[0] if args else kwargs.pop("hidden_states")
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            model(torch.tensor([list(w) for w in windows]), use_cache=False)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["hidden"], captured["kwargs"]


def _run(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _inputs(layer: nn.Module, hidden: torch.Tensor, kwargs: dict, names: dict[str, nn.Module],
            stop_at: str | None = None) -> dict[str, torch.Tensor]:
    """Inputs reaching each named submodule; stops the layer early once ``stop_at`` has its input."""
    seen: dict[str, torch.Tensor] = {}

    def make(name):
        def hook(module, args):
            seen[name] = args[0]  # kept whole: identity tells which layers share an input
            if name == stop_at:
                raise _Stop

        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in names.items()]
    try:
        with torch.inference_mode():
            _run(layer, hidden, kwargs)
    except _Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def _groups(order: list[str], inputs: dict[str, torch.Tensor]) -> list[list[str]]:
    """Linear layers fed the same tensor form a group (q/k/v; gate/up), in execution order."""
    groups: list[list[str]] = []
    for name in order:
        if groups and inputs[name] is inputs[groups[-1][0]]:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def corrected_factors(weight: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, rank: int, damping: float,
                      truncate: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.reshape(-1, x.shape[-1])
    x_hat = x_hat.reshape(-1, x_hat.shape[-1])
    gram = gram_f64(x_hat)
    s = factorize.whitening(gram, damping)
    cross = cross_f64(x, x_hat)
    # W* = W·C·G⁻¹ via two triangular solves with G = S·Sᵀ (no explicit inverse).
    y = torch.linalg.solve_triangular(s, (weight.double() @ cross).T, upper=False)
    w_star = torch.linalg.solve_triangular(s.T, y, upper=True).T
    if truncate is not None:
        return truncate(w_star, rank, s)
    return factorize.whitened(w_star, rank, s)


def compress_sequential_(model: nn.Module, ranks: dict[str, int], windows: Sequence[Sequence[int]],
                         damping: float = 1e-4, truncate: Callable | None = None) -> None:
    """Replace every module in ``ranks`` by corrected factors, layer by layer, in place."""
    layers = selection.decoder_layers(model)
    per_layer = selection.target_linears(model, list({n.rsplit(".", 1)[-1] for n in ranks}))
    dense_h, kwargs = _capture_first_layer(model, layers, windows)
    comp_h = dense_h
    diverged = False
    for index, layer in enumerate(tqdm(layers, desc="compressing layers", unit="layer")):
        chosen = {n: m for n, m in per_layer[index] if n in ranks}
        if not chosen:
            with torch.inference_mode():
                dense_h = _run(layer, dense_h, kwargs)
                comp_h = _run(layer, comp_h, kwargs) if diverged else dense_h
            continue
        dense_in = _inputs(layer, dense_h, kwargs, chosen)
        order = list(dense_in)  # dict order is the order the hooks fired in
        with torch.inference_mode():
            new_dense = _run(layer, dense_h, kwargs)
        for group in _groups(order, dense_in):
            comp_in = _inputs(layer, comp_h, kwargs, {group[0]: chosen[group[0]]}, stop_at=group[0])[group[0]]
            for name in group:
                module = chosen[name]
                a, b = corrected_factors(module.weight.detach(), dense_in[name], comp_in, ranks[name], damping,
                                         truncate)
                set_module(model, name, factorized_linear(a, b, module.bias, module.weight.dtype))
        dense_h = new_dense
        with torch.inference_mode():
            comp_h = _run(layer, comp_h, kwargs)
        diverged = True
