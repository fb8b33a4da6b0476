"""Delta slots in optimum's graph (export/delta_branches.py): architectures without a fused graph take deltas too,
and the runtime applies them as the PyTorch model with the delta merged computes."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import tiny_archs
from edgepack.runtime import load
from edgepack.runtime.errors import PackageError
from edgepack.toolchain.build import BuildConfig, build
from edgepack.toolchain.delta.make import DeltaConfig, make

PROMPT = [5, 17, 42, 99, 7, 250, 3, 64]


def _runtime_logits(model):
    return model.decoder.forward(PROMPT, model.decoder.new_cache(), all_logits=True)


def _torch_logits(folder, delta=None):
    return tiny.merged_logits(folder, PROMPT, delta)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per architecture: a tiny base, and a fine-tune that moves its linear weights, biases and norms."""
    made = {}

    def get(arch):
        if arch not in made:
            root = tmp_path_factory.mktemp(arch)
            base = tiny_archs.save(arch, root / "base")
            made[arch] = base, tiny_archs.save_finetune(base, root / "ft", dense=True)
        return made[arch]

    return get


# GPT-NeoX: packed q/k/v, LayerNorm weights and biases; OPT: Gemm projections, a decoder scope without
# "model"; GPT-2: Conv1D projections (ΔW in nn.Linear's layout); Llama with biases: the fused graph's family.
@pytest.mark.parametrize("arch", ["gpt_neox", "opt", "gpt2", "llama-bias"])
def test_apply_switch_remove_match_merged_weights(arch, models, tmp_path):
    base, finetune = models(arch)
    delta = make(str(base), str(finetune), DeltaConfig(method="truncsvd", rank=3))
    assert delta.dense  # norms and biases moved too, and have slots
    pkg = tmp_path / "pkg"
    manifest = build(BuildConfig(model=str(base), graph="optimum", delta_slots=True), pkg)
    assert manifest.plan["graph"] == "optimum"
    import onnx

    onnx.checker.check_model(str(pkg / "model.onnx"))  # nodes in topological order, every input defined
    model = load(pkg)
    plain = _runtime_logits(model)
    np.testing.assert_allclose(plain, _torch_logits(base), atol=1e-3)  # rank-0 branches change nothing
    model.apply_delta(delta)
    applied = _runtime_logits(model)
    np.testing.assert_allclose(applied, _torch_logits(base, delta), atol=1e-3)
    assert np.abs(applied - plain).max() > 1e-2
    model.apply_delta(None)
    np.testing.assert_array_equal(_runtime_logits(model), plain)


@pytest.mark.parametrize("kind", ["int4", "ressvd"])
def test_int4_and_factorized_bases_in_optimums_graph(kind, models, tmp_path):
    from edgepack.toolchain.compression import compress
    from edgepack.toolchain.ressvd import ResSVDConfig

    base, finetune = models("gpt_neox")
    delta = make(str(base), str(finetune), DeltaConfig(method="truncsvd", rank=3))
    source = base
    if kind == "ressvd":
        source = tmp_path / "compressed"
        compress(str(base), ResSVDConfig(method="svd", ratio=0.2, layers="all", tune_steps=0), source)
    pkg = tmp_path / "pkg"
    build(BuildConfig(model=str(source), graph="optimum", delta_slots=True, int4=kind == "int4"), pkg)
    model = load(pkg, delta=delta)  # a compressed package records its uncompressed source's fingerprint
    with_delta = _runtime_logits(model)
    model.apply_delta(None)
    reference = _torch_logits(source, delta)
    assert np.abs(with_delta - reference).mean() < np.abs(_runtime_logits(model) - reference).mean()
    if kind == "ressvd":  # float32: the side branch around each factor pair is exact
        np.testing.assert_allclose(with_delta, reference, atol=1e-3)


def test_a_norm_the_graph_folded_is_refused_by_name(models, tmp_path):
    # Gemma's norms scale by (1 + w): the exporter folds 1 + w into a new constant, so w has no slot.
    base, finetune = models("gemma")
    delta = make(str(base), str(finetune), DeltaConfig(method="truncsvd", rank=2))
    pkg = tmp_path / "pkg"
    build(BuildConfig(model=str(base), graph="optimum", delta_slots=True), pkg)
    with pytest.raises(PackageError, match=r"changes model\.layers\.0\.input_layernorm\.weight"):
        load(pkg, delta=delta)
    linear_only = type(delta)(delta.base_fingerprint, delta.layers, {}, delta.info)
    load(pkg, delta=linear_only)  # its linear layers do have slots


def test_scopes_follow_torch_exporter_names():
    from edgepack.export.delta_branches import scopes

    assert scopes("model.layers.10.self_attn.q_proj")[0] == "/model/layers.10/self_attn/q_proj/"
    assert scopes("model.decoder.final_layer_norm")[1] == "/decoder/final_layer_norm/"


def test_slots_keep_an_exports_external_data(models, tmp_path):
    # Exports past protobuf's 2 GB limit keep their weights in a data file beside model.onnx; the rewrite must
    # write them there again (here a tiny export moved to that layout by hand).
    import onnx
    from edgepack.export import onnx_export
    from edgepack.export.delta_branches import add_delta_slots
    from edgepack.runtime.delta import DELTA_SLOTS_KEY
    from edgepack.toolchain import sources

    model = sources.load(str(models("gpt_neox")[0])).model
    path = onnx_export.export(model, tmp_path / "onnx")[0]
    onnx.save_model(onnx.load(str(path)), str(path), save_as_external_data=True, location="model.onnx_data",
                    size_threshold=0)
    assert add_delta_slots(model, path) == 8
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx_data"]
    assert path.stat().st_size < (path.parent / "model.onnx_data").stat().st_size  # weights stayed outside
    rewritten = onnx.load(str(path))
    assert {p.key for p in rewritten.metadata_props} >= {DELTA_SLOTS_KEY}
    onnx.checker.check_model(str(path))
