"""Check a safetensors file's header before any loader trusts it.

The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data. A hostile or damaged file can
declare a header of petabytes, offsets past the end, overlapping tensors, byte counts that do not
match the shape, or tensors whose dtype/shape differ from the model they are loaded into; each is
refused here with a ``ModelSourceError`` naming the tensor, before torch allocates anything.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from edgepack.runtime.errors import ModelSourceError

MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
TORCH_NAMES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
               "torch.int64": "I64", "torch.int32": "I32", "torch.int8": "I8", "torch.uint8": "U8",
               "torch.bool": "BOOL"}

Expected = dict[str, tuple[str, tuple[int, ...]]]


def check_file(path: Path | str, expected: Expected | None = None) -> dict[str, dict[str, Any]]:
    """Validate ``path``'s header (and, given ``expected`` name → (dtype, shape), its tensors against
    the model); return the tensor entries."""
    path = Path(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelSourceError(f"{path} is {size} bytes: too short for a safetensors file")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise ModelSourceError(f"{path} declares a {n}-byte safetensors header, but the file is {size} bytes "
                                       f"(limit {MAX_HEADER_BYTES}); corrupt or not safetensors")
            raw = f.read(n)
    except OSError as e:
        raise ModelSourceError(f"cannot read {path}: {e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:
        raise ModelSourceError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ModelSourceError(f"{path}: the safetensors header is not a JSON object")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    _check_layout(tensors, size - 8 - n, path)
    if expected is not None:
        _check_against_model(tensors, expected, path)
    return tensors


def _check_layout(tensors: dict[str, Any], data_len: int, path: Path) -> None:
    spans = []
    for name, entry in tensors.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelSourceError(f"{where}: entry must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in ITEMSIZE:
            raise ModelSourceError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ModelSourceError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise ModelSourceError(f"{where}: data_offsets must be two non-negative integers, got {offsets!r}")
        begin, end = offsets
        if not begin <= end <= data_len:
            raise ModelSourceError(f"{where}: data_offsets {offsets} fall outside the {data_len} data bytes")
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise ModelSourceError(f"{where}: {end - begin} bytes do not hold a {dtype} tensor of shape {shape}")
        spans.append((begin, end, name))
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin != end:  # the format packs tensors back to back: a gap or an overlap is damage
            raise ModelSourceError(f"{path}: tensors {a!r} and {b!r} {'overlap' if begin < end else 'leave a gap'};"
                                   " corrupt safetensors file")
    covered = (spans[0][0], spans[-1][1]) if spans else (0, 0)
    if covered != (0, data_len):
        raise ModelSourceError(f"{path}: the tensors cover bytes {covered[0]}..{covered[1]} of {data_len} data bytes; "
                               "corrupt or truncated safetensors file")


def _check_against_model(tensors: dict[str, Any], expected: Expected, path: Path) -> None:
    for name, entry in tensors.items():
        if name not in expected:
            raise ModelSourceError(f"{path}: tensor {name!r} is not a parameter of the model it is loaded into")
        dtype, shape = expected[name]
        if entry["dtype"] != dtype or tuple(entry["shape"]) != tuple(shape):
            raise ModelSourceError(f"{path}: tensor {name!r} is {entry['dtype']} {entry['shape']}, the model "
                                   f"expects {dtype} {list(shape)}")


def expected_from_state_dict(state: dict[str, Any]) -> Expected:
    """name → (safetensors dtype, shape) of a torch state dict."""
    return {k: (TORCH_NAMES.get(str(v.dtype), str(v.dtype)), tuple(v.shape)) for k, v in state.items()}


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0
