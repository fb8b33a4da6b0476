"""GPT-2-style ``Conv1D`` projections seen as ``nn.Linear`` while ResSVD or a delta works on them.

transformers' ``Conv1D`` computes x·W + b with W stored [in, out], the transpose of ``nn.Linear``'s. Rather than
teach every step (calibration, truncation, correction, tune, delta extraction and importance) a second weight
layout, the model's Conv1D modules are swapped for equal ``nn.Linear`` modules, and back again afterwards, so a
saved folder keeps the layout its config's architecture loads.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def to_linear(model: nn.Module) -> list[str]:
    """Replace every Conv1D of ``model`` with an ``nn.Linear`` computing the same; return their names."""
    from edgepack.toolchain.ressvd.layers import set_module

    names = [name for name, m in model.named_modules() if _is_conv1d(m)]
    for name in names:
        conv = model.get_submodule(name)
        n_in, n_out = conv.weight.shape
        linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, dtype=conv.weight.dtype, device=conv.weight.device)
        linear.weight.data = conv.weight.data.t().contiguous()
        if conv.bias is not None:
            linear.bias.data = conv.bias.data
        linear.train(conv.training)
        set_module(model, name, linear)
    return names


def restore(model: nn.Module, names: list[str]) -> None:
    """Turn the modules ``to_linear`` replaced back into Conv1D, except those since factorized (a ResSVD pair
    is rebuilt from the compression record, whatever the layer was)."""
    from edgepack.toolchain.ressvd.layers import set_module
    from transformers.pytorch_utils import Conv1D

    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            continue
        conv = Conv1D(linear.out_features, linear.in_features)
        conv.weight.data = linear.weight.data.t().contiguous()
        if linear.bias is not None:  # else Conv1D's own zeros: the same function
            conv.bias.data = linear.bias.data
        conv.train(linear.training)
        set_module(model, name, conv)


def dims(module: Any) -> tuple[int, int]:
    """(out, in) of an ``nn.Linear`` or a Conv1D."""
    if _is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_out), int(n_in)
    return int(module.out_features), int(module.in_features)
