"""GPT-2, GPT-NeoX, OPT, Falcon, GPT-J, GLM 4, Apertus, GPT-BigCode, GPT-Neo, CodeGen, LFM2, XGLM, MPT, BLOOM, Mamba,
Granite 4's hybrids, Bamba and Falcon-H1 seen through the Llama layout's names, so the fused graph (``llama.py``) builds
them too.

The graph reads ``model.model.{embed_tokens, layers, norm, rotary_emb}``, each layer's two norms, ``self_attn`` and
``mlp``, and ``model.lm_head``. GPT-2 and GPT-NeoX hold the same parts under other names, and two in another form.
GPT-2's Conv1D layers store W transposed; they are copied here as ``nn.Linear``. GPT-NeoX packs q/k/v head by head
(q, k, v of head 0, then of head 1, ...) where GroupQueryAttention takes all of q, then k, then v; the packed
projection's output rows are permuted once here. A delta slot on it records the permutation, so the runtime permutes
a delta's rows the same way (``runtime/delta.py``). OPT's learned position table starts at row 2 (its ``offset``);
the graph reads it from there. Falcon packs q/k/v by key-value group (the group's query heads, then its key, then
its value) in its newer layout, all q then one k and one v with multi-query attention, and head by head (as
GPT-NeoX) otherwise. GPT-J has no rotary module (its attention keeps a sin/cos table); the view gives it one holding
the same inverse frequencies. GLM 4's four norms a layer get Gemma 2's names, Apertus's two Llama's. CodeGen packs
q/k/v in 4 model-parallel blocks of q, v, k (reordered); GPT-BigCode as Falcon or GPT-NeoX do; GPT-Neo's local
layers become sliding windows; LFM2 keeps its convolution layers as they are. XGLM's sinusoidal positions become a
table; MPT and BLOOM carry their ALiBi slopes in the view's config (``alibi_slopes``), and BLOOM's embedding norm is
``embed_norm``. Every copy keeps the source model's path, which is what deltas and the package's slot metadata name.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Layout:
    # what build_llama reads: .config, .model.{embed_tokens, embed_positions, layers, norm, rotary_emb}, .lm_head
    model: Any
    names: dict[int, str]  # id(module or parameter) → its path in the source model
    rows: dict[int, np.ndarray]  # id(module) → the permutation of its output rows (graph row j = source row rows[j])


class _Config:
    """The source config with a few Llama attribute names added (``num_key_value_heads``, ``head_dim``, ...)."""

    def __init__(self, config: Any, **extra: Any) -> None:
        self.__dict__["_config"], self.__dict__["_extra"] = config, extra

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__["_extra"]
        return extra[name] if name in extra else getattr(self.__dict__["_config"], name)


def layout(model: Any) -> Layout:
    """``model`` itself for the Llama layout; a view of it with that layout's names for GPT-2, GPT-NeoX, OPT, Falcon,
    GPT-J and GLM 4."""
    view = _VIEWS.get(getattr(model.config, "model_type", ""))
    return view(model) if view else Layout(model, _names(model), {})


def _names(model: Any) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()} | {id(p): n for n, p in model.named_parameters()}


def _head_by_head(heads: int, dim: int) -> np.ndarray:
    """Source row of each graph row for q/k/v packed head by head: (head h, kind t, feature d) is row
    h·3·dim + t·dim + d; the graph wants t·heads·dim + h·dim + d."""
    return np.arange(3 * heads * dim).reshape(heads, 3, dim).transpose(1, 0, 2).reshape(-1)


def _registered(copy: Any, source: Any, names: dict[int, str]) -> Any:
    """``copy`` of ``source``, named by the source's path (what deltas and slot metadata name)."""
    names[id(copy)] = names[id(source)]
    return copy


def _reordered(module: Any, order: np.ndarray, names: dict[int, str], rows: dict[int, np.ndarray]) -> Any:
    """A copy of ``module`` with its output rows in ``order``, registered under the source's path."""
    copy = _registered(_rows_permuted(module, order), module, names)
    rows[id(copy)] = order
    return copy


