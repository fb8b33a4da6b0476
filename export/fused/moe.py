"""Mixture-of-experts MLP blocks (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, FlexOlmo, GraniteMoE and its shared-MLP
variant, GPT-OSS) as one onnxruntime ``MoE`` op, or ``QMoE`` in int4 / int8 graphs.

onnxruntime's CPU kernels take the router's logits, softmax them, pick the top k experts per token (renormalizing
their weights when ``normalize_routing_weights`` is set: Mixtral always, the others by ``norm_topk_prob``) and run
the chosen experts' SwiGLU MLPs. Its CPU kernel reads gate and up as one matrix with their rows interleaved
(``swiglu_fusion=1``: gate row j, then up row j), so that is how the experts are stacked here. The router stays a
float32 MatMul at every width: the top-k choice is a comparison of its outputs, and rounding the router moves
tokens to other experts. QMoE's experts are int4 with integer zero points or symmetric int8, blocks of 32 along
the input, as the factor pairs of ``linear.py``; it needs hidden and expert widths that are whole blocks, and a
model whose widths are not keeps float32 experts in an int4 graph. Qwen2-MoE's shared expert is a plain MLP
beside the routed ones, scaled by sigmoid(a linear gate); GraniteMoE-shared's shared MLP is added unscaled. GraniteMoE
keeps its experts as 3-D parameters (gate and up halves of one [E, 2·inter, hidden] tensor) and takes softmax over
the top-k logits, which is the renormalized top-k of the full softmax. GPT-OSS's router has a bias, its 3-D experts
have biases, and they clamp gate and up and compute (up + 1) · gate · sigmoid(1.702 · gate): the op's ``swiglu_limit``,
``activation_alpha`` and ``activation_beta``. Experts have no delta slots for their weights (the op takes stacked
weights, not side branches): a delta that changes them is refused when it is loaded (runtime/delta.py); GPT-OSS's
router and expert biases get dense slots.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
from edgepack.export.fused.blocks import BLOCK, quantize_q4_int, quantize_q8
from edgepack.export.fused.builder import MS_DOMAIN, trimmed
from edgepack.export.fused.linear import ACCURACY_LEVEL, LinearEmitter
from edgepack.runtime.errors import UnsupportedArchitecture

MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "flex_olmo", "granitemoe", "granitemoeshared", "gpt_oss")
# experts held as 3-D parameters, not nn.Linear modules: a delta factorizes none of them, on either graph
STACKED_EXPERT_TYPES = ("granitemoe", "granitemoeshared", "granitemoehybrid", "gpt_oss")


def experts_of(config: Any) -> int:
    """Routed experts a layer (0 for a dense model), under any of the names configs use."""
    count = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or getattr(
        config, "n_routed_experts", None)
    return int(count or 0)


def check_moe(config: Any) -> None:
    """Refuse, by name, mixture-of-experts settings the MoE op does not compute."""
    if getattr(config, "model_type", "") not in MOE_TYPES:
        return
    if experts_of(config) < 2:  # GraniteMoE with no experts has no MLP block at all
        raise UnsupportedArchitecture(f"model type '{config.model_type}' with {experts_of(config)} experts a layer "
                                      "has no MLP the fused graph describes; build with --graph optimum")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise UnsupportedArchitecture(f"the fused graph's experts are SwiGLU MLPs, this model's use "
                                      f"{config.hidden_act}; build with --graph optimum")
    top_k = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if not 1 <= top_k <= experts_of(config):
        raise UnsupportedArchitecture(f"num_experts_per_tok must be between 1 and the {experts_of(config)} experts, "
                                      f"this model sets {top_k}")


def block_of(layer: Any) -> Any:
    """A decoder layer's MLP block (Mixtral calls it ``block_sparse_moe``)."""
    return layer.mlp if hasattr(layer, "mlp") else layer.block_sparse_moe


def is_sparse(block: Any) -> bool:
    return hasattr(block, "experts") and hasattr(block, "gate") or _parallel(block) or _gpt_oss(block)


def _gpt_oss(block: Any) -> bool:
    """GPT-OSS's block: a router with a bias, and the experts as 3-D parameters with biases."""
    return hasattr(block, "router") and hasattr(getattr(block, "experts", None), "gate_up_proj")


def _parallel(block: Any) -> bool:
    """GraniteMoE's block: a router module and the experts as 3-D parameters."""
    return hasattr(block, "router") and hasattr(block, "input_linear")


