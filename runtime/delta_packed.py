"""The packed layout of a delta file's sparse factors (format 2): three tensors for the whole delta.

Per-factor tensors cost a safetensors header entry each (~100 bytes of JSON): at r = 2 a 135M model's
delta has 1,260 of them, 130 kB, a fifth of an int8 delta file. Packed, every sparse factor, walked in
sorted layer order, U then V, contributes its bitmask (⌈entries/8⌉ bytes, np.packbits order) to
``packed.mask`` and its kept values to ``packed.values``; int8 values keep one float32 scale per factor
in ``packed.values.scale``. A factor's value count is its mask's popcount, so nothing but the masks
says where one factor's values end, and the reader demands that the three tensors are used up exactly.
numpy only: the runtime reads this.
"""

from __future__ import annotations

import numpy as np

MASK, VALUES, SCALE = "packed.mask", "packed.values", "packed.values.scale"
KEYS = (MASK, VALUES, SCALE)


def pack(factors: list[tuple[np.ndarray, np.ndarray, int]], value_dtype: str) -> dict[str, np.ndarray]:
    """Tensors for ``factors``: (sorted flat indices, values, entries of the factor) in file order."""
    masks, values, scales = [], [], []
    for index, vals, entries in factors:
        masks.append(bitmask(index, entries))
        if value_dtype == "int8":
            vals, scale = quantize_int8(vals)
            scales.append(scale)
        values.append(np.asarray(vals))
    out = {MASK: np.concatenate(masks).astype(np.uint8),
           VALUES: np.concatenate(values).astype(value_dtype)}
    if value_dtype == "int8":
        out[SCALE] = np.asarray(scales, np.float32)
    return out


def bitmask(index: np.ndarray, entries: int) -> np.ndarray:
    """The positions ``index`` of a factor with ``entries`` entries as packed bits (np.packbits order)."""
    bits = np.zeros(entries, bool)
    bits[index] = True
    return np.packbits(bits)


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric int8 codes and their one float32 scale (the largest magnitude maps to 127)."""
    peak = float(np.abs(values).max()) if values.size else 0.0
    scale = np.float32(peak / 127 if peak > 0 else 1.0)
    return np.clip(np.rint(values / scale), -127, 127).astype(np.int8), scale


def unpack(tensors: dict[str, np.ndarray], factors: list[tuple[str, int]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(float32 values, int64 flat indices) of each (key, entries) in ``factors``, in file order.
    Raises ValueError when the tensors do not split into exactly these factors."""
    mask, values = tensors[MASK], tensors[VALUES]
    if mask.dtype != np.uint8 or mask.ndim != 1 or values.ndim != 1:
        raise ValueError(f"{MASK} must be 1-D uint8 and {VALUES} 1-D, got {mask.dtype} {mask.shape}, {values.shape}")
    if values.dtype == np.int8:
        scales = tensors[SCALE]
        if scales.dtype != np.float32 or scales.shape != (len(factors),):
            raise ValueError(f"{SCALE}: {scales.dtype} {scales.shape} where {len(factors)} float32 scales belong")
    elif SCALE in tensors or values.dtype not in (np.float16, np.float32):
        raise ValueError(f"{VALUES}: {values.dtype} values with{'' if SCALE in tensors else 'out'} scales")
    out, at_mask, at_value = {}, 0, 0
    for i, (key, entries) in enumerate(factors):
        size = (entries + 7) // 8
        if at_mask + size > mask.size:
            raise ValueError(f"{MASK} ends inside {key}")
        bits = np.unpackbits(mask[at_mask:at_mask + size])
        at_mask += size
        if bits[entries:].any():
            raise ValueError(f"{key}: bitmask has bits set past the factor's {entries} entries")
        index = np.flatnonzero(bits[:entries])
        if at_value + index.size > values.size:
            raise ValueError(f"{VALUES} ends inside {key}")
        vals = values[at_value:at_value + index.size].astype(np.float32)
        at_value += index.size
        if values.dtype == np.int8:
            vals = vals * tensors[SCALE][i]
        out[key] = (vals, index.astype(np.int64))
    if at_mask != mask.size or at_value != values.size:
        raise ValueError(f"{MASK} / {VALUES} hold {mask.size - at_mask} / {values.size - at_value} more entries "
                         "than the layers use")
    return out