def _heads(config: Any) -> dict[str, int]:
    heads = int(config.num_attention_heads)
    return {"num_key_value_heads": heads, "head_dim": int(config.hidden_size) // heads}


def _gpt2(model: Any) -> Layout:
    names = _names(model)
    t = model.transformer

    def linear(module: Any) -> Any:
        return _registered(_linear_of(module), module, names)

    layers = [SimpleNamespace(input_layernorm=h.ln_1, post_attention_layernorm=h.ln_2,
                              self_attn=SimpleNamespace(qkv_proj=linear(h.attn.c_attn), o_proj=linear(h.attn.c_proj)),
                              mlp=SimpleNamespace(fc1=linear(h.mlp.c_fc), fc2=linear(h.mlp.c_proj)))
              for h in t.h]
    config = _Config(model.config, hidden_act=model.config.activation_function, **_heads(model.config))
    inner = SimpleNamespace(embed_tokens=t.wte, embed_positions=t.wpe, layers=layers, norm=t.ln_f, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), names, {})


def _neox(model: Any) -> Layout:
    names, rows = _names(model), {}
    n = model.gpt_neox
    heads = int(model.config.num_attention_heads)
    order = _head_by_head(heads, int(model.config.hidden_size) // heads)
    layers = [SimpleNamespace(input_layernorm=layer.input_layernorm,
                              post_attention_layernorm=layer.post_attention_layernorm,
                              self_attn=SimpleNamespace(qkv_proj=_reordered(layer.attention.query_key_value, order,
                                                                            names, rows),
                                                        o_proj=layer.attention.dense),
                              mlp=SimpleNamespace(fc1=layer.mlp.dense_h_to_4h, fc2=layer.mlp.dense_4h_to_h))
              for layer in n.layers]
    inner = SimpleNamespace(embed_tokens=n.embed_in, embed_positions=None, layers=layers, norm=n.final_layer_norm,
                            rotary_emb=n.rotary_emb)
    return Layout(SimpleNamespace(config=_Config(model.config, **_heads(model.config)), model=inner,
                                  lm_head=model.embed_out), names, rows)


def _opt_layers(layers: Any) -> list[Any]:
    """OPT's (and XGLM's) decoder layers under Llama's names: separate q/k/v, out_proj, a plain fc1 / fc2 MLP."""
    return [SimpleNamespace(input_layernorm=layer.self_attn_layer_norm, post_attention_layernorm=layer.final_layer_norm,
                            self_attn=SimpleNamespace(q_proj=layer.self_attn.q_proj, k_proj=layer.self_attn.k_proj,
                                                      v_proj=layer.self_attn.v_proj, o_proj=layer.self_attn.out_proj),
                            mlp=SimpleNamespace(fc1=layer.fc1, fc2=layer.fc2))
            for layer in layers]


def _opt(model: Any) -> Layout:
    d = model.model.decoder
    layers = _opt_layers(d.layers)
    positions = SimpleNamespace(weight=d.embed_positions.weight[d.embed_positions.offset:])
    config = _Config(model.config, hidden_act=model.config.activation_function, **_heads(model.config))
    inner = SimpleNamespace(embed_tokens=d.embed_tokens, embed_positions=positions, layers=layers,
                            norm=d.final_layer_norm, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), _names(model), {})


def falcon_kv_heads(config: Any) -> int:
    """Falcon's key/value heads: ``num_kv_heads`` in the newer layout or without multi-query attention, else 1."""
    if config.new_decoder_architecture or not config.multi_query:
        return int(config.num_kv_heads)
    return 1


