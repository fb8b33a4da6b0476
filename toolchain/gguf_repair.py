"""What transformers' GGUF reader leaves out of a model, read back from the GGUF itself.

transformers (4.57) maps a fixed list of ``{arch}.*`` keys per architecture into the model config and ignores the
rest, so a GGUF written by llama.cpp's converter can load without an error and still compute another model:
Llama 3's rope divisors (the ``rope_freqs`` tensor), Phi-3's longrope factors and partial rotary, Gemma's
softcaps and rope scaling, StarCoder 2's rope base, StableLM's rotary share, Llama biases. Others fail on a
shape (Qwen 3's head size, GPT-2's positions, Falcon's key-value heads), and one reads no key at all (Qwen2-MoE,
``mend_reader``). Each was found by writing a tiny model
as llama.cpp does and comparing what transformers reads back (tests/gguf_writer.py, tests/toolchain/
test_gguf_archs.py). No library does this, so it is written here: ``repair_config`` sets what the header says
and transformers did not, ``repair_weights`` undoes a tensor layout transformers does not know, ``repair_tokenizer``
gives a byte-level BPE the split rule its ``tokenizer.ggml.pre`` names. What cannot be read (an unknown rope
scaling) is refused by name. Every change is printed.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from edgepack.runtime.errors import UnsupportedArchitecture

# The Llama 3 and Qwen 2 split rules (their tokenizer.json files' Split patterns), which transformers' GGUF
# tokenizer converters replace with GPT-2's for a GGUF of another architecture.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
# llama.cpp's tokenizer.ggml.pre names for those rules
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
# rules transformers' converters already apply (GPT-2's; SmolLM's vocabulary has no multi-digit token to differ on)
_GPT2_RULES = {"gpt-2", "smollm", "default"}
# architectures whose transformers converter already applies the Qwen 2 rule
_QWEN2_CONVERTED = {"qwen2", "qwen2_moe", "qwen3", "qwen3_moe"}
# the small tensors read here (not the weights)
_EXTRA = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


@dataclass(frozen=True)
class Header:
    arch: str
    keys: dict[str, Any]
    tensors: frozenset[str]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.keys.get(f"{self.arch}.{key}", default)


def read_header(path: Path) -> Header:
    """The GGUF's metadata (without the tokenizer's arrays), its tensor names, and the few small tensors that
    carry settings (rope factors)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    keys = {}
    for name, f in reader.fields.items():
        if name.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                            "tokenizer.ggml.scores")):
            continue
        keys[name] = f.contents()
    extra = {t.name: np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float64).reshape(-1)
             for t in reader.tensors if t.name in _EXTRA}
    return Header(str(keys.get("general.architecture", "")), keys, frozenset(t.name for t in reader.tensors), extra)


