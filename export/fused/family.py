"""What sets a Llama-family decoder apart from Llama, read from a model's config: the fused graph (``llama.py``) is one
layout, and these are its switches.

Gemma's differences are all local: norms scale by ``1 + w``, the embedding is multiplied by sqrt(hidden), the MLP
gate is a tanh-approximated GELU, attention scales by ``query_pre_attn_scalar``, Gemma 2 caps attention scores and
final logits with ``c·tanh(x/c)``, and Gemma 2 / 3 also norm each block's output before the residual add ("sandwich"
norms). Qwen3 and Gemma 3 norm each head of q and k; Gemma 3 rotates sliding-window layers with their own base
frequency. Phi-3 packs q/k/v and gate/up in its checkpoint and may rotate only part of each head. SmolLM3 skips the
rotary on some layers; Granite scales the embedding, each block's output, the attention scores and the logits by
constants. StableLM and OLMo norm with LayerNorm (mean subtracted; StableLM's has weights and biases, OLMo's none)
instead of RMSNorm, and StableLM rotates part of each head. OLMo 2 norms only each block's output (no norm before a
block) and norms q and k over their whole width, not per head. Phi (1.5 / 2) runs attention and a plain two-layer
MLP side by side on one normed input ("parallel"), with LayerNorms, biases everywhere and a partial rotary. GPT-NeoX
runs them side by side too, each on its own norm of the residual (``parallel_norms``; or one after the other when
``use_parallel_residual`` is off). GPT-2 and OPT have no rotary: they add learned position embeddings to the token's
(OPT's MLP is a ReLU). Falcon runs attention and MLP side by side on one norm, or on two in its newer layout. Cohere
runs attention and a SwiGLU MLP side by side on one LayerNorm without bias, rotates interleaved pairs of dimensions
and scales its logits; GPT-J rotates interleaved pairs too, of the first ``rotary_dim`` dimensions of a head, with
attention and MLP side by side. Ministral, Seed-OSS and ERNIE 4.5 (interleaved rotary) are Llama's layout;
StarCoder2 has LayerNorms with biases and a plain MLP; OLMo 3 is OLMo 2 with sliding-window layers (each kind its
own rotary); EXAONE 4 norms block outputs only, q and k per head, and rotates only its sliding-window layers;
VaultGemma is Gemma 2 without the norms on block outputs; Cohere 2 is Cohere with sliding-window layers, only those
rotated. GLM packs gate/up (as Phi-3) and rotates interleaved pairs of part of each head; GLM 4 adds Gemma 2's norms
on block outputs, under other names. Helium is Llama with an interleaved rotary; Arcee has a plain MLP with a
squared ReLU; Nemotron too, with LayerNorms that scale by 1 + w and a partial rotary; Apertus has the plain MLP with
xIELU (its parameters per layer) and per-head q/k norms, under other norm names; HunYuan norms each head of q and k
after the rotary, so the graph rotates them itself and GroupQueryAttention does not. BitNet (its unquantized weights)
norms attention's output before o and the gated MLP's before down, with a squared ReLU. XGLM adds sinusoidal
positions (read as a table) to a scaled embedding. MPT and BLOOM have no rotary: ALiBi adds a per-head linear bias of
the key distance to the attention scores (``alibi.py``); BLOOM also norms the embedding. GPT-2, GPT-NeoX, OPT, Falcon,
GPT-J, GLM 4, Apertus, XGLM, MPT, BLOOM and others reach the graph through ``views.py``, which gives their modules
the Llama layout's names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgepack.export.fused.alibi import Alibi
from edgepack.export.fused.moe import MOE_TYPES, check_moe
from edgepack.runtime.errors import UnsupportedArchitecture

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "granite", "gemma", "gemma2",
                   "gemma3_text", "stablelm", "olmo", "olmo2", "phi", "gpt_neox", "gpt2", "opt", "falcon", "cohere",
                   "gptj", "ministral", "olmo3", "seed_oss", "starcoder2", "vaultgemma", "ernie4_5", "exaone4",
                   "cohere2", "glm", "glm4", "helium", "arcee", "nemotron", "apertus", "hunyuan_v1_dense",
                   "gpt_bigcode", "gpt_neo", "bitnet", "lfm2", "codegen", "xglm", "mpt", "bloom", "mamba",
                   "mamba2", "falcon_mamba", "granitemoehybrid", "bamba", "falcon_h1", *MOE_TYPES)
LAYER_NORM_TYPES = ("stablelm", "olmo", "phi", "gpt_neox", "gpt2", "opt", "falcon", "cohere", "gptj", "codegen",
                    "starcoder2", "cohere2", "nemotron", "gpt_bigcode", "gpt_neo", "xglm", "mpt", "bloom")
COHERE_TYPES = ("cohere", "cohere2")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text", "vaultgemma")  # norms by 1 + w, embedding scaled by sqrt(hidden)
POST_NORM_TYPES = ("olmo2", "olmo3", "exaone4", "flex_olmo")  # norms on each block's output only
POSITION_TABLE_TYPES = ("gpt2", "opt", "gpt_bigcode", "gpt_neo", "xglm")  # absolute positions (XGLM's sinusoidal)
ALIBI_TYPES = ("mpt", "bloom")  # linear biases of the key distance, no rotary
STATE_SPACE_TYPES = ("mamba", "mamba2", "falcon_mamba")  # state-space layers only: no attention, no KV cache
HYBRID_TYPES = ("granitemoehybrid", "bamba", "falcon_h1")  # Mamba 2 layers with or beside attention layers
# embedding, residual, attention and logit multipliers
GRANITE_TYPES = ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")
GPTJ_TYPES = ("gptj", "codegen")  # GPT-J's layout: a rotary of rotary_dim dimensions in interleaved pairs
# transformers' activation names → how the graph computes them (FastGelu is the tanh approximation)
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh",
               "gelu": "gelu", "relu": "relu", "relu2": "relu2", "xielu": "xielu"}


@dataclass(frozen=True)
class Family:
    norm_offset: float  # RMSNorm scales by offset + w (Gemma: 1)
    embed_scale: float | None  # the embedding lookup is multiplied by this (Gemma: sqrt(hidden))
    activation: str  # of the MLP gate: a value of ACTIVATIONS
    sandwich: bool  # a norm on each block's output before the residual add (Gemma 2 / 3)
    attention_scale: float
    attention_softcap: float  # 0: none
    logit_softcap: float  # 0: none
    residual_scale: float | None  # each block's output is multiplied by this before the residual add (Granite)
    logit_scale: float | None  # the logits are multiplied by this (Granite: 1 / logits_scaling)
    rotary_layers: tuple[bool, ...] | None  # per layer, whether it applies the rotary (SmolLM3); None: all do
    layer_norm: bool = False  # LayerNorm (x - mean) instead of RMSNorm (StableLM, OLMo)
    norm_eps: float = 1e-6
    pre_norm: bool = True  # a norm before each block (all but OLMo 2, which norms only the block's output)
    qk_norm_per_head: bool = True  # q/k norms over each head (Qwen3, Gemma 3) or over the whole width (OLMo 2)
    parallel: bool = False  # attention and MLP read the same normed input, both added to the residual (Phi)
    parallel_norms: bool = False  # parallel, the MLP reading its own norm of the residual (GPT-NeoX)
    positions: bool = False  # learned absolute position embeddings added to the token embeddings (GPT-2)
    rotary_interleaved: bool = False  # the rotary turns pairs (x0, x1), (x2, x3), ... (Cohere), not halves
    qk_norm_after_rotary: bool = False  # q/k norms on the rotated heads (HunYuan), not before the rotary
    alibi: Alibi | None = None  # ALiBi's linear bias on the key distance instead of a rotary (MPT, BLOOM, Falcon-RW)


def check_supported(config: Any) -> None:
    """Refuse, by name, models the fused layout does not describe."""
    model_type = getattr(config, "model_type", "?")
    if model_type not in SUPPORTED_TYPES:
        raise UnsupportedArchitecture(f"model type '{model_type}' has no fused graph yet "
                                      f"(supported: {', '.join(SUPPORTED_TYPES)}); build without --graph fused")
    quantized = getattr(config, "quantization_config", None)
    if quantized:  # e.g. a packed BitNet, GPTQ or AWQ checkpoint: its modules hold no float weights to read
        method = _field(quantized, "quant_method") or "?"
        raise UnsupportedArchitecture(f"the fused graph reads float weights, this checkpoint is quantized "
                                      f"({method}); build from its unquantized weights")
    act = _activation_name(config)
    if act not in ACTIVATIONS:
        raise UnsupportedArchitecture(f"the fused graph has {', '.join(ACTIVATIONS)} MLPs, this model uses {act}")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < 2:  # onnxruntime's window of 1 does not match transformers' (self only)
        raise UnsupportedArchitecture(f"the fused graph needs a sliding window of at least 2, this model has {window}")
    kinds = set(getattr(config, "layer_types", None) or ()) - {"full_attention", "sliding_attention"}
    if model_type == "lfm2":
        kinds -= {"conv"}  # LFM2's short convolutions, with their state (llama.py)
        if int(getattr(config, "conv_L_cache", 3)) < 2:
            raise UnsupportedArchitecture("the fused graph needs LFM2 convolutions of at least 2 positions")
    if model_type in (*STATE_SPACE_TYPES, *HYBRID_TYPES) and act != "silu":  # mamba.py's convolutions and gate
        raise UnsupportedArchitecture(f"the fused graph's Mamba layers use SiLU, this model uses {act}; no graph "
                                      "takes it yet")
    if model_type in HYBRID_TYPES:
        kinds -= {"mamba", "attention"}  # Mamba 2 mixers (mamba.py) and full attention
    if kinds:
        raise UnsupportedArchitecture(f"the fused graph has full and sliding-window attention only, this model "
                                      f"has {sorted(kinds)} layers")
    if getattr(config, "use_bidirectional_attention", False):
        raise UnsupportedArchitecture("the fused graph is causal; this model attends both ways (an encoder)")
    heads = getattr(config, "num_attention_heads", None)
    head = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else 0)
    unrotated = model_type in (*POSITION_TABLE_TYPES, *ALIBI_TYPES) or model_type == "falcon" and getattr(
        config, "alibi", False)
    share = 0.0 if unrotated else float(getattr(config, "partial_rotary_factor", None) or 1.0)
    rotated = int(head * share)
    if model_type in GPTJ_TYPES:
        if not getattr(config, "rotary_dim", 64):  # transformers then rotates by a hidden-wide table
            raise UnsupportedArchitecture(f"the fused graph needs {model_type}'s rotary_dim; build with --graph "
                                          "optimum")
        rotated = int(getattr(config, "rotary_dim", 64))
    # a config.json read by the planner spells CodeGen's head count n_head (CodeGenConfig maps it)
    if model_type == "codegen" and int(heads or config.n_head) % 4:
        raise UnsupportedArchitecture("the fused graph reads CodeGen's q/k/v in its 4 model-parallel blocks, which "
                                      "this model's head count does not divide into; build with --graph optimum")
    if head and rotated % 16:  # GroupQueryAttention's kernel rotates in groups of 16 dimensions
        raise UnsupportedArchitecture(f"the fused graph rotates multiples of 16 dimensions of a head, this model "
                                      f"rotates {rotated}; build with --graph optimum")
    _check_gpt2(config)
    _check_opt(config)
    _check_falcon(config)
    _check_alibi(config)
    check_moe(config)
    if model_type in COHERE_TYPES and getattr(config, "use_qk_norm", False):
        raise UnsupportedArchitecture("the fused graph has no per-head LayerNorm of q/k (Cohere's use_qk_norm); "
                                      "build with --graph optimum")
    stablelm_parallel = model_type == "stablelm" and getattr(config, "use_parallel_residual", False)
    if getattr(config, "qk_layernorm", False) or stablelm_parallel:
        raise UnsupportedArchitecture("the fused graph has no per-head LayerNorm of q/k and no parallel residual "
                                      "(StableLM options this model uses); build with --graph optimum")
    if getattr(config, "clip_qkv", None) is not None:
        raise UnsupportedArchitecture("the fused graph does not clip q/k/v (OLMo's clip_qkv, which this model "
                                      "sets); build with --graph optimum")


def _check_gpt2(config: Any) -> None:
    if getattr(config, "model_type", "") not in ("gpt2", "gpt_bigcode"):
        return
    if getattr(config, "add_cross_attention", False) or getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise UnsupportedArchitecture("the fused graph has GPT-2 without cross-attention and with one attention "
                                      "scale for every layer; build with --graph optimum")


def _check_opt(config: Any) -> None:
    if getattr(config, "model_type", "") != "opt":
        return
    if not getattr(config, "do_layer_norm_before", True) or getattr(config, "_remove_final_layer_norm", False):
        raise UnsupportedArchitecture("the fused graph norms before each block and at the end (OPT-350m norms "
                                      "after each block); build with --graph optimum")
    if getattr(config, "word_embed_proj_dim", config.hidden_size) != config.hidden_size:
        raise UnsupportedArchitecture("the fused graph has no projection between OPT's embedding width and its "
                                      "hidden width; build with --graph optimum")


def _check_falcon(config: Any) -> None:
    if getattr(config, "model_type", "") != "falcon":
        return
    # getattr with FalconConfig's defaults: the planner checks a config.json, which older Falcons write sparsely
    if getattr(config, "new_decoder_architecture", False) and not getattr(config, "parallel_attn", True):
        raise UnsupportedArchitecture("the fused graph has Falcon's newer layout with parallel attention only")


def _check_alibi(config: Any) -> None:
    model_type = getattr(config, "model_type", "")
    if model_type == "bloom" and getattr(config, "apply_residual_connection_post_layernorm", False):
        raise UnsupportedArchitecture("the fused graph adds each block to its input, this BLOOM to its normed input "
                                      "(apply_residual_connection_post_layernorm); build with --graph optimum")
    attn = getattr(config, "attn_config", None) if model_type == "mpt" else None
    if attn is not None and _field(attn, "clip_qkv"):
        raise UnsupportedArchitecture("the fused graph does not clip q/k/v (MPT's attn_config.clip_qkv, which this "
                                      "model sets); build with --graph optimum")


def _field(section: Any, name: str) -> Any:
    """A field of a nested config section, which a config.json read by the planner gives as a dict."""
    return section.get(name) if isinstance(section, dict) else getattr(section, name, None)


def _falcon_norms(config: Any) -> int:
    """Falcon's norms a layer in parallel attention: 2 (attention's and MLP's) in the newer layout by default."""
    count = getattr(config, "num_ln_in_parallel_attn", None)
    return int(count) if count is not None else 2 if config.new_decoder_architecture else 1


