"""Factorized (ResSVD) layers in the fused graph: one MatMulNBits per factor at any rank, in→r factors
that share an input packed into one op, q/k/v pairs as two ops (r→out block-diagonal), parity with PyTorch (#4)."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import tiny
import torch
from edgepack.export import parity
from edgepack.export.fused import blocks
from edgepack.export.fused.builder import save
from edgepack.export.fused.linear import is_factorized
from edgepack.export.fused.llama import build_llama
from edgepack.runtime.fused_decoder import FusedDecoder

CONTEXT = 64
PROMPT = list(range(40, 70))
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")
# Ranks of the tiny model's projections (hidden 64, intermediate 128): whole blocks of 32 and not.
RANKS = dict(zip(PROJECTIONS, (32, 20, 12, 40, 32, 24, 33)))


def _compressed(only: tuple[str, ...] = PROJECTIONS) -> torch.nn.Module:
    """The tiny model with ``only`` these projections of its last layer factorized."""
    model = tiny.make_model()
    for name in only:
        model.set_submodule(f"model.layers.1.{name}", tiny.factorized(model.get_submodule(f"model.layers.1.{name}"),
                                                                 RANKS[name]))
    return model


def _graph(model, path, int4: bool, delta_slots: bool = False, block_qkv: bool = True):
    save(build_llama(model, CONTEXT, int4, delta_slots=delta_slots, block_qkv=block_qkv), path)
    return onnx.load(str(path), load_external_data=False).graph


def _int4_reference(model: torch.nn.Module, factor_bits: int = 4) -> torch.nn.Module:
    """The weights the int4 graph computes with: dense layers in Q4_1 form, factors with integer zero points
    (or 8-bit symmetric blocks), the tied embedding as 8-bit blocks."""
    reference = copy.deepcopy(model)
    parts = {id(part) for m in reference.modules() if is_factorized(m) for part in m}
    with torch.no_grad():
        for name, module in reference.named_modules():
            if id(module) in parts and factor_bits == 8:
                w = _dequantize_q8(blocks.quantize_q8(module.weight.numpy()))
            elif id(module) in parts:
                w = blocks.dequantize_q4_int(blocks.quantize_q4_int(module.weight.numpy()))
            elif isinstance(module, torch.nn.Linear) and name != "lm_head":
                w = blocks.dequantize_q4(blocks.quantize_q4(module.weight.numpy()))
            else:
                continue
            module.weight.copy_(torch.from_numpy(w))
        q8 = blocks.quantize_q8(reference.model.embed_tokens.weight.numpy())
        table = (q8.data.astype(np.float32) - 128) * q8.scales.reshape(q8.n_out, -1, 1)
        reference.model.embed_tokens.weight.copy_(torch.from_numpy(table.reshape(q8.n_out, -1)))
    return reference


@pytest.mark.parametrize("block_qkv", [True, False])
def test_int4_factor_pairs_are_one_matmulnbits_each_at_any_rank(tmp_path, block_qkv):
    model = _compressed()
    graph = _graph(model, tmp_path / "int4.onnx", int4=True, block_qkv=block_qkv)
    layer = [n for n in graph.node if n.name.startswith("layers.1.")]
    ops = [n.op_type for n in layer]
    # in→r: packed q/k/v, o, packed gate/up; r→out: q/k/v block-diagonal as one op (or q, k, v), o, gate,
    # up; plus down's pair. Nothing else multiplies: no block sums, remainder MatMuls or Adds, whatever the rank.
    assert ops.count("MatMulNBits") == (9 if block_qkv else 11)
    assert "MatMul" not in ops and "Add" not in ops and "Concat" not in ops
    splits = {"layers.1.mlp.gate_up_low/split"} | (set() if block_qkv else {"layers.1.attn.qkv_low/split"})
    assert {n.name for n in layer if n.op_type == "Split"} == splits  # packed QKV goes to attention whole
    nbits = {n.name: {a.name: a.i for a in n.attribute} for n in layer if n.op_type == "MatMulNBits"}
    low = "layers.1.attn.qkv.0/MatMulNBits" if block_qkv else "layers.1.attn.qkv_low.0/MatMulNBits"
    assert nbits[low]["N"] == 32 + 20 + 12
    if block_qkv:
        assert (nbits["layers.1.attn.qkv.1/MatMulNBits"]["K"], nbits["layers.1.attn.qkv.1/MatMulNBits"]["N"]) == (
            32 + 20 + 12, 64 + 32 + 32)
    assert nbits["layers.1.mlp.down.1/MatMulNBits"]["K"] == 33  # not a whole block: still one op
    assert all(len(n.input) == 4 for n in layer if n.op_type == "MatMulNBits")  # integer zero points given
    # The dense layer keeps the exact Q4_1 form (its remainders folded into the packed projections).
    assert any(n.name == "layers.0.attn.qkv/MatMulNBits" for n in graph.node)
    decoder = FusedDecoder(tmp_path / "int4.onnx")
    ref = _torch_logits(_int4_reference(model), PROMPT)
    got = decoder.forward(PROMPT, decoder.new_cache(), all_logits=True)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()


def _dequantize_q8(q8) -> np.ndarray:
    table = (q8.data.astype(np.float32) - 128) * q8.scales.reshape(q8.n_out, -1, 1)
    return table.reshape(q8.n_out, -1)[:, : q8.n_in]


def test_int4_graph_with_8bit_factors_matches_its_reference(tmp_path):
    """``factor_bits=8``: every factor is one symmetric 8-bit MatMulNBits (no zero points), dense layers keep
    the exact 4-bit Q4_1 form, and the graph computes what PyTorch does with those weights."""
    model = _compressed()
    save(build_llama(model, CONTEXT, True, factor_bits=8, block_qkv=False), tmp_path / "f8.onnx")  # one op a factor
    graph = onnx.load(str(tmp_path / "f8.onnx"), load_external_data=False).graph
    nbits = {n.name: ({a.name: a.i for a in n.attribute}, len(n.input)) for n in graph.node
             if n.op_type == "MatMulNBits"}
    factors = {k: v for k, v in nbits.items() if k.startswith("layers.1.")}
    assert len(factors) == 11 and all(a["bits"] == 8 and inputs == 3 for a, inputs in factors.values())
    assert nbits["layers.0.attn.qkv/MatMulNBits"][0]["bits"] == 4
    decoder = FusedDecoder(tmp_path / "f8.onnx")
    ref = _torch_logits(_int4_reference(model, factor_bits=8), PROMPT)
    got = decoder.forward(PROMPT, decoder.new_cache(), all_logits=True)
    assert np.abs(got - ref).max() < 0.03 * np.abs(ref).max()
    # closer to the float model than 4-bit factors are
    float_logits = _torch_logits(model, PROMPT)
    assert np.abs(ref - float_logits).max() < np.abs(_torch_logits(_int4_reference(model), PROMPT) - float_logits).max()


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("only", [PROJECTIONS, ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")])
def test_float_graph_of_packed_factor_pairs_matches_pytorch(tmp_path, only):
    """All projections factorized, or a mix (q, k packed with v plain; up factorized, gate plain)."""
    model = _compressed(only)
    graph = _graph(model, tmp_path / "f32.onnx", int4=False)
    names = {n.name for n in graph.node}
    # all three of q/k/v factorized: packed as two ops; two of them: their in→r halves packed
    packed = len(only) == len(PROJECTIONS)
    assert ("layers.1.attn.qkv.0/MatMul" if packed else "layers.1.attn.qkv_low.0/MatMul") in names
    assert ("layers.1.mlp.gate_up_low.0/MatMul" in names) == ("mlp.gate_proj" in only)  # one pair: nothing to pack
    report = parity.compare(model, tmp_path / "f32.onnx", [PROMPT], decode_steps=4, decoder_class=FusedDecoder)
    assert report.passed and report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0


def test_factor_pairs_keep_one_delta_slot_per_projection(tmp_path):
    """Packing the in→r factors leaves each factorized projection its own delta side branch; packed q/k/v
    pairs take one packed slot, as a dense packed projection does."""
    graph = _graph(_compressed(), tmp_path / "slots.onnx", int4=True, delta_slots=True)
    inputs = {i.name for i in graph.input}
    assert {"delta.layers.1.attn.qkv.a", "delta.layers.1.attn.o.a"} <= inputs
    assert {f"delta.layers.1.mlp.{p}.a" for p in ("gate", "up", "down")} <= inputs
    decoder = FusedDecoder(tmp_path / "slots.onnx")
    assert np.isfinite(decoder.forward(PROMPT, decoder.new_cache())).all()


@pytest.mark.parametrize("factor_bits", [4, 8])
def test_memory_model_counts_the_linear_bytes_the_int4_graph_stores(tmp_path, factor_bits):
    """The planner's byte count of factorized layers (runtime/memory.py) is what the exporter writes, at
    either factor width."""
    from edgepack.runtime import memory

    model = _compressed()
    save(build_llama(model, CONTEXT, True, factor_bits=factor_bits), tmp_path / "int4.onnx")
    graph = onnx.load(str(tmp_path / "int4.onnx")).graph
    stored = sum(onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer
                 if t.name.startswith("layers.") and not t.name.endswith("norm.weight"))
    shape = memory.ModelShape.from_config(model.config.to_dict())
    ranks = {f"model.layers.1.{name}": rank for name, rank in RANKS.items()}
    assert stored == memory.weight_bytes(shape, "int4", ranks, graph="fused", factor_bits=factor_bits)["linear"]
