"""The fused inference graph of a Llama-family decoder, built from the weights with onnx.helper.

Per layer: SimplifiedLayerNormalization (RMSNorm; the residual add is fused into the next
norm by SkipSimplifiedLayerNormalization), one packed QKV projection, GroupQueryAttention with the
rotary embedding applied inside (cos/sin caches) and a KV cache shared between past and present
(one preallocated buffer of ``context`` positions per layer and kind), an o projection, and a
SwiGLU MLP with packed gate/up projections. Linear layers are float32 MatMul or int4 / int8 MatMulNBits
(``linear.py``); the tied embedding is stored once. What other members of the family change (Qwen, Phi-3,
Gemma, Granite, SmolLM3: norms, multipliers, activations, windows, rotary) is read by ``family.py``;
GPT-2, GPT-NeoX, OPT, Falcon, GPT-J, BLOOM and others are read through ``views.py``, which gives their modules Llama's
names.

Graph contract (what ``runtime/fused_decoder.py`` binds):
    inputs   input_ids int64 [1, S]; seqlens_k int32 [1] (= positions after this step - 1);
             total_sequence_length int32 [] (= positions after this step);
             logits_to_keep int64 [1] (k: logits of the last k positions only);
             past_key_values.N.key / .value float32 [1, kv_heads, capacity, head_dim] (attention layers);
             past_conv.N / past_ssm.N float32 states of convolution and state-space layers (LFM2, Mamba: mamba.py)
    outputs  logits float32 [1, min(k, S), vocab]; present.N.key / .value, present_conv.N / present_ssm.N (the same
             buffers as the past)
    metadata edgepack.graph = "fused", edgepack.context_length = the positions the rotary caches cover
The cache capacity is the runtime's choice (up to the context length): it can start small and grow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from edgepack.export.fused.activations import activate
from edgepack.export.fused.alibi import alibi_bias
from edgepack.export.fused.builder import FLOAT, INT32, INT64, MS_DOMAIN, GraphBuilder, trimmed
from edgepack.export.fused.family import STATE_SPACE_TYPES, Family, check_supported, family_of
from edgepack.export.fused.linear import (
    LinearEmitter,
    embed_8bit,
    head_8bit,
    in_features,
    is_joint,
    is_pairs,
    table_8bit,
)
from edgepack.export.fused.mamba import causal_conv, mamba2_mixer, mamba_mixer
from edgepack.export.fused.moe import block_of, is_sparse, moe_block
from edgepack.export.fused.views import layout
from edgepack.runtime.delta import DELTA_SLOTS_KEY  # JSON: each slot's inputs, input width, (module, width) parts
from edgepack.runtime.errors import UnsupportedArchitecture

GRAPH_NAME = "fused"
CONTEXT_KEY = "edgepack.context_length"
LOGITS_KEEP = "logits_to_keep"  # input: logits for the last k positions only


def head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def build_llama(model: Any, context: int, int4: bool = False, exact: bool = True, fold: bool = True,
                delta_slots: bool = False, int8: bool = False, factor_bits: int = 4, block_qkv: bool = True) -> Any:
    """The fused graph (an ``onnx.ModelProto``) of a Llama-family causal LM for ``context`` positions;
    ``delta_slots`` adds the low-rank side branches fine-tune deltas are applied through; ``int4`` or
    ``int8`` quantizes the linear layers (and stores a tied embedding as one 8-bit table); ``factor_bits``
    is the width of ResSVD factor pairs in an int4 graph (4 or 8); ``block_qkv`` packs factorized q/k/v
    projections as two ops (``LinearEmitter.block_qkv``)."""
    check_supported(model.config)
    view = layout(model)
    model, cfg = view.model, view.model.config
    family = family_of(cfg, 1 if cfg.model_type in STATE_SPACE_TYPES else head_dim(cfg))  # Mamba has no heads
    b = GraphBuilder("edgepack_fused_llama")
    ids = b.add_input("input_ids", INT64, [1, "sequence_length"])
    seqlens = b.add_input("seqlens_k", INT32, [1])
    total = b.add_input("total_sequence_length", INT32, [])
    lin = LinearEmitter(b, int4, exact, fold, delta_slots, view.names, int8=int8, factor_bits=factor_bits,
                        block_qkv=block_qkv, rows=view.rows)
    rotary = {kind: _rotary_caches(b, module, context, kind) for kind, module in _rotaries(model).items()}
    embedding = _array(model.model.embed_tokens.weight)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    table = table_8bit(b, embedding) if (int4 or int8) and tied else None
    if table is not None:
        hidden = embed_8bit(b, ids, table)
    else:
        hidden = b.op1("Gather", [b.weight("embed.weight", embedding), ids], "embed/gather")
    hidden = _scaled(b, hidden, family.embed_scale, "embed")
    if family.positions:
        hidden = _positioned(b, hidden, ids, total, _array(model.model.embed_positions.weight))
    offset = _span(b, ids, total)[0] if family.qk_norm_after_rotary else ""  # the graph rotates q and k itself
    bias = alibi_bias(b, ids, total, family.alibi) if family.alibi else ""
    norm = _Norms(lin, family.norm_eps, family.norm_offset, family.layer_norm)
    if getattr(model.model, "embed_norm", None) is not None:  # BLOOM norms the embedding
        hidden = norm.alone(hidden, model.model.embed_norm, "embed_norm")
    residual, pending = hidden, None  # pending: a block output not yet added to the residual
    post_norms = family.sandwich or not family.pre_norm  # a norm on each block's output (Gemma 2 / 3, OLMo 2)
    for i, layer in enumerate(model.model.layers):
        if family.pre_norm:
            x, residual = norm.add(pending, residual, layer.input_layernorm, f"layers.{i}.input_norm")
        else:
            x = residual = _added(b, residual, pending, f"layers.{i}/residual_in")
        if getattr(layer, "mixer", None) is not None:  # Mamba, Mamba 2: a state-space mixer, no MLP
            mixer = mamba2_mixer if hasattr(layer.mixer, "dt_bias") else mamba_mixer
            pending = mixer(lin, x, layer.mixer, i)
            continue
        def attend(inp: str, i: int = i, layer: Any = layer) -> str:
            kv_shape = [1, cfg.num_key_value_heads, "capacity", head_dim(cfg)]
            past = [b.add_input(f"past_key_values.{i}.{kind}", FLOAT, kv_shape) for kind in ("key", "value")]
            cos, sin = rotary["local" if "local" in rotary and _window(cfg, i) > 0 else "global"] if rotary else (
                "", "")
            return _attention(b, lin, inp, layer.self_attn, (cfg, family, norm), past,
                              (seqlens, total, cos, sin, offset, bias), i, kv_shape)

        if getattr(layer, "conv", None) is not None:  # LFM2's short convolution instead of attention
            attn = _short_conv(lin, x, layer.conv, i)
        elif getattr(layer, "mamba", None) is None:
            attn = attend(x)
        elif getattr(layer, "self_attn", None) is None:  # Granite 4's hybrids, Bamba: a Mamba 2 mixer instead
            attn = mamba2_mixer(lin, x, layer.mamba, i)
        else:  # Falcon-H1: the Mamba 2 mixer and attention side by side, each with its multipliers
            ssm = _scaled(b, mamba2_mixer(lin, x, layer.mamba, i), layer.ssm_out_multiplier, f"layers.{i}.ssm_out")
            attn = attend(_scaled(b, x, layer.attention_in_multiplier, f"layers.{i}.attn_in"))
            attn = b.op1("Add", [ssm, _scaled(b, attn, layer.attn_out_multiplier, f"layers.{i}.attn_out")],
                         f"layers.{i}/mixers")
        if family.parallel:  # Phi, Falcon: the MLP reads the same normed input; both outputs join the residual
            if family.parallel_norms:  # GPT-NeoX, newer Falcons: the MLP's own norm of the same residual
                x = norm.alone(residual, layer.post_attention_layernorm, f"layers.{i}.mlp_norm")
            mlp = _block(lin, x, layer, (family.activation, norm), cfg, f"layers.{i}.mlp")
            pending = b.op1("Add", [attn, mlp], f"layers.{i}/parallel")
            continue
        if post_norms:  # the block's output is normed before the residual add
            attn = norm.alone(attn, layer.post_attention_layernorm, f"layers.{i}.attn_out_norm")
        attn = _scaled(b, attn, family.residual_scale, f"layers.{i}.attn")
        if family.pre_norm:
            # Gemma 2 / 3 (and VaultGemma, which has no post_attention_layernorm) name the MLP's norm differently
            mlp_norm = layer.pre_feedforward_layernorm if family.sandwich or not hasattr(
                layer, "post_attention_layernorm") else layer.post_attention_layernorm
            x, residual = norm.add(attn, residual, mlp_norm, f"layers.{i}.post_norm")
        else:
            x = residual = _added(b, residual, attn, f"layers.{i}/residual_attn")
        pending = _block(lin, x, layer, (family.activation, norm), cfg, f"layers.{i}.mlp")
        if post_norms:
            pending = norm.alone(pending, layer.post_feedforward_layernorm, f"layers.{i}.mlp_out_norm")
        pending = _scaled(b, pending, family.residual_scale, f"layers.{i}.mlp")
    final = model.model.final_layernorm if hasattr(model.model, "final_layernorm") else model.model.norm  # Phi's name
    x, _ = norm.add(pending, residual, final, "final_norm")
    x = _last_positions(b, x, b.add_input(LOGITS_KEEP, INT64, [1]))
    if table is not None:
        logits = head_8bit(b, x, table)
    elif tied:  # one float32 copy: the head reads the embedding transposed
        logits = b.op1("FusedMatMul", [x, "embed.weight"], "lm_head/FusedMatMul", domain=MS_DOMAIN, transB=1)
    else:
        logits = lin.head_bias_delta(lin.module(x, model.lm_head, "lm_head"), model.lm_head)
    logits = _scaled(b, logits, family.logit_scale, "lm_head")
    if family.logit_softcap:
        logits = _softcap(b, logits, family.logit_softcap, "lm_head")
    b.add_output(logits, "logits", FLOAT, [1, "kept_positions", cfg.vocab_size])
    metadata = {"edgepack.graph": GRAPH_NAME, CONTEXT_KEY: str(context)}
    if delta_slots:
        metadata[DELTA_SLOTS_KEY] = json.dumps(lin.slots)
    return b.to_model(metadata)


def _last_positions(b: GraphBuilder, x: str, keep: str) -> str:
    """x[:, -keep:]. The LM head is about a fifth of a token's work and its logits 200 KB per position:
    a prefill needs them for its last position only, parity and perplexity for all (keep >= S)."""
    start = b.op1("Neg", [keep], "lm_head/keep_start")
    return b.op1("Slice", [x, start, b.const([2**62]), b.const([1])], "lm_head/keep")


def _span(b: GraphBuilder, ids: str, total: str) -> tuple[str, str]:
    """The positions of this step's tokens as int64 [1] tensors: start = total - S and end = total."""
    steps = b.op1("Shape", [ids], "positions/steps", start=1, end=2)
    end = b.op1("Reshape", [b.op1("Cast", [total], "positions/cast", to=INT64), b.const([1])], "positions/end")
    return b.op1("Sub", [end, steps], "positions/start"), end


