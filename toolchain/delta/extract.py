"""The raw fine-tune delta: ΔW = W_finetuned − W_base for every linear layer, plus whatever else changed.

Linear layers are found by module type (every ``nn.Linear`` except the output head), so any Hugging
Face causal LM works, not only Llama. Other parameters that changed (norms, biases, embeddings) are
kept densely as differences and counted in the size; parameters that did not change cost nothing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from edgepack.runtime.errors import UnsupportedArchitecture, UsageError
from edgepack.toolchain import conv1d


@dataclass
class RawDelta:
    linears: dict[str, torch.Tensor]  # module path → ΔW [n_out, n_in], float32
    dense: dict[str, torch.Tensor]  # parameter name → its change, float32
    base_fingerprint: str


def fingerprint(model: nn.Module) -> str:
    """A digest of a model's float32 weights (names, shapes and values), so a delta can name its base.

    Computed from the values, not the files, so the same weights read from a GGUF or from a
    Hugging Face folder give the same fingerprint.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        array = param.detach().float().contiguous().cpu().numpy()
        digest.update(f"{name}|{list(array.shape)}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer a delta factorizes: all ``nn.Linear`` modules but the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


def extract(base: nn.Module, finetuned: nn.Module) -> RawDelta:
    """ΔW of each linear layer and the change of every other parameter that moved. GPT-2-style Conv1D layers
    become ``nn.Linear`` in both models (in place: what follows, importance and tune, works on those), after
    the fingerprint is taken from the weights as the package holds them."""
    _check_same_architecture(base, finetuned)
    base_fingerprint = fingerprint(base)
    conv1d.to_linear(base)
    conv1d.to_linear(finetuned)
    base_params = dict(base.named_parameters())
    ft_params = dict(finetuned.named_parameters())
    linears = linear_layers(base)
    if not linears:
        raise UnsupportedArchitecture(f"{type(base).__name__} has no linear layers outside its output head, which a "
                                      "delta factorizes: deltas are not supported for it")
    weights = {f"{name}.weight": name for name in linears}
    out: dict[str, torch.Tensor] = {}
    dense: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for pname, p in base_params.items():
            diff = ft_params[pname].detach().float() - p.detach().float()
            if pname in weights:
                out[weights[pname]] = diff
            elif bool(diff.abs().max() > 0):
                dense[pname] = diff
    return RawDelta(out, dense, base_fingerprint)


def _check_same_architecture(base: nn.Module, finetuned: nn.Module) -> None:
    kind = [getattr(getattr(m, "config", None), "model_type", type(m).__name__) for m in (base, finetuned)]
    if kind[0] != kind[1]:
        raise UsageError(f"the fine-tuned model is a {kind[1]}, the base a {kind[0]}: a delta needs the same "
                         "architecture")
    shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in (base, finetuned)]
    if shapes[0].keys() != shapes[1].keys():
        only = sorted(shapes[0].keys() ^ shapes[1].keys())[:3]
        raise UsageError(f"the two models have different parameters (e.g. {', '.join(only)}); a delta needs the "
                         "same architecture and size")
    for name, shape in shapes[0].items():
        if shapes[1][name] != shape:
            raise UsageError(f"parameter {name} is {list(shape)} in the base and {list(shapes[1][name])} in the "
                             "fine-tune; a delta needs models of the same size")

