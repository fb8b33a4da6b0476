"""Gemm → MatMul rewrite: GPT-2-style projections (exported as Gemm) become quantizable, same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from edgepack.export.gemm import gemms_to_matmuls
from edgepack.export.quantize import Int4Config, quantize_int4
from edgepack.runtime.errors import UnsupportedArchitecture
from onnx import TensorProto, helper, numpy_helper


def _model(op: str = "Gemm") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1")  # [in, out]
    w2 = numpy_helper.from_array(rng.standard_normal((32, 96)).astype(np.float32), "w2")  # [out, in]: transB
    b1 = numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b1")
    if op == "Gemm":
        nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1"),
                 helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2", transB=1)]
    else:  # no linear layer at all
        nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu")]
    out_width = 32 if op == "Gemm" else 64
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, out_width])],
                              [w1, w2, b1])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_rewrite_keeps_outputs_and_leaves_no_gemm():
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    model = _model()
    before = _run(model, x)
    assert gemms_to_matmuls(model) == 2
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Add", "MatMul"]
    assert {t.name for t in model.graph.initializer} == {"w1", "w2.T", "b1"}
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-5, atol=1e-5)


def test_quantize_reaches_gemm_weights_and_refuses_a_graph_with_none(tmp_path):
    onnx.save(_model(), tmp_path / "gemm.onnx")
    quantize_int4(tmp_path / "gemm.onnx", tmp_path / "q.onnx", Int4Config())
    ops = [n.op_type for n in onnx.load(tmp_path / "q.onnx").graph.node]
    assert ops.count("MatMulNBits") == 2
    onnx.save(_model("Relu"), tmp_path / "relu.onnx")
    with pytest.raises(UnsupportedArchitecture, match="without --int4"):
        quantize_int4(tmp_path / "relu.onnx", tmp_path / "q2.onnx", Int4Config())