def _positioned(b: GraphBuilder, hidden: str, ids: str, total: str, table: np.ndarray) -> str:
    """hidden + the learned embeddings of positions total - S .. total - 1 (GPT-2, OPT): one Slice of the table."""
    start, end = _span(b, ids, total)
    rows = b.op1("Slice", [b.weight("embed_positions.weight", table), start, end, b.const([0])], "positions/rows")
    return b.op1("Add", [hidden, rows], "positions/add")


def _added(b: GraphBuilder, residual: str, block_out: str | None, name: str) -> str:
    """residual + block_out where no norm follows to fuse the add into (OLMo 2); the residual alone at first."""
    return residual if block_out is None else b.op1("Add", [residual, block_out], name)


def _scaled(b: GraphBuilder, x: str, scale: float | None, name: str) -> str:
    """x · scale (Gemma's and Granite's constant multipliers); x itself without one."""
    return x if scale is None else b.op1("Mul", [x, b.const(np.float32(scale), np.float32)], f"{name}/scale")


def _softcap(b: GraphBuilder, x: str, cap: float, name: str) -> str:
    """cap · tanh(x / cap) (Gemma 2's final logits)."""
    c = b.const(np.float32(cap), np.float32)
    return b.op1("Mul", [b.op1("Tanh", [b.op1("Div", [x, c], f"{name}/cap_div")], f"{name}/cap_tanh"), c],
                 f"{name}/cap_mul")