def _falcon(model: Any) -> Layout:
    names, rows = _names(model), {}
    t, cfg = model.transformer, model.config
    heads, kv = int(cfg.num_attention_heads), falcon_kv_heads(cfg)
    dim = int(cfg.hidden_size) // heads
    if cfg.new_decoder_architecture:  # source: per group, its heads // kv query heads, then k, then v
        group = heads // kv + 2
        source = np.arange(kv * group * dim).reshape(kv, group, dim)
        order = np.concatenate([source[:, :-2].reshape(-1), source[:, -2].reshape(-1), source[:, -1].reshape(-1)])
    elif not cfg.multi_query:  # head by head, as GPT-NeoX
        order = _head_by_head(heads, dim)
    else:
        order = None  # already all q, then k, then v

    def qkv(module: Any) -> Any:
        return module if order is None else _reordered(module, order, names, rows)

    def norms(h: Any) -> dict[str, Any]:
        if hasattr(h, "ln_attn"):  # two norms side by side (the newer layout)
            return {"input_layernorm": h.ln_attn, "post_attention_layernorm": h.ln_mlp}
        return {"input_layernorm": h.input_layernorm,
                "post_attention_layernorm": getattr(h, "post_attention_layernorm", None)}

    layers = [SimpleNamespace(**norms(h), self_attn=SimpleNamespace(qkv_proj=qkv(h.self_attention.query_key_value),
                                                                   o_proj=h.self_attention.dense),
                              mlp=SimpleNamespace(fc1=h.mlp.dense_h_to_4h, fc2=h.mlp.dense_4h_to_h))
              for h in t.h]
    alibi = {"alibi_slopes": _alibi_slopes(cfg)} if cfg.alibi else {}  # Falcon-RW: ALiBi, no rotary
    config = _Config(cfg, hidden_act=cfg.activation, num_key_value_heads=kv, head_dim=dim, **alibi)
    inner = SimpleNamespace(embed_tokens=t.word_embeddings, embed_positions=None, layers=layers, norm=t.ln_f,
                            rotary_emb=None if cfg.alibi else t.rotary_emb)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), names, rows)


def _gptj(model: Any) -> Layout:
    return _gptj_layout(model, lambda a: {"q_proj": a.q_proj, "k_proj": a.k_proj, "v_proj": a.v_proj}, _names(model),
                        {})


def _gptj_layout(model: Any, projections: Any, names: dict[int, str], rows: dict[int, np.ndarray]) -> Layout:
    """GPT-J's layout (one LayerNorm before attention and MLP side by side, a sin/cos table for the rotary), with
    ``projections(attn)`` giving the attention's q/k/v modules under Llama's names."""
    t, cfg = model.transformer, model.config
    layers = [SimpleNamespace(input_layernorm=h.ln_1, post_attention_layernorm=None,
                              self_attn=SimpleNamespace(**projections(h.attn), o_proj=h.attn.out_proj),
                              mlp=SimpleNamespace(fc1=h.mlp.fc_in, fc2=h.mlp.fc_out))
              for h in t.h]
    config = _Config(cfg, hidden_act=cfg.activation_function, **_heads(cfg))
    inner = SimpleNamespace(embed_tokens=t.wte, embed_positions=None, layers=layers, norm=t.ln_f,
                            rotary_emb=_sinusoidal(int(cfg.rotary_dim)))
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), names, rows)


def _sinusoidal(dim: int) -> Any:
    """A rotary module for GPT-J and CodeGen, whose attention keeps a sin/cos table: the inverse frequencies
    transformers' create_sinusoidal_positions computes it from."""
    import torch

    return SimpleNamespace(inv_freq=1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.int64) / dim)),
                           rope_type="default", attention_scaling=1.0, config=None)