def mend_reader() -> None:
    """transformers (4.57) renames a qwen2moe GGUF's architecture to 'qwen2_moe' before it looks the file's keys up
    in its table, which has them under 'qwen2moe' only: it reads none of them, not even the expert count its own
    weight loader then uses (an index error, or the wrong experts). Give the table that name too; a transformers
    that has it is left alone. Called before transformers reads a GGUF."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    table = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    if "qwen2moe" in table and "qwen2_moe" not in table:
        table["qwen2_moe"] = table["qwen2moe"]


def repair_config(config: Any, header: Header, ref: str) -> list[str]:
    """Set on ``config`` what ``header`` says and transformers did not read; the changes, as 'name=value'."""
    changes: list[str] = []

    def put(name: str, value: Any) -> None:
        if getattr(config, name, None) != value:
            setattr(config, name, value)
            changes.append(f"{name}={_short(value)}")

    key_length = header.get("attention.key_length")
    if key_length and hasattr(config, "head_dim"):
        put("head_dim", int(key_length))
    theta = header.get("rope.freq_base")
    if theta is not None and hasattr(config, "rope_theta"):
        put("rope_theta", float(theta))
    _rotary_share(config, header, put)
    _rope_scaling(config, header, put, ref)
    _per_arch(config, header, put)
    return changes


def _rotary_share(config: Any, header: Header, put: Any) -> None:
    dims = header.get("rope.dimension_count")
    if not dims or not hasattr(config, "partial_rotary_factor"):
        return
    heads = config.num_attention_heads
    if header.arch in ("phi3", "nemotron"):  # llama.cpp writes int(share * hidden) // heads for these
        share = dims * heads / config.hidden_size
    else:
        share = dims / (getattr(config, "head_dim", None) or config.hidden_size // heads)
    put("partial_rotary_factor", float(share))


def _rope_scaling(config: Any, header: Header, put: Any, ref: str) -> None:
    kind = header.get("rope.scaling.type")
    factor = header.get("rope.scaling.factor")
    if "rope_freqs.weight" in header.extra:
        put("rope_scaling", _llama3_rope(config, header.extra["rope_freqs.weight"], ref))
    elif "rope_factors_long.weight" in header.extra:
        original = header.get("rope.scaling.original_context_length")
        if original:
            put("original_max_position_embeddings", int(original))
        put("rope_scaling", {"type": "longrope",
                             "long_factor": header.extra["rope_factors_long.weight"].tolist(),
                             "short_factor": header.extra["rope_factors_short.weight"].tolist()})
    elif kind == "linear" and factor and float(factor) != 1.0:
        put("rope_scaling", {"rope_type": "linear", "factor": float(factor)})
    elif kind == "yarn" and factor:
        scaling = {"rope_type": "yarn", "factor": float(factor),
                   "original_max_position_embeddings": int(header.get("rope.scaling.original_context_length"))}
        for ours, theirs in (("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
            if header.get(f"rope.scaling.{theirs}") is not None:
                scaling[ours] = float(header.get(f"rope.scaling.{theirs}"))
        put("rope_scaling", scaling)
    elif kind not in (None, "none", "linear", "yarn"):
        raise UnsupportedArchitecture(f"{ref}: rope scaling '{kind}' in a GGUF is not read by edgepack yet; build "
                                      "from the model's Hugging Face folder")


def _llama3_rope(config: Any, divisors: np.ndarray, ref: str) -> dict[str, Any]:
    """The llama3 rope parameters that give llama.cpp's per-frequency divisors: the smooth band between the
    frequencies left alone and those divided by the factor is linear in 1/wavelength, so two of its points fix
    it (one, or none, leave the band's edges free within the gaps; any choice there computes the same)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    base = 1.0 / config.rope_theta ** (np.arange(0, dim, 2) / dim)
    if divisors.size != base.size:
        raise UnsupportedArchitecture(f"{ref}: its rope_freqs tensor has {divisors.size} entries for {base.size} "
                                      "rotary frequencies; edgepack cannot read this rope scaling")
    big = float(divisors.max())
    inv_wavelen = base / (2 * math.pi)
    kept = inv_wavelen[np.isclose(divisors, 1.0, rtol=1e-5)]
    scaled = inv_wavelen[np.isclose(divisors, big, rtol=1e-5)]
    smooth = ~np.isclose(divisors, 1.0, rtol=1e-5) & ~np.isclose(divisors, big, rtol=1e-5)
    share = (1 / divisors[smooth] - 1 / big) / (1 - 1 / big)  # 0 at the scaled edge, 1 at the kept one
    u = inv_wavelen[smooth]
    lo_gap = scaled.max() if scaled.size else 0.0
    hi_gap = kept.min() if kept.size else 2 * inv_wavelen.max()
    if u.size >= 2:
        slope, offset = np.polyfit(u, share, 1)
        low, high = -offset / slope, (1 - offset) / slope
    elif u.size == 1:
        low = (lo_gap + u[0]) / 2
        high = low + (u[0] - low) / share[0]
    else:
        low, high = lo_gap + (hi_gap - lo_gap) / 3, lo_gap + 2 * (hi_gap - lo_gap) / 3
    original = 8192  # free: the band depends on original / (low or high factor) only
    scaling = {"rope_type": "llama3", "factor": big, "low_freq_factor": float(original * low),
               "high_freq_factor": float(original * high), "original_max_position_embeddings": original}
    if not np.allclose(_llama3_divisors(config, scaling, base), divisors, rtol=1e-4):
        raise UnsupportedArchitecture(f"{ref}: its rope_freqs tensor is not a llama3 rope scaling edgepack can "
                                      "read; build from the model's Hugging Face folder")
    return scaling


def _llama3_divisors(config: Any, scaling: dict[str, Any], base: np.ndarray) -> np.ndarray:
    """The divisors of the base frequencies that transformers' own llama3 rope computes from ``scaling``."""
    import copy

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    trial = copy.copy(config)
    trial.rope_scaling = scaling
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](trial, "cpu")
    return base / inv_freq.double().numpy()


def _per_arch(config: Any, header: Header, put: Any) -> None:
    arch, names = header.arch, header.tensors
    if arch == "llama":  # Llama with biases: transformers reads the config as bias-free and drops them
        if "blk.0.attn_q.bias" in names:
            put("attention_bias", True)
        if "blk.0.ffn_up.bias" in names:
            put("mlp_bias", True)
    if arch in ("gemma2", "gemma3"):
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if header.get(key) is not None:
                put(key, float(header.get(key)))
        # llama.cpp's attention scale: by the head size, or by hidden / heads for the 27B models (46 / 62 layers)
        big = header.get("block_count") == {"gemma2": 46, "gemma3": 62}[arch]
        width = config.hidden_size // config.num_attention_heads if big else header.get("attention.key_length")
        if width:
            put("query_pre_attn_scalar", int(width))
        if arch == "gemma3" and header.get("rope.freq_base_swa") is not None:
            put("rope_local_base_freq", float(header.get("rope.freq_base_swa")))
    if arch == "phi3" and header.get("attention.sliding_window"):
        put("sliding_window", int(header.get("attention.sliding_window")))
    if arch in ("qwen2moe", "qwen3moe") and header.get("expert_feed_forward_length"):
        put("moe_intermediate_size", int(header.get("expert_feed_forward_length")))
    if arch == "qwen2moe" and header.get("expert_shared_feed_forward_length"):
        put("shared_expert_intermediate_size", int(header.get("expert_shared_feed_forward_length")))
    if arch == "qwen3moe":
        # llama.cpp's Qwen 3 MoE always renormalizes the chosen experts' weights (as every released one is set up)
        put("norm_topk_prob", bool(header.get("expert_weights_norm", True)))
    if arch == "gpt2" and header.get("context_length"):
        put("n_positions", int(header.get("context_length")))
    if arch == "falcon":
        kv = int(header.get("attention.head_count_kv", 1))
        new = "blk.0.attn_norm_2.weight" in names
        put("new_decoder_architecture", new)
        put("num_kv_heads", kv if new else 1)
        put("multi_query", kv == 1)


