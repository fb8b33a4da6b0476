"""Selection during the tune (toolchain/delta/prune.py, ``edgepack delta --prune-during-tune``)."""

from __future__ import annotations

import dataclasses

import pytest
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import budget, prune, tune
from edgepack.toolchain.delta.make import DeltaConfig, compress


@pytest.fixture(scope="module")
def setup(delta_setup):
    model, _, raw, windows = delta_setup
    return model, raw, windows


@pytest.mark.parametrize("method", ["osd", "magtruncsvd"])
def test_pruning_during_the_tune_ends_within_the_budget(setup, method):
    model, raw, windows = setup
    config = DeltaConfig(method=method, rank=1, windows=4, window_tokens=48, tune_steps=8, tune_lr=1e-2,
                         prune_during_tune=True)
    delta = compress(model, raw, config, windows, {})
    one_shot = compress(model, raw, dataclasses.replace(config, prune_during_tune=False), windows, {})
    assert delta.info["budget_bits"] == one_shot.info["budget_bits"]
    assert delta.bits <= delta.info["budget_bits"]
    kept = delta.info["tune"]["kept_bits_by_step"]
    assert len(kept) == 8 and kept == sorted(kept, reverse=True) and kept[3] <= delta.info["budget_bits"]
    for layer in delta.layers.values():  # the recorded bits are those of the stored pattern
        assert layer.u.index is not None
        assert layer.bits == budget.sparse_bits(layer.n_out, layer.n_in, layer.rank, layer.u.kept, layer.v.kept)
    if method == "magtruncsvd":  # per-layer allocation: every layer within its own budget
        assert all(layer.bits <= 32 * (layer.n_out + layer.n_in) for layer in delta.layers.values())


def test_cubic_schedule():
    assert prune.target_bits(1000, 100, 0, 4) == 1000
    assert prune.target_bits(1000, 100, 4, 4) == 100 == prune.target_bits(1000, 100, 9, 4)
    assert 100 < prune.target_bits(1000, 100, 2, 4) < 550  # cubic: most of the pruning early


def test_pruning_during_the_tune_lowers_the_distillation_loss(setup):
    model, raw, windows = setup
    teacher = tune.teacher_states(model, raw, windows)
    from edgepack.toolchain.delta import factorize

    changed = {n: d for n, d in raw.linears.items() if bool(d.abs().max() > 0)}
    factors = {n: factorize.svd_factors(d, 2) for n, d in changed.items()}
    budgets = {n: 32 * sum(d.shape) for n, d in changed.items()}
    layers, losses, kept = prune.gradual(model, factors, budgets, raw.dense, windows, teacher,
                                         prune.PruneSettings(steps=30, lr=1e-2, positions=48))
    one_shot = {n: factorize.sparse_layer(n, u, v, u.abs(), v.abs(), budgets[n]) for n, (u, v) in factors.items()}
    before = tune.distillation_loss(model, one_shot, raw.dense, windows, teacher)
    after = tune.distillation_loss(model, layers, raw.dense, windows, teacher)
    assert sum(layer.bits for layer in layers.values()) <= sum(budgets.values())
    assert after < 0.8 * before


def test_options_are_checked():
    with pytest.raises(UsageError):
        DeltaConfig(method="truncsvd", prune_during_tune=True)
    with pytest.raises(UsageError):
        DeltaConfig(method="osd", prune_during_tune=True, tune_steps=0)
    with pytest.raises(UsageError):
        DeltaConfig(method="osd", prune_during_tune=True, prune_until=0)
