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
                     windows: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
    """∂L/∂W of each layer in ``layers`` with its weight moved by ``shifts[name]``; mean token loss
    over ``windows``. The model's weights are restored afterwards."""
    saved = {}
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


def taylor_scores(u: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|θ·∂L/∂θ| for every entry of U [n_out, k] and V [n_in, k], given G = ∂L/∂ΔW [n_out, n_in]."""
    g = grad.float()
    return (u * (g @ v)).abs(), (v * (g.T @ u)).abs()