def _codegen(model: Any) -> Layout:
    """CodeGen: GPT-J's layout, its q/k/v one projection in 4 model-parallel blocks, each holding its heads' q, then
    v, then k; the rows are reordered to all q, then k, then v."""
    names, rows = _names(model), {}
    heads = int(model.config.num_attention_heads)
    dim = int(model.config.hidden_size) // heads
    blocks = np.arange(3 * heads * dim).reshape(4, 3, heads // 4, dim)  # block, kind (q, v, k), head, feature
    order = np.concatenate([blocks[:, kind].reshape(-1) for kind in (0, 2, 1)])
    return _gptj_layout(model, lambda a: {"qkv_proj": _reordered(a.qkv_proj, order, names, rows)}, names, rows)


def _glm4(model: Any) -> Layout:
    """GLM 4's four norms a layer under Gemma 2's names (its post_attention_layernorm is the MLP's input norm)."""
    layers = [SimpleNamespace(input_layernorm=layer.input_layernorm,
                              post_attention_layernorm=layer.post_self_attn_layernorm,
                              pre_feedforward_layernorm=layer.post_attention_layernorm,
                              post_feedforward_layernorm=layer.post_mlp_layernorm, self_attn=layer.self_attn,
                              mlp=layer.mlp)
              for layer in model.model.layers]
    return _relaid(model, layers)


def _relaid(model: Any, layers: list[Any], norm: Any = None, rotary: Any = None) -> Layout:
    """A Llama-layout model (``model.model.embed_tokens``, ...) whose layers are given under Llama's names."""
    inner = SimpleNamespace(embed_tokens=model.model.embed_tokens, embed_positions=None, layers=layers,
                            norm=model.model.norm if norm is None else norm,
                            rotary_emb=model.model.rotary_emb if rotary is None else rotary)
    return Layout(SimpleNamespace(config=model.config, model=inner, lm_head=model.lm_head), _names(model), {})


def _bigcode(model: Any) -> Layout:
    """GPT-BigCode (StarCoder 1, SantaCoder): GPT-2's layout with nn.Linear layers, multi-query attention (all q, then
    one k, then one v) or q/k/v packed head by head, as GPT-NeoX."""
    names, rows = _names(model), {}
    t, cfg = model.transformer, model.config
    heads = int(cfg.num_attention_heads)
    dim = int(cfg.hidden_size) // heads
    order = None if cfg.multi_query else _head_by_head(heads, dim)
    layers = [SimpleNamespace(input_layernorm=h.ln_1, post_attention_layernorm=h.ln_2,
                              self_attn=SimpleNamespace(qkv_proj=h.attn.c_attn if order is None else _reordered(
                                  h.attn.c_attn, order, names, rows), o_proj=h.attn.c_proj),
                              mlp=SimpleNamespace(fc1=h.mlp.c_fc, fc2=h.mlp.c_proj))
              for h in t.h]
    config = _Config(cfg, hidden_act=cfg.activation_function, num_key_value_heads=1 if cfg.multi_query else heads,
                     head_dim=dim)
    inner = SimpleNamespace(embed_tokens=t.wte, embed_positions=t.wpe, layers=layers, norm=t.ln_f, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), names, rows)


def _neo(model: Any) -> Layout:
    """GPT-Neo: GPT-2's layout with separate q/k/v (no biases), its local layers as sliding-window ones."""
    t, cfg = model.transformer, model.config
    layers = [SimpleNamespace(input_layernorm=h.ln_1, post_attention_layernorm=h.ln_2,
                              self_attn=SimpleNamespace(q_proj=h.attn.attention.q_proj, k_proj=h.attn.attention.k_proj,
                                                        v_proj=h.attn.attention.v_proj,
                                                        o_proj=h.attn.attention.out_proj),
                              mlp=SimpleNamespace(fc1=h.mlp.c_fc, fc2=h.mlp.c_proj))
              for h in t.h]
    kinds = ["sliding_attention" if kind == "local" else "full_attention" for kind in cfg.attention_layers]
    config = _Config(cfg, hidden_act=cfg.activation_function, sliding_window=int(cfg.window_size), layer_types=kinds,
                     **_heads(cfg))
    inner = SimpleNamespace(embed_tokens=t.wte, embed_positions=t.wpe, layers=layers, norm=t.ln_f, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), _names(model), {})


def _lfm2(model: Any) -> Layout:
    """LFM2: attention layers (out_proj, q/k_layernorm) and short-convolution layers (kept as ``conv``: the graph
    builds them with their state, ``llama.py``), each before a SwiGLU MLP named w1 / w3 / w2; the final norm is
    embedding_norm."""
    def mixer(layer: Any) -> dict[str, Any]:
        if not layer.is_attention_layer:
            return {"conv": layer.conv}
        a = layer.self_attn
        return {"self_attn": SimpleNamespace(q_proj=a.q_proj, k_proj=a.k_proj, v_proj=a.v_proj, o_proj=a.out_proj,
                                             q_norm=a.q_layernorm, k_norm=a.k_layernorm)}

    layers = [SimpleNamespace(input_layernorm=layer.operator_norm, post_attention_layernorm=layer.ffn_norm,
                              mlp=SimpleNamespace(gate_proj=layer.feed_forward.w1, up_proj=layer.feed_forward.w3,
                                                  down_proj=layer.feed_forward.w2), **mixer(layer))
              for layer in model.model.layers]
    return _relaid(model, layers, model.model.embedding_norm, model.model.pos_emb)


def _apertus(model: Any) -> Layout:
    """Apertus's two norms a layer (attention_layernorm, feedforward_layernorm) under Llama's names."""
    layers = [SimpleNamespace(input_layernorm=layer.attention_layernorm,
                              post_attention_layernorm=layer.feedforward_layernorm, self_attn=layer.self_attn,
                              mlp=layer.mlp)
              for layer in model.model.layers]
    return _relaid(model, layers)


