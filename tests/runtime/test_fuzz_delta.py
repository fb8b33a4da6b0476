"""Hostile delta files: every input ends in a typed PackageError, never another exception."""

from __future__ import annotations

import json

import numpy as np
import pytest
from edgepack.runtime import delta_file
from edgepack.runtime.delta_file import Delta, FactorData, LayerDelta
from edgepack.runtime.errors import PackageError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_counts import count


def _valid_delta() -> Delta:
    rng = np.random.default_rng(0)
    layer = LayerDelta("model.layers.0.mlp.up_proj", 6, 4, 2,
                       FactorData(rng.standard_normal(5).astype(np.float32), np.array([0, 2, 3, 7, 11])),
                       FactorData(rng.standard_normal(8).astype(np.float32)), 100)
    delta = Delta("f" * 32, {layer.name: layer}, {"model.norm.weight": np.ones(4, np.float32)},
                  {"method": "osd", "rank": 1, "relax": 1, "importance": "taylor"})
    return delta


VALID = delta_file.to_bytes(_valid_delta(), "float16")  # U packed: bitmask + values (format 2's default)
VALID_INDEX = delta_file.to_bytes(_valid_delta(), "int8", "index")  # U's positions as 16-bit indices
VALID_MASK = delta_file.to_bytes(_valid_delta(), "int8", "mask")  # U's own bitmask
HEADER_LEN = int.from_bytes(VALID[:8], "little")


def _read(tmp_path, data: bytes) -> None:
    path = tmp_path / "d.safetensors"
    path.write_bytes(data)
    try:
        delta_file.read(path)
    except PackageError:
        pass


def test_the_valid_file_reads(tmp_path):
    path = tmp_path / "ok.safetensors"
    for data in (VALID, VALID_INDEX, VALID_MASK):
        path.write_bytes(data)
        assert delta_file.read(path).layers["model.layers.0.mlp.up_proj"].u.index.tolist() == [0, 2, 3, 7, 11]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(VALID_INDEX) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips_of_an_index_file_never_crash(tmp_path, flips):
    count("fuzz")
    data = bytearray(VALID_INDEX)
    for pos, value in flips:
        data[pos] = value
    _read(tmp_path, bytes(data))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_byte_flips_never_crash(tmp_path, flips):
    count("fuzz")
    data = bytearray(VALID)
    for pos, value in flips:
        data[pos] = value
    _read(tmp_path, bytes(data))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(0, len(VALID)))
def test_truncations_never_crash(tmp_path, cut):
    count("fuzz")
    _read(tmp_path, VALID[:cut])


def _with_metadata(meta: object) -> bytes:
    """The valid tensors under a different edgepack_delta metadata value (header rewritten)."""
    header = json.loads(VALID[8:8 + HEADER_LEN])
    header["__metadata__"]["edgepack_delta"] = json.dumps(meta) if not isinstance(meta, str) else meta
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + VALID[8 + HEADER_LEN:]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_metadata_values_never_crash(tmp_path, meta):
    count("fuzz")
    _read(tmp_path, _with_metadata(meta))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["shape", "rank", "bits", "kept_u"]), json_values)
def test_layer_descriptions_never_crash(tmp_path, field, value):
    """Plausible metadata with one field of the layer description replaced (checksum still valid)."""
    count("fuzz")
    header = json.loads(VALID[8:8 + HEADER_LEN])
    meta = json.loads(header["__metadata__"]["edgepack_delta"])
    meta["layers"]["model.layers.0.mlp.up_proj"][field] = value
    _read(tmp_path, _with_metadata(meta))


@pytest.mark.parametrize("change", [
    {"format_version": 3}, {"format_version": "2"}, {"format_version": 2.0}, {"base_fingerprint": None},
    {"layers": []}, {"tensor_sha256": "0" * 64},
    {"dense": {"model.norm.weight": [5]}}, {"layers": {"x": {"shape": [6, 4], "rank": 9, "bits": 1}}},
    {"layers": {"model.layers.0.mlp.up_proj": {"shape": [6, 4], "rank": float("inf"), "bits": 1}}},
])
def test_inconsistent_metadata_is_refused(tmp_path, change):
    header = json.loads(VALID[8:8 + HEADER_LEN])
    meta = {**json.loads(header["__metadata__"]["edgepack_delta"]), **change}
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_with_metadata(meta))
    with pytest.raises(PackageError):
        delta_file.read(path)


