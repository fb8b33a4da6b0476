"""GGUF files of the tiny models in tiny_archs.py, written as llama.cpp's converter (convert_hf_to_gguf.py) writes
them: its architecture names, metadata keys and tensor names (from the gguf package's own map), and the same
changes to the tensors (q/k rows permuted for Llama, norm weights with their +1 folded in for Gemma and Nemotron,
GPT-2's Conv1D weights transposed, experts stacked, Mamba's A stored as -exp(A_log), ...). transformers reads
these files back through its own GGUF loader, which is what edgepack is checked against (tests/toolchain/
test_gguf_archs.py, benchmarks/generality/gguf_sweep.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

# transformers' model_type -> llama.cpp's architecture name
ARCH_NAMES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2_moe": "qwen2moe",
              "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma2": "gemma2", "gemma3_text": "gemma3",
              "stablelm": "stablelm", "starcoder2": "starcoder2", "nemotron": "nemotron", "falcon": "falcon",
              "bloom": "bloom", "gpt2": "gpt2", "mamba": "mamba", "lfm2": "lfm2"}


def write(model: Any, tokenizer: Any, path: Path, name: str = "tiny", pre: str = "gpt-2",
          extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``path``; ``extra``: more metadata keys, as they are."""
    import gguf

    cfg = model.config
    arch = ARCH_NAMES[cfg.model_type]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    meta = _metadata(cfg)
    if cfg.model_type == "lfm2":  # the width the model has, after LFM2's own adjustment of the config's
        meta["feed_forward_length"] = model.model.layers[0].feed_forward.w1.out_features
    for key, value in meta.items():
        _add(w, f"{arch}.{key}", value)
    for key, value in (extra or {}).items():
        _add(w, key, value)
    _add_tokenizer(w, tokenizer, cfg, pre)
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(enum, cfg.num_hidden_layers)
    for hf_name, array in _tensors(model):
        target = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if target is None and cfg.model_type == "bloom":  # llama.cpp converts BloomModel, without the prefix
            target = names.get_name(hf_name.removeprefix("transformer."), try_suffixes=(".weight", ".bias"))
        if target is None:
            raise KeyError(f"no GGUF name for {hf_name} ({arch})")
        w.add_tensor(target, np.ascontiguousarray(array, dtype=np.float32))
    for target, array in _extra_tensors(cfg):
        w.add_tensor(target, array.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w: Any, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, list):
        w.add_array(key, value)
    else:
        raise TypeError(f"{key}: {type(value)}")


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if getattr(cfg, n, None) is not None:
            return getattr(cfg, n)
    return default


