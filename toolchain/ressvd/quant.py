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
    """[n_out, n_in] → [n_out, blocks, 32], zero-padded like the exporter."""
    return F.pad(w.float(), (0, (-w.shape[1]) % BLOCK)).reshape(w.shape[0], -1, BLOCK)


def fake_int4(w: torch.Tensor) -> torch.Tensor:
    """``dequantize_q4_int(quantize_q4_int(w))`` in torch: the weight an int4 factor's MatMulNBits uses."""
    x = _blocks(w)
    low, high = x.amin(-1).clamp(max=0.0), x.amax(-1).clamp(min=0.0)
    scale = (high - low) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-low / scale), 0, 15)
    q = torch.clamp(torch.round(x / scale[..., None]) + zp[..., None], 0, 15)
    return ((q - zp[..., None]) * scale[..., None]).reshape(w.shape[0], -1)[:, : w.shape[1]]


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