def repair_weights(model: Any, header: Header) -> bool:
    """Undo llama.cpp's query-key-value layout of a Falcon with several key-value heads (all queries, then all
    keys, then all values), which transformers keeps, into Falcon's own (each key-value head's queries, key and
    value together). True when something was changed."""
    import torch

    config = model.config
    if header.arch != "falcon" or not config.new_decoder_architecture:
        return False
    kv, heads = config.num_kv_heads, config.num_attention_heads
    head_dim = config.hidden_size // heads
    with torch.no_grad():
        for layer in model.transformer.h:
            for p in layer.self_attention.query_key_value.parameters():
                rest = p.shape[1:]
                q, k, v = torch.split(p.data, [heads * head_dim, kv * head_dim, kv * head_dim])
                grouped = torch.cat([q.reshape(kv, heads // kv, head_dim, *rest), k.reshape(kv, 1, head_dim, *rest),
                                     v.reshape(kv, 1, head_dim, *rest)], dim=1)
                p.data.copy_(grouped.reshape(p.shape))
    return True


def split_rule_known(header: Header) -> bool:
    """Whether transformers' converter plus ``repair_tokenizer`` give this GGUF's byte-level BPE its own split
    rule (llama.cpp has some 40 others, by ``tokenizer.ggml.pre`` name, that edgepack does not carry)."""
    pre = header.keys.get("tokenizer.ggml.pre")
    if header.keys.get("tokenizer.ggml.model") != "gpt2" or not pre:
        return True
    return str(pre) in _SPLITS or str(pre) in _GPT2_RULES


def _split_to_set(header: Header, model_type: str) -> str | None:
    """The split rule ``repair_tokenizer`` puts in place of the converter's, or None where that one is right."""
    if header.keys.get("tokenizer.ggml.model") != "gpt2":
        return None
    pattern = _SPLITS.get(str(header.keys.get("tokenizer.ggml.pre")))
    return None if pattern is _QWEN2_SPLIT and model_type in _QWEN2_CONVERTED else pattern


def repair_tokenizer(tokenizer: Any, header: Header, model_type: str) -> list[str]:
    """What the GGUF says of its tokenizer and transformers' converter does not do: a byte-level BPE's split rule
    (``tokenizer.ggml.pre``: it applies GPT-2's to any Llama GGUF, Llama 3's included), and no BOS token where
    ``tokenizer.ggml.add_bos_token`` is false (its Llama converter adds one regardless). Notes of the changes."""
    notes = _special_tokens(tokenizer, header)
    if header.keys.get("tokenizer.ggml.add_bos_token") is False and getattr(tokenizer, "add_bos_token", False):
        tokenizer.add_bos_token = False  # LlamaTokenizerFast rebuilds its post-processor on this
        notes.append("add_bos_token=False")
    pattern = _split_to_set(header, model_type)
    if pattern is not None:
        from tokenizers import Regex, pre_tokenizers

        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)])
        notes.append(f"the '{header.keys['tokenizer.ggml.pre']}' split rule for its tokenizer")
    return notes


def _special_tokens(tokenizer: Any, header: Header) -> list[str]:
    """The GGUF's own BOS / EOS / UNK / PAD ids: transformers' Gemma and Llama converters take their classes'
    default token names, which another vocabulary may not hold (they are then added past the model's embedding)."""
    notes = []
    vocab = {i: t for t, i in tokenizer.get_vocab().items()}
    for kind, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        wanted = header.keys.get(f"tokenizer.ggml.{key}_token_id")
        if wanted is None or int(wanted) not in vocab or getattr(tokenizer, f"{kind}_token_id") == int(wanted):
            continue
        setattr(tokenizer, f"{kind}_token", vocab[int(wanted)])
        notes.append(f"{kind}_token={vocab[int(wanted)]}")
    if notes and hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()  # its BOS / EOS template names the tokens
    return notes


def report(ref: str, changes: list[str]) -> None:
    if changes:
        print(f"edgepack: {ref}: read from the GGUF what transformers {_version()} leaves out: {', '.join(changes)}",
              file=sys.stderr)


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return f"[{len(value)} values]"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _version() -> str:
    import transformers

    return transformers.__version__
