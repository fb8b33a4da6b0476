"""Deltas applied in the runtime equal the PyTorch model with the same delta merged."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tiny
from edgepack.runtime import delta_file, load
from edgepack.runtime.errors import PackageError
from edgepack.toolchain.delta.make import DeltaConfig, make

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]


@pytest.fixture(scope="module")
def delta_path(tiny_model_dir, tiny_finetune_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("delta") / "truncsvd.safetensors"
    delta_file.write(make(str(tiny_model_dir), str(tiny_finetune_dir), DeltaConfig(method="truncsvd", rank=3)), path)
    return path


def _runtime_logits(model, tokens=PROMPT):
    return model.decoder.forward(tokens, model.decoder.new_cache(), all_logits=True)


def _torch_logits(folder, delta=None):
    return tiny.merged_logits(folder, PROMPT, delta)


def test_apply_switch_remove_match_merged_weights(tiny_slots_package, tiny_model_dir, delta_path):
    delta = delta_file.read(delta_path)
    model = load(tiny_slots_package)
    base = _runtime_logits(model)
    np.testing.assert_allclose(base, _torch_logits(tiny_model_dir), atol=1e-3)
    model.apply_delta(delta_path)
    applied = _runtime_logits(model)
    np.testing.assert_allclose(applied, _torch_logits(tiny_model_dir, delta), atol=1e-3)
    assert np.abs(applied - base).max() > 1e-2  # the delta does change the model
    model.apply_delta(None)
    np.testing.assert_array_equal(_runtime_logits(model), base)
    # load with a delta = apply after load
    np.testing.assert_allclose(_runtime_logits(load(tiny_slots_package, delta=delta_path)), applied, atol=1e-6)


def test_decode_steps_use_the_current_delta(tiny_slots_package, delta_path):
    """The single-token step binding is cached per KV cache; a switch must rebuild it."""
    model = load(tiny_slots_package)
    cache = model.decoder.new_cache()
    model.decoder.forward(PROMPT, cache)
    before = model.decoder.forward([11], cache)
    model.apply_delta(delta_path)
    cache2 = model.decoder.new_cache()
    model.decoder.forward(PROMPT, cache2)
    after = model.decoder.forward([11], cache2)
    full = _runtime_logits(model, PROMPT + [11])[-1]
    np.testing.assert_allclose(after, full, atol=1e-4)
    assert np.abs(after - before).max() > 1e-2


def test_session_restarts_its_cache_after_a_switch(tiny_slots_package, delta_path):
    model = load(tiny_slots_package)
    session = model.session()
    session.ask("hello", max_new_tokens=4)
    model.apply_delta(delta_path)
    old_cache = session.cache
    session.ask("again", max_new_tokens=4)
    assert session.cache is not old_cache


def test_wrong_base_is_refused_with_both_fingerprints(tiny_slots_package, delta_path, tmp_path):
    delta = delta_file.read(delta_path)
    other = type(delta)("0" * 32, delta.layers, delta.dense, delta.info)
    path = tmp_path / "other.safetensors"
    delta_file.write(other, path)
    model = load(tiny_slots_package)
    with pytest.raises(PackageError, match="0{32}.*" + model.package.manifest.model["weights_fingerprint"]):
        model.apply_delta(path)


def test_package_without_slots_refuses_a_delta(tiny_package, delta_path):
    with pytest.raises(PackageError, match="--delta-slots"):
        load(tiny_package, delta=delta_path)


@pytest.mark.parametrize("kind", ["int4", "ressvd"])
def test_delta_on_int4_and_factorized_bases(kind, tiny_model_dir, tiny_finetune_dir, delta_path, tmp_path):
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.compression import compress
    from edgepack.toolchain.ressvd import ResSVDConfig

    source = tiny_model_dir
    if kind == "ressvd":
        source = tmp_path / "compressed"
        compress(str(tiny_model_dir), ResSVDConfig(method="svd", ratio=0.2, layers="all"), source)
    pkg = tmp_path / "pkg"
    build(BuildConfig(model=str(source), graph="fused", delta_slots=True, int4=kind == "int4"), pkg)
    model = load(pkg, delta=delta_path)  # same fingerprint as the uncompressed base
    with_delta = _runtime_logits(model)
    model.apply_delta(None)
    without = _runtime_logits(model)
    reference = _torch_logits(source, delta_file.read(delta_path))
    # the side branch moves the base's output towards the merged model's
    assert np.abs(with_delta - reference).mean() < np.abs(without - reference).mean()
    if kind == "ressvd":  # float32: the side branch is exact
        np.testing.assert_allclose(with_delta, reference, atol=1e-3)
    shutil.rmtree(pkg)


def test_norm_changes_apply_too(tiny_slots_package, tiny_model_dir, tmp_path):
    import tiny

    finetune = tiny.save_finetune(tiny_model_dir, tmp_path / "ft-norms", norms=True)
    delta = make(str(tiny_model_dir), str(finetune), DeltaConfig(method="truncsvd", rank=3))
    assert len(delta.dense) == 5  # 2 layers x 2 norms + the final norm
    model = load(tiny_slots_package, delta=delta)
    np.testing.assert_allclose(_runtime_logits(model), _torch_logits(tiny_model_dir, delta), atol=1e-3)


def test_a_tuned_sparse_delta_matches_merged_weights(tiny_slots_package, tiny_model_dir, tiny_finetune_dir, tmp_path):
    # The tune (toolchain/delta/tune.py) only changes the kept values; the runtime must apply what it wrote.
    from pydoc_data.topics import topics

    valid = tmp_path / "valid.txt"
    valid.write_text(" ".join(list(topics.values())[20:30]))
    config = DeltaConfig(method="osd", rank=2, valid=str(valid), windows=2, window_tokens=48, tune_steps=4,
                         tune_lr=1e-2)
    path = tmp_path / "tuned.safetensors"
    delta_file.write(make(str(tiny_model_dir), str(tiny_finetune_dir), config), path, "int8")
    delta = delta_file.read(path)
    assert delta.info["tune"]["steps"] == 4
    model = load(tiny_slots_package, delta=path)
    np.testing.assert_allclose(_runtime_logits(model), _torch_logits(tiny_model_dir, delta), atol=1e-3)