def _xglm(model: Any) -> Layout:
    """XGLM: OPT's layout with sinusoidal positions, read as a table: its rows from ``offset`` on (XGLM's positions
    start at 2), computed by the model's own function for every position the config allows."""
    m, cfg = model.model, model.config
    layers = _opt_layers(m.layers)
    table = m.embed_positions
    rows = type(table).get_embedding(int(cfg.max_position_embeddings) + table.offset, table.embedding_dim,
                                     table.padding_idx)[table.offset:]
    config = _Config(cfg, hidden_act=cfg.activation_function, **_heads(cfg))
    inner = SimpleNamespace(embed_tokens=m.embed_tokens, embed_positions=SimpleNamespace(weight=rows), layers=layers,
                            norm=m.layer_norm, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), _names(model), {})


def _mpt(model: Any) -> Layout:
    """MPT: bias-free LayerNorms, q/k/v packed as all q, then k, then v, a plain GELU MLP, ALiBi."""
    t, cfg = model.transformer, model.config
    layers = [SimpleNamespace(input_layernorm=h.norm_1, post_attention_layernorm=h.norm_2,
                              self_attn=SimpleNamespace(qkv_proj=h.attn.Wqkv, o_proj=h.attn.out_proj),
                              mlp=SimpleNamespace(fc1=h.ffn.up_proj, fc2=h.ffn.down_proj))
              for h in t.blocks]
    config = _Config(cfg, alibi_slopes=_alibi_slopes(cfg), **_heads(cfg))
    inner = SimpleNamespace(embed_tokens=t.wte, embed_positions=None, layers=layers, norm=t.norm_f, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), _names(model), {})


def _bloom(model: Any) -> Layout:
    """BLOOM: a LayerNorm of the embedding, q/k/v packed head by head (reordered, as GPT-NeoX's), ALiBi."""
    names, rows = _names(model), {}
    t, cfg = model.transformer, model.config
    heads = int(cfg.num_attention_heads)
    order = _head_by_head(heads, int(cfg.hidden_size) // heads)
    layers = [SimpleNamespace(input_layernorm=h.input_layernorm, post_attention_layernorm=h.post_attention_layernorm,
                              self_attn=SimpleNamespace(qkv_proj=_reordered(h.self_attention.query_key_value, order,
                                                                            names, rows),
                                                        o_proj=h.self_attention.dense),
                              mlp=SimpleNamespace(fc1=h.mlp.dense_h_to_4h, fc2=h.mlp.dense_4h_to_h))
              for h in t.h]
    config = _Config(cfg, alibi_slopes=_alibi_slopes(cfg), **_heads(cfg))
    inner = SimpleNamespace(embed_tokens=t.word_embeddings, embed_norm=t.word_embeddings_layernorm,
                            embed_positions=None, layers=layers, norm=t.ln_f, rotary_emb=None)
    return Layout(SimpleNamespace(config=config, model=inner, lm_head=model.lm_head), names, rows)


def _alibi_slopes(config: Any) -> list[float]:
    """Each head's ALiBi slope, from transformers' own bias of two positions (MPT and BLOOM choose the slopes of
    a head count that is not a power of two differently; Falcon's are BLOOM's in bfloat16): MPT's is
    slope · (j - last), BLOOM's and Falcon's slope · j."""
    import torch

    heads = int(config.num_attention_heads)
    if config.model_type == "mpt":
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        return (-build_mpt_alibi_tensor(heads, 2)[:, 0, 0]).tolist()
    if config.model_type == "falcon":
        from transformers.models.falcon.modeling_falcon import build_alibi_tensor
    else:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    return build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1].tolist()


def _mamba(model: Any) -> Layout:
    """Mamba, Falcon-Mamba and Mamba 2: each layer one RMSNorm and a state-space mixer (``mamba.py``), no attention and
    no MLP."""
    m = model.backbone
    layers = [SimpleNamespace(input_layernorm=layer.norm, mixer=layer.mixer) for layer in m.layers]
    inner = SimpleNamespace(embed_tokens=m.embeddings, embed_positions=None, layers=layers, norm=m.norm_f,
                            rotary_emb=None)
    return Layout(SimpleNamespace(config=model.config, model=inner, lm_head=model.lm_head), _names(model), {})