def moe_block(lin: LinearEmitter, x: str, block: Any, config: Any, name: str,
              dense_mlp: Callable[[str, Any, str], str], shared_mlp: Any = None) -> str:
    """The routed experts of ``block`` applied to ``x`` [1, S, hidden], plus its shared expert when it has one
    (Qwen2-MoE's in the block, GraniteMoE-shared's ``shared_mlp`` in the layer; ``dense_mlp`` emits it as the
    model's other MLPs are emitted)."""
    b = lin.builder
    attrs = dict(k=int(config.num_experts_per_tok), activation_type="swiglu", swiglu_fusion=1,
                 activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=int(bool(getattr(block, "norm_topk_prob", True))))
    params = (None, None)  # the expert biases' parameters, where a delta may change them (dense slots)
    if _gpt_oss(block):
        router = _biased_router(lin, x, block.router, name)
        (gate_up, down), biases = _stacked_gpt_oss(block.experts)
        params = (block.experts.gate_up_proj_bias, block.experts.down_proj_bias)  # laid out as the op takes them
        # its experts clamp gate and up to the limit and compute (up + 1) · gate · sigmoid(1.702 · gate)
        attrs |= dict(activation_alpha=float(block.experts.alpha), activation_beta=1.0,
                      swiglu_limit=float(block.experts.limit))
    else:
        gate = block.router.layer if _parallel(block) else block.gate
        router = lin.delta(x, lin.float_weight(x, _array(gate.weight), f"{name}.router"), gate.in_features, [gate],
                           f"{name}.router")
        if _parallel(block):
            (gate_up, down), biases = _stacked_parameters(block), (None, None)
        else:
            projections = [_projections(e) for e in block.experts]
            (gate_up, down), biases = _stacked(projections), _biases(projections)
    logits = b.op1("Reshape", [router, b.const([-1, gate_up.shape[0]])], f"{name}/router_rows")
    bias_inputs = (_optional(lin, biases[0], f"{name}.gate_up", params[0]),
                   _optional(lin, biases[1], f"{name}.down", params[1]))
    quantized = (lin.int4 or lin.int8) and gate_up.shape[2] % BLOCK == 0 and down.shape[2] % BLOCK == 0
    if quantized:
        out = _qmoe(lin, x, logits, gate_up, down, bias_inputs, name, attrs, bits=4 if lin.int4 else 8)
    else:
        inputs = [x, logits, b.weight(f"{name}.experts.gate_up", gate_up), bias_inputs[0],
                  b.weight(f"{name}.experts.down", down), bias_inputs[1]]
        out = b.op1("MoE", trimmed(inputs), f"{name}/MoE", domain=MS_DOMAIN, **attrs)
    if shared_mlp is not None:  # GraniteMoE-shared: input_linear packs gate and up (gate first), as Phi-3's gate_up
        view = SimpleNamespace(gate_up_proj=shared_mlp.input_linear, down_proj=shared_mlp.output_linear)
        return b.op1("Add", [out, dense_mlp(x, view, f"{name}.shared_mlp")], f"{name}/with_shared")
    shared = getattr(block, "shared_expert", None)
    if shared is None:
        return out
    gate = block.shared_expert_gate
    gate_logit = lin.delta(x, lin.float_weight(x, _array(gate.weight), f"{name}.shared_gate"), gate.in_features,
                           [gate], f"{name}.shared_gate")
    scale = b.op1("Sigmoid", [gate_logit], f"{name}/shared_gate")
    shared_out = b.op1("Mul", [dense_mlp(x, shared, f"{name}.shared_expert"), scale], f"{name}/shared_scaled")
    return b.op1("Add", [out, shared_out], f"{name}/with_shared")


def _qmoe(lin: LinearEmitter, x: str, logits: str, gate_up: np.ndarray, down: np.ndarray,
          biases: tuple[str, str], name: str, attrs: dict[str, Any], bits: int) -> str:
    """QMoE over int4 (integer zero points) or int8 (symmetric, zero point 128 implied) blocks of 32."""
    b = lin.builder
    tensors = {}
    for kind, stacked in (("gate_up", gate_up), ("down", down)):
        codes, scales, zero_points = _quantized(stacked, bits)
        tensors[kind] = (b.weight(f"{name}.experts.{kind}.qweight", codes),
                         b.weight(f"{name}.experts.{kind}.scales", scales),
                         "" if zero_points is None else b.weight(f"{name}.experts.{kind}.zero_points", zero_points))
    (w1, s1, z1), (w2, s2, z2) = tensors["gate_up"], tensors["down"]
    inputs = [x, logits, w1, s1, biases[0], w2, s2, biases[1], "", "", "", z1, z2]
    return b.op1("QMoE", trimmed(inputs), f"{name}/QMoE", domain=MS_DOMAIN, expert_weight_bits=bits,
                 block_size=BLOCK, accuracy_level=ACCURACY_LEVEL, **attrs)