@dataclass(frozen=True)
class _Norms:
    """The norms of one model: RMSNorm (its weights scaling by offset + w), or LayerNorm (``layer``: the mean
    subtracted too, with a bias when the module has one, with neither weight nor bias for OLMo's)."""

    lin: LinearEmitter
    eps: float
    offset: float
    layer: bool = False

    def _param(self, module: Any, kind: str, name: str, fill: float, width: int) -> str:
        # The offset is folded into the stored weight; a delta's change of w adds to it unchanged.
        param = getattr(module, kind, None)
        if param is None:
            return self.lin.builder.const(np.full(width, fill, np.float32), np.float32)
        value = _array(param) + (self.offset if kind == "weight" else 0.0)
        return self.lin.dense_delta(self.lin.builder.weight(f"{name}.{kind}", value), param)

    def _inputs(self, module: Any, name: str, width: int) -> list[str]:
        gamma = self._param(module, "weight", name, 1.0, width)
        return [gamma, self._param(module, "bias", name, 0.0, width)] if self.layer else [gamma]

    def alone(self, x: str, module: Any, name: str) -> str:
        """The norm of ``x`` over its last axis."""
        out = self.lin.builder.unique(f"{name}/out")
        op = "LayerNormalization" if self.layer else "SimplifiedLayerNormalization"
        self.lin.builder.op_named(op, [x, *self._inputs(module, name, _width(module))], [out], name, axis=-1,
                                  epsilon=self.eps, stash_type=1)
        return out

    def add(self, block_out: str | None, residual: str, module: Any, name: str) -> tuple[str, str]:
        """The norm of residual + block_out; returns (normed, new residual). The first has nothing to add."""
        if block_out is None:
            return self.alone(residual, module, name), residual
        b = self.lin.builder
        out, total = b.unique(f"{name}/out"), b.unique(f"{name}/residual")
        op = "SkipLayerNormalization" if self.layer else "SkipSimplifiedLayerNormalization"
        b.op_named(op, [block_out, residual, *self._inputs(module, name, _width(module))], [out, "", "", total], name,
                   domain=MS_DOMAIN, epsilon=self.eps)
        return out, total


