"""How a delta file stores its sparse factors: bitmask or index positions, float16 or int8 values."""

from __future__ import annotations

import numpy as np
import pytest
from edgepack.runtime import delta_file
from edgepack.runtime.delta_file import Delta, FactorData, LayerDelta
from edgepack.runtime.errors import PackageError


def _delta(density: float, seed: int = 0) -> Delta:
    rng = np.random.default_rng(seed)
    layers = {}
    for i, (n_out, n_in, k) in enumerate([(96, 64, 4), (40, 96, 4), (300, 250, 2)]):
        factors = []
        for rows in (n_out, n_in):
            keep = np.flatnonzero(rng.random(rows * k) < density)
            factors.append(FactorData(rng.standard_normal(keep.size).astype(np.float32), keep))
        layers[f"model.layers.{i}.mlp.up_proj"] = LayerDelta(f"model.layers.{i}.mlp.up_proj", n_out, n_in, k,
                                                             *factors, 1000)
    return Delta("f" * 32, layers, {}, {"method": "magtruncsvd"})


@pytest.mark.parametrize("density", [0.0, 0.01, 0.36, 1.0])
@pytest.mark.parametrize("encoding", ["packed", "auto", "mask", "index"])
def test_positions_round_trip_exactly(tmp_path, density, encoding):
    delta = _delta(density)
    path = tmp_path / "d.safetensors"
    delta_file.write(delta, path, "float32", encoding)
    back = delta_file.read(path)
    for name, layer in delta.layers.items():
        for mine, theirs in ((layer.u, back.layers[name].u), (layer.v, back.layers[name].v)):
            np.testing.assert_array_equal(theirs.index, mine.index)
            np.testing.assert_array_equal(theirs.values, mine.values)


def test_auto_takes_the_smaller_encoding(tmp_path):
    dense_ish, sparse = _delta(0.36), _delta(0.01)
    sizes = {(d, e): len(delta_file.to_bytes(delta, "float16", e))
             for d, delta in (("dense", dense_ish), ("sparse", sparse)) for e in ("packed", "auto", "mask", "index")}
    assert sizes["dense", "auto"] == sizes["dense", "mask"] < sizes["dense", "index"]
    assert sizes["sparse", "auto"] == sizes["sparse", "index"] < sizes["sparse", "mask"]
    assert sizes["dense", "packed"] < sizes["dense", "mask"]  # one header entry for all masks, not one each
    # at OSD's density the bitmask costs ~1 bit per factor entry instead of 16 per kept one
    entries = sum((layer.n_out + layer.n_in) * layer.rank for layer in dense_ish.layers.values())
    kept = sum(layer.u.kept + layer.v.kept for layer in dense_ish.layers.values())
    assert sizes["dense", "index"] - sizes["dense", "mask"] > 2 * kept - entries / 8 - 1000


@pytest.mark.parametrize("encoding", ["packed", "mask"])
def test_int8_values_are_within_half_a_step_of_their_scale(tmp_path, encoding):
    delta = _delta(0.36, seed=3)  # one scale per factor, packed or not
    path = tmp_path / "d.safetensors"
    delta_file.write(delta, path, "int8", encoding)
    back = delta_file.read(path)
    for name, layer in delta.layers.items():
        for mine, theirs in ((layer.u, back.layers[name].u), (layer.v, back.layers[name].v)):
            step = np.abs(mine.values).max() / 127
            assert np.abs(theirs.values - mine.values).max() <= step / 2 * (1 + 1e-6)


def test_unknown_index_encoding_is_refused():
    with pytest.raises(PackageError, match="index encoding"):
        delta_file.to_bytes(_delta(0.3), "float16", "gzip")
