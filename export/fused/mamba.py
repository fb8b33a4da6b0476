"""State-space layers in the fused graph: Mamba's (and Falcon-Mamba's, which RMS-norms B, C and Δ) and Mamba 2's
selective-scan mixers, and the causal convolution with a state they share with LFM2's short convolutions.

A Mamba layer keeps two states instead of a KV cache: its convolution's last ``conv_kernel - 1`` inputs, graph input
``past_conv.i`` / output ``present_conv.i`` [1, inner, kernel - 1], and the SSM state h, ``past_ssm.i`` /
``present_ssm.i`` [inner, state]. The runtime binds one buffer as both past and present, as it does the KV cache
(``runtime/fused_decoder.py``). Per position t, with Δ = softplus(dt_proj(dt)) and A = -exp(A_log):
h ← exp(Δ·A) ⊙ h + (Δ·x) Bᵀ, y = h C + D ⊙ x, and the output is out_proj(y ⊙ silu(z)). The recurrence is one ONNX
``Scan`` over this step's positions (one iteration when decoding), everything else is computed for all positions at
once, in float32, as transformers' ``slow_forward`` does.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from edgepack.export.fused.builder import FLOAT, GraphBuilder
from edgepack.export.fused.linear import LinearEmitter, _array
from onnx import helper


def causal_conv(lin: LinearEmitter, channels: str, conv: Any, i: int, name: str) -> str:
    """``conv`` (a depthwise nn.Conv1d) over [1, C, S] ``channels`` after the layer's state of the previous
    kernel - 1 positions (``past_conv.i``), which it updates (``present_conv.i``): the Concat that reads the state
    runs before the Slice that writes it, so one buffer can be both. Returns [1, C, S]."""
    b = lin.builder
    width, kernel = int(conv.weight.shape[0]), int(conv.kernel_size[0])
    past = b.add_input(f"past_conv.{i}", FLOAT, [1, width, kernel - 1])
    window = b.op1("Concat", [past, channels], f"{name}/window", axis=2)
    present = f"present_conv.{i}"
    b.op_named("Slice", [window, b.const([1 - kernel]), b.const([2**62]), b.const([2])], [present], f"{name}/state")
    b.outputs.append(helper.make_tensor_value_info(present, FLOAT, [1, width, kernel - 1]))
    inputs = [window, lin.parameter(f"{name}.weight", conv.weight)]
    if conv.bias is not None:
        inputs.append(lin.parameter(f"{name}.bias", conv.bias))
    return b.op1("Conv", inputs, f"{name}/conv", group=width, kernel_shape=[kernel])


def mamba_mixer(lin: LinearEmitter, x: str, mixer: Any, i: int) -> str:
    """Mamba's mixer on the normed [1, S, hidden] ``x``: in_proj, the causal convolution, the selective scan with
    its state, the gate and out_proj."""
    b = lin.builder
    name = f"layers.{i}.mixer"
    inner, state, rank = int(mixer.intermediate_size), int(mixer.ssm_state_size), int(mixer.time_step_rank)
    projected = lin.linear(x, mixer.in_proj, f"{name}.in_proj")
    h, gate = b.op("Split", [projected, b.const([inner, inner])], f"{name}/split", 2, axis=-1)
    channels = b.op1("Transpose", [h], f"{name}/channels", perm=[0, 2, 1])
    conv = causal_conv(lin, channels, mixer.conv1d, i, f"{name}.conv1d")
    h = _silu(b, b.op1("Transpose", [conv], f"{name}/positions", perm=[0, 2, 1]), f"{name}/conv_act")  # [1, S, I]
    params = lin.linear(h, mixer.x_proj, f"{name}.x_proj")
    dt, B, C = b.op("Split", [params, b.const([rank, state, state])], f"{name}/ssm_params", 3, axis=-1)
    eps = getattr(mixer, "rms_eps", None)
    if eps is not None:  # Falcon-Mamba: B, C and dt RMS-normed, without weights
        dt, B, C = (_rms(b, t, width, float(eps), f"{name}/{kind}_rms")
                    for t, width, kind in ((dt, rank, "dt"), (B, state, "b"), (C, state, "c")))
    delta = b.op1("Softplus", [lin.linear(dt, mixer.dt_proj, f"{name}.dt_proj")], f"{name}/softplus")  # [1, S, I]
    a_log = lin.parameter(f"{name}.A_log", mixer.A_log)
    A = b.op1("Neg", [b.op1("Exp", [a_log], f"{name}/exp_a")], f"{name}/A")  # [I, N]
    column = b.const([1, -1, inner, 1])
    delta_col = b.op1("Reshape", [delta, column], f"{name}/delta_col")  # [1, S, I, 1]
    decay = b.op1("Exp", [b.op1("Mul", [delta_col, A], f"{name}/delta_a")], f"{name}/decay")  # [1, S, I, N]
    dx = b.op1("Reshape", [b.op1("Mul", [delta, h], f"{name}/delta_x"), column], f"{name}/dx_col")
    rows = b.const([1, -1, 1, state])
    inject = b.op1("Mul", [dx, b.op1("Reshape", [B, rows], f"{name}/b_rows")], f"{name}/inject")  # [1, S, I, N]
    readout = b.op1("Reshape", [C, b.const([1, -1, state, 1])], f"{name}/c_cols")  # [1, S, N, 1]
    y = _scan(b, decay, inject, readout, (inner, state), i, name)  # [S, I, 1]
    y = b.op1("Reshape", [y, b.const([1, -1, inner])], f"{name}/y")
    d = lin.parameter(f"{name}.D", mixer.D)
    y = b.op1("Add", [y, b.op1("Mul", [h, d], f"{name}/skip")], f"{name}/with_skip")
    y = b.op1("Mul", [y, _silu(b, gate, f"{name}/gate_act")], f"{name}/gated")
    return lin.linear(y, mixer.out_proj, f"{name}.out_proj")


def mamba2_mixer(lin: LinearEmitter, x: str, mixer: Any, i: int) -> str:
    """Mamba 2's mixer (Granite 4's hybrid layers) on the normed [1, S, hidden] ``x``: in_proj to the gate z, x·B·C
    and one Δ per head; the causal convolution of x·B·C; per head (B and C shared by the heads of a group, A and D one
    number a head) the scan of an SSM state [heads, head_dim, N]; y ⊙ silu(z) RMS-normed, then out_proj."""
    b = lin.builder
    name = f"layers.{i}.mamba"
    heads, dim, state = int(mixer.num_heads), int(mixer.head_dim), int(mixer.ssm_state_size)
    inner, groups = int(mixer.intermediate_size), int(mixer.n_groups)
    width = groups * state
    if getattr(mixer, "ssm_in_multiplier", None) is not None:  # Falcon-H1's μP multipliers: of the input, and
        x = b.op1("Mul", [x, b.const(np.float32(mixer.ssm_in_multiplier), np.float32)], f"{name}/in_scaled")
    projected = lin.linear(x, mixer.in_proj, f"{name}.in_proj")
    if getattr(mixer, "mup_vector", None) is not None:  # of each section of the projection (z, x, B, C, dt)
        projected = b.op1("Mul", [projected, b.weight(f"{name}.mup_vector", _array(mixer.mup_vector).reshape(-1))],
                          f"{name}/mup")
    gate, xbc, dt = b.op("Split", [projected, b.const([inner, inner + 2 * width, heads])], f"{name}/split", 3,
                         axis=-1)
    conv = causal_conv(lin, b.op1("Transpose", [xbc], f"{name}/channels", perm=[0, 2, 1]), mixer.conv1d, i,
                       f"{name}.conv1d")
    xbc = _silu(b, b.op1("Transpose", [conv], f"{name}/positions", perm=[0, 2, 1]), f"{name}/conv_act")
    h, B, C = b.op("Split", [xbc, b.const([inner, width, width])], f"{name}/xbc", 3, axis=-1)
    dt_bias = lin.parameter(f"{name}.dt_bias", mixer.dt_bias)
    delta = b.op1("Softplus", [b.op1("Add", [dt, dt_bias], f"{name}/dt_biased")], f"{name}/softplus")  # [1, S, H]
    low, high = (float(v) for v in mixer.time_step_limit)
    if low > 0.0 or high < float("inf"):
        delta = b.op1("Clip", [delta, b.const(np.float32(low), np.float32), b.const(np.float32(high), np.float32)],
                      f"{name}/dt_limit")
    a_log = lin.parameter(f"{name}.A_log", mixer.A_log)
    A = b.op1("Neg", [b.op1("Exp", [a_log], f"{name}/exp_a")], f"{name}/A")  # [H]
    decay = b.op1("Exp", [b.op1("Mul", [delta, A], f"{name}/delta_a")], f"{name}/decay")  # [1, S, H]
    decay = b.op1("Reshape", [decay, b.const([1, -1, heads, 1, 1])], f"{name}/decay_heads")
    per_head = b.op1("Reshape", [h, b.const([1, -1, heads, dim])], f"{name}/x_heads")  # [1, S, H, P]
    dx = b.op1("Mul", [per_head, b.op1("Reshape", [delta, b.const([1, -1, heads, 1])], f"{name}/delta_heads")],
               f"{name}/delta_x")
    dx = b.op1("Reshape", [dx, b.const([1, -1, heads, dim, 1])], f"{name}/dx_col")
    B = _per_head(b, B, (groups, heads, state), f"{name}/b")  # [1, S, H, N]
    inject = b.op1("Mul", [dx, b.op1("Reshape", [B, b.const([1, -1, heads, 1, state])], f"{name}/b_rows")],
                   f"{name}/inject")  # [1, S, H, P, N]
    C = _per_head(b, C, (groups, heads, state), f"{name}/c")
    readout = b.op1("Reshape", [C, b.const([1, -1, heads, state, 1])], f"{name}/c_cols")
    y = _scan(b, decay, inject, readout, (heads, dim, state), i, name)  # [S, H, P, 1]
    d = lin.parameter(f"{name}.D", mixer.D)
    skip = b.op1("Mul", [per_head, b.op1("Reshape", [d, b.const([heads, 1])], f"{name}/d_heads")], f"{name}/skip")
    y = b.op1("Add", [b.op1("Reshape", [y, b.const([1, -1, heads, dim])], f"{name}/y_heads"), skip],
              f"{name}/with_skip")
    y = _gated_norm(lin, b.op1("Reshape", [y, b.const([1, -1, inner])], f"{name}/y"), gate, mixer, name)
    return lin.linear(y, mixer.out_proj, f"{name}.out_proj")


def _gated_norm(lin: LinearEmitter, y: str, gate: str, mixer: Any, name: str) -> str:
    """The mixer's output gate and RMSNorm: RMSNorm(y ⊙ silu(z)) over all channels (Mamba 2, Granite 4, Bamba); for
    Falcon-H1 over each of n_groups groups, with the gate before or after it, or the gate alone (no mamba_rms_norm)."""
    b = lin.builder
    gated = _silu(b, gate, f"{name}/gate_act")
    norm = getattr(mixer, "norm", None) if getattr(mixer, "mamba_rms_norm", True) else None
    if norm is None:
        return b.op1("Mul", [y, gated], f"{name}/gated")
    after = getattr(norm, "norm_before_gate", False)  # the gate after the norm (Falcon-H1's default)
    groups = int(getattr(norm, "n_groups", 1))
    if not after:
        y = b.op1("Mul", [y, gated], f"{name}/gated")
    width = int(norm.weight.shape[0])
    grouped = b.op1("Reshape", [y, b.const([1, -1, groups, width // groups])], f"{name}/norm_groups")
    normed = _rms(b, grouped, width // groups, float(norm.variance_epsilon), f"{name}.norm")
    weight = lin.parameter(f"{name}.norm.weight", norm.weight)
    y = b.op1("Mul", [b.op1("Reshape", [normed, b.const([1, -1, width])], f"{name}/norm_flat"), weight],
              f"{name}/norm_scaled")
    return b.op1("Mul", [y, gated], f"{name}/gated_after") if after else y


def _per_head(b: GraphBuilder, x: str, dims: tuple[int, int, int], name: str) -> str:
    """[1, S, groups·N] → [1, S, heads, N], each group's N values repeated for its heads (in order)."""
    groups, heads, state = dims
    grouped = b.op1("Reshape", [x, b.const([1, -1, groups, 1, state])], f"{name}_groups")
    steps = b.op1("Shape", [x], f"{name}_steps", start=1, end=2)
    shape = b.op1("Concat", [b.const([1]), steps, b.const([groups, heads // groups, state])], f"{name}_shape", axis=0)
    return b.op1("Reshape", [b.op1("Expand", [grouped, shape], f"{name}_repeat"), b.const([1, -1, heads, state])],
                 f"{name}_heads")


def _scan(b: GraphBuilder, decay: str, inject: str, readout: str, dims: tuple[int, ...], i: int, name: str) -> str:
    """h ← decay_t ⊙ h + inject_t and y_t = h · readout_t for each position t, from ``past_ssm.i`` (the state of
    shape ``dims``); the final h is ``present_ssm.i``. Returns the stacked y [S, ..., 1]."""
    # the state without a batch axis: the Scan reads it and writes its final value into the bound buffer itself
    start = b.add_input(f"past_ssm.{i}", FLOAT, list(dims))
    body = helper.make_graph(
        [helper.make_node("Mul", ["decay_t", "h_in"], ["kept"]),
         helper.make_node("Add", ["kept", "inject_t"], ["h_out"]),
         helper.make_node("MatMul", ["h_out", "readout_t"], ["y_t"])],
        f"{name}_scan_step",
        [helper.make_tensor_value_info(n, FLOAT, None) for n in ("h_in", "decay_t", "inject_t", "readout_t")],
        [helper.make_tensor_value_info(n, FLOAT, None) for n in ("h_out", "y_t")])
    present, ys = f"present_ssm.{i}", b.unique(f"{name}/scan_y")
    b.op_named("Scan", [start, _squeezed(b, decay, name), _squeezed(b, inject, name), _squeezed(b, readout, name)],
               [present, ys], f"{name}/scan", body=body, num_scan_inputs=3)
    b.outputs.append(helper.make_tensor_value_info(present, FLOAT, list(dims)))
    return ys


def _rms(b: GraphBuilder, x: str, width: int, eps: float, name: str) -> str:
    """x / sqrt(mean(x²) + eps) over the last axis (an RMSNorm without weight)."""
    out = b.unique(f"{name}/out")
    b.op_named("SimplifiedLayerNormalization", [x, b.const(np.ones(width, np.float32), np.float32)], [out], name,
               axis=-1, epsilon=eps, stash_type=1)
    return out


def _squeezed(b: GraphBuilder, x: str, name: str) -> str:
    """[1, S, ...] → [S, ...]: Scan iterates over the first axis."""
    return b.op1("Squeeze", [x, b.const([0])], f"{name}/{x.rsplit('/', 1)[-1]}_seq")


def _silu(b: GraphBuilder, x: str, name: str) -> str:
    return b.op1("Mul", [x, b.op1("Sigmoid", [x], f"{name}/sigmoid")], name)

