"""A short knowledge-distillation fine-tune of the compressed factors (SVD-LLM's "parameter update").

Only the factor pairs are trained; every other weight is frozen. The layers before the first
compressed one are unchanged, so their output on the calibration windows (recorded by the
propagation pass, ``sequential.Trace``) is the fixed input of the tune, and the dense model's last
decoder output, recorded by the same pass, gives the teacher's logits through the model's own
(frozen) norm and head: no teacher model is kept, and no layer is run that the tune cannot change.

The loss is KL(teacher ‖ student) of the next-token distributions on a random subset of positions
per window, and the optimizer loop is the delta tune's (toolchain/distill.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.toolchain import distill
from edgepack.toolchain.ressvd import bfloat16, quant, selection
from torch import nn


@dataclass(frozen=True)
class TuneSettings:
    steps: int
    lr: float = 1e-4
    batch: int = 4  # windows per step
    positions: int = 64  # positions per window whose logits enter the loss
    seed: int = 0
    # bfloat16 autocast of the layers and the head (matrix products in bfloat16, the loss in float32) where the
    # CPU makes it faster (bfloat16.py). With avx512_bf16, on the default model: 2.12 against 3.40 CPU-s a step,
    # perplexity after 64 steps 21.90 against 21.92 in float32.
    bf16: bool = True
    # "int4" / "int8": train the factors through the package's rounding of them (quant.py); "none": float.
    quant: str = "none"


@dataclass
class Trace:
    """What the propagation pass records for the tune, at no extra forward cost."""

    first: int  # index of the first compressed decoder layer
    inputs: torch.Tensor  # hidden states entering it, one row per calibration window
    kwargs: dict  # the decoder layers' other call arguments (rotary embeddings, mask)
    teacher: torch.Tensor  # the dense model's last decoder output


def tune_(model: nn.Module, trace: Trace, settings: TuneSettings,
          callback: Callable[[int], None] | None = None) -> list[float]:
    """Train the factors of ``model``'s compressed layers in place; returns the loss of every step.
    ``callback(steps_done)`` runs after each step (the benchmark's perplexity checkpoints)."""
    layers = selection.decoder_layers(model)[trace.first:]
    norm, head = _final_norm(model), model.get_output_embeddings()
    pairs = [m for layer in layers for m in layer.modules() if isinstance(m, nn.Sequential)]
    if not any(True for m in pairs for _ in m.parameters()):
        return []

    half = settings.bf16 and bfloat16.fast()
    if settings.bf16 and not half:
        print("edgepack: this CPU multiplies bfloat16 slower than float32; the factor tune runs in float32",
              file=sys.stderr)

    def batch_loss(batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return _step_loss(layers, norm, head, trace, batch, settings.positions, g, half)

    with distill.frozen(model), quant.fake_quantized(pairs, settings.quant):
        # Collected inside (a parametrized weight is held by its parametrization), and by identity, once
        # each: a joint group's members share their first factor (joint.py), and AdamW must see that
        # parameter once, with the gradient of all its uses summed.
        trainable = list({id(p): p for m in pairs for p in m.parameters()}.values())
        _check_replay(model, batch_loss, trace.inputs.shape[0])
        for p in trainable:
            p.requires_grad_(True)
        return distill.train(trainable, trace.inputs.shape[0], settings.steps, settings.lr, settings.batch,
                             settings.seed, batch_loss, "tuning factors" + _QUANT_LABEL.get(settings.quant, ""),
                             callback)


def _check_replay(model: nn.Module, batch_loss: Callable, count: int) -> None:
    """Replay two windows before training: a model whose layers take per-window arguments this cannot slice
    fails here, by name."""
    try:
        with torch.no_grad():
            batch_loss(torch.arange(min(2, count)), torch.Generator().manual_seed(0))
    except RuntimeError as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UnsupportedArchitecture(f"the ResSVD factor tune cannot replay the decoder layers of "
                                      f"{type(model).__name__} ({first}); pass --tune-steps 0") from None


_QUANT_LABEL = {"int4": " (int4-aware)", "int8": " (int8-aware)"}


def distillation_loss(model: nn.Module, trace: Trace, windows: Sequence[int] | None = None) -> float:
    """The tune's loss on ``windows`` (default: all) at every position, without gradients."""
    layers = selection.decoder_layers(model)[trace.first:]
    batch = torch.tensor(list(range(trace.inputs.shape[0])) if windows is None else list(windows))
    with torch.no_grad():
        return float(_step_loss(layers, _final_norm(model), model.get_output_embeddings(), trace, batch, None, None))


def _step_loss(layers, norm, head, trace: Trace, batch: torch.Tensor, positions: int | None,
               g: torch.Generator | None, bf16: bool = False) -> torch.Tensor:
    hidden = trace.inputs[batch]
    kwargs = {k: _rows(v, batch, trace.inputs.shape[0]) for k, v in trace.kwargs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for layer in layers:
            out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
    return distill.head_kl(hidden.float(), trace.teacher[batch], norm, head, positions, g,
                           torch.bfloat16 if bf16 else torch.float32)


def _rows(value, batch: torch.Tensor, count: int):
    """A per-window argument (first dimension = the window count) is sliced like the hidden states; one whose
    first dimension folds the windows with another axis (BLOOM's ALiBi bias, [windows·heads, 1, tokens]) is
    unfolded, sliced and folded again. Only tensors of 3 or more dimensions are taken as folded: 1-D and 2-D
    arguments (cache positions) may be any multiple of the count by chance."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == count and count > 1:
        return value[batch]
    if (isinstance(value, torch.Tensor) and value.dim() >= 3 and count > 1 and value.shape[0] > count
            and value.shape[0] % count == 0):
        return value.view(count, -1, *value.shape[1:])[batch].flatten(0, 1)
    if isinstance(value, tuple):
        return tuple(_rows(v, batch, count) for v in value)
    return value


# What the families call the norm between the last decoder layer and the head (Llama, GPT-NeoX, GPT-2, Phi, ...).
_FINAL_NORMS = ("norm", "final_layer_norm", "ln_f", "final_layernorm", "norm_f", "embedding_norm",  # LFM2
               "layer_norm")  # XGLM: layer_norm


def _final_norm(model: nn.Module) -> nn.Module:
    # get_decoder() is the whole LM on GPT-2 / GPT-NeoX; base_model is the LM itself on Gemma 3 (its prefix
    # names a multimodal wrapper's attribute), whose decoder is .model
    # OPT keeps it one level down, in model.decoder.
    for base in (model.base_model, getattr(model, "model", None), getattr(model.base_model, "decoder", None)):
        for name in _FINAL_NORMS:
            if isinstance(getattr(base, name, None), nn.Module):
                return getattr(base, name)
    raise UnsupportedArchitecture(f"cannot find the final norm of {type(model).__name__} for the factor tune; "
                                  "pass --tune-steps 0")
