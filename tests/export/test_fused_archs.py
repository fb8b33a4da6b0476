"""The fused graph on the Llama-family variants it describes besides Llama itself (Qwen2's q/k/v biases, Qwen3's
per-head q/k norms, a head width other than hidden / heads, untied heads, sliding windows, Gemma 1 / 2 / 3: offset
norms, scaled embedding, GELU, sandwich norms, softcaps, a local rotary; Phi-3's packed projections, partial rotary
and longrope; SmolLM3's rotary-free layers; Granite's multipliers; StableLM's and OLMo's LayerNorms; OLMo 2's
output-only norms; GPT-NeoX, GPT-2 and OPT through views.py), and the end-to-end path: build with delta slots, a
fine-tune's delta applied in the runtime."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import tiny
import torch
from edgepack.export import parity
from edgepack.export.fused.builder import save
from edgepack.export.fused.llama import build_llama, check_supported
from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.runtime.fused_decoder import FusedDecoder

CONTEXT = 64
PROMPTS = [[5, 17, 33, 101, 7, 250, 3, 99], list(range(40, 70))]
VARIANTS = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 32}),  # 4 heads x 32 != hidden 64
    "qwen2-untied": ("qwen2", {"tie_word_embeddings": False}),
    "llama-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral-window": ("mistral", {"sliding_window": 5}),  # slides: the prompts are longer
    "qwen2-window": ("qwen2", {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1}),
    "phi3": ("phi3", {"hidden_size": 128, "partial_rotary_factor": 0.5, "sliding_window": 9}),  # 16 of 32 rotate
    "phi3-longrope": ("phi3", {"hidden_size": 128, "original_max_position_embeddings": CONTEXT,
                               "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 10 for i in range(16)],
                                                "long_factor": [4.0] * 16}}),
    "smollm3": ("smollm3", {"no_rope_layers": [1, 0]}),  # layer 1 without rotary
    "granite": ("granite", {"embedding_multiplier": 3.0, "residual_multiplier": 0.5, "attention_multiplier": 0.3,
                            "logits_scaling": 2.0}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 24,
                          "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0}),
    "gemma3": ("gemma3_text", {"head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 24,
                               "layer_types": ["sliding_attention", "full_attention"]}),
    # LayerNorm with weights and biases; a quarter of each 64-wide head rotates; q/k/v biases
    "stablelm": ("stablelm", {"hidden_size": 256, "partial_rotary_factor": 0.25, "use_qkv_bias": True}),
    "olmo": ("olmo", {}),  # LayerNorm without parameters
    "olmo2": ("olmo2", {}),  # norms on block outputs only; q/k normed over their whole width
    # attention and a plain MLP side by side, biases, a head with a bias, half of each 64-wide head rotates
    "phi": ("phi", {"hidden_size": 256, "partial_rotary_factor": 0.5, "tie_word_embeddings": False}),
    # q/k/v packed head by head (reordered for GroupQueryAttention), a norm each for attention and MLP side by
    # side, a quarter of each 64-wide head rotates, exact GELU, an untied head
    "gpt_neox": ("gpt_neox", {"hidden_size": 256, "rotary_pct": 0.25, "tie_word_embeddings": False}),
    "gpt_neox-sequential": ("gpt_neox", {"hidden_size": 256, "rotary_pct": 0.25, "use_parallel_residual": False}),
    # Conv1D layers, learned positions, no rotary, tanh GELU, biases everywhere
    "gpt2": ("gpt2", {}),
    # learned positions from row 2 of the table, ReLU MLP, q/k/v biases
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    # q/k/v packed by key-value group; attention and MLP side by side on two norms (newer layout), on one
    # (multi-query), or one after the other; head by head without multi-query
    # Llama-layout types optimum cannot export (stop 23): Ministral's per-layer windows, OLMo 3 (OLMo 2 + a rotary
    # per attention kind), Seed-OSS's q/k/v and o biases, StarCoder2's LayerNorms and plain c_fc / c_proj MLP,
    # VaultGemma (Gemma 2 without post norms), ERNIE 4.5's interleaved rotary, EXAONE 4 (post norms, per-head q/k
    # norms, rotary on sliding layers only)
    "ministral": ("ministral", {"head_dim": 16, "sliding_window": 5,
                                "layer_types": ["sliding_attention", "full_attention"]}),
    "olmo3": ("olmo3", {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}),
    "seed_oss": ("seed_oss", {"attention_bias": True, "attention_out_bias": True}),
    "starcoder2": ("starcoder2", {"sliding_window": 7, "use_bias": True}),
    "vaultgemma": ("vaultgemma", {"head_dim": 16, "sliding_window": 6, "query_pre_attn_scalar": 24,
                                  "attn_logit_softcapping": 3.0, "final_logit_softcapping": 5.0,
                                  "layer_types": ["sliding_attention", "full_attention"]}),
    "ernie4_5": ("ernie4_5", {"use_bias": True}),
    "exaone4": ("exaone4", {"sliding_window": 5, "layer_types": ["sliding_attention", "full_attention"]}),
    # packed gate/up, q/k/v biases, half of each 32-wide head rotated in interleaved pairs; GLM 4 adds output norms
    "glm": ("glm", {"head_dim": 32, "attention_bias": True}),
    "glm4": ("glm4", {"head_dim": 32, "attention_bias": True}),
    # attention and SwiGLU side by side on one bias-free LayerNorm, interleaved rotary, scaled logits
    "cohere": ("cohere", {"logit_scale": 0.5}),
    "cohere2": ("cohere2", {"logit_scale": 0.5, "sliding_window": 5,
                            "layer_types": ["sliding_attention", "full_attention"]}),  # full layers: no rotary
    # attention and MLP side by side on one LayerNorm, 16 of each 64-wide head rotated in interleaved pairs, a head
    # with a bias
    "gptj": ("gptj", {"hidden_size": 256, "rotary_dim": 16, "tie_word_embeddings": False}),
    # stop 25: Helium's interleaved rotary; Arcee's and Nemotron's plain squared-ReLU MLP (Nemotron: LayerNorms by
    # 1 + w with biases, half of each 32-wide head rotated, q/k/v/o and MLP biases); Apertus's xIELU and per-head
    # q/k norms under other norm names; HunYuan's q/k norms on the rotated heads (the graph rotates them itself)
    "helium": ("helium", {"head_dim": 16, "attention_bias": True}),
    "arcee": ("arcee", {}),
    "nemotron": ("nemotron", {"head_dim": 32, "partial_rotary_factor": 0.5, "attention_bias": True,
                              "mlp_bias": True}),
    "apertus": ("apertus", {}),
    "hunyuan_v1_dense": ("hunyuan_v1_dense", {"head_dim": 16}),
    "hunyuan-bias": ("hunyuan_v1_dense", {"head_dim": 16, "attention_bias": True}),
    "hunyuan-alpha": ("hunyuan_v1_dense", {"head_dim": 16, "rope_scaling": {"type": "dynamic", "alpha": 1000.0,
                                                                          "factor": 1.0}}),  # as HunYuan ships
    # learned positions, LayerNorms, biases: GPT-BigCode's multi-query attention (one k/v head) or q/k/v packed head
    # by head; GPT-Neo's unscaled attention, its local layers as sliding windows
    "bitnet": ("bitnet", {}),  # norms before o and before down, squared-ReLU gate
    # LFM2: short-convolution layers with their state beside attention layers with per-head q/k norms
    "lfm2": ("lfm2", {"layer_types": ["conv", "full_attention"]}),
    "lfm2-bias": ("lfm2", {"num_hidden_layers": 3, "layer_types": ["conv", "full_attention", "conv"],
                           "conv_bias": True, "conv_L_cache": 4}),
    "gpt_bigcode": ("gpt_bigcode", {"multi_query": True}),
    "gpt_bigcode-mha": ("gpt_bigcode", {"multi_query": False}),
    "gpt_neo": ("gpt_neo", {"num_layers": 2, "attention_types": [[["global", "local"], 1]], "window_size": 5}),
    # GPT-J's layout with q/k/v in CodeGen's 4 model-parallel blocks of q, v, k; 8 heads: 2 a block
    "codegen": ("codegen", {"hidden_size": 512, "num_attention_heads": 8, "rotary_dim": 32, "n_ctx": 256,
                            "tie_word_embeddings": False}),
    # stop 26: XGLM's sinusoidal positions from row 2 of its table, a scaled embedding; ALiBi (GroupQueryAttention's
    # attention_bias): MPT's bias-free LayerNorms and exact GELU, BLOOM's normed embedding and head-by-head q/k/v;
    # 6 heads, not a power of two, where the two choose their slopes differently
    "xglm": ("xglm", {"ffn_dim": 128}),
    "mpt": ("mpt", {"expansion_ratio": 2}),
    "mpt-6heads": ("mpt", {"hidden_size": 96, "num_attention_heads": 6, "expansion_ratio": 2,
                           "attn_config": {"softmax_scale": 0.2}}),
    "bloom": ("bloom", {}),
    "bloom-6heads": ("bloom", {"hidden_size": 96, "num_attention_heads": 6}),
    # GPT-OSS: attention sinks, q/k/v/o biases, sliding and full layers, a biased router, 3-D experts with biases and
    # a clamped (up + 1) · gate · sigmoid(1.702 · gate); YaRN's rotary
    "gpt_oss": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 5,
                            "layer_types": ["sliding_attention", "full_attention"]}),
    "gpt_oss-yarn": ("gpt_oss", {"head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                                 "layer_types": ["full_attention", "full_attention"],
                                 "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                                                  "beta_slow": 1.0, "original_max_position_embeddings": 32}}),
    # Mamba: state-space layers only (a convolution and a selective scan with their states), no attention, no MLP
    "mamba": ("mamba", {"state_size": 8, "conv_kernel": 4}),
    "mamba-bias": ("mamba", {"state_size": 16, "conv_kernel": 3, "use_bias": True, "time_step_rank": 5}),
    "falcon_mamba": ("falcon_mamba", {"state_size": 8, "conv_kernel": 4}),  # B, C and dt RMS-normed
    "mamba2": ("mamba2", {"state_size": 8, "num_heads": 8, "head_dim": 16, "n_groups": 2, "expand": 2,
                          "conv_kernel": 4}),
    "mamba2-limit": ("mamba2", {"state_size": 8, "num_heads": 8, "head_dim": 16, "n_groups": 1, "expand": 2,
                                "conv_kernel": 3, "time_step_limit": (0.05, 0.5), "use_bias": True,
                                "tie_word_embeddings": False}),
    # Granite 4's hybrids: Mamba 2 layers (per-head A and D, B and C shared by groups of heads, a gated RMSNorm) around
    # an attention layer without rotary; a shared MLP alone, or beside experts; Granite's multipliers
    "granitemoehybrid": ("granitemoehybrid", {"num_hidden_layers": 3, "layer_types": ["mamba", "attention", "mamba"],
                                              "num_local_experts": 0, "shared_intermediate_size": 128,
                                              "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8,
                                              "mamba_expand": 2, "mamba_d_conv": 4, "residual_multiplier": 0.5}),
    "granitemoehybrid-moe": ("granitemoehybrid", {"num_hidden_layers": 3,
                                                  "layer_types": ["mamba", "attention", "mamba"],
                                                  "num_local_experts": 4, "num_experts_per_tok": 2,
                                                  "intermediate_size": 32, "shared_intermediate_size": 64,
                                                  "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 2,
                                                  "mamba_d_state": 8, "mamba_expand": 2, "mamba_d_conv": 4,
                                                  "embedding_multiplier": 2.0, "logits_scaling": 2.0,
                                                  "attention_multiplier": 0.2}),
    # Bamba: Mamba 2 layers and an attention layer rotating half of each 32-wide head, each before a SwiGLU MLP
    "bamba": ("bamba", {"num_hidden_layers": 3, "attn_layer_indices": [1], "head_dim": 32, "mamba_n_heads": 8,
                        "mamba_d_head": 16, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_expand": 2,
                        "num_attention_heads": 2, "num_key_value_heads": 1}),
    # Falcon-H1: a Mamba 2 mixer and attention side by side in every layer, μP multipliers everywhere (set away from 1),
    # the gated norm over 2 groups with the gate after it, or no norm at all
    "falcon_h1": ("falcon_h1", {"head_dim": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 2,
                                "mamba_d_state": 8, "mamba_d_ssm": 128, "mamba_rms_norm": True,
                                "embedding_multiplier": 1.5, "lm_head_multiplier": 0.7, "key_multiplier": 0.8,
                                "attention_in_multiplier": 1.2, "attention_out_multiplier": 0.9,
                                "ssm_in_multiplier": 1.1, "ssm_out_multiplier": 0.6,
                                "ssm_multipliers": [0.5, 1.5, 0.8, 1.2, 0.9], "mlp_multipliers": [0.7, 1.3],
                                "tie_word_embeddings": False}),
    "falcon_h1-nonorm": ("falcon_h1", {"head_dim": 16, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 8,
                                       "mamba_d_ssm": 128, "mamba_rms_norm": False, "mamba_norm_before_gate": False,
                                       "tie_word_embeddings": False}),
    "falcon-new": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2, "hidden_size": 128}),
    "falcon-mq": ("falcon", {"multi_query": True, "hidden_size": 128}),
    # Falcon-RW's ALiBi: BLOOM's slopes, slope · j rounded to bfloat16, added before the scores' scale; 12 heads, so
    # that some slopes are not powers of two and the rounding shows
    "falcon-alibi": ("falcon", {"alibi": True, "multi_query": False, "parallel_attn": False, "num_attention_heads": 12,
                                "num_kv_heads": 12, "hidden_size": 192, "bias": True}),
    "falcon-seq": ("falcon", {"multi_query": False, "parallel_attn": False, "num_kv_heads": 4, "hidden_size": 128,
                              "bias": True}),
}


def make_model(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = dict(vocab_size=tiny.VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                    eos_token_id=2, pad_token_id=0, tie_word_embeddings=True) | overrides
    config = AutoConfig.for_model(model_type, **settings)
    # as sources.load: transformers' SDPA skips Gemma 2's attention softcap, eager computes it
    eager = {"attn_implementation": "eager"} if getattr(config, "attn_logit_softcapping", None) else {}
    model = AutoModelForCausalLM.from_config(config, **eager).eval()
    with torch.no_grad():  # decisive logits (as tiny.make_model), and norms / biases away from their init
        for name, p in model.named_parameters():
            # GPT-OSS's expert biases are 2-D and start at zero; Mamba's A_log is a log of decay rates, not a matrix
            if p.dim() == 2 and not name.endswith(("_bias", "A_log")):
                p.mul_(4.0)
            else:
                p.add_(0.2 * torch.randn_like(p))
    return model


def assert_float_parity(model_type: str, overrides: dict, path) -> None:
    """The float32 fused graph of a tiny ``model_type`` (written to ``path``) computes what transformers does."""
    model = make_model(model_type, **overrides)
    save(build_llama(model, CONTEXT), path)
    report = parity.compare(model, path, PROMPTS, decode_steps=4, decoder_class=FusedDecoder)
    assert report.passed and report.max_abs_diff < 1e-4 and report.top1_agreement == 1.0


def save_finetuned(model_type: str, overrides: dict, tmp_path, moves) -> tuple:
    """A tiny ``model_type`` saved as ``tmp_path/base``, and as ``tmp_path/tuned`` with every parameter whose name
    ``moves`` accepts moved by 5 % of its mean magnitude (seeded); returns both folders."""
    make_model(model_type, **overrides).save_pretrained(tmp_path / "base")
    tiny.make_tokenizer().save_pretrained(tmp_path / "base")
    tuned = make_model(model_type, **overrides)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if moves(name):
                p.add_(0.05 * torch.randn(p.shape, generator=gen) * p.abs().mean())
    tuned.save_pretrained(tmp_path / "tuned")
    tiny.make_tokenizer().save_pretrained(tmp_path / "tuned")
    return tmp_path / "base", tmp_path / "tuned"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_float_graph_matches_pytorch(variant, tmp_path):
    assert_float_parity(*VARIANTS[variant], tmp_path / "f32.onnx")


def test_qwen3_norms_are_per_head_and_int4_graph_runs(tmp_path):
    import onnx

    model = make_model("qwen3", head_dim=32)
    save(build_llama(model, CONTEXT, int4=True), tmp_path / "int4.onnx")
    nodes = [n.name for n in onnx.load(str(tmp_path / "int4.onnx")).graph.node]
    assert sum(n.endswith((".q_norm", ".k_norm")) for n in nodes) == 2 * 2
    decoder = FusedDecoder(tmp_path / "int4.onnx")
    logits = decoder.forward(PROMPTS[1], decoder.new_cache(), all_logits=True)
    with torch.inference_mode():
        ref = model(torch.tensor([PROMPTS[1]])).logits[0].numpy()
    # int4 rounding of random weights moves logits, but they stay the model's: strongly correlated
    assert np.corrcoef(logits.ravel(), ref.ravel())[0, 1] > 0.9


def test_longrope_is_refused_past_its_short_factors_range():
    model_type, overrides = VARIANTS["phi3-longrope"]
    model = make_model(model_type, **overrides)
    with pytest.raises(UnsupportedArchitecture, match=f"--context {CONTEXT} or less"):
        build_llama(model, 2 * CONTEXT)


def _config(**fields):
    return SimpleNamespace(model_type="mistral", hidden_act="silu", **fields)


def test_qwen2_slides_only_its_upper_layers():
    model_type, overrides = VARIANTS["qwen2-window"]
    graph = build_llama(make_model(model_type, **overrides), CONTEXT).graph
    windows = [next(a.i for a in n.attribute if a.name == "local_window_size")
               for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert windows == [-1, 7]  # layer 0 below max_window_layers: full attention


def test_a_window_of_one_is_refused():
    with pytest.raises(UnsupportedArchitecture, match="sliding window of at least 2"):
        check_supported(_config(sliding_window=1))


def test_a_quantized_checkpoint_is_refused_by_its_method():
    # a packed BitNet (or GPTQ, AWQ) checkpoint's modules hold no float weights for the graph to read
    with pytest.raises(UnsupportedArchitecture, match=r"quantized \(bitnet\)"):
        check_supported(_config(quantization_config={"quant_method": "bitnet", "linear_class": "autobitlinear"}))


def test_a_mamba_without_silu_is_refused_by_name():
    # its convolution's activation and output gate are hidden_act; the graph computes SiLU
    with pytest.raises(UnsupportedArchitecture, match="Mamba layers use SiLU, this model uses gelu"):
        check_supported(SimpleNamespace(model_type="mamba", hidden_act="gelu"))


def test_other_attention_kinds_are_refused_by_name():
    with pytest.raises(UnsupportedArchitecture, match="chunked_attention"):
        check_supported(_config(layer_types=["full_attention", "chunked_attention"]))


@pytest.mark.parametrize("variant", ["qwen3", "qwen2", "gemma3", "phi3", "stablelm", "olmo2", "phi", "gpt_neox",
                                     "gpt2", "opt", "falcon-new", "cohere", "gptj",
                                     "starcoder2", "exaone4", "ernie4_5", "vaultgemma", "glm4", "nemotron",
                                     "apertus", "hunyuan-bias", "helium", "arcee", "gpt_bigcode-mha", "gpt_neo",
                                     "bitnet", "lfm2-bias", "codegen", "xglm", "mpt-6heads", "bloom-6heads",
                                     "gpt_oss", "mamba-bias", "granitemoehybrid", "falcon_mamba", "mamba2-limit",
                                     "bamba", "falcon_h1"])
def test_a_delta_package_matches_merged_weights(variant, tmp_path):
    """build --delta-slots, and a fine-tune that also moves norms (Qwen3's q/k norms) and biases (Qwen2's
    q/k/v biases): its delta applied at load equals PyTorch with the changes merged."""
    from edgepack.runtime import delta_file, load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.delta.make import DeltaConfig, make

    # the decoder blocks (GPT-2 and BLOOM call them h, MPT blocks), but not a fused MoE's expert weights, which have no
    # slots (GPT-OSS's expert biases have)
    blocks = ("layers.", ".h.", "blocks.")
    save_finetuned(*VARIANTS[variant], tmp_path, lambda name: any(part in name for part in blocks) and (
        ".experts." not in name or name.endswith("_bias")))

    build(BuildConfig(model=str(tmp_path / "base"), graph="auto", delta_slots=True, context=CONTEXT), tmp_path / "pkg")
    delta = make(str(tmp_path / "base"), str(tmp_path / "tuned"), DeltaConfig(method="truncsvd", rank=8))
    moved = {"qwen2": "q_proj.bias", "phi3": "input_layernorm.weight",
             "stablelm": "input_layernorm.bias", "phi": "fc1.bias", "gpt_neox": "query_key_value.bias",
             "gpt2": "c_attn.bias", "opt": "fc1.bias", "falcon-new": "ln_attn.weight",
             "cohere": "input_layernorm.weight", "gptj": "fc_in.bias", "starcoder2": "c_fc.bias",
             "exaone4": "post_feedforward_layernorm.weight", "ernie4_5": "o_proj.bias",
             "vaultgemma": "pre_feedforward_layernorm.weight",
             "glm4": "post_mlp_layernorm.weight", "nemotron": "up_proj.bias", "hunyuan-bias": "key_layernorm.weight",
             "helium": "k_proj.bias", "arcee": "post_attention_layernorm.weight", "gpt_bigcode-mha": "c_attn.bias",
             "gpt_neo": "out_proj.bias", "bitnet": "ffn_sub_norm.weight",
             "lfm2-bias": "conv.conv.weight", "codegen": "fc_in.bias", "xglm": "fc1.bias",
             "mpt-6heads": "norm_1.weight", "gpt_oss": "self_attn.sinks", "mamba-bias": "mixer.A_log",
             "granitemoehybrid": "mamba.dt_bias", "falcon_mamba": "mixer.D", "mamba2-limit": "mixer.dt_bias",
             "bamba": "mamba.norm.weight", "falcon_h1": "mamba.D",
             "bloom-6heads": "query_key_value.bias"}.get(variant, "q_norm.weight")
    assert any(name.endswith(moved) for name in delta.dense)
    if variant == "gpt_oss":
        assert {"model.layers.1.mlp.experts.down_proj_bias", "model.layers.1.mlp.router.weight"} <= set(delta.dense)
    delta_file.write(delta, tmp_path / "d.safetensors")
    model = load(tmp_path / "pkg", delta=tmp_path / "d.safetensors")
    got = model.decoder.forward(PROMPTS[0], model.decoder.new_cache(), all_logits=True)

    want = tiny.merged_logits(tmp_path / "base", PROMPTS[0], delta)
    np.testing.assert_allclose(got, want, atol=1e-3)
    model.apply_delta(None)  # and removing it gives the base back
    base = model.decoder.forward(PROMPTS[0], model.decoder.new_cache(), all_logits=True)
    assert np.abs(base - got).max() > 1e-2


def test_softcapped_attention_loads_eager_so_the_reference_computes_the_cap(tmp_path):
    from edgepack.toolchain import sources

    model_type, overrides = VARIANTS["gemma2"]
    make_model(model_type, **overrides).save_pretrained(tmp_path)
    tiny.make_tokenizer().save_pretrained(tmp_path)
    loaded = sources.load(str(tmp_path)).model
    assert loaded.config._attn_implementation == "eager"  # SDPA would skip the cap: parity against the wrong model
    save(build_llama(loaded, CONTEXT), tmp_path / "g.onnx")
    assert parity.compare(loaded, tmp_path / "g.onnx", PROMPTS, decoder_class=FusedDecoder).max_abs_diff < 1e-4


def test_layouts_the_fused_graph_lacks_fall_back_by_name():
    # checked on the config, so `build --graph auto` falls back to optimum's graph instead of failing later
    from transformers import CohereConfig, OlmoConfig, OPTConfig, StableLmConfig

    with pytest.raises(UnsupportedArchitecture, match="rotates 4"):  # 16-wide heads, a quarter rotates
        check_supported(StableLmConfig(hidden_size=64, num_attention_heads=4, partial_rotary_factor=0.25))
    with pytest.raises(UnsupportedArchitecture, match="parallel residual"):
        check_supported(StableLmConfig(hidden_size=256, num_attention_heads=4, use_parallel_residual=True))
    with pytest.raises(UnsupportedArchitecture, match="use_qk_norm"):
        check_supported(CohereConfig(hidden_size=64, num_attention_heads=4, use_qk_norm=True))
    with pytest.raises(UnsupportedArchitecture, match="OPT-350m"):
        check_supported(OPTConfig(do_layer_norm_before=False))
    with pytest.raises(UnsupportedArchitecture, match="embedding width"):
        check_supported(OPTConfig(hidden_size=1024, word_embed_proj_dim=512))
    with pytest.raises(UnsupportedArchitecture, match="clip_qkv"):
        check_supported(OlmoConfig(hidden_size=64, num_attention_heads=4, clip_qkv=8.0))


@pytest.mark.parametrize("arch", ["gpt_neox-wide", "gpt2", "falcon", "gptj-wide", "cohere", "gpt_bigcode", "apertus",
                                  "lfm2", "codegen-wide", "xglm", "mpt", "bloom", "mamba", "granitemoehybrid-moe"])
def test_factorized_views_take_deltas(arch, tmp_path):
    """A ResSVD-compressed GPT-NeoX (its packed q/k/v factor pair reordered for GroupQueryAttention, the delta's
    rows reordered the same way at load) and GPT-2 (factor pairs where Conv1D layers were) in the fused graph."""
    import tiny_archs
    from edgepack.runtime import load
    from edgepack.toolchain.build import BuildConfig, build
    from edgepack.toolchain.compression import compress
    from edgepack.toolchain.delta.make import DeltaConfig, make
    from edgepack.toolchain.ressvd import ResSVDConfig

    base = tiny_archs.save(arch, tmp_path / "base")
    delta = make(str(base), str(tiny_archs.save_finetune(base, tmp_path / "ft", dense=True)),
                 DeltaConfig(method="truncsvd", rank=3))
    compress(str(base), ResSVDConfig(method="svd", ratio=0.2, layers="all", tune_steps=0), tmp_path / "c")
    manifest = build(BuildConfig(model=str(tmp_path / "c"), delta_slots=True, context=CONTEXT), tmp_path / "pkg")
    assert manifest.plan["graph"] == "fused"
    model = load(tmp_path / "pkg", delta=delta)
    got = model.decoder.forward(PROMPTS[0], model.decoder.new_cache(), all_logits=True)
    np.testing.assert_allclose(got, tiny.merged_logits(tmp_path / "c", PROMPTS[0], delta), atol=1e-3)
    model.apply_delta(None)
    plain = model.decoder.forward(PROMPTS[0], model.decoder.new_cache(), all_logits=True)
    np.testing.assert_allclose(plain, tiny.merged_logits(tmp_path / "c", PROMPTS[0]), atol=1e-3)
    assert np.abs(plain - got).max() > 1e-2
