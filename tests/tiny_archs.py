"""Tiny random causal LMs of many architectures (hidden 64, 2 layers, the tests' 512-token BPE tokenizer
from tiny.py), for the architecture tests and the generality sweep (benchmarks/generality/sweep.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

VOCAB = 512
_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **_IDS}


def _cfg(cls_name: str, **overrides: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, cls_name)(**{**_COMMON, **overrides})

    return make


def _plain(cls_name: str, **kwargs: Any) -> Callable[[], Any]:
    def make() -> Any:
        import transformers

        return getattr(transformers, cls_name)(**{**_IDS, "vocab_size": VOCAB, **kwargs})

    return make


ARCHS: dict[str, Callable[[], Any]] = {
    "llama": _cfg("LlamaConfig", tie_word_embeddings=True),
    "llama-bias": _cfg("LlamaConfig", attention_bias=True, mlp_bias=True),
    "llama-untied": _cfg("LlamaConfig", tie_word_embeddings=False),
    "llama-headdim": _cfg("LlamaConfig", head_dim=32),
    "llama-rope3": _cfg("LlamaConfig", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}),
    "llama-padvocab": _cfg("LlamaConfig", vocab_size=576),  # more embedding rows than tokens, as Qwen ships
    "llama-dynrope": _cfg("LlamaConfig", rope_scaling={"rope_type": "dynamic", "factor": 2.0,
                                                       "original_max_position_embeddings": 64}),
    "llama-notemplate": _cfg("LlamaConfig"),  # its tokenizer has no chat template (save() drops it)
    "mistral": _cfg("MistralConfig"),
    "mistral-sw32": _cfg("MistralConfig", sliding_window=32),
    "mistral-nosw": _cfg("MistralConfig", sliding_window=None),
    "qwen2": _cfg("Qwen2Config"),
    "qwen3": _cfg("Qwen3Config", head_dim=16),
    "phi3": _cfg("Phi3Config"),
    "gemma": _cfg("GemmaConfig", head_dim=16),
    "gemma2": _cfg("Gemma2Config", head_dim=16, sliding_window=32),
    "gpt2": _plain("GPT2Config", n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gpt_neox": _plain("GPTNeoXConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25),
    # 64-wide heads, 16 of them rotated: the fused graph's GPT-NeoX (the one above falls back to optimum's)
    "gpt_neox-wide": _plain("GPTNeoXConfig", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=256, rotary_pct=0.25),
    "olmo": _cfg("OlmoConfig"),
    "stablelm": _cfg("StableLmConfig"),
    "granite": _cfg("GraniteConfig", embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                    attention_multiplier=0.1),
    "phi": _plain("PhiConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, partial_rotary_factor=0.5),
    # 64-wide heads, 32 of them rotated: what the fused graph takes (the one above falls back to optimum's)
    "phi-wide": _plain("PhiConfig", hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, partial_rotary_factor=0.5),
    "opt": _plain("OPTConfig", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=256, word_embed_proj_dim=64),
    "opt-128": _plain("OPTConfig", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=128, word_embed_proj_dim=64),  # fewer positions than a 256-token window
    "falcon": _plain("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     new_decoder_architecture=True, num_kv_heads=2, max_position_embeddings=256),
    "bloom": _plain("BloomConfig", hidden_size=64, n_layer=2, n_head=4),
    # Falcon-RW (falcon-rw-1b's layout): ALiBi instead of the rotary, head by head q/k/v, one block after the other
    "falcon-rw": _plain("FalconConfig", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=True,
                        multi_query=False, parallel_attn=False, bias=True, max_position_embeddings=256),
    "gptj": _plain("GPTJConfig", n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    # 64-wide heads, 16 of them rotated: the fused graph's GPT-J (the one above falls back to optimum's)
    "gptj-wide": _plain("GPTJConfig", n_embd=256, n_layer=2, n_head=4, n_positions=256, rotary_dim=16),
    "gemma3_text": _cfg("Gemma3TextConfig", head_dim=16, sliding_window=32),
    "cohere": _cfg("CohereConfig"),
    "olmo2": _cfg("Olmo2Config"),
    "smollm3": _cfg("SmolLM3Config"),
    # Llama-layout types optimum cannot export, which the fused graph builds (stop 23)
    "ministral": _cfg("MinistralConfig", head_dim=16, sliding_window=32,
                      layer_types=["sliding_attention", "full_attention"]),
    "olmo3": _cfg("Olmo3Config", sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
    "seed_oss": _cfg("SeedOssConfig", attention_bias=True),
    "starcoder2": _cfg("Starcoder2Config", sliding_window=32),
    "vaultgemma": _cfg("VaultGemmaConfig", head_dim=16, sliding_window=32,
                       layer_types=["sliding_attention", "full_attention"]),
    "ernie4_5": _cfg("Ernie4_5Config", use_bias=True),
    "exaone4": _cfg("Exaone4Config", sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
    "glm": _cfg("GlmConfig", head_dim=32),  # 16 of each 32-wide head rotated
    "glm4": _cfg("Glm4Config", head_dim=32),
    "cohere2": _cfg("Cohere2Config", sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
    "qwen3_moe": _cfg("Qwen3MoeConfig", head_dim=16, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32),
    "mixtral": _cfg("MixtralConfig", num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _cfg("Qwen2MoeConfig", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "olmoe": _cfg("OlmoeConfig", num_experts=4, num_experts_per_tok=2),
    "flex_olmo": _cfg("FlexOlmoConfig", num_experts=4, num_experts_per_tok=2),
    "granitemoe": _cfg("GraniteMoeConfig", num_local_experts=4, num_experts_per_tok=2),
    "granitemoeshared": _cfg("GraniteMoeSharedConfig", num_local_experts=4, num_experts_per_tok=2,
                             shared_intermediate_size=64),
    # more families (stop 25): common small models optimum exports, and newer Llama-like ones it does not
    "gpt_neo": _plain("GPTNeoConfig", hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=256,
                      attention_types=[[["global", "local"], 1]], window_size=32, intermediate_size=128),
    "gpt_bigcode": _plain("GPTBigCodeConfig", n_embd=64, n_layer=2, n_head=4, n_positions=256, multi_query=True),
    "codegen": _plain("CodeGenConfig", n_embd=64, n_layer=2, n_head=4, n_positions=256, n_ctx=256, rotary_dim=8),
    # 64-wide heads, 16 of them rotated: the fused graph's CodeGen (the one above falls back to optimum's)
    "codegen-wide": _plain("CodeGenConfig", n_embd=256, n_layer=2, n_head=4, n_positions=256, n_ctx=256,
                           rotary_dim=16),
    "mpt": _plain("MptConfig", d_model=64, n_heads=4, n_layers=2, max_seq_len=256, expansion_ratio=2),
    "xglm": _plain("XGLMConfig", d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                   max_position_embeddings=256),
    "helium": _cfg("HeliumConfig", head_dim=16),
    "nemotron": _cfg("NemotronConfig", head_dim=32, partial_rotary_factor=0.5),  # 16 of each head rotated
    "arcee": _cfg("ArceeConfig"),
    "apertus": _cfg("ApertusConfig"),
    "hunyuan_v1_dense": _cfg("HunYuanDenseV1Config", head_dim=16),
    "bitnet": _cfg("BitNetConfig"),  # its unquantized form (plain nn.Linear)
    "lfm2": _cfg("Lfm2Config", layer_types=["conv", "full_attention"], norm_eps=1e-5),
    "phimoe": _cfg("PhimoeConfig", num_local_experts=4, num_experts_per_tok=2),
    # state-space layers only: a convolution and a selective scan with their states, no attention, no MLP
    "mamba": _plain("MambaConfig", hidden_size=64, state_size=8, num_hidden_layers=2, intermediate_size=128,
                    conv_kernel=4),
    "falcon_mamba": _plain("FalconMambaConfig", hidden_size=64, state_size=8, num_hidden_layers=2,
                           intermediate_size=128, conv_kernel=4),
    "mamba2": _plain("Mamba2Config", hidden_size=64, state_size=8, num_hidden_layers=2, num_heads=8, head_dim=16,
                     n_groups=2, conv_kernel=4, expand=2),  # untied: transformers saves no tied Mamba 2
    # Granite 4's hybrids (granite-4.0-h-*): Mamba 2 layers around an attention layer without rotary, a shared MLP
    # alone (the dense 350M / 1B) or beside 4 experts (micro, tiny)
    "granitemoehybrid": _cfg("GraniteMoeHybridConfig", num_hidden_layers=3, layer_types=["mamba", "attention", "mamba"],
                             num_local_experts=0, shared_intermediate_size=128, mamba_n_heads=8, mamba_d_head=16,
                             mamba_d_state=8, mamba_expand=2, mamba_d_conv=4),
    "granitemoehybrid-moe": _cfg("GraniteMoeHybridConfig", num_hidden_layers=3,
                                 layer_types=["mamba", "attention", "mamba"], num_local_experts=4,
                                 num_experts_per_tok=2, intermediate_size=32, shared_intermediate_size=64,
                                 mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=8, mamba_expand=2,
                                 mamba_d_conv=4, embedding_multiplier=2.0, residual_multiplier=0.5,
                                 logits_scaling=2.0),
    # Bamba: Mamba 2 layers and attention (half of each 32-wide head rotated), each before a SwiGLU MLP
    "bamba": _cfg("BambaConfig", num_hidden_layers=3, attn_layer_indices=[1], num_attention_heads=2,
                  num_key_value_heads=1, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8, mamba_expand=2),
    # Falcon-H1: a Mamba 2 mixer and attention side by side in every layer, μP multipliers away from 1
    "falcon_h1": _cfg("FalconH1Config", head_dim=16, mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2,
                      mamba_d_state=8, mamba_d_ssm=128, mamba_rms_norm=True, embedding_multiplier=1.5,
                      lm_head_multiplier=0.7, key_multiplier=0.8, ssm_multipliers=[0.5, 1.5, 0.8, 1.2, 0.9],
                      mlp_multipliers=[0.7, 1.3], tie_word_embeddings=False),
    "gpt_oss": _cfg("GptOssConfig", head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                  "original_max_position_embeddings": 64}),
    # Gemma 3's multimodal checkpoint (gemma-3-4b and up): a SigLIP vision tower beside Gemma 3's language model
    "gemma3": _plain("Gemma3Config", text_config={**_COMMON, "head_dim": 16, "sliding_window": 32},
                     vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 28, "patch_size": 14},
                     mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 2,
                     eoi_token_index=VOCAB - 3),
}


def make_model(arch: str, seed: int = 0) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(ARCHS[arch]()).eval()
    # As tests/tiny.py: random init gives near-uniform logits; scale so greedy choices are decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def save(arch: str, folder: Path, seed: int = 0) -> Path:
    from tiny import make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    make_model(arch, seed).save_pretrained(folder)
    tokenizer = make_tokenizer()
    if arch == "llama-notemplate":
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    return folder


def save_finetune(base: Path, folder: Path, seed: int = 1, scale: float = 0.05, dense: bool = False) -> Path:
    """A stand-in fine-tune of any saved tiny model: every 2-D weight inside the decoder moved by a
    low-rank change (``tests/tiny.py`` does the same for Llama's linear layers only); ``dense`` also moves
    every 1-D parameter (norm weights and biases, linear biases)."""
    import torch
    from tiny import make_tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base).eval()
    gen = torch.Generator().manual_seed(seed)
    head = model.get_output_embeddings().weight
    embed = model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if dense and p.dim() == 1:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))
            if p.dim() != 2 or p is head or p is embed or "embed" in name or "wpe" in name:
                continue
            n, m = p.shape
            low = torch.randn(n, 4, generator=gen) @ torch.randn(4, m, generator=gen)
            p.add_(scale * (low + 0.1 * torch.randn(n, m, generator=gen)))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder
