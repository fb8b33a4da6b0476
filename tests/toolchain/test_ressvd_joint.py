"""Joint factorization (#4): q/k/v and gate/up share one in→r factor; accounting, save/reload, export."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import tiny
import torch
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.ressvd import ResSVDConfig, compress_, factorize, joint, selection

CONFIG = dict(ratio=0.2, layers=2, calib_windows=4, calib_length=64, tune_steps=2, joint=True)
FOLDER_CONFIG = {**CONFIG, "layers": 1}  # the saved tiny model has 2 layers: the last one compressed
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12]


def test_full_rank_joint_factors_equal_the_dense_products():
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(out, 24, generator=g, dtype=torch.float64) for out in (24, 8, 8)]
    x = torch.randn(500, 24, generator=g, dtype=torch.float64)
    s = factorize.whitening(x.T @ x, 1e-4)
    for a, b in (factorize.whitened(torch.cat(weights), 24, s), factorize.residual(torch.cat(weights), 24, s, 0.25)):
        pairs = joint.shared_pairs(a, b, [24, 8, 8], [None, torch.ones(8, dtype=torch.float64), None], torch.float64)
        assert pairs[0][0] is pairs[1][0] is pairs[2][0]  # one shared in→r module
        for pair, w, bias in zip(pairs, weights, (0.0, 1.0, 0.0)):
            torch.testing.assert_close(pair(x[:7]), x[:7] @ w.T + bias, atol=1e-8, rtol=1e-8)


def test_joint_group_storage_is_rank_times_in_plus_all_outs():
    model = tiny.make_model(seed=5, layers=4)
    per_layer = selection.target_linears(model, ResSVDConfig().targets)
    ranks, groups = joint.last_k_ranks(per_layer, 0.2, 2)
    assert [[n.rsplit(".", 1)[-1] for n in g] for g in groups] == [["q_proj", "k_proj", "v_proj"],
                                                                   ["gate_proj", "up_proj"]] * 2
    modules = {n: m for layer in per_layer for n, m in layer}
    total = sum(m.weight.numel() for m in modules.values())
    kept = sum(m.weight.numel() for n, m in modules.items() if n not in ranks)
    for group in groups:
        assert len({ranks[n] for n in group}) == 1
        kept += ranks[group[0]] * (modules[group[0]].in_features + sum(modules[n].out_features for n in group))
    grouped = {n for g in groups for n in g}
    kept += sum(r * (modules[n].in_features + modules[n].out_features) for n, r in ranks.items() if n not in grouped)
    share = selection.removed_share(per_layer, ranks, groups)
    assert share == pytest.approx((total - kept) / total)
    # Flooring each rank removes at most one rank's worth more per group or lone module.
    slack = sum(modules[g[0]].in_features + sum(modules[n].out_features for n in g) for g in groups)
    slack += sum(modules[n].in_features + modules[n].out_features for n in ranks if n not in grouped)
    slack /= total
    assert 0.2 <= share <= 0.2 + slack


def test_compress_joint_trains_shared_factors_and_counts_them_once():
    model = tiny.make_model(seed=5, layers=4)
    windows = [list(range(i, i + 32)) for i in range(0, 256, 32)]
    before = sum(p.numel() for p in model.parameters())
    per_layer = selection.target_linears(model, ResSVDConfig().targets)
    total = sum(selection.params(layer) for layer in per_layer)
    report = compress_(model, ResSVDConfig(**CONFIG), windows)
    attn, mlp = model.model.layers[3].self_attn, model.model.layers[3].mlp
    assert attn.q_proj[0] is attn.k_proj[0] is attn.v_proj[0] and mlp.gate_proj[0] is mlp.up_proj[0]
    assert len(report.groups) == 4 and len(report.tune_loss) == 2
    # Exact accounting: the parameters that left the model are the removed share of the target weights.
    assert before - report.params_after == round(report.removed_share * total) and report.removed_share >= 0.2


def test_joint_needs_propagation():
    with pytest.raises(UsageError, match="--joint"):
        ResSVDConfig(joint=True, propagate=False)
    with pytest.raises(UsageError, match="--joint"):
        ResSVDConfig(joint=True, rank_map={"model.layers.0.mlp.up_proj": 4})


@pytest.fixture(scope="module")
def joint_folder(tiny_model_dir, tmp_path_factory):
    from edgepack.toolchain.compression import compress

    out = tmp_path_factory.mktemp("joint") / "compressed"
    report = compress(str(tiny_model_dir), ResSVDConfig(**FOLDER_CONFIG), out)
    return out, report


def test_save_reload_rebuilds_the_shared_factors(joint_folder, tiny_model_dir, tmp_path):
    from edgepack.export import onnx_export, parity
    from edgepack.toolchain import sources
    from edgepack.toolchain.compression import compress_loaded

    out, report = joint_folder
    assert json.loads((out / "edgepack_compression.json").read_text())["groups"] == report.groups
    reloaded = sources.load(str(out)).model
    attn = reloaded.model.layers[-1].self_attn
    assert attn.q_proj[0] is attn.k_proj[0] is attn.v_proj[0]
    assert sum(p.numel() for p in reloaded.parameters()) == report.params_after
    fresh = sources.load(str(tiny_model_dir))
    compress_loaded(fresh, ResSVDConfig(**FOLDER_CONFIG))
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        np.testing.assert_allclose(reloaded(ids).logits.numpy(), fresh.model(ids).logits.numpy(), atol=1e-5)
    files = onnx_export.export(reloaded, tmp_path / "onnx")  # optimum's graph handles the shared module too
    assert parity.check(reloaded, files[0], [PROMPT]).passed


def test_a_folder_without_groups_still_loads(tiny_model_dir, tmp_path):
    """Folders written before joint groups existed record ranks only."""
    from edgepack.toolchain import sources
    from edgepack.toolchain.compression import compress

    out = tmp_path / "plain"
    compress(str(tiny_model_dir), ResSVDConfig(ratio=0.2, layers=1, calib_windows=4, calib_length=64, tune_steps=0),
             out)
    record = json.loads((out / "edgepack_compression.json").read_text())
    record.pop("groups", None)
    (out / "edgepack_compression.json").write_text(json.dumps(record))
    model = sources.load(str(out)).model
    assert model.model.layers[-1].self_attn.q_proj[0] is not model.model.layers[-1].self_attn.k_proj[0]


@pytest.mark.parametrize("int4", [False, True])
def test_export_emits_one_shared_factor_per_group(joint_folder, tmp_path, int4):
    from edgepack.export import parity
    from edgepack.export.fused.builder import save
    from edgepack.export.fused.llama import build_llama
    from edgepack.runtime.fused_decoder import FusedDecoder
    from edgepack.toolchain import sources

    model = sources.load(str(joint_folder[0])).model
    save(build_llama(model, 64, int4), tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    op = "MatMulNBits" if int4 else "MatMul"
    last = [n for n in graph.node if n.name.startswith("layers.1.")]
    matmuls = sorted(n.name for n in last if n.op_type == op)
    # B then stacked A for q/k/v and for gate/up, a pair each for o and down: 8 against 4 dense.
    assert matmuls == sorted(f"layers.1.{p}/{op}" for p in (
        "attn.qkv.0", "attn.qkv.1", "attn.o.0", "attn.o.1", "mlp.gate_up.0", "mlp.gate_up.1", "mlp.down.0",
        "mlp.down.1"))
    assert [n.name for n in last if n.op_type == "Split"] == ["layers.1.mlp/split"]  # GQA takes packed QKV
    dense = [n for n in graph.node if n.name.startswith("layers.0.") and n.op_type == op]
    assert len(dense) == 4
    if not int4:
        report = parity.compare(model, tmp_path / "model.onnx", [PROMPT], decode_steps=3, decoder_class=FusedDecoder)
        assert report.passed and report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0
