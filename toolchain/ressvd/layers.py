"""Paired linear ops: a dense ``nn.Linear`` replaced by in→r then r→out (bias on the second)."""

from __future__ import annotations

import torch
from torch import nn


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank that keeps a share (1 − ratio) of an out × in matrix's parameters, as two factors."""
    return int((1.0 - ratio) * out_features * in_features // (out_features + in_features))


def factorized_linear(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Sequential:
    """``Sequential(Linear(in, r), Linear(r, out))`` holding B then A; a drop-in for the dense layer."""
    rank = b.shape[0]
    first = nn.Linear(b.shape[1], rank, bias=False, dtype=dtype)
    second = nn.Linear(rank, a.shape[0], bias=bias is not None, dtype=dtype)
    with torch.no_grad():
        first.weight.copy_(b.to(dtype))
        second.weight.copy_(a.to(dtype))
        if bias is not None:
            second.bias.copy_(bias.to(dtype))
    return nn.Sequential(first, second)


def empty_factorized(linear_shape: tuple[int, int], rank: int, bias: bool, dtype: torch.dtype) -> nn.Sequential:
    out_features, in_features = linear_shape
    return nn.Sequential(nn.Linear(in_features, rank, bias=False, dtype=dtype),
                         nn.Linear(rank, out_features, bias=bias, dtype=dtype))


def get_module(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name)


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
