"""The memory model's view of any architecture: its linear layers read from the model's own modules.

``ModelShape.from_config`` knows one block, Llama's, from config keys alone (the runtime needs no torch). Other
families name and shape their projections differently (GPT-NeoX's packed query_key_value, OPT's fc1 / fc2,
GPT-2's Conv1D c_attn) and spell their config keys differently (GPT-2's n_head), so the planner instantiates the
model on torch's meta device (shapes, no memory, no weights read) and takes each decoder layer's linear layers as
ResSVD would see them, under their real names, and the attention sizes from the config object, whose attribute
maps resolve those spellings.
"""

from __future__ import annotations

import re
from typing import Any

from edgepack.runtime import memory
from edgepack.runtime.errors import UnsupportedArchitecture


def from_config(cfg: dict[str, Any], spec: str) -> memory.ModelShape:
    """``cfg`` (a config.json or a GGUF's config) as a ModelShape with the architecture's own linear layers."""
    from edgepack.export.fused.family import STATE_SPACE_TYPES
    from edgepack.toolchain import conv1d
    from edgepack.toolchain.ressvd import selection
    from edgepack.toolchain.ressvd.config import DEFAULT_TARGETS
    from transformers import AutoConfig

    try:
        config = AutoConfig.for_model(**cfg)
        model = _empty(config)
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError, NotImplementedError) as e:
        raise UnsupportedArchitecture(f"{spec}: the planner cannot lay out model type '{cfg.get('model_type')}' "
                                      f"({type(e).__name__}: {str(e)[:160]}); build it without --device") from None
    conv1d.to_linear(model)
    per_layer = selection.target_linears(model, DEFAULT_TARGETS)
    templates = [(_template(name, 0), *conv1d.dims(m)) for name, m in per_layer[0]]
    uniform = all([(_template(name, i), *conv1d.dims(m)) for name, m in layer] == templates
                  for i, layer in enumerate(per_layer))
    # layers that differ (LFM2's convolution and attention layers) are listed one by one
    layers = () if uniform else tuple(tuple((name, *conv1d.dims(m)) for name, m in layer) for layer in per_layer)
    heads = 0 if config.model_type in STATE_SPACE_TYPES else int(config.num_attention_heads)  # Mamba: no KV cache
    hidden = int(config.hidden_size)
    fixed = _fixed_linears(model, {id(m) for layer in per_layer for _, m in layer})
    widest = [(name, o, k) for layer in (layers or (templates,)) for name, o, k in layer]
    return memory.ModelShape(
        layers=len(per_layer), hidden=hidden, intermediate=_intermediate(widest, fixed, config), heads=heads,
        kv_heads=_kv_heads(config, heads) if heads else 0,
        head_dim=int(getattr(config, "head_dim", None) or hidden // heads) if heads else 0,
        vocab=int(config.vocab_size),
        tied=bool(cfg.get("tie_word_embeddings", True)), layer_linears=() if layers else tuple(templates),
        fixed_linears=fixed, per_layer_linears=layers, kv_layers=_kv_layers(config, len(per_layer)),
        **_states(config, len(per_layer)))


def _states(config: Any, layers: int) -> dict[str, int]:
    """The bytes of the Mamba layers' convolution states (kernel - 1 positions of the convolved channels) and SSM
    states (N per channel), and N: Mamba's, and the Mamba 2 layers' of Granite 4's hybrids and Bamba."""
    from edgepack.export.fused.family import HYBRID_TYPES, STATE_SPACE_TYPES

    if config.model_type == "mamba2":
        inner, state, kernel = int(config.expand * config.hidden_size), int(config.state_size), int(config.conv_kernel)
        convolved = inner + 2 * int(config.n_groups) * state
    elif config.model_type in STATE_SPACE_TYPES:  # Mamba, Falcon-Mamba
        inner, state, kernel, convolved = (int(config.intermediate_size), int(config.state_size),
                                           int(config.conv_kernel), int(config.intermediate_size))
    elif config.model_type in HYBRID_TYPES:  # Falcon-H1: a Mamba 2 mixer in every layer, its width mamba_d_ssm
        if config.model_type != "falcon_h1":  # its layers_block_type names every layer "attention"
            layers = sum(kind == "mamba" for kind in config.layers_block_type)
        inner = int(getattr(config, "mamba_d_ssm", None) or config.mamba_expand * config.hidden_size)
        state, kernel = int(config.mamba_d_state), int(config.mamba_d_conv)
        convolved = inner + 2 * int(config.mamba_n_groups) * state
    else:
        return {}
    # per position, a Mamba layer's graph holds [channels, N] tensors: five for Mamba (Δ·A, its exp, the input term
    # and the two Scan reads of them), two for Mamba 2, whose decay is one number a head (export/fused/mamba.py);
    # measured: a 256-token prefill of a 12 × 768 Granite 4 hybrid peaks 247 MiB over the loaded model, Mamba 126 MiB
    tensors = 2 if config.model_type in HYBRID_TYPES or config.model_type == "mamba2" else 5
    return {"state_bytes": layers * (convolved * (kernel - 1) + inner * state) * 4,
            "scan_bytes": tensors * inner * state * 4}


def _kv_layers(config: Any, layers: int) -> int | None:
    """Layers that keep a KV cache, where some keep none (LFM2's convolution layers); None: all of them."""
    from edgepack.export.fused.family import STATE_SPACE_TYPES

    if config.model_type in STATE_SPACE_TYPES:  # state-space layers only (Mamba)
        return 0
    kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None)  # Bamba: the latter
    if not kinds:
        return None
    # LFM2's convolution layers (a state of 2 positions) and Granite 4's Mamba 2 layers keep states instead
    attending = sum(kind not in ("conv", "mamba") for kind in kinds)
    return None if attending == layers else attending