def _width(norm: Any) -> int:
    """The width a norm module normalizes (OLMo's parameter-free LayerNorm keeps it as normalized_shape)."""
    weight = getattr(norm, "weight", None)
    return int(weight.shape[-1]) if weight is not None else int(norm.normalized_shape[-1])


def _attention(b: GraphBuilder, lin: LinearEmitter, x: str, attn: Any, model: tuple[Any, Family, _Norms],
               past: list[str], shared: tuple[str, ...], i: int, kv_shape: list[int | str]) -> str:
    import torch.nn as nn

    cfg, family, norm = model
    name = f"layers.{i}.attn"
    projections = (attn.q_proj, attn.k_proj, attn.v_proj) if hasattr(attn, "q_proj") else ()
    if not projections:  # Phi-3: the checkpoint's own packed projection, as GQA takes it
        packed = lin.module(x, attn.qkv_proj, f"{name}.qkv")
        qkv = [lin.delta(x, packed, cfg.hidden_size, [attn.qkv_proj], f"{name}.qkv"), "", ""]
    elif all(isinstance(p, nn.Linear) for p in projections):  # one packed projection, GQA splits it
        weight = np.concatenate([_array(p.weight) for p in projections])
        biases = [p.bias for p in projections]
        bias = np.concatenate([_array(t) for t in biases]) if all(t is not None for t in biases) else None
        if bias is None and any(t is not None for t in biases):
            raise UnsupportedArchitecture("q/k/v projections with bias on only some of them")
        packed = lin.weight(x, weight, bias, f"{name}.qkv")
        qkv = [lin.delta(x, packed, cfg.hidden_size, list(projections), f"{name}.qkv"), "", ""]
    elif is_joint(list(projections)) or lin.block_qkv and is_pairs(list(projections)):  # packed QKV too
        packed = lin.joint(x, list(projections), f"{name}.qkv")
        qkv = [lin.delta(x, packed, cfg.hidden_size, list(projections), f"{name}.qkv"), "", ""]
    else:  # factorized projections stay separate (their in→r factors share one op)
        p_names = [f"{name}.{p_name}" for p_name in ("q", "k", "v")]
        outs = lin.modules(x, list(projections), p_names, f"{name}.qkv_low")
        qkv = [lin.delta(x, y, cfg.hidden_size, [p], n) for y, p, n in zip(outs, projections, p_names)]
    seqlens, total, cos, sin, offset, bias = shared
    rotary = bool(cos) and (family.rotary_layers is None or family.rotary_layers[i])
    norms = _qk_modules(attn)
    if norms and family.qk_norm_after_rotary:  # HunYuan: rotate here, so the norms see rotated heads
        qkv = _rotated(b, _unpacked(b, qkv, cfg, name), cfg, (cos, sin, offset) if rotary else None, family, name)
        rotary = False
    if norms:
        qkv = _qk_norms(b, norm, _unpacked(b, qkv, cfg, name), norms, cfg, name, family.qk_norm_per_head)
    out = b.unique(f"{name}/out")
    present = [f"present.{i}.key", f"present.{i}.value"]
    sinks = getattr(attn, "sinks", None)  # GPT-OSS: a per-head logit that joins each softmax's denominator
    sink = lin.parameter(f"{name}.sinks", sinks) if sinks is not None else ""
    # position_ids (unused), attention_bias (ALiBi), head_sink
    b.op_named("GroupQueryAttention", trimmed([*qkv, *past, seqlens, total, cos, sin, "", bias, sink]), [out, *present],
               f"{name}/gqa",
               domain=MS_DOMAIN, num_heads=cfg.num_attention_heads, kv_num_heads=cfg.num_key_value_heads,
               do_rotary=int(rotary),
               rotary_interleaved=int(family.rotary_interleaved),
               scale=family.attention_scale, softcap=family.attention_softcap,
               local_window_size=_window(cfg, i))
    for p in present:
        b.outputs.append(_value_info(p, kv_shape))
    if getattr(attn, "attn_sub_norm", None) is not None:  # BitNet: a norm between attention and its o projection
        out = norm.alone(out, attn.attn_sub_norm, f"{name}.sub_norm")
    o_in = cfg.num_attention_heads * head_dim(cfg)
    o_proj = attn.dense if hasattr(attn, "dense") else attn.o_proj  # Phi calls it dense
    return lin.delta(out, lin.module(out, o_proj, f"{name}.o"), o_in, [o_proj], f"{name}.o")


