"""Re-selection at the tuned point (toolchain/delta/reselect.py, ``edgepack delta --reselect``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import factorize, reselect
from edgepack.toolchain.delta.make import DeltaConfig, compress


@pytest.fixture(scope="module")
def setup(delta_setup):
    return delta_setup


def test_reselected_delta_stays_within_the_budget_and_records_both_tunes(setup):
    model, _, raw, windows = setup
    config = DeltaConfig(method="osd", rank=1, windows=4, window_tokens=48, tune_steps=4, tune_lr=1e-2, reselect=True)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    delta = compress(model, raw, config, windows, {})
    assert delta.bits <= delta.info["budget_bits"]
    assert sum(layer.bits for layer in delta.layers.values()) == delta.bits
    assert delta.info["tune"]["steps"] == 4 and delta.info["first_tune"]["steps"] == 4
    counts = delta.info["reselect"]
    assert 0 < counts["kept_in_both"] <= min(counts["kept_before"], counts["kept_after"])
    assert counts["kept_after"] == sum(layer.u.kept + layer.v.kept for layer in delta.layers.values())
    for name, p in model.named_parameters():  # the gradient pass at the tuned point restores the weights
        torch.testing.assert_close(p, weights[name], atol=0, rtol=0)


def test_rebuilt_factors_take_the_tuned_values_where_kept_and_the_svd_elsewhere(setup):
    _, _, raw, _ = setup
    name, change = next(iter(raw.linears.items()))
    u, v = factorize.svd_factors(change, 2)
    layer = factorize.sparse_layer(name, u, v, u.abs(), v.abs(), 32 * (u.shape[0] + v.shape[0]))
    tuned = type(layer)(layer.name, layer.n_out, layer.n_in, layer.rank,
                        type(layer.u)(layer.u.values + 1.0, layer.u.index),
                        type(layer.v)(layer.v.values - 1.0, layer.v.index), layer.bits)
    ru, rv = reselect.rebuilt_factors({name: (u, v)}, {name: tuned})[name]
    for rebuilt, original, part, shift in ((ru, u, layer.u, 1.0), (rv, v, layer.v, -1.0)):
        flat, keep = rebuilt.ravel().numpy(), np.zeros(original.numel(), bool)
        keep[part.index] = True
        np.testing.assert_allclose(flat[keep], original.ravel().numpy()[keep] + shift, rtol=1e-6)
        np.testing.assert_array_equal(flat[~keep], original.ravel().numpy()[~keep])


@pytest.mark.parametrize("options", [dict(method="magtruncsvd", tune_steps=4), dict(method="osd", tune_steps=0),
                                     dict(method="osd", tune_steps=4, allocation="layer")])
def test_reselect_refuses_what_it_cannot_rescore(options):
    with pytest.raises(UsageError, match="--reselect"):
        DeltaConfig(reselect=True, **options)