def family_of(config: Any, head_dim: int) -> Family:
    gemma = config.model_type in GEMMA_TYPES
    granite = config.model_type in GRANITE_TYPES
    scalar = getattr(config, "query_pre_attn_scalar", None) if gemma else None
    rotary = getattr(config, "no_rope_layers", None) if config.model_type == "smollm3" else None
    if config.model_type == "exaone4" and getattr(config, "sliding_window", None) or config.model_type == "cohere2":
        rotary = [kind == "sliding_attention" for kind in config.layer_types]  # global layers have no rotary
    neox_parallel = config.model_type == "gpt_neox" and bool(config.use_parallel_residual)
    falcon = config.model_type == "falcon"
    falcon_parallel = falcon and bool(config.new_decoder_architecture or config.parallel_attn)
    two_norms = neox_parallel or falcon and bool(config.new_decoder_architecture) and _falcon_norms(config) == 2
    # GPT-Neo never scales attention scores; GPT-2 and GPT-BigCode may be told not to
    unscaled = config.model_type == "gpt_neo" or config.model_type in ("gpt2", "gpt_bigcode") and not getattr(
        config, "scale_attn_weights", True)
    scale = getattr(config, "scale_embedding", False) if config.model_type == "xglm" else gemma
    falcon_h1 = config.model_type == "falcon_h1"  # μP: the embedding, logits and keys (so the scores) scaled
    return Family(
        norm_offset=1.0 if gemma or config.model_type == "nemotron" else 0.0,
        embed_scale=math.sqrt(config.hidden_size) if scale else float(config.embedding_multiplier)
        if granite or falcon_h1 else None,
        activation=ACTIVATIONS[_activation_name(config)],
        sandwich=config.model_type in ("gemma2", "gemma3_text", "glm4"),
        attention_scale=float(config.attention_multiplier) if granite else 1.0 if unscaled else
        _mpt_scale(config) or float(scalar or head_dim) ** -0.5 * (float(config.key_multiplier) if falcon_h1 else 1.0),
        attention_softcap=float(getattr(config, "attn_logit_softcapping", None) or 0.0),
        logit_softcap=float(getattr(config, "final_logit_softcapping", None) or 0.0),
        residual_scale=float(config.residual_multiplier) if granite else None,
        logit_scale=1.0 / float(config.logits_scaling) if granite else float(config.logit_scale)
        if config.model_type in COHERE_TYPES else float(config.lm_head_multiplier) if falcon_h1 else None,
        rotary_layers=tuple(bool(r) for r in rotary) if rotary is not None else None,
        layer_norm=config.model_type in LAYER_NORM_TYPES,
        norm_eps=_norm_eps(config),
        pre_norm=config.model_type not in POST_NORM_TYPES,
        qk_norm_per_head=config.model_type not in ("olmo2", "olmo3", "olmoe", "flex_olmo"),
        parallel=config.model_type in ("phi", *GPTJ_TYPES, *COHERE_TYPES) or neox_parallel or falcon_parallel,
        parallel_norms=two_norms,
        positions=config.model_type in POSITION_TABLE_TYPES,
        rotary_interleaved=config.model_type in (*GPTJ_TYPES, "ernie4_5", "glm", "glm4", "helium",
                                                 *COHERE_TYPES),
        qk_norm_after_rotary=config.model_type == "hunyuan_v1_dense",
        alibi=_alibi(config, head_dim),
    )


