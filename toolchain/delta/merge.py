"""A delta merged into a PyTorch model for the duration of a block (validation loss, benchmarks,
parity references): linear layers get U·Vᵀ added, changed parameters their dense difference."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from edgepack.runtime.delta_file import Delta
from edgepack.toolchain.delta.extract import linear_layers


@contextlib.contextmanager
def merged(model: torch.nn.Module, delta: Delta) -> Iterator[torch.nn.Module]:
    """``model`` with ``delta`` added to its weights; the original weights are restored on exit."""
    layers = linear_layers(model)
    targets = {f"{name}.weight": torch.from_numpy(layer.matrix()) for name, layer in delta.layers.items()}
    targets.update({name: torch.from_numpy(change) for name, change in delta.dense.items()})
    if any(n not in layers for n in delta.layers):
        raise ValueError(f"the delta names parameters this model lacks: {list(delta.layers)[:3]}")
    with added(model, targets):
        yield model


@contextlib.contextmanager
def added(model: torch.nn.Module, changes: Mapping[str, torch.Tensor]) -> Iterator[torch.nn.Module]:
    """``model`` with ``changes[name]`` added to each named parameter; restored on exit."""
    params = dict(model.named_parameters())
    missing = [n for n in changes if n not in params]
    if missing:
        raise ValueError(f"the delta names parameters this model lacks: {missing[:3]}")
    saved = {name: params[name].detach().clone() for name in changes}
    try:
        with torch.no_grad():
            for name, change in changes.items():
                params[name].add_(torch.as_tensor(change).to(params[name].dtype))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                params[name].copy_(weight)
