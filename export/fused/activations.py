"""The MLP activations of the fused graph, as onnxruntime nodes: SiLU, ReLU, squared ReLU (Arcee, Nemotron, BitNet),
GELU exact or tanh-approximated, and xIELU (Apertus), whose parameters are graph weights with delta slots."""

from __future__ import annotations

from typing import Any

import numpy as np
from edgepack.export.fused.builder import FLOAT, MS_DOMAIN
from edgepack.export.fused.linear import LinearEmitter


def activate(lin: LinearEmitter, x: str, activation: str, name: str, module: Any = None) -> str:
    """``activation`` of x; ``module`` is the MLP's activation module, for one with parameters (xIELU)."""
    b = lin.builder
    if activation == "silu":
        return b.op1("Mul", [x, b.op1("Sigmoid", [x], f"{name}/sigmoid")], f"{name}/silu")
    if activation == "relu":
        return b.op1("Relu", [x], f"{name}/relu")
    if activation == "relu2":
        relu = b.op1("Relu", [x], f"{name}/relu")
        return b.op1("Mul", [relu, relu], f"{name}/relu2")
    if activation == "xielu":
        return _xielu(lin, x, module, name)
    # onnxruntime's FastGelu is GELU's tanh approximation, its Gelu the exact (erf) one
    return b.op1("FastGelu" if activation == "gelu_tanh" else "Gelu", [x], f"{name}/{activation}", domain=MS_DOMAIN)


def _xielu(lin: LinearEmitter, x: str, act: Any, name: str) -> str:
    """xIELU (Apertus), with the layer's own parameters: αp·x² + βx for x > 0, else αn·(e^min(x, ε) − 1 − x) + βx,
    where αp = softplus(a_p) and αn = β + softplus(a_n). a_p and a_n are graph weights with delta slots."""
    b = lin.builder

    def scalar(value: Any) -> str:
        return b.const(np.float32(float(value.detach().float().reshape(-1)[0])), np.float32)

    def rounded(value: str, dtype: Any, kind: str) -> str:
        # transformers keeps these parameters in bfloat16 even in a float32 model, and computes α in that dtype
        elem = _ROUNDING.get(str(dtype).removeprefix("torch."))
        if elem is None:
            return value
        return b.op1("Cast", [b.op1("Cast", [value], f"{name}/{kind}_round", to=elem)], f"{name}/{kind}_back", to=FLOAT)

    def softplus(param: Any, kind: str) -> str:
        stored = b.weight(f"{name}.act.{kind}", param.detach().float().cpu().numpy())
        raw = rounded(lin.dense_delta(stored, param), param.dtype, kind)
        return rounded(b.op1("Softplus", [raw], f"{name}/xielu_{kind}"), param.dtype, f"{kind}_softplus")

    beta = scalar(act.beta)
    alpha_p = softplus(act.alpha_p, "alpha_p")
    alpha_n = b.op1("Add", [softplus(act.alpha_n, "alpha_n"), beta], f"{name}/xielu_alpha_n")
    alpha_n = rounded(alpha_n, act.alpha_n.dtype, "alpha_n_sum")
    linear = b.op1("Mul", [x, beta], f"{name}/xielu_bx")
    positive = b.op1("Add", [b.op1("Mul", [b.op1("Mul", [x, x], f"{name}/xielu_x2"), alpha_p], f"{name}/xielu_px2"),
                             linear], f"{name}/xielu_pos")
    low = b.op1("Exp", [b.op1("Min", [x, scalar(act.eps)], f"{name}/xielu_min")], f"{name}/xielu_exp")
    below = b.op1("Sub", [b.op1("Sub", [low, b.const(np.float32(1.0), np.float32)], f"{name}/xielu_expm1"), x],
                  f"{name}/xielu_sub")
    negative = b.op1("Add", [b.op1("Mul", [below, alpha_n], f"{name}/xielu_neg_scale"), linear], f"{name}/xielu_neg")
    above = b.op1("Greater", [x, b.const(np.float32(0.0), np.float32)], f"{name}/xielu_above")
    return b.op1("Where", [above, positive, negative], f"{name}/xielu")


_ROUNDING = {"bfloat16": 16, "float16": 10}  # onnx.TensorProto's BFLOAT16 and FLOAT16