def _metadata(cfg: Any) -> dict[str, Any]:
    """The {arch}.* keys llama.cpp writes for this architecture (its converter's set_gguf_parameters)."""
    t = cfg.model_type
    hidden = _get(cfg, "hidden_size", "n_embd")
    heads = _get(cfg, "num_attention_heads", "n_head", default=0)
    head_dim = _get(cfg, "head_dim", default=hidden // max(heads, 1))
    meta: dict[str, Any] = {"block_count": _get(cfg, "num_hidden_layers", "n_layer"), "embedding_length": hidden}
    if t == "mamba":
        return {**meta, "context_length": 2**20, "feed_forward_length": 0, "attention.head_count": 0,
                "ssm.conv_kernel": cfg.conv_kernel, "ssm.inner_size": cfg.intermediate_size,
                "ssm.state_size": cfg.state_size, "ssm.time_step_rank": cfg.time_step_rank,
                "attention.layer_norm_rms_epsilon": float(cfg.layer_norm_epsilon)}
    if t in ("gpt2", "bloom", "falcon"):
        meta.update({"context_length": _get(cfg, "n_positions", "seq_length", default=2048 if t == "falcon" else
                                            hidden),
                     "feed_forward_length": 4 * hidden, "attention.head_count": heads,
                     "attention.layer_norm_epsilon": float(cfg.layer_norm_epsilon)})
        if t == "bloom":
            meta["attention.head_count_kv"] = heads
        if t == "falcon":
            meta["attention.head_count_kv"] = _get(cfg, "num_kv_heads", default=1)
            meta["tensor_data_layout"] = "jploski"
        return meta
    kv = _get(cfg, "num_key_value_heads", default=heads)
    meta.update({"context_length": cfg.max_position_embeddings, "feed_forward_length": cfg.intermediate_size,
                 "attention.head_count": heads, "attention.head_count_kv": kv})
    share = _get(cfg, "partial_rotary_factor", default=1.0)
    # llama.cpp's Phi-3 and Nemotron count the rotated dimensions from the hidden size
    rope_dims = int(share * hidden) // heads if t in ("phi3", "nemotron") else int(head_dim * share)
    if t in ("stablelm", "starcoder2", "nemotron"):
        meta["attention.layer_norm_epsilon"] = float(_get(cfg, "layer_norm_eps", "norm_epsilon", "norm_eps"))
    else:
        meta["attention.layer_norm_rms_epsilon"] = float(_get(cfg, "rms_norm_eps", "norm_eps"))
    if t == "stablelm":
        return {**meta, "rope.dimension_count": rope_dims, "use_parallel_residual": bool(cfg.use_parallel_residual)}
    if t == "gemma2":
        return {**meta, "attention.key_length": head_dim, "attention.value_length": head_dim,
                "attn_logit_softcapping": float(cfg.attn_logit_softcapping),
                "final_logit_softcapping": float(cfg.final_logit_softcapping),
                "attention.sliding_window": cfg.sliding_window}
    meta["rope.freq_base"] = float(cfg.rope_theta)
    if t == "lfm2":
        meta["attention.head_count_kv"] = [kv if kind == "full_attention" else 0 for kind in cfg.layer_types]
        meta["shortconv.l_cache"] = cfg.conv_L_cache
    if t in ("llama", "mistral", "nemotron", "phi3"):
        meta["rope.dimension_count"] = rope_dims
    if t in ("llama", "mistral", "nemotron", "lfm2"):
        meta["vocab_size"] = cfg.vocab_size
    if getattr(cfg, "head_dim", None) is not None:
        meta["attention.key_length"] = meta["attention.value_length"] = head_dim
    if t in ("qwen2_moe", "qwen3_moe"):
        meta["expert_count"] = cfg.num_experts
        meta["expert_used_count"] = cfg.num_experts_per_tok
        meta["expert_feed_forward_length"] = cfg.moe_intermediate_size
        if t == "qwen2_moe":
            meta["expert_shared_feed_forward_length"] = cfg.shared_expert_intermediate_size
    if t == "gemma3_text":
        meta["rope.freq_base_swa"] = float(cfg.rope_local_base_freq)
        meta["attention.sliding_window"] = cfg.sliding_window
        if cfg.final_logit_softcapping:
            meta["final_logit_softcapping"] = float(cfg.final_logit_softcapping)
    if t == "phi3":
        meta["attention.sliding_window"] = cfg.sliding_window or 0
        meta["rope.scaling.original_context_length"] = _get(cfg, "original_max_position_embeddings",
                                                            default=cfg.max_position_embeddings)
    return {**meta, **_rope_scaling(cfg)}


def _rope_scaling(cfg: Any) -> dict[str, Any]:
    scaling = _get(cfg, "rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if cfg.model_type == "nemotron":
        return {"rope.scaling.type": "none"} if not kind else {"rope.scaling.type": "linear",
                                                                "rope.scaling.factor": float(scaling["factor"])}
    if kind == "linear":
        return {"rope.scaling.type": "linear", "rope.scaling.factor": float(scaling["factor"])}
    if kind == "yarn":
        return {"rope.scaling.type": "yarn", "rope.scaling.factor": float(scaling["factor"]),
                "rope.scaling.original_context_length": scaling["original_max_position_embeddings"]}
    if kind == "longrope" and cfg.model_type == "phi3":
        orig = cfg.original_max_position_embeddings
        scale = cfg.max_position_embeddings / orig
        return {"rope.scaling.attn_factor": float(np.sqrt(1 + np.log(scale) / np.log(orig)) if scale > 1 else 1.0)}
    return {}


def _extra_tensors(cfg: Any) -> list[tuple[str, np.ndarray]]:
    """Tensors llama.cpp generates from the config: the llama3 rope's per-frequency divisors and Phi-3's longrope
    factors."""
    scaling = _get(cfg, "rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        return [("rope_freqs.weight", _llama3_divisors(cfg, scaling))]
    if kind == "longrope":
        return [("rope_factors_long.weight", np.asarray(scaling["long_factor"])),
                ("rope_factors_short.weight", np.asarray(scaling["short_factor"]))]
    return []


def _llama3_divisors(cfg: Any, s: dict[str, Any]) -> np.ndarray:
    head_dim = _get(cfg, "head_dim", default=cfg.hidden_size // cfg.num_attention_heads)
    freqs = 1.0 / cfg.rope_theta ** (np.arange(0, head_dim, 2) / head_dim)
    low = s["original_max_position_embeddings"] / s["low_freq_factor"]
    high = s["original_max_position_embeddings"] / s["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * np.pi / f
        if wavelen < high:
            out.append(1.0)
        elif wavelen > low:
            out.append(s["factor"])
        else:
            smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
                s["high_freq_factor"] - s["low_freq_factor"])
            out.append(1 / ((1 - smooth) / s["factor"] + smooth))
    return np.asarray(out)


def _tensors(model: Any) -> list[tuple[str, np.ndarray]]:
    cfg = model.config
    t = cfg.model_type
    state = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    tied = getattr(cfg, "tie_word_embeddings", False)
    out: list[tuple[str, np.ndarray]] = []
    experts: dict[str, list[np.ndarray]] = {}
    for name, array in state.items():
        if name == "lm_head.weight" and (tied or t in ("bloom",)):
            continue
        if ".rotary_emb." in name or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if t in ("llama", "mistral") and re.search(r"\.(q|k)_proj\.(weight|bias)$", name):
            heads = cfg.num_attention_heads if ".q_proj" in name else cfg.num_key_value_heads
            array = _permute(array, heads)
        if t in ("gemma2", "gemma3_text") and name.endswith("norm.weight"):
            array = array + 1
        if t == "nemotron" and name.endswith("norm.weight"):
            array = array + 1
        if t == "gpt2" and re.search(r"\.(c_attn|c_proj|c_fc)\.weight$", name):
            array = array.T
        if t == "mamba":
            if name.endswith("A_log"):
                array = -np.exp(array)
            if name.endswith("conv1d.weight"):
                array = array.squeeze(1)
        if t == "lfm2" and array.ndim == 3:
            array = array.squeeze(1)
        if t == "bloom" and "query_key_value" in name:
            array = _bloom_qkv(array, cfg)
        if t == "falcon" and "query_key_value" in name:
            array = _falcon_qkv(array, cfg)
        if t == "mamba" and name in ("backbone.embeddings.weight", "lm_head.weight"):
            pad = -len(array) % 8
            array = np.concatenate([array, np.zeros((pad, array.shape[1]), np.float32)])
        match = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$", name)
        if match:
            experts.setdefault(f"{match.group(1)}.{match.group(3)}", []).append(array)
            continue
        if t == "qwen2_moe" and name.endswith("shared_expert_gate.weight"):
            array = array.reshape(-1)
        out.append((name, array))
    out += [(f"{key}.weight", np.stack(arrays)) for key, arrays in experts.items()]
    return out


def _permute(weight: np.ndarray, heads: int) -> np.ndarray:
    # llama.cpp interleaves each head's rotary halves; transformers undoes this on load
    out = weight.shape[0]
    return weight.reshape(heads, 2, out // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _bloom_qkv(array: np.ndarray, cfg: Any) -> np.ndarray:
    # HF keeps q/k/v interleaved per head; llama.cpp stores all q rows, then k, then v
    heads, hidden = cfg.n_head, cfg.hidden_size
    per = array.reshape(heads, 3, hidden // heads, *array.shape[1:])
    return np.concatenate([per[:, i].reshape(hidden, *array.shape[1:]) for i in range(3)], axis=0)


def _falcon_qkv(array: np.ndarray, cfg: Any) -> np.ndarray:
    # HF groups each key-value head's queries with its k and v; llama.cpp stores all q rows, then k, then v
    kv = cfg.num_kv_heads if cfg.new_decoder_architecture or not cfg.multi_query else 1
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per = array.reshape(kv, cfg.num_attention_heads // kv + 2, head_dim, *array.shape[1:])
    q = per[:, :-2].reshape(-1, *array.shape[1:])
    return np.concatenate([q, per[:, -2].reshape(-1, *array.shape[1:]), per[:, -1].reshape(-1, *array.shape[1:])])


def _add_tokenizer(w: Any, tokenizer: Any, cfg: Any, pre: str) -> None:
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    rows = cfg.vocab_size + (-cfg.vocab_size % 8 if cfg.model_type == "mamba" else 0)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), rows)]
    special = set(tokenizer.all_special_tokens)
    if cfg.model_type in ("gemma2", "gemma3_text"):  # llama.cpp writes Gemma's sentencepiece vocabulary, with scores
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(len(tokens))])
        w.add_token_types([3 if t in special else 1 for t in tokens])
        w.add_unk_token_id(tokenizer.unk_token_id)
        w.add_bos_token_id(tokenizer.bos_token_id)
        w.add_eos_token_id(tokenizer.eos_token_id)
        return
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_add_bos_token(False)  # as the tests' tokenizer, which adds none
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(tokenizer.bos_token_id)
    w.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        w.add_pad_token_id(tokenizer.pad_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


# Tiny models whose settings differ from their config class's defaults where transformers' GGUF reader has
# dropped them (rope base, rotary share, rope scaling, softcaps, head size, biases, ...): name -> (tiny_archs
# architecture, config overrides).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {"rope_theta": 50000.0, "attention_bias": True, "mlp_bias": True}),
    "llama-rope3": ("llama", {"max_position_embeddings": 1024, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 8.0,
        "original_max_position_embeddings": 256}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"rope_theta": 50000.0}),
    "qwen3": ("qwen3", {"head_dim": 32}),
    "qwen3_moe": ("qwen3_moe", {"norm_topk_prob": True}),
    # 32-wide heads, half of each rotated (as Phi-4-mini rotates 3/4), longrope factors
    "phi3": ("phi3", {"num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                      "original_max_position_embeddings": 128, "partial_rotary_factor": 0.5, "rope_scaling": {
                          "type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5],
                          "long_factor": [1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]}}),
    # a GGUF's Gemma scales attention by its head size (llama.cpp), where the config class's default is 256
    "gemma2": ("gemma2", {"attn_logit_softcapping": 40.0, "final_logit_softcapping": 20.0,
                          "query_pre_attn_scalar": 16}),
    "gemma3_text": ("gemma3_text", {"rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                    "rope_local_base_freq": 20000.0, "query_pre_attn_scalar": 16}),
    "stablelm": ("stablelm", {"partial_rotary_factor": 0.5}),
    # llama.cpp writes no sliding window for StarCoder 2 (nor for a Mistral): a GGUF of one has none
    "starcoder2": ("starcoder2", {"rope_theta": 999999.0, "sliding_window": None}),
    "nemotron": ("nemotron", {"head_dim": 16}),  # llama.cpp counts its rotated dimensions from the hidden size
    "falcon": ("falcon", {}),  # two key-value heads: llama.cpp's q/k/v layout
    "falcon-7b": ("falcon", {"new_decoder_architecture": False, "multi_query": True, "num_kv_heads": 1}),
    "bloom": ("bloom", {}),
    "gpt2": ("gpt2", {}),
    "mamba": ("mamba", {}),
    "lfm2": ("lfm2", {}),
    "qwen2_moe": ("qwen2_moe", {}),  # transformers alone reads none of its settings
}


def make_model(variant: str, seed: int = 3) -> Any:
    """The variant's tiny model, its 1-D weights (norms, biases) moved off their initial values so that a
    dropped bias or a norm offset shows in the logits."""
    import tiny_archs
    import torch
    from transformers import AutoModelForCausalLM

    arch, overrides = VARIANTS[variant]
    config = tiny_archs.ARCHS[arch]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    # eager attention: transformers' SDPA path skips Gemma 2's attention softcap, which edgepack computes
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            elif p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape))
    return model