def _short_conv(lin: LinearEmitter, x: str, conv: Any, i: int) -> str:
    """LFM2's gated short convolution: B, C, h = in_proj(x); out_proj(C · conv(B · h)), the convolution causal and
    per channel over the last L positions, with its state of the last L - 1 values of B · h (``mamba.causal_conv``)."""
    b = lin.builder
    name = f"layers.{i}.conv"
    hidden = int(conv.conv.weight.shape[0])
    projected = lin.linear(x, conv.in_proj, f"{name}.in_proj")
    gate_in, gate_out, h = b.op("Split", [projected, b.const([hidden] * 3)], f"{name}/split", 3, axis=-1)
    gated = b.op1("Transpose", [b.op1("Mul", [gate_in, h], f"{name}/gate_in")], f"{name}/channels", perm=[0, 2, 1])
    mixed = causal_conv(lin, gated, conv.conv, i, name)
    y = b.op1("Mul", [b.op1("Transpose", [mixed], f"{name}/positions", perm=[0, 2, 1]), gate_out], f"{name}/gate_out")
    return lin.linear(y, conv.out_proj, f"{name}.out_proj")


def _window(cfg: Any, i: int) -> int:
    """GroupQueryAttention's ``local_window_size`` for layer ``i``, -1 for full attention. It takes the
    window as transformers counts it (a query sees the ``sliding_window`` positions ending at itself):
    parity is exact for windows 2 to 31 on prompts of 60 tokens. With ``layer_types`` only
    "sliding_attention" layers slide (Qwen2's upper layers); without, all do (Mistral)."""
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None)
    if not window or kinds and kinds[i] != "sliding_attention":
        return -1
    return int(window)


