"""Distil the kept values of a compressed delta toward the full fine-tune (``edgepack delta --tune-steps N``).

Selection decides which factor entries a delta keeps; their values are still those of the rank-(r+c)
SVD, fitted to ΔW with every other entry present. Here the kept values (and only those: the pattern,
hence the bits, is unchanged) are trained for a few steps so that base + delta matches the fine-tune's
next-token distribution on the validation windows: KL(fine-tune ‖ base + delta), AdamW, linear warm-up
then cosine decay. The teacher is base + the raw ΔW (exactly the fine-tune), run once per window; only
its last hidden state is kept (576 floats per token instead of 49152 logits), and its logits are
recomputed through the frozen head on a random subset of positions per step, since the head's
49152-wide product dominates a step's cost while every position's gradient reaches the delta anyway.

The delta enters the student as a side branch y += (x·V)·Uᵀ on each linear layer (a forward hook):
the base weights are never touched, and U and V are scattered from the trainable kept values.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from edgepack.runtime.delta_file import FactorData, LayerDelta
from edgepack.runtime.errors import UnsupportedArchitecture
from edgepack.toolchain import distill
from edgepack.toolchain.delta.extract import RawDelta, linear_layers
from edgepack.toolchain.delta.merge import added
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm


@dataclass(frozen=True)
class TuneSettings:
    steps: int
    lr: float = 1e-4
    batch: int = 2  # windows per step
    positions: int | None = 64  # positions per window whose logits enter the loss (None: all)
    seed: int = 0
    # Weight of the next-token NLL of the window's own text: loss (1 − hard)·KL + hard·NLL, the task loss OSD's
    # importance is defined on, beside the distillation target (0: KL alone).
    hard: float = 0.0


class _Branch:
    """The trainable kept values of one layer's factors and the hook that adds (x·V)·Uᵀ to its output."""

    def __init__(self, layer: LayerDelta) -> None:
        self.layer = layer
        self.values = [nn.Parameter(torch.from_numpy(np.asarray(f.values, np.float32)).clone())
                       for f in (layer.u, layer.v)]
        self.index = [None if f.index is None else torch.from_numpy(np.asarray(f.index, np.int64))
                      for f in (layer.u, layer.v)]

    def _dense(self, i: int, rows: int) -> torch.Tensor:
        if self.index[i] is None:
            return self.values[i].view(rows, self.layer.rank)
        flat = torch.zeros(rows * self.layer.rank, dtype=self.values[i].dtype)
        return flat.index_put((self.index[i],), self.values[i]).view(rows, self.layer.rank)

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        u, v = self._dense(0, self.layer.n_out), self._dense(1, self.layer.n_in)
        return output + (inputs[0] @ v.to(output.dtype)) @ u.T.to(output.dtype)

    def tuned(self) -> LayerDelta:
        u, v = (FactorData(p.detach().numpy().copy(), f.index) for p, f in zip(self.values, (self.layer.u,
                                                                                              self.layer.v)))
        return replace(self.layer, u=u, v=v)


def teacher_states(model: nn.Module, raw: RawDelta, windows: Sequence[Sequence[int]]) -> torch.Tensor:
    """The full fine-tune's (base + raw ΔW) input to the output head, [windows, tokens, hidden]."""
    changes = {f"{n}.weight": d for n, d in raw.linears.items()} | dict(raw.dense)
    with added(model, changes), torch.no_grad():
        return torch.cat([head_inputs(model, torch.tensor([list(w)]))
                          for w in tqdm(windows, desc="teacher (full fine-tune)", unit="window", file=sys.stderr)])


def head_inputs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The decoder's final (normed) hidden states, [batch, tokens, hidden]: the loss needs the head's input
    alone, and skipping the full-vocabulary logits of every position is most of a step's saving."""
    return _decoder(model)(input_ids=ids, use_cache=False).last_hidden_state