def _empty(config: Any) -> Any:
    """The model with its parameters on the meta device (no memory). All of it there first; a model that reads a
    buffer's value while it is built (Apertus's xIELU calls ``.item()``) gets its buffers on the CPU instead."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except NotImplementedError:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(config)


def _fixed_linears(model: Any, compressible: set[int]) -> tuple[tuple[int, int, int], ...]:
    """(out, in, count) of the decoder's linear weights outside ResSVD's targets: a mixture of experts' experts
    (``nn.Linear`` each, or GraniteMoE's 3-D [experts, out, in] parameters) and routers (a dense model has none;
    its LM head is counted apart)."""
    from edgepack.toolchain.ressvd import selection
    from torch import nn

    counts: dict[tuple[int, int], int] = {}

    def add(out: int, inner: int, n: int = 1) -> None:
        counts[out, inner] = counts.get((out, inner), 0) + n

    for _, module in selection.decoder_layers(model).named_modules():
        if isinstance(module, nn.Linear) and id(module) not in compressible:
            add(int(module.out_features), int(module.in_features))
        if isinstance(module, nn.Conv1d):  # LFM2's depthwise convolution: a 3-D weight, not a stack of linears
            continue
        for param in module.parameters(recurse=False):
            if param.dim() == 3:
                add(int(param.shape[1]), int(param.shape[2]), int(param.shape[0]))
    return tuple((o, k, n) for (o, k), n in sorted(counts.items()))


def _intermediate(templates: list[tuple[str, int, int]], fixed: tuple[tuple[int, int, int], ...], config: Any) -> int:
    """The widest MLP activation a token makes: of a dense layer, or of its top-k experts side by side."""
    from edgepack.export.fused.moe import experts_of

    widest = max(max(o, k) for _, o, k in templates)
    if experts_of(config) < 2 or not fixed:
        return widest
    expert = int(getattr(config, "moe_intermediate_size", None) or config.intermediate_size)
    return max(widest, int(getattr(config, "num_experts_per_tok", 1) or 1) * expert)


def _kv_heads(config: Any, heads: int) -> int:
    """Key/value heads the KV cache holds (Falcon spells them num_kv_heads, 1 with multi-query attention)."""
    if getattr(config, "model_type", "") == "falcon":
        from edgepack.export.fused.views import falcon_kv_heads

        return falcon_kv_heads(config)
    return int(getattr(config, "num_key_value_heads", None) or heads)


def _template(name: str, index: int) -> str:
    """``model.layers.3.mlp.fc1`` → ``model.layers.{i}.mlp.fc1`` (the first ``.3.`` of layer 3)."""
    return re.sub(rf"\.{index}\.", ".{i}.", name, count=1)
