"""Block quantization of linear weights in numpy, laid out for onnxruntime's MatMulNBits.

MatMulNBits computes ``w = (q - zp) * scale`` per block of 32 input features, and its fast CPU
kernels need *integer* zero points (float zero points are accepted but run ~50x slower here). The
default model ships as GGUF Q4_1, ``w = q * d + m`` with a float minimum ``m`` per block; rounding
``-m / d`` to an integer shifts every weight of the block by up to d/2 (perplexity 1.21x float32).
So ``quantize_q4`` keeps ``q`` and ``d`` exactly, uses the default zero point 8, and returns the
per-block remainder ``m + 8 d`` as a small matrix: the graph adds ``blocksum(x) @ remainder.T``,
which restores Q4_1 exactly (one tiny MatMul per distinct input, shared by packed projections).
Faster, and as good in perplexity: ``remainder_digits`` writes the remainders as two 4-bit digit
blocks, so one MatMulNBits over ``[x, blocksum(x), blocksum(x)]`` applies them (linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32


@dataclass(frozen=True)
class Q4Weight:
    """A [n_out, n_in] weight as MatMulNBits inputs plus the block remainders."""

    packed: np.ndarray  # uint8 [n_out, blocks, 16], two 4-bit values a byte, low nibble first
    scales: np.ndarray  # float32 [n_out * blocks]
    remainder: np.ndarray  # float32 [n_out, blocks]: m + 8 d, added through the block sums of x
    n_in: int
    n_out: int


@dataclass(frozen=True)
class Q8Weight:
    """A [n_out, n_in] weight as 8-bit MatMulNBits inputs (symmetric, zero point 128 implied)."""

    data: np.ndarray  # uint8 [n_out, blocks, 32]
    scales: np.ndarray  # float32 [n_out * blocks]
    n_in: int
    n_out: int


def _blocks(weight: np.ndarray) -> np.ndarray:
    """[n_out, n_in] → [n_out, blocks, 32], zero-padding n_in up to a whole block."""
    n_out, n_in = weight.shape
    pad = (-n_in) % BLOCK
    w = np.asarray(weight, dtype=np.float32)
    if pad:
        w = np.concatenate([w, np.zeros((n_out, pad), np.float32)], axis=1)
    return w.reshape(n_out, -1, BLOCK)


def quantize_q4(weight: np.ndarray) -> Q4Weight:
    """Asymmetric 4-bit, block 32, with a float minimum per block (Q4_1's form)."""
    w = _blocks(weight)
    low, high = w.min(axis=-1), w.max(axis=-1)
    scale = (high - low) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # a constant block: q = 0, all in the minimum
    q = np.clip(np.rint((w - low[..., None]) / scale[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    remainder = (low + 8.0 * scale).astype(np.float32)
    return Q4Weight(packed, scale.reshape(-1), remainder, weight.shape[1], weight.shape[0])


@dataclass(frozen=True)
class Q4IntWeight:
    """A [n_out, n_in] weight as MatMulNBits inputs with integer zero points (no remainder)."""

    packed: np.ndarray  # uint8 [n_out, blocks, 16]
    scales: np.ndarray  # float32 [n_out * blocks]
    zero_points: np.ndarray  # uint8 [n_out * ceil(blocks / 2)], low nibble first
    n_in: int
    n_out: int


def quantize_q4_int(weight: np.ndarray) -> Q4IntWeight:
    """Asymmetric 4-bit, block 32, zero point rounded to an integer (what MatMulNBits runs fastest);
    the zero point is rounded first and the codes against it, so the rounding error is per weight."""
    w = _blocks(weight)
    low, high = np.minimum(w.min(axis=-1), 0.0), np.maximum(w.max(axis=-1), 0.0)
    scale = (high - low) / 15.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    zp = np.clip(np.rint(-low / scale), 0, 15).astype(np.uint8)
    q = np.clip(np.rint(w / scale[..., None]) + zp[..., None], 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    if zp.shape[1] % 2:
        zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
    zp_packed = (zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    return Q4IntWeight(packed, scale.reshape(-1), zp_packed, weight.shape[1], weight.shape[0])


def dequantize_q4_int(q: Q4IntWeight) -> np.ndarray:
    """The float weight an integer-zero-point int4 graph computes with (for tests and error measurements)."""
    values = np.empty(q.packed.shape[:2] + (BLOCK,), np.float32)
    values[..., 0::2] = q.packed & 0x0F
    values[..., 1::2] = q.packed >> 4
    blocks = q.packed.shape[1]
    zp = np.stack([q.zero_points & 0x0F, q.zero_points >> 4], axis=-1).reshape(q.n_out, -1)[:, :blocks]
    w = (values - zp[..., None]) * q.scales.reshape(q.n_out, -1, 1)
    return w.reshape(q.n_out, -1)[:, : q.n_in]


def remainder_digits(remainder: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The [n_out, blocks] remainders as two 4-bit "digits" (a coarse code and a code of what it
    missed), so MatMulNBits can apply them to the block sums appended to its input: returns packed
    codes [n_out, 2 * padded / 32, 16], their scales [n_out * 2 * padded / 32], and the error left."""
    r = _blocks(remainder)  # [n_out, padded / 32, 32]
    codes, scales = [], []
    for _ in range(2):
        scale = np.abs(r).max(axis=-1) / 7.0
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        c = np.clip(np.rint(r / scale[..., None]), -8, 7)
        r = r - c * scale[..., None]
        codes.append((c + 8).astype(np.uint8))
        scales.append(scale)
    q = np.concatenate(codes, axis=1)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    error = r.reshape(remainder.shape[0], -1)[:, : remainder.shape[1]]
    return packed, np.concatenate(scales, axis=1).reshape(-1), error


def dequantize_q4(q: Q4Weight) -> np.ndarray:
    """The float weight the graph computes with (for tests and error measurements)."""
    values = np.empty(q.packed.shape[:2] + (BLOCK,), np.float32)
    values[..., 0::2] = q.packed & 0x0F
    values[..., 1::2] = q.packed >> 4
    scales = q.scales.reshape(q.n_out, -1, 1)
    w = (values - 8.0) * scales + q.remainder[..., None]
    return w.reshape(q.n_out, -1)[:, : q.n_in]


def quantize_q8(weight: np.ndarray) -> Q8Weight:
    """Symmetric 8-bit, block 32 (Q8_0's form, which the default model's embedding ships as)."""
    w = _blocks(weight)
    scale = np.abs(w).max(axis=-1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale[..., None]), -127, 127).astype(np.int16) + 128
    return Q8Weight(q.astype(np.uint8), scale.reshape(-1), weight.shape[1], weight.shape[0])
