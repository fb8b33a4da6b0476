"""Mixtures of experts in the fused graph (export/fused/moe.py): Mixtral, Qwen2-MoE (a shared expert beside the
routed ones), Qwen3-MoE (with and without renormalized top-k weights, a dense layer among sparse ones) and OLMoE,
against transformers in float32; QMoE in int4 / int8 graphs; deltas on the layers outside the experts."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny
import torch
from edgepack.export import parity
from edgepack.export.fused.blocks import dequantize_q4_int, quantize_q4_int
from edgepack.export.fused.builder import save
from edgepack.export.fused.llama import build_llama, check_supported
from edgepack.runtime.errors import PackageError, UnsupportedArchitecture
from edgepack.runtime.fused_decoder import FusedDecoder

from tests.export.test_fused_archs import CONTEXT, PROMPTS, assert_float_parity, make_model, save_finetuned

_ROUTED = {"num_experts_per_tok": 2}
VARIANTS = {
    "mixtral": ("mixtral", {"num_local_experts": 4, **_ROUTED}),
    "mixtral-window": ("mixtral", {"num_local_experts": 4, "sliding_window": 5, **_ROUTED}),
    "qwen2_moe": ("qwen2_moe", {"num_experts": 4, "moe_intermediate_size": 64, "shared_expert_intermediate_size": 96,
                                "norm_topk_prob": True, **_ROUTED}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "moe_intermediate_size": 64, "head_dim": 16,
                                "norm_topk_prob": True, **_ROUTED}),
    # top-k weights as the softmax gave them (not summing to 1); layer 0 a dense MLP
    "qwen3_moe-dense0": ("qwen3_moe", {"num_experts": 4, "moe_intermediate_size": 64, "head_dim": 16,
                                       "norm_topk_prob": False, "mlp_only_layers": [0], **_ROUTED}),
    "olmoe": ("olmoe", {"num_experts": 4, **_ROUTED}),  # q/k normed over their whole width
    "mixtral-top1": ("mixtral", {"num_local_experts": 3, "num_experts_per_tok": 1}),
    "flex_olmo": ("flex_olmo", {"num_experts": 4, **_ROUTED}),  # OLMo 2's norms on block outputs, OLMoE's block
    # 3-D expert parameters, Granite's multipliers; the shared variant adds an unscaled dense MLP
    "granitemoe": ("granitemoe", {"num_local_experts": 4, "embedding_multiplier": 3.0, "residual_multiplier": 0.5,
                                  "attention_multiplier": 0.3, "logits_scaling": 2.0, **_ROUTED}),
    "granitemoeshared": ("granitemoeshared", {"num_local_experts": 4, "shared_intermediate_size": 96,
                                              "residual_multiplier": 0.5, **_ROUTED}),
}


def _ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float_graph_matches_pytorch(variant, tmp_path):
    assert_float_parity(*VARIANTS[variant], tmp_path / "f32.onnx")
    sparse = 1 if variant == "qwen3_moe-dense0" else 2
    assert _ops(tmp_path / "f32.onnx").count("MoE") == sparse


def _block_graph(block, config, int4: bool, tmp_path):
    """A graph of one MoE block alone: x [1, S, hidden] → the block's output."""
    from edgepack.export.fused.builder import FLOAT, GraphBuilder
    from edgepack.export.fused.linear import LinearEmitter
    from edgepack.export.fused.moe import moe_block

    b = GraphBuilder("moe")
    lin = LinearEmitter(b, int4=int4)
    out = moe_block(lin, b.add_input("x", FLOAT, [1, "S", config.hidden_size]), block, config, "moe", None)
    b.add_output(out, "y", FLOAT, [1, "S", config.hidden_size])
    save(b.to_model(), tmp_path / "block.onnx")
    import onnxruntime as ort

    return ort.InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"])


def test_int4_experts_are_qmoe_over_the_exporters_codes(tmp_path):
    """QMoE reads the codes, scales and zero points as ``quantize_q4_int`` lays them out: its output is close to
    the block with each expert's weights replaced by their int4 values, four times closer than to the float block
    (what is left is the int8 activations of accuracy level 4)."""
    model_type, overrides = VARIANTS["mixtral"]
    model = make_model(model_type, **overrides)
    block = model.model.layers[0].block_sparse_moe
    x = np.random.default_rng(0).standard_normal((1, 9, model.config.hidden_size)).astype(np.float32)
    session = _block_graph(block, model.config, True, tmp_path)
    assert [n.op_type for n in onnx.load(str(tmp_path / "block.onnx")).graph.node].count("QMoE") == 1
    got = session.run(None, {"x": x})[0]
    with torch.no_grad():
        exact = block(torch.from_numpy(x))[0].numpy()
        for expert in block.experts:
            for linear in (expert.w1, expert.w2, expert.w3):
                linear.weight.copy_(torch.from_numpy(dequantize_q4_int(quantize_q4_int(linear.weight.numpy()))))
        rounded = block(torch.from_numpy(x))[0].numpy()
    assert np.abs(got - rounded).max() < 0.25 * np.abs(got - exact).max()