def _qk_modules(attn: Any) -> tuple[Any, Any] | None:
    """The q and k norms of an attention block (HunYuan names them query_ / key_layernorm), or None."""
    for q_name, k_name in (("q_norm", "k_norm"), ("query_layernorm", "key_layernorm")):
        if getattr(attn, q_name, None) is not None:
            return getattr(attn, q_name), getattr(attn, k_name)
    return None


def _unpacked(b: GraphBuilder, qkv: list[str], cfg: Any, name: str) -> list[str]:
    """q, k and v apart: a packed projection split by the widths GroupQueryAttention would have used."""
    q, k, v = qkv
    if k:
        return qkv
    dim = head_dim(cfg)
    widths = [cfg.num_attention_heads * dim, cfg.num_key_value_heads * dim, cfg.num_key_value_heads * dim]
    return b.op("Split", [q, b.const(widths)], f"{name}/split_qkv", 3, axis=-1)


def _rotated(b: GraphBuilder, qkv: list[str], cfg: Any, rotary: tuple[str, str, str] | None, family: Family,
             name: str) -> list[str]:
    """q and k rotated by onnxruntime's RotaryEmbedding at positions offset, offset + 1, ... (what
    GroupQueryAttention would do inside); unchanged on a layer without the rotary."""
    if rotary is None:
        return qkv
    cos, sin, offset = rotary
    q, k, v = qkv
    out = [b.op1("RotaryEmbedding", [x, offset, cos, sin], f"{name}/{kind}_rotary", domain=MS_DOMAIN,
                 interleaved=int(family.rotary_interleaved), num_heads=heads)
           for x, kind, heads in ((q, "q", cfg.num_attention_heads), (k, "k", cfg.num_key_value_heads))]
    return [*out, v]


def _qk_norms(b: GraphBuilder, norm: _Norms, qkv: list[str], modules: tuple[Any, Any], cfg: Any, name: str,
              per_head: bool = True) -> list[str]:
    """Qwen3 / Gemma 3: RMSNorm over each head of q and of k (OLMo 2: over all of q, all of k), before the
    rotary, which GroupQueryAttention applies, so q, k and v go to it unpacked."""
    dim = head_dim(cfg)
    q, k, v = qkv
    normed = []
    for x, module, heads, kind in ((q, modules[0], cfg.num_attention_heads, "q"),
                                   (k, modules[1], cfg.num_key_value_heads, "k")):
        if not per_head:
            normed.append(norm.alone(x, module, f"{name}.{kind}_norm"))
            continue
        split = b.op1("Reshape", [x, b.const([0, 0, heads, dim])], f"{name}/{kind}_heads")
        out = norm.alone(split, module, f"{name}.{kind}_norm")
        normed.append(b.op1("Reshape", [out, b.const([0, 0, heads * dim])], f"{name}/{kind}_flat"))
    return [*normed, v]