def _alibi(config: Any, head_dim: int) -> Alibi | None:
    """ALiBi's slopes (which the view reads from transformers) and, for Falcon, its bfloat16, pre-scale form."""
    if config.model_type in ALIBI_TYPES:
        return Alibi(tuple(config.alibi_slopes))
    if config.model_type == "falcon" and config.alibi:
        return Alibi(tuple(config.alibi_slopes), scale=head_dim ** -0.5, bfloat16=True)
    return None


def _mpt_scale(config: Any) -> float | None:
    """MPT's attn_config.softmax_scale, which replaces 1 / sqrt(head_dim) when set."""
    attn = getattr(config, "attn_config", None) if config.model_type == "mpt" else None
    scale = _field(attn, "softmax_scale") if attn is not None else None
    return float(scale) if scale else None


def _norm_eps(config: Any) -> float:
    """The norms' epsilon: RMSNorm's ``rms_norm_eps``, StableLM's ``layer_norm_eps``, OLMo's fixed 1e-5 (its
    parameter-free LayerNorm takes none from the config)."""
    if config.model_type == "olmo":
        return 1e-5
    if config.model_type in ("stablelm", "phi", "gpt_neox", *COHERE_TYPES):
        return float(config.layer_norm_eps)
    if config.model_type in ("opt", "xglm"):
        return 1e-5  # torch's LayerNorm default, which their layers use
    if config.model_type in ("gpt2", "falcon", *GPTJ_TYPES, "gpt_bigcode", "gpt_neo", "mpt", "bloom",
                             *STATE_SPACE_TYPES):
        return float(config.layer_norm_epsilon)
    if config.model_type == "starcoder2":
        return float(config.norm_epsilon)
    if config.model_type in ("nemotron", "lfm2"):
        return float(config.norm_eps)
    return float(config.rms_norm_eps)


def _activation_name(config: Any) -> str:
    """The MLP's activation as transformers reads it: Gemma 2 / 3 from ``hidden_activation``, the others
    (Gemma too) from ``hidden_act``."""
    if getattr(config, "model_type", "") == "falcon":
        return getattr(config, "activation", "gelu")
    if getattr(config, "model_type", "") == "mpt":
        return "gelu"  # transformers' MPT MLP is the exact GELU, whatever its config says
    if getattr(config, "model_type", "") == "bloom":
        return "gelu_pytorch_tanh"  # BloomGelu: the tanh approximation
    if getattr(config, "model_type", "") in ("gpt2", "opt", *GPTJ_TYPES, "gpt_bigcode", "gpt_neo", "xglm"):
        return getattr(config, "activation_function", "relu" if config.model_type == "opt" else "gelu_new")
    if getattr(config, "model_type", "") in ("gemma2", "gemma3_text", "vaultgemma"):
        return getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh"  # their configs' default
    return getattr(config, "hidden_act", "silu")
