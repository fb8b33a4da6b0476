"""The delta file: a compressed fine-tune delta (OSD and its baselines) as safetensors + metadata.

Written by the toolchain (``edgepack delta``), read by the runtime; numpy only, so both sides share
it and the runtime stays torch-free. Per decoder linear layer ``name`` (its module path, e.g.
``model.layers.3.mlp.down_proj``) the delta is ΔW ≈ U·Vᵀ with U [n_out, k] and V [n_in, k], each
factor stored either densely (``name.u``) or sparsely as kept values and where they sit. Format 2
writes all sparse factors packed into three tensors (runtime/delta_packed.py: one bitmask bit per
factor entry, the values, int8 scales) by default; per factor, a bitmask (``name.u.mask``) or flat
indices (``name.u.index`` uint16, int32 for factors over 65,536 entries) with ``name.u.values`` can
be asked for. Format 1 files (per-factor indices only) still read. Other
parameters the fine-tune changed (norms, biases) are stored densely as ``dense.<param>`` (their
difference from the base).

The header's ``edgepack_delta`` metadata (JSON) records the format version, method, r, c, the
fingerprint of the base weights the delta was made against, per-layer ranks and accounted bits,
and a sha256 of every tensor's bytes, which the reader checks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgepack.runtime import delta_packed
from edgepack.runtime.errors import IntegrityError, PackageError

FORMAT_VERSION = 2  # 2: sparse positions as a bitmask (``.mask``) or indices; 1: indices only
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "edgepack_delta"
MAX_HEADER = 16 << 20  # a header larger than this is not a delta edgepack wrote
_VALUE_DTYPES = ("float32", "float16", "int8")  # int8: symmetric, one float32 scale per factor
# packed: all sparse factors' bitmasks and values in three tensors (the smallest; the default);
# auto: per factor, a bitmask or indices, whichever is smaller; mask / index: per factor, that one.
INDEX_ENCODINGS = ("packed", "auto", "mask", "index")


@dataclass(frozen=True)
class FactorData:
    """One factor: ``values`` dense [rows·rank] (``index`` None) or the kept entries at ``index``."""

    values: np.ndarray
    index: np.ndarray | None = None

    def dense(self, rows: int, rank: int) -> np.ndarray:
        if self.index is None:
            return self.values.astype(np.float32).reshape(rows, rank)
        out = np.zeros(rows * rank, np.float32)
        out[self.index] = self.values
        return out.reshape(rows, rank)

    @property
    def kept(self) -> int:
        return int(self.values.size)


@dataclass(frozen=True)
class LayerDelta:
    """ΔW of one linear layer, [n_out, n_in] ≈ U·Vᵀ."""

    name: str
    n_out: int
    n_in: int
    rank: int
    u: FactorData
    v: FactorData
    bits: int  # accounted as in toolchain/delta/budget.py

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(U [n_out, k], V [n_in, k]) as dense float32 arrays."""
        return self.u.dense(self.n_out, self.rank), self.v.dense(self.n_in, self.rank)

    def matrix(self) -> np.ndarray:
        u, v = self.factors()
        return u @ v.T

    def describe(self) -> dict[str, Any]:
        entries = (self.n_out + self.n_in) * self.rank
        return {"shape": [self.n_out, self.n_in], "rank": self.rank, "kept_u": self.u.kept,
                "kept_v": self.v.kept, "sparse": self.u.index is not None,
                "density": round((self.u.kept + self.v.kept) / max(entries, 1), 4), "bits": self.bits}


@dataclass(frozen=True)
class Delta:
    """A whole compressed delta. ``info`` holds method, r, c, budget and how importance was scored."""

    base_fingerprint: str
    layers: dict[str, LayerDelta]
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        return sum(layer.bits for layer in self.layers.values()) + 32 * sum(a.size for a in self.dense.values())

    def metadata(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "base_fingerprint": self.base_fingerprint, "info": self.info,
                "accounted_bits": self.bits, "layers": {n: layer.describe() for n, layer in self.layers.items()},
                "dense": {n: list(a.shape) for n, a in self.dense.items()}}


def to_bytes(delta: Delta, value_dtype: str = "float32", index: str = "packed") -> bytes:
    """The safetensors bytes of ``delta``; factor values stored as ``value_dtype``, sparse positions
    as ``index`` says (``INDEX_ENCODINGS``)."""
    from safetensors.numpy import save

    if value_dtype not in _VALUE_DTYPES:
        raise PackageError(f"delta values must be one of {_VALUE_DTYPES}, got {value_dtype!r}")
    if index not in INDEX_ENCODINGS:
        raise PackageError(f"delta index encoding must be one of {INDEX_ENCODINGS}, got {index!r}")
    tensors: dict[str, np.ndarray] = {}
    packed = []
    for name, layer in sorted(delta.layers.items()):
        for key, factor, rows in (("u", layer.u, layer.n_out), ("v", layer.v, layer.n_in)):
            if index == "packed" and factor.index is not None:
                packed.append((factor.index, factor.values, rows * layer.rank))
                continue
            stem = f"{name}.{key}" if factor.index is None else f"{name}.{key}.values"
            tensors.update(_encode(stem, factor.values, value_dtype))
            if factor.index is not None:
                tensors.update(_positions(f"{name}.{key}", factor.index, rows * layer.rank, index))
    if packed:
        tensors.update(delta_packed.pack(packed, value_dtype))
    for name, array in delta.dense.items():
        tensors[f"dense.{name}"] = array.astype(np.float32)
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    meta = delta.metadata()
    meta["value_dtype"] = value_dtype
    meta["tensor_sha256"] = _tensor_digest(tensors)
    return save(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})


