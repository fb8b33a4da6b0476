"""Quantization-aware factor tune: the factors are trained through the exporter's own rounding.

ResSVD's factors are new float matrices, so an int4 package rounds them afresh (export/fused/blocks.py,
``quantize_q4_int``: blocks of 32 along the input, integer zero point). Rounding to nearest after a float
tune cost the default model's 20 % package 1.31x perplexity (22.08 in PyTorch, 29.02 in the package). Here
the tune sees the weights the package will compute with: each factor's weight is replaced, while the tune
runs, by its fake-quantized copy (the same float32 arithmetic as the exporter, so the rounding is identical:
tests/toolchain/test_ressvd_quant.py), and the gradient passes straight through the rounding to the float
weight. The saved factors stay float; the exporter's rounding of them gives the codes the tune trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from edgepack.export.fused.blocks import BLOCK
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """[n_out, n_in] → [n_out, blocks, 32], zero-padded like the exporter (a copy either way: the callers
    work in place on it)."""
    pad = (-w.shape[1]) % BLOCK
    x = F.pad(w.float(), (0, pad)) if pad else w.float().clone()
    return x.reshape(w.shape[0], -1, BLOCK)


def fake_int4(w: torch.Tensor) -> torch.Tensor:
    """``dequantize_q4_int(quantize_q4_int(w))`` in torch: the weight an int4 factor's MatMulNBits uses.
    In place on one copy, same operations in the same order as the exporter (it runs on every tune step)."""
    x = _blocks(w)
    low, high = torch.aminmax(x, dim=-1)
    low.clamp_(max=0.0)
    scale = high.clamp_(min=0.0).sub_(low).div_(15.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = low.neg_().div_(scale).round_().clamp_(0, 15)[..., None]
    scale = scale[..., None]
    x.div_(scale).round_().add_(zp).clamp_(0, 15).sub_(zp).mul_(scale)
    return x.reshape(w.shape[0], -1)[:, : w.shape[1]]


def fake_int8(w: torch.Tensor) -> torch.Tensor:
    """``quantize_q8`` dequantized: symmetric 8-bit blocks of 32 (the exporter's ``factor_bits=8``)."""
    x = _blocks(w)
    scale = x.abs().amax(-1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale[..., None]), -127, 127)
    return (q * scale[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]


class FakeQuant(nn.Module):
    """A parametrization: the rounded weight forward, the identity backward (straight-through)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.round = {"int4": fake_int4, "int8": fake_int8}[mode]

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rounded = self.round(w).to(w.dtype)
        return w + (rounded - w).detach()


@contextlib.contextmanager
def fake_quantized(pairs: Sequence[nn.Sequential], mode: str) -> Iterator[None]:
    """Inside, every linear of ``pairs`` computes with its weight rounded as ``mode`` ("none": unchanged); on
    exit the float weights (the same parameters, trained in between) are back in place."""
    # by identity, once each: joint groups share a first factor between pairs
    parts = [] if mode == "none" else list({id(m): m for pair in pairs for m in pair if isinstance(m, nn.Linear)}
                                           .values())
    try:
        for m in parts:
            parametrize.register_parametrization(m, "weight", FakeQuant(mode))
        yield
    finally:
        for m in parts:
            if parametrize.is_parametrized(m, "weight"):
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=False)


def balance_(pairs: Sequence[nn.Sequential]) -> int:
    """Rescale each rank component between the two factors so that the r→out factor A's column and the
    in→r factor B's row have equal norms; returns how many factor pairs (or joint groups) were rescaled.
    Exact in float: A·B is unchanged.

    Why: ResSVD's splits are skewed (B carries the whitening's S⁻¹, the residual stage's components and the
    correction and tune move them apart), and one int4 scale per 32 of A's columns then serves columns of
    very different sizes (on the default model's 20 % factors, up to 99x), so the small ones round coarsely;
    B rounds per row, so its error does not change. An SVD's own √σ split is already balanced (a no-op);
    on the 84 factor pairs of the default model at 20 % the int4 error of A·B falls from 13.1 % to 11.7 %.
    """
    groups: dict[int, list[nn.Sequential]] = {}
    for pair in pairs:
        if len(pair) == 2 and all(isinstance(m, nn.Linear) for m in pair):
            groups.setdefault(id(pair[0]), []).append(pair)  # joint groups share their in→r module
    with torch.no_grad():
        for members in groups.values():
            first, seconds = members[0][0], list({id(p[1]): p[1] for p in members}.values())
            a = torch.cat([m.weight for m in seconds]).float().norm(dim=0)
            b = first.weight.float().norm(dim=1)
            c = torch.where((a > 0) & (b > 0), (a / b).sqrt(), torch.ones_like(a))
            for m in seconds:
                m.weight.div_(c.to(m.weight.dtype))
            first.weight.mul_(c[:, None].to(first.weight.dtype))
            if first.bias is not None:
                first.bias.mul_(c.to(first.bias.dtype))
    return len(groups)
