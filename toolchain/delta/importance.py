"""OSD's importance of factor entries: first-order Taylor |θ·∂L/∂θ| from one backward pass.

The gradient is taken at the model the delta will actually produce before sparsification, the base
plus the rank-k reconstruction U·Vᵀ of each layer's delta, on a few validation windows. With
G = ∂L/∂ΔW, the chain rule through ΔW = U·Vᵀ gives ∂L/∂U = G·V and ∂L/∂V = Gᵀ·U.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn as nn
from tqdm import tqdm


def weight_gradients(model: nn.Module, layers: dict[str, nn.Linear], shifts: dict[str, torch.Tensor],
                     windows: Sequence[Sequence[int]], grams: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, torch.Tensor]:
    """∂L/∂W of each layer in ``layers`` with its weight moved by ``shifts[name]``; mean token loss
    over ``windows``. The model's weights are restored afterwards. A ``grams`` dict is filled with
    each layer's input X·Xᵀ / tokens (for the output-error criterion) from the same forward passes."""
    saved = {}
    hooks = [] if grams is None else [layer.register_forward_hook(_gram_hook(grams, name, len(windows)))
                                      for name, layer in layers.items()]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                saved[name] = layer.weight.detach().clone()
                layer.weight.add_(shifts[name].to(layer.weight.dtype))
        for layer in layers.values():
            layer.weight.requires_grad_(True)
            layer.weight.grad = None
        for window in tqdm(windows, desc="importance (backward)", unit="window", file=sys.stderr):
            ids = torch.tensor([list(window)])
            loss = model(ids, labels=ids, use_cache=False).loss / len(windows)
            loss.backward()
        return {name: layer.weight.grad.detach().clone() for name, layer in layers.items()}
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.grad = None
                if name in saved:
                    layer.weight.copy_(saved[name])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for hook in hooks:
            hook.remove()


def _gram_hook(grams: dict[str, torch.Tensor], name: str, count: int):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        gram = x.T @ x / (x.shape[0] * count)
        grams[name] = grams[name] + gram if name in grams else gram

    return hook


def taylor_scores(u: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|θ·∂L/∂θ| for every entry of U [n_out, k] and V [n_in, k], given G = ∂L/∂ΔW [n_out, n_in]."""
    g = grad.float()
    return (u * (g @ v)).abs(), (v * (g.T @ u)).abs()


def output_scores(u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much the layer's output moves, in mean squared error over the validation inputs, when one
    factor entry is zeroed: removing U[i, j] takes U[i, j]·V[:, j] from row i of ΔW, costing
    U[i, j]²·(V[:, j]ᵀ·C·V[:, j]); removing V[l, j] costs V[l, j]²·‖U[:, j]‖²·C[l, l] (C = E[x·xᵀ])."""
    c = gram.float()
    col_energy = torch.einsum("ij,ik,kj->j", v, c, v)  # V_jᵀ C V_j for every column j
    return u.square() * col_energy, v.square() * (u.square().sum(0) * torch.diagonal(c)[:, None])


def input_grams(model: nn.Module, layers: dict[str, nn.Linear], windows: Sequence[Sequence[int]]
                ) -> dict[str, torch.Tensor]:
    """Each layer's mean input X·Xᵀ over ``windows`` (float64), from forward passes alone."""
    grams: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(_gram_hook(grams, name, len(windows))) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for window in tqdm(windows, desc="input statistics", unit="window", file=sys.stderr):
                model(torch.tensor([list(window)]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return grams