def test_int8_graph_runs_qmoe_and_stays_close(tmp_path):
    model_type, overrides = VARIANTS["qwen3_moe"]
    model = make_model(model_type, **overrides)
    save(build_llama(model, CONTEXT, int8=True), tmp_path / "int8.onnx")
    assert _ops(tmp_path / "int8.onnx").count("QMoE") == 2
    report = parity.compare(model, tmp_path / "int8.onnx", PROMPTS, decode_steps=4, decoder_class=FusedDecoder)
    assert report.top1_agreement > 0.9


def test_widths_that_are_not_whole_blocks_keep_float_experts(tmp_path):
    model = make_model("mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=72)  # 72 % 32
    save(build_llama(model, CONTEXT, int4=True), tmp_path / "int4.onnx")
    ops = _ops(tmp_path / "int4.onnx")
    assert ops.count("MoE") == 2 and "QMoE" not in ops and "MatMulNBits" in ops


def test_moe_settings_the_op_lacks_are_refused_by_name():
    from transformers import MixtralConfig

    with pytest.raises(UnsupportedArchitecture, match="SwiGLU MLPs.*gelu"):
        check_supported(MixtralConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu"))


def _saved(tmp_path, variant: str, move: str) -> tuple:
    """A base and a fine-tune of ``variant`` whose decoder parameters move, the experts' (GraniteMoE's 3-D ones
    included) only with ``move="all"``."""
    def moves(name: str) -> bool:
        expert = ".experts." in name or "block_sparse_moe.input_linear" in name or "_moe.output_linear" in name
        return "layers." in name and (move == "all" or not expert)

    return save_finetuned(*VARIANTS[variant], tmp_path, moves)


@pytest.mark.parametrize("variant", ["qwen2_moe", "olmoe", "granitemoeshared"])
def test_a_delta_outside_the_experts_matches_merged_weights(variant, tmp_path):
    """Attention, norms, routers and Qwen2-MoE's shared expert (and its gate) take deltas in the fused graph."""
    from edgepack.runtime import delta_file, load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.delta.make import DeltaConfig, make

    base, tuned = _saved(tmp_path, variant, move="outside")
    manifest = build(BuildConfig(model=str(base), graph="fused", delta_slots=True, context=CONTEXT), tmp_path / "pkg")
    assert manifest.plan["graph"] == "fused"
    delta = make(str(base), str(tuned), DeltaConfig(method="truncsvd", rank=8))
    assert any(name.endswith(("mlp.gate", "router.layer")) for name in delta.layers)  # the router moved
    delta_file.write(delta, tmp_path / "d.safetensors")
    model = load(tmp_path / "pkg", delta=tmp_path / "d.safetensors")
    got = model.decoder.forward(PROMPTS[0], model.decoder.new_cache(), all_logits=True)
    np.testing.assert_allclose(got, tiny.merged_logits(base, PROMPTS[0], delta), atol=1e-3)


def test_a_delta_that_moves_experts_is_refused_by_the_fused_graph(tmp_path):
    from edgepack.runtime import delta_file, load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.delta.make import DeltaConfig, make

    base, tuned = _saved(tmp_path, "mixtral", move="all")
    build(BuildConfig(model=str(base), graph="fused", delta_slots=True, context=CONTEXT), tmp_path / "pkg")
    delta_file.write(make(str(base), str(tuned), DeltaConfig(method="truncsvd", rank=4)), tmp_path / "d.safetensors")
    with pytest.raises(PackageError, match=r"expert layer .*experts\.\d+\.w\d.*--graph optimum"):
        load(tmp_path / "pkg", delta=tmp_path / "d.safetensors")


def test_auto_builds_delta_slots_of_an_exportable_moe_on_optimums_graph(tmp_path):
    """Where optimum can export the model, ``--graph auto --delta-slots`` takes its graph, whose every expert
    MatMul has a slot; without slots the fused graph is the choice."""
    from edgepack.toolchain.build import BuildConfig, resolve_graph

    model_type, overrides = VARIANTS["qwen3_moe"]
    config = make_model(model_type, **overrides).config
    assert resolve_graph(BuildConfig(model="x", delta_slots=True), config).graph == "optimum"
    assert resolve_graph(BuildConfig(model="x"), config).graph == "fused"
    model_type, overrides = VARIANTS["mixtral"]
    mixtral = make_model(model_type, **overrides).config  # optimum cannot export Mixtral: fused, experts without slots
    assert resolve_graph(BuildConfig(model="x", delta_slots=True), mixtral).graph == "fused"
