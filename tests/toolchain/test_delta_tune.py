"""The distillation tune of a delta's kept values (toolchain/delta/tune.py, ``edgepack delta --tune-steps``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from edgepack.runtime import delta_file
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import tune
from edgepack.toolchain.delta.make import DeltaConfig, compress, make
from edgepack.toolchain.delta.merge import merged


@pytest.fixture(scope="module")
def setup(delta_setup):
    return delta_setup


@pytest.mark.parametrize("method", ["osd", "magtruncsvd", "truncsvd"])
def test_tuning_keeps_the_pattern_and_the_bits(setup, method):
    model, _, raw, windows = setup
    config = DeltaConfig(method=method, rank=1, windows=4, window_tokens=48)
    plain = compress(model, raw, config, windows, {})
    tuned = compress(model, raw, dataclasses.replace(config, tune_steps=6, tune_lr=1e-2), windows, {})
    assert tuned.bits == plain.bits and tuned.info["budget_bits"] == plain.info["budget_bits"]
    assert tuned.info["tune"]["steps"] == 6
    changed = 0
    for name, layer in plain.layers.items():
        other = tuned.layers[name]
        for a, b in ((layer.u, other.u), (layer.v, other.v)):
            assert (a.index is None) == (b.index is None)
            if a.index is not None:
                np.testing.assert_array_equal(a.index, b.index)
            assert a.values.shape == b.values.shape
            changed += int(not np.array_equal(a.values, b.values))
    assert changed > 0  # the values did move


def test_tuning_brings_base_plus_delta_closer_to_the_finetune(setup):
    model, _, raw, windows = setup
    delta = compress(model, raw, DeltaConfig(method="magtruncsvd", rank=1), [], {})
    teacher = tune.teacher_states(model, raw, windows)
    before = tune.distillation_loss(model, delta.layers, raw.dense, windows, teacher)
    layers, losses = tune.tune(model, delta.layers, raw.dense, windows, teacher,
                               tune.TuneSettings(steps=30, lr=1e-2, positions=48))
    after = tune.distillation_loss(model, layers, raw.dense, windows, teacher)
    assert len(losses) == 30
    assert after < 0.8 * before


def test_teacher_is_the_finetune_and_the_model_is_left_as_it_was(setup):
    model, ft, raw, windows = setup
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = tune.teacher_states(model, raw, windows[:1])
    with torch.no_grad():
        want = tune.head_inputs(ft, torch.tensor([windows[0]]))
    torch.testing.assert_close(teacher, want, atol=1e-4, rtol=1e-4)
    delta = compress(model, raw, DeltaConfig(method="magtruncsvd", rank=1), [], {})
    tune.tune(model, delta.layers, raw.dense, windows, teacher[:1].expand(4, -1, -1),
              tune.TuneSettings(steps=2, lr=1e-2))
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), weights[name], rtol=0, atol=0)
        assert not param.requires_grad or name in weights


def test_the_branch_the_tune_trains_is_the_merged_delta(setup):
    # The hook's (x·V)·Uᵀ and merging U·Vᵀ into the weights must give the same model, or the tune
    # would optimize something other than what the file applies.
    model, _, raw, windows = setup
    delta = compress(model, raw, DeltaConfig(method="magtruncsvd", rank=2), [], {})
    teacher = tune.teacher_states(model, raw, windows[:1])
    via_hook = tune.distillation_loss(model, delta.layers, {}, windows[:1], teacher)
    with merged(model, dataclasses.replace(delta, dense={})), torch.no_grad():
        student = torch.log_softmax(model(torch.tensor([windows[0]])).logits.float(), -1)[0]
        target = torch.log_softmax(model.get_output_embeddings()(teacher[0]).float(), -1)
    via_merge = float(torch.nn.functional.kl_div(student, target, log_target=True, reduction="batchmean"))
    assert via_hook == pytest.approx(via_merge, rel=1e-3, abs=1e-6)


def test_tune_needs_validation_text_and_sane_options(tiny_model_dir, tiny_finetune_dir):
    with pytest.raises(UsageError, match="--valid"):
        make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="magtruncsvd", tune_steps=2))
    with pytest.raises(UsageError, match="--tune-steps"):
        DeltaConfig(tune_steps=-1)
    with pytest.raises(UsageError, match="--tune-lr"):
        DeltaConfig(tune_lr=0.0)


def test_a_tuned_delta_round_trips_through_its_file(setup, tmp_path):
    model, _, raw, windows = setup
    delta = compress(model, raw, DeltaConfig(method="osd", rank=1, tune_steps=3, tune_lr=1e-2), windows, {})
    path = tmp_path / "tuned.safetensors"
    delta_file.write(delta, path, "float32")
    back = delta_file.read(path)
    assert back.info["tune"]["steps"] == 3
    for name, layer in delta.layers.items():
        np.testing.assert_array_equal(back.layers[name].matrix(), layer.matrix())


def test_a_tune_on_the_text_itself_lowers_its_nll_and_keeps_the_bits(setup):
    model, _, raw, windows = setup
    from edgepack.toolchain.delta.auto import validation_loss

    config = DeltaConfig(method="magtruncsvd", rank=1, windows=4, window_tokens=48, tune_lr=1e-2)
    plain = compress(model, raw, config, windows, {})
    hard = compress(model, raw, dataclasses.replace(config, tune_steps=20, tune_hard=1.0), windows, {})
    assert hard.bits == plain.bits and hard.info["tune"]["hard_nll_weight"] == 1.0
    assert validation_loss(model, hard, windows) < validation_loss(model, plain, windows) - 0.01
    with pytest.raises(UsageError, match="--tune-hard"):
        DeltaConfig(tune_hard=1.5)


def test_the_fused_head_loss_matches_the_composed_one(setup):
    model, _, raw, windows = setup
    delta = compress(model, raw, DeltaConfig(method="magtruncsvd", rank=1), [], {})
    teacher = tune.teacher_states(model, raw, windows[:2])
    ids = torch.tensor([list(w) for w in windows[:2]])
    head = model.get_output_embeddings()
    results = []
    for fused in (True, False):
        branches = {n: tune._Branch(layer) for n, layer in delta.layers.items()}
        with tune.distill.frozen(model), tune._with_delta(model, branches, raw.dense):
            g = torch.Generator().manual_seed(3)  # the same positions in both
            if fused:
                assert tune.distill.frozen_linear(head)
                loss = tune._loss(model, head, ids, teacher, 16, g)
            else:
                loss = tune.distill.sampled_kl(tune.head_inputs(model, ids), teacher, head, 16, g)
            loss.backward()
        results.append((float(loss), torch.cat([p.grad.flatten() for b in branches.values() for p in b.values
                                                if p.grad is not None])))
    assert results[0][0] > 0
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-3)