def _granite_hybrid(model: Any) -> Layout:
    """Granite 4's hybrids: Granite's layers with a Mamba 2 mixer (``mamba``) in place of attention in most of them,
    and its shared MLP (input_linear packs gate and up) beside the experts, or alone in the dense models."""
    def parts(layer: Any) -> dict[str, Any]:
        mixer = {"mamba": layer.mamba} if layer.mamba is not None else {"self_attn": layer.self_attn}
        shared = layer.shared_mlp
        if getattr(layer, "block_sparse_moe", None) is not None:
            return {**mixer, "mlp": layer.block_sparse_moe, "shared_mlp": shared}
        return {**mixer, "mlp": SimpleNamespace(gate_up_proj=shared.input_linear, down_proj=shared.output_linear)}

    layers = [SimpleNamespace(input_layernorm=layer.input_layernorm,
                              post_attention_layernorm=layer.post_attention_layernorm, **parts(layer))
              for layer in model.model.layers]
    return _relaid(model, layers)


def _bamba(model: Any) -> Layout:
    """Bamba: Mamba 2 layers (``mamba``) and attention layers (partial rotary), each before a SwiGLU MLP
    (``feed_forward``, after ``pre_ff_layernorm``)."""
    layers = [SimpleNamespace(input_layernorm=layer.input_layernorm, post_attention_layernorm=layer.pre_ff_layernorm,
                              mlp=layer.feed_forward, **({"mamba": layer.mamba} if layer.layer_type == "mamba" else
                                                         {"self_attn": layer.self_attn}))
              for layer in model.model.layers]
    return _relaid(model, layers, model.model.final_layernorm)


def _falcon_h1(model: Any) -> Layout:
    """Falcon-H1: in every layer a Mamba 2 mixer and attention side by side on one norm (their μP multipliers stay on
    the layer), then a SwiGLU MLP (``feed_forward``, with its own multipliers)."""
    layers = [SimpleNamespace(input_layernorm=layer.input_layernorm, post_attention_layernorm=layer.pre_ff_layernorm,
                              mamba=layer.mamba, self_attn=layer.self_attn, mlp=layer.feed_forward,
                              ssm_out_multiplier=float(layer.ssm_out_multiplier),
                              attention_in_multiplier=float(layer.attention_in_multiplier),
                              attn_out_multiplier=float(layer.attn_out_multiplier))
              for layer in model.model.layers]
    return _relaid(model, layers, model.model.final_layernorm)


def _linear_of(module: Any) -> Any:
    """An ``nn.Linear`` equal to a Conv1D (x·W + b, W [in, out]); other modules (a Linear, a factorized pair)
    unchanged."""
    from torch import nn

    if type(module).__name__ != "Conv1D":
        return module
    n_in, n_out = module.weight.shape
    linear = nn.Linear(n_in, n_out, bias=module.bias is not None, dtype=module.weight.dtype, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def _rows_permuted(module: Any, order: np.ndarray) -> Any:
    """A copy of a linear layer (or of a factorized pair's output half) whose output rows are in ``order``."""
    from torch import nn

    if isinstance(module, nn.Sequential):
        return nn.Sequential(*module[:-1], _rows_permuted(module[-1], order))
    index = _index(order, module.weight.device)
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       dtype=module.weight.dtype, device="meta")
    linear.weight = nn.Parameter(module.weight.detach()[index], requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach()[index], requires_grad=False)
    return linear


def _index(order: np.ndarray, device: Any) -> Any:
    import torch

    return torch.as_tensor(order, dtype=torch.long, device=device)


_VIEWS = {"gpt2": _gpt2, "gpt_neox": _neox, "opt": _opt, "falcon": _falcon, "gptj": _gptj, "glm4": _glm4,
          "apertus": _apertus, "gpt_bigcode": _bigcode, "gpt_neo": _neo,
          "lfm2": _lfm2, "codegen": _codegen, "xglm": _xglm, "mpt": _mpt, "bloom": _bloom,
          "mamba": _mamba, "mamba2": _mamba, "falcon_mamba": _mamba, "granitemoehybrid": _granite_hybrid,
          "bamba": _bamba, "falcon_h1": _falcon_h1}