def write(delta: Delta, path: Path | str, value_dtype: str = "float32", index: str = "packed") -> int:
    """Write atomically; returns the file's size in bytes."""
    from edgepack.runtime.files import atomic_write_bytes

    data = to_bytes(delta, value_dtype, index)
    atomic_write_bytes(Path(path), data)
    return len(data)


def _positions(stem: str, index: np.ndarray, entries: int, encoding: str) -> dict[str, np.ndarray]:
    """Where a sparse factor's kept values sit: a packed bitmask (⌈entries/8⌉ bytes) or flat indices
    (16-bit whenever the factor is small enough, as it nearly always is)."""
    width = 2 if entries <= 1 << 16 else 4
    if encoding == "mask" or (encoding == "auto" and (entries + 7) // 8 <= width * index.size):
        return {f"{stem}.mask": delta_packed.bitmask(index, entries)}
    return {f"{stem}.index": index.astype(np.uint16 if width == 2 else np.int32)}


def _encode(stem: str, values: np.ndarray, value_dtype: str) -> dict[str, np.ndarray]:
    if value_dtype != "int8":
        return {stem: values.astype(value_dtype)}
    codes, scale = delta_packed.quantize_int8(values)
    return {stem: codes, f"{stem}.scale": np.asarray([scale], np.float32)}


def _decode(tensors: dict[str, np.ndarray], stem: str) -> np.ndarray:
    values = tensors[stem]
    if f"{stem}.scale" in tensors:
        return values.astype(np.float32) * np.float32(tensors[f"{stem}.scale"][0])
    return values.astype(np.float32)


def read(path: Path | str) -> Delta:
    """Load and verify a delta file; every failure is a PackageError naming the file."""
    return read_with_metadata(path)[0]


def read_with_metadata(path: Path | str) -> tuple[Delta, dict[str, Any]]:
    """``read``, and the header metadata it was checked against (what ``inspect`` prints)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    raw = _read(path)
    meta = _metadata(_header(raw, path), path)
    try:
        tensors = load(raw)
    except (SafetensorError, ValueError, TypeError) as e:
        raise PackageError(f"{path} is not a readable delta file: {e}") from None
    if _tensor_digest(tensors) != meta.get("tensor_sha256"):
        raise IntegrityError(f"{path}: tensor checksum mismatch (the file was altered or damaged); "
                             "copy the delta again")
    try:
        return _assemble(tensors, meta), meta
    except (KeyError, ValueError, TypeError, IndexError, OverflowError) as e:
        raise PackageError(f"{path}: inconsistent delta ({type(e).__name__}: {e}); rebuild it with edgepack delta")\
            from None


def _read(path: Path) -> bytes:
    if not path.is_file():
        raise PackageError(f"delta file {path} does not exist (make one with `edgepack delta`)")
    return path.read_bytes()


def _header(raw: bytes, path: Path) -> dict[str, Any]:
    if len(raw) < 8:
        raise PackageError(f"{path} is too short to be a delta file")
    size = int.from_bytes(raw[:8], "little")
    if size > MAX_HEADER or 8 + size > len(raw):
        raise PackageError(f"{path}: header length {size} is out of range; not a delta file or truncated")
    try:
        header = json.loads(raw[8:8 + size])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PackageError(f"{path}: the header is not JSON; not a delta file") from None
    if not isinstance(header, dict):
        raise PackageError(f"{path}: the header is not a JSON object; not a delta file")
    return header


def _metadata(header: dict[str, Any], path: Path) -> dict[str, Any]:
    text = (header.get("__metadata__") or {}).get(METADATA_KEY) if isinstance(header.get("__metadata__"), dict) \
        else None
    if not isinstance(text, str):
        raise PackageError(f"{path} is a safetensors file without edgepack delta metadata; not a delta file")
    try:
        meta = json.loads(text)
    except json.JSONDecodeError:
        raise PackageError(f"{path}: the delta metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise PackageError(f"{path}: the delta metadata is not a JSON object")
    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        raise PackageError(f"{path}: delta format version {version!r} is not supported (this edgepack reads "
                           f"{', '.join(map(str, READABLE_VERSIONS))}); upgrade edgepack or rebuild the delta")
    for key, kind in (("base_fingerprint", str), ("layers", dict), ("dense", dict), ("info", dict)):
        if not isinstance(meta.get(key), kind):
            raise PackageError(f"{path}: delta metadata field {key!r} is missing or malformed")
    return meta


def _assemble(tensors: dict[str, np.ndarray], meta: dict[str, Any]) -> Delta:
    shapes = {}
    for name, desc in sorted(meta["layers"].items()):
        n_out, n_in = (int(x) for x in desc["shape"])
        rank = int(desc["rank"])
        if min(n_out, n_in, rank) < 0 or rank > min(n_out, n_in):
            raise ValueError(f"layer {name}: rank {rank} impossible for shape {n_out}x{n_in}")
        shapes[name] = (n_out, n_in, rank)
    masks = meta["format_version"] >= 2
    if any(k in tensors for k in delta_packed.KEYS) and not (masks and delta_packed.MASK in tensors):
        raise ValueError("packed factor tensors without a packed bitmask, or in a format 1 file")
    packed = _packed(tensors, shapes) if delta_packed.MASK in tensors else {}
    layers = {}
    for name, (n_out, n_in, rank) in shapes.items():
        u, v = (FactorData(*packed[key]) if key in packed else _factor(tensors, key, rows * rank, masks)
                for key, rows in ((f"{name}.u", n_out), (f"{name}.v", n_in)))
        layers[name] = LayerDelta(name, n_out, n_in, rank, u, v, int(meta["layers"][name]["bits"]))
    dense = {}
    for name, shape in meta["dense"].items():
        array = tensors[f"dense.{name}"]
        if list(array.shape) != list(shape):
            raise ValueError(f"dense {name}: shape {list(array.shape)} differs from the metadata's {shape}")
        dense[name] = array
    info = dict(meta["info"], value_dtype=meta.get("value_dtype"))
    return Delta(meta["base_fingerprint"], layers, dense, info)


def _packed(tensors: dict[str, np.ndarray], shapes: dict[str, tuple[int, int, int]]
            ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The packed sparse factors: every factor without a dense tensor of its own, in sorted layer order."""
    keys = []
    for name, (n_out, n_in, rank) in shapes.items():
        for key, rows in ((f"{name}.u", n_out), (f"{name}.v", n_in)):
            if any(f"{key}.{part}" in tensors for part in ("values", "index", "mask")):
                raise ValueError(f"{key}: stored both packed and on its own")
            if key not in tensors:
                keys.append((key, rows * rank))
    return delta_packed.unpack(tensors, keys)


def _factor(tensors: dict[str, np.ndarray], key: str, entries: int, masks: bool) -> FactorData:
    if key in tensors:
        values = _decode(tensors, key)
        if values.ndim != 1 or values.size != entries:
            raise ValueError(f"{key}: {values.size} values where the rank says {entries}")
        return FactorData(values)
    values = _decode(tensors, f"{key}.values")
    if f"{key}.mask" in tensors:
        if not masks or f"{key}.index" in tensors:
            raise ValueError(f"{key}: a bitmask in a format 1 file, or both a bitmask and indices")
        index = _unmask(tensors[f"{key}.mask"], key, entries)
    else:
        index = tensors[f"{key}.index"]
    if values.shape != index.shape or values.ndim != 1:
        raise ValueError(f"{key}: values {values.shape} and indices {index.shape} differ")
    if index.size and (int(index.min()) < 0 or int(index.max()) >= entries):
        raise ValueError(f"{key}: an index lies outside the factor's {entries} entries")
    if index.size > 1 and not bool((np.diff(index.astype(np.int64)) > 0).all()):  # O(n), unlike np.unique
        raise ValueError(f"{key}: indices must be strictly increasing (repeated or unsorted)")
    return FactorData(values, index.astype(np.int64))


def _unmask(mask: np.ndarray, key: str, entries: int) -> np.ndarray:
    """The kept flat indices of a packed bitmask, refusing a wrong length or bits past the end."""
    if mask.dtype != np.uint8 or mask.ndim != 1 or mask.size != (entries + 7) // 8:
        raise ValueError(f"{key}: bitmask of {mask.dtype} {mask.shape} where {entries} entries need "
                         f"{(entries + 7) // 8} bytes of uint8")
    bits = np.unpackbits(mask)
    if bits[entries:].any():
        raise ValueError(f"{key}: bitmask has bits set past the factor's {entries} entries")
    return np.flatnonzero(bits[:entries])


def _tensor_digest(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def summary(meta: dict[str, Any]) -> dict[str, Any]:
    """What ``edgepack inspect`` prints about a delta file."""
    layers = meta["layers"]
    return {"format_version": meta["format_version"], "base_fingerprint": meta["base_fingerprint"],
            **{k: meta["info"].get(k) for k in ("method", "rank", "relax", "importance")},
            "layers": len(layers), "dense_parameters": sorted(meta["dense"]),
            "accounted_bits": meta.get("accounted_bits"), "value_dtype": meta.get("value_dtype"),
            "mean_density": round(sum(d.get("density", 1.0) for d in layers.values()) / max(len(layers), 1), 4)}