def _decoder(model: nn.Module) -> nn.Module:
    """The LM's decoder stack: ``get_decoder()`` is the whole LM on GPT-2 / GPT-NeoX, ``base_model`` is on Gemma 3
    (its prefix names a multimodal wrapper's attribute)."""
    for candidate in (model.base_model, getattr(model, "model", None), model.get_decoder()):
        if isinstance(candidate, nn.Module) and candidate is not model:
            return candidate
    raise UnsupportedArchitecture(f"cannot find the decoder of {type(model).__name__} for the delta tune; "
                                  "pass --tune-steps 0")


def tune(model: nn.Module, layers: dict[str, LayerDelta], dense: dict[str, torch.Tensor],
         windows: Sequence[Sequence[int]], teacher: torch.Tensor, settings: TuneSettings
         ) -> tuple[dict[str, LayerDelta], list[float]]:
    """``layers`` with their kept values trained toward ``teacher`` (teacher_states); the loss of every step.
    ``dense``: the delta's dense parameter changes, applied (not trained) during the tune."""
    branches = {n: _Branch(layer) for n, layer in layers.items()}
    params = [p for b in branches.values() for p in b.values if p.numel()]
    if not params or settings.steps < 1:
        return dict(layers), []
    head = model.get_output_embeddings()
    ids = torch.tensor([list(w) for w in windows])

    def batch_loss(batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        if settings.hard:
            return _mixed_loss(model, head, ids[batch], teacher[batch], settings.positions, g, settings.hard)
        return _loss(model, head, ids[batch], teacher[batch], settings.positions, g)

    with distill.frozen(model), _with_delta(model, branches, dense):
        losses = distill.train(params, len(windows), settings.steps, settings.lr, settings.batch, settings.seed,
                               batch_loss, "tuning kept values")
    return {n: b.tuned() for n, b in branches.items()}, losses


def distillation_loss(model: nn.Module, layers: dict[str, LayerDelta], dense: dict[str, torch.Tensor],
                      windows: Sequence[Sequence[int]], teacher: torch.Tensor) -> float:
    """KL(teacher ‖ base + delta) at every position of ``windows``, without gradients."""
    branches = {n: _Branch(layer) for n, layer in layers.items()}
    head = model.get_output_embeddings()
    with _with_delta(model, branches, dense), torch.no_grad():
        losses = [float(_loss(model, head, torch.tensor([list(w)]), teacher[i:i + 1], None, None))
                  for i, w in enumerate(windows)]
    return sum(losses) / len(losses)


@contextlib.contextmanager
def _with_delta(model: nn.Module, branches: dict[str, _Branch], dense: dict[str, torch.Tensor]) -> Iterator[None]:
    """``model`` computing base + delta: each branch hooked onto its linear layer, ``dense`` added to the
    weights; both undone on exit."""
    modules = linear_layers(model)
    hooks = [modules[n].register_forward_hook(b.hook) for n, b in branches.items()]
    try:
        with added(model, dense):
            yield
    finally:
        for hook in hooks:
            hook.remove()


def _loss(model: nn.Module, head: nn.Module, ids: torch.Tensor, teacher: torch.Tensor, positions: int | None,
          g: torch.Generator | None) -> torch.Tensor:
    # head_inputs are already the final norm's output
    return distill.head_kl(head_inputs(model, ids), teacher, nn.Identity(), head, positions, g)


def _mixed_loss(model: nn.Module, head: nn.Module, ids: torch.Tensor, teacher: torch.Tensor, positions: int | None,
                g: torch.Generator, hard: float) -> torch.Tensor:
    """(1 − hard)·KL(teacher ‖ student) + hard·NLL of the next tokens, on the same random positions (those with
    a next token)."""
    states = head_inputs(model, ids)
    count = ids.shape[1] - 1
    idx = torch.randperm(count, generator=g)[:positions] if positions is not None else torch.arange(count)
    kl = distill.sampled_kl(states[:, idx], teacher[:, idx], head, None, None)
    nll = F.cross_entropy(head(states[:, idx]).float().flatten(0, 1), ids[:, idx + 1].flatten())
    return (1 - hard) * kl + hard * nll