def _quantized(stacked: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[E, N, K] float → QMoE's codes [E, N, K·bits/8], scales [E, N, K/32] and (int4) zero points."""
    codes, scales, zero_points = [], [], []
    for w in stacked:
        if bits == 4:
            q = quantize_q4_int(w)
            codes.append(q.packed.reshape(q.n_out, -1))
            zero_points.append(q.zero_points.reshape(q.n_out, -1))
        else:
            q = quantize_q8(w)
            codes.append(q.data.reshape(q.n_out, -1))
        scales.append(q.scales.reshape(q.n_out, -1))
    return np.stack(codes), np.stack(scales), np.stack(zero_points) if zero_points else None


def _stacked(projections: list[tuple[Any, Any, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """Gate and up of every expert as [E, 2·inter, hidden] with their rows interleaved, and down [E, hidden, inter]."""
    gate_up, down = [], []
    for gate, up, out in projections:
        pair = np.stack([_array(gate.weight), _array(up.weight)], axis=1)  # [inter, 2, hidden]
        gate_up.append(pair.reshape(-1, pair.shape[-1]))
        down.append(_array(out.weight))
    return np.stack(gate_up), np.stack(down)


def _stacked_parameters(block: Any) -> tuple[np.ndarray, np.ndarray]:
    """GraniteMoE's 3-D experts: input_linear [E, 2·inter, hidden] (gate rows, then up rows) interleaved row by row."""
    both = _array(block.input_linear.weight)
    inter = both.shape[1] // 2
    gate_up = np.stack([both[:, :inter], both[:, inter:]], axis=2).reshape(both.shape)
    return np.ascontiguousarray(gate_up), _array(block.output_linear.weight)


def _biased_router(lin: LinearEmitter, x: str, router: Any, name: str) -> str:
    """GPT-OSS's router logits x·Wᵀ + b in float32; W and b are parameters of its router module, not a linear layer,
    so a delta's change of either is a dense slot."""
    b = lin.builder
    weight = lin.parameter(f"{name}.router.weight", router.weight)
    logits = b.op1("FusedMatMul", [x, weight], f"{name}/router", domain=MS_DOMAIN, transB=1)
    bias = lin.parameter(f"{name}.router.bias", router.bias)
    return b.op1("Add", [logits, bias], f"{name}/router_bias")


def _stacked_gpt_oss(experts: Any) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """GPT-OSS's 3-D experts: gate_up [E, hidden, 2·inter] with gate and up in alternate columns, down
    [E, inter, hidden]; transposed, gate_up's rows alternate as the op wants."""
    gate_up = np.ascontiguousarray(_array(experts.gate_up_proj).transpose(0, 2, 1))
    down = np.ascontiguousarray(_array(experts.down_proj).transpose(0, 2, 1))
    return (gate_up, down), (_array(experts.gate_up_proj_bias), _array(experts.down_proj_bias))


def _biases(parts: list[tuple[Any, Any, Any]]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Interleaved gate/up biases [E, 2·inter] and down biases [E, hidden], None where no expert has one."""
    gate_up = down = None
    if any(g.bias is not None or u.bias is not None for g, u, _ in parts):
        gate_up = np.stack([np.stack([_bias_or_zeros(g), _bias_or_zeros(u)], axis=1).reshape(-1) for g, u, _ in parts])
    if any(d.bias is not None for _, _, d in parts):
        down = np.stack([_bias_or_zeros(d) for _, _, d in parts])
    return gate_up, down


def _projections(expert: Any) -> tuple[Any, Any, Any]:
    """(gate, up, down) of one expert: Mixtral names them w1, w3, w2."""
    import torch.nn as nn

    parts = (expert.w1, expert.w3, expert.w2) if hasattr(expert, "w1") else (
        expert.gate_proj, expert.up_proj, expert.down_proj)
    if not all(isinstance(p, nn.Linear) for p in parts):
        raise UnsupportedArchitecture("the fused graph's experts are plain nn.Linear layers; this model's experts "
                                      f"are {type(parts[0]).__name__} (compressed experts are not supported)")
    return parts


def _optional(lin: LinearEmitter, value: np.ndarray | None, name: str, param: Any = None) -> str:
    """An optional bias input ("" without one), with a dense delta slot where ``param`` is its parameter."""
    if value is None:
        return ""
    weight = lin.builder.weight(f"{name}.bias", value)
    return weight if param is None else lin.dense_delta(weight, param)


def _bias_or_zeros(linear: Any) -> np.ndarray:
    return _array(linear.bias) if linear.bias is not None else np.zeros(linear.out_features, np.float32)


def _array(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()