def _block(lin: LinearEmitter, x: str, layer: Any, act_norm: tuple[str, _Norms], cfg: Any, name: str) -> str:
    """A layer's MLP: a mixture of experts (moe.py) or one dense MLP (``act_norm``: its activation, and the model's
    norms for one with a norm inside)."""
    activation, norm = act_norm

    def dense(inp: str, mlp: Any, mlp_name: str) -> str:
        return _mlp(lin.builder, lin, inp, mlp, activation, mlp_name, norm)

    block = block_of(layer)
    if not is_sparse(block):
        return dense(x, block, name)
    return moe_block(lin, x, block, cfg, name, dense, getattr(layer, "shared_mlp", None))


def _mlp(b: GraphBuilder, lin: LinearEmitter, x: str, mlp: Any, activation: str, name: str,
         norm: _Norms | None = None) -> str:
    """down(act(gate(x)) * up(x)), with gate and up as one packed projection when both are plain."""
    import torch.nn as nn

    plain = _plain_mlp(mlp)
    if plain:  # Phi, StarCoder2, Arcee: a plain two-layer MLP, fc2(act(fc1(x)))
        up, down = plain
        hidden = lin.linear(x, up, f"{name}.fc1")
        return lin.linear(activate(lin, hidden, activation, name, getattr(mlp, "act_fn", None)), down, f"{name}.fc2")
    if hasattr(mlp, "gate_up_proj"):  # Phi-3: one packed projection, gate first
        both = lin.linear(x, mlp.gate_up_proj, f"{name}.gate_up")
        gate, up = b.op("Split", [both, b.const([_out_features(mlp.gate_up_proj) // 2] * 2)], f"{name}/split", 2,
                        axis=-1)
        return _down(b, lin, activate(lin, gate, activation, name), up, mlp, name, norm)
    # Falcon-H1 scales the gate before its activation and the MLP's output
    gate_scale, down_scale = getattr(mlp, "gate_multiplier", None), getattr(mlp, "down_multiplier", None)
    joint = is_joint([mlp.gate_proj, mlp.up_proj])
    if joint or isinstance(mlp.gate_proj, nn.Linear) and isinstance(mlp.up_proj, nn.Linear) and \
            mlp.gate_proj.bias is None and mlp.up_proj.bias is None:
        both = lin.joint(x, [mlp.gate_proj, mlp.up_proj], f"{name}.gate_up") if joint else lin.weight(
            x, np.concatenate([_array(mlp.gate_proj.weight), _array(mlp.up_proj.weight)]), None, f"{name}.gate_up")
        both = lin.delta(x, both, in_features(mlp.gate_proj), [mlp.gate_proj, mlp.up_proj], f"{name}.gate_up")
        widths = [int(m[-1].out_features if joint else m.out_features) for m in (mlp.gate_proj, mlp.up_proj)]
        gate, up = b.op("Split", [both, b.const(widths)], f"{name}/split", 2, axis=-1)
    else:
        n_in = in_features(mlp.gate_proj)
        gate, up = lin.modules(x, [mlp.gate_proj, mlp.up_proj], [f"{name}.gate", f"{name}.up"], f"{name}.gate_up_low")
        gate = lin.delta(x, gate, n_in, [mlp.gate_proj], f"{name}.gate")
        up = lin.delta(x, up, n_in, [mlp.up_proj], f"{name}.up")
    activated = activate(lin, _scaled(b, gate, gate_scale, f"{name}.gate"), activation, name)
    return _scaled(b, _down(b, lin, activated, up, mlp, name, norm), down_scale, f"{name}.down")


def _plain_mlp(mlp: Any) -> tuple[Any, Any] | None:
    """(in, out) linear layers of an MLP without a gate, under any of the names the family uses."""
    for names in (("fc1", "fc2"), ("c_fc", "c_proj")):
        if hasattr(mlp, names[0]):
            return getattr(mlp, names[0]), getattr(mlp, names[1])
    if hasattr(mlp, "up_proj") and not hasattr(mlp, "gate_proj"):  # Arcee, Nemotron, Apertus
        return mlp.up_proj, mlp.down_proj
    return None


def _down(b: GraphBuilder, lin: LinearEmitter, activated: str, up: str, mlp: Any, name: str,
          norm: _Norms | None = None) -> str:
    gated = b.op1("Mul", [activated, up], f"{name}/gated")
    if getattr(mlp, "ffn_sub_norm", None) is not None:  # BitNet: a norm before the down projection
        gated = norm.alone(gated, mlp.ffn_sub_norm, f"{name}.sub_norm")
    return lin.linear(gated, mlp.down_proj, f"{name}.down")


def _rotaries(model: Any) -> dict[str, Any]:
    """The model's rotary embeddings: "global", and Gemma 3's "local" one for sliding-window layers
    (another base frequency)."""
    embs = getattr(model.model, "rotary_embs", None)  # OLMo 3: one per attention kind
    if embs is not None:
        return {"global": embs["full_attention"], "local": embs["sliding_attention"]}
    if model.model.rotary_emb is None:  # GPT-2, OPT: learned positions instead
        return {}
    local = getattr(model.model, "rotary_emb_local", None)
    return {"global": model.model.rotary_emb} | ({"local": local} if local is not None else {})


def _rotary_caches(b: GraphBuilder, rotary: Any, context: int, kind: str) -> tuple[str, str]:
    """cos/sin [context, head_dim/2] from the model's own inverse frequencies (so rope scaling
    variants come along), computed in float32 as transformers does."""
    # The frequencies as initialized: longrope / dynamic rope swap inv_freq after a long forward pass
    inv_freq = getattr(rotary, "original_inv_freq", rotary.inv_freq).detach().float().cpu().numpy()
    if inv_freq.size % 8:  # GroupQueryAttention's kernel rotates in groups of 16 dimensions
        raise UnsupportedArchitecture(f"the fused graph rotates multiples of 16 dimensions of a head, this model "
                                      f"rotates {2 * inv_freq.size}; build with --graph optimum")
    config = getattr(rotary, "config", None)
    original = getattr(config, "original_max_position_embeddings", None) or getattr(config, "max_position_embeddings",
                                                                                     None)
    if getattr(rotary, "rope_type", "default") == "longrope" and original and context > original:
        # transformers switches to the long factors past the original length, for the whole sequence
        raise UnsupportedArchitecture(f"the fused graph has the short rope factors only: build with --context "
                                      f"{original} or less, or with --graph optimum")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    freqs = np.arange(context, dtype=np.float32)[:, None] * inv_freq[None, :]
    cos = (np.cos(freqs) * scaling).astype(np.float32)
    sin = (np.sin(freqs) * scaling).astype(np.float32)
    prefix = "rotary" if kind == "global" else f"rotary_{kind}"  # the Llama graph's names stay as they were
    return b.weight(f"{prefix}.cos", cos), b.weight(f"{prefix}.sin", sin)


def _value_info(name: str, shape: list[int | str]) -> Any:
    from onnx import helper

    return helper.make_tensor_value_info(name, FLOAT, shape)


def _out_features(module: Any) -> int:
    """Output width of an ``nn.Linear`` or of the last layer of a factorized pair."""
    return int(module[-1].out_features if hasattr(module, "__getitem__") else module.out_features)


def _array(t: Any) -> np.ndarray:
    return t.detach().float().cpu().numpy()
