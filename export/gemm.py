"""Gemm → MatMul (+ Add) for weight-only quantization.

onnxruntime's MatMulNBits quantizer rewrites MatMul nodes only. GPT-2-style models (``Conv1D``,
``addmm``) export their projections as Gemm, so an "int4" package of one kept every weight in
float32; rewriting each Gemm whose weight is a constant lets the quantizer see it.
"""

from __future__ import annotations

from typing import Any


def gemms_to_matmuls(model: Any) -> int:
    """Rewrite, in place, every Gemm of ``model`` (an onnx ModelProto) with a constant 2-D weight, alpha = beta
    = 1 and no transposed input as MatMul (+ Add of its bias); return how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rewritten, nodes = 0, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        weight = inits.get(node.input[1]) if node.op_type == "Gemm" and len(node.input) > 1 else None
        if (weight is None or len(weight.dims) != 2 or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        b_name = weight.name
        if attrs.get("transB", 0):
            b_name = f"{weight.name}.T"
            if b_name not in inits:
                inits[b_name] = numpy_helper.from_array(numpy_helper.to_array(weight).T.copy(), b_name)
                graph.initializer.append(inits[b_name])
            uses[weight.name] -= 1
            if uses[weight.name] == 0:
                graph.initializer.remove(weight)
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}/matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b_name], [product], name=f"{node.name}/MatMul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}/Add"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten
