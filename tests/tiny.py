"""A tiny random Llama and a real (trained in seconds) BPE tokenizer, built in code for unit tests."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB = 512


def make_tokenizer():
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)


def make_model(seed: int = 0, layers: int = 2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    # Random init at std 0.02 gives near-uniform logits; scale up so greedy choices are decisive.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model


def factorized(linear, rank: int):
    """A ResSVD-style pair Linear(in, r) → Linear(r, out) from the truncated SVD of ``linear``."""
    import torch

    u, s, vh = torch.linalg.svd(linear.weight.detach(), full_matrices=False)
    first = torch.nn.Linear(linear.in_features, rank, bias=False)
    second = torch.nn.Linear(rank, linear.out_features, bias=False)
    with torch.no_grad():
        first.weight.copy_(vh[:rank] * s[:rank, None])
        second.weight.copy_(u[:, :rank])
    return torch.nn.Sequential(first, second)


def save_tiny(folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    make_model(seed).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def save_finetune(base: Path, folder: Path, seed: int = 1, rank: int = 4, scale: float = 0.05,
                  norms: bool = False) -> Path:
    """A stand-in fine-tune of the tiny model: every decoder linear moved by a low-rank change plus
    a little full-rank noise (a real fine-tune's delta is nearly, not exactly, low-rank); ``norms``
    also moves every RMSNorm weight."""
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.modules():
            if isinstance(module, torch.nn.Linear):
                n_out, n_in = module.weight.shape
                low = torch.randn(n_out, rank, generator=gen) @ torch.randn(rank, n_in, generator=gen)
                noise = torch.randn(n_out, n_in, generator=gen) * 0.1
                module.weight.add_(scale * (low + noise))
        if norms:
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(0.2 * torch.randn(param.shape, generator=gen))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def merged_logits(folder, prompt, delta=None):
    """Logits of the source model at ``folder`` in PyTorch for ``prompt``, with each delta layer's U·Vᵀ added through
    a hook and its dense changes added to the parameters (what the runtime must reproduce)."""
    import torch
    from edgepack.toolchain import sources

    model = sources.load(str(folder)).model  # also rebuilds a ResSVD-compressed folder's factor pairs
    modules = dict(model.named_modules())
    for name, layer in (delta.layers.items() if delta else []):
        weight = torch.from_numpy(layer.matrix())
        modules[name].register_forward_hook(lambda m, i, out, w=weight: out + torch.nn.functional.linear(i[0], w))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, change in (delta.dense.items() if delta else []):
            owner = name.rsplit(".", 1)[0]
            if name not in params:  # the bias of a factorized pair lives on its r→out half
                name = f"{owner}.{len(modules[owner]) - 1}.bias"
            params[name].add_(torch.from_numpy(change))
        return model(torch.tensor([prompt])).logits[0].numpy()