def _rewritten(data: bytes, edit, version: int | None = None) -> bytes:
    """``data`` with its tensors changed by ``edit(tensors)`` and the checksum recomputed, so only the
    reader's structural checks stand between the change and the runtime."""
    from safetensors.numpy import load, save

    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    meta = json.loads(header["__metadata__"]["edgepack_delta"])
    tensors = load(data)
    edit(tensors)
    meta["tensor_sha256"] = delta_file._tensor_digest(tensors)
    if version is not None:
        meta["format_version"] = version
    return save(tensors, metadata={"edgepack_delta": json.dumps(meta)})


KEY = "model.layers.0.mlp.up_proj.u"


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


@pytest.mark.parametrize("edit", [
    _set(f"{KEY}.mask", np.array([0b10110001, 0b00011000], np.uint8)),  # a bit past the 12 entries
    _set(f"{KEY}.mask", np.array([0b10110001], np.uint8)),  # too short
    _set(f"{KEY}.mask", np.array([0b10110001, 0, 0], np.uint8)),  # too long
    _set(f"{KEY}.mask", np.array([0b10110001, 0b00110000], np.uint8)),  # 6 bits for 5 values
    _set(f"{KEY}.mask", np.array([0b10110001, 0b00010000], np.uint16)),  # not bytes
    _set(f"{KEY}.index", np.array([0, 2, 3, 7, 11], np.uint16)),  # a mask and indices both
    lambda t: t.pop(f"{KEY}.mask"),  # neither
], ids=["past-end", "short", "long", "count", "dtype", "both", "neither"])
def test_corrupt_bitmasks_are_refused(tmp_path, edit):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewritten(VALID_MASK, edit))
    with pytest.raises(PackageError, match="inconsistent delta"):
        delta_file.read(path)


P = "packed"


@pytest.mark.parametrize("edit", [
    _set(f"{P}.mask", np.array([0b10110001, 0b00011000], np.uint8)),  # a bit past U's 12 entries
    _set(f"{P}.mask", np.array([0b10110001], np.uint8)),  # too short
    _set(f"{P}.mask", np.array([0b10110001, 0b00010000, 0], np.uint8)),  # a byte left over
    _set(f"{P}.mask", np.array([0b10110001, 0b00110000], np.uint8)),  # 6 bits for 5 values
    _set(f"{P}.mask", np.array([0b10110001, 0b00000000], np.uint8)),  # 4 bits: a value left over
    _set(f"{P}.mask", np.array([0b10110001, 0b00010000], np.uint16)),  # not uint8
    _set(f"{P}.values", np.zeros((5, 1), np.float16)),  # not 1-D
    _set(f"{P}.values", np.zeros(5, np.int32)),  # not a value type
    _set(f"{P}.values", np.zeros(5, np.int8)),  # int8 without scales
    _set(f"{P}.values.scale", np.ones(1, np.float32)),  # scales for float16 values
    lambda t: t.pop(f"{P}.mask"),  # values without a mask
    lambda t: t.pop(f"{P}.values"),  # a mask without values
    _set(f"{KEY}.index", np.array([0, 2, 3, 7, 11], np.uint16)),  # packed and on its own both
], ids=["past-end", "short", "long", "count", "leftover", "dtype", "2d", "int32", "int8-no-scale", "stray-scale",
        "no-mask", "no-values", "both"])
def test_corrupt_packed_factors_are_refused(tmp_path, edit):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(_rewritten(VALID, edit))
    with pytest.raises(PackageError, match="inconsistent delta"):
        delta_file.read(path)


def test_a_bitmask_in_a_format_1_file_is_refused_and_format_1_indices_still_read(tmp_path):
    path = tmp_path / "v1.safetensors"
    path.write_bytes(_rewritten(VALID_MASK, lambda t: None, version=1))
    with pytest.raises(PackageError, match="format 1"):
        delta_file.read(path)
    path.write_bytes(_rewritten(VALID, lambda t: None, version=1))
    with pytest.raises(PackageError, match="format 1"):
        delta_file.read(path)
    path.write_bytes(_rewritten(VALID_INDEX, lambda t: None, version=1))  # what edgepack wrote before masks
    assert delta_file.read(path).layers["model.layers.0.mlp.up_proj"].u.index.tolist() == [0, 2, 3, 7, 11]
