"""Selection during the tune: start from the dense rank-k factors, distil them toward the fine-tune
(tune.py's loss) and prune gradually to the bit budget, so the entries are chosen where the tune has
already moved the values, and the survivors are trained after their neighbours are gone.

A one-shot pattern (magnitude or OSD's Fisher at the base) is chosen before the tune and fixed: its
importance is that of the SVD's values, not of the values the tune ends with. Here the kept bits fall
from all entries of U and V to the budget on a cubic schedule (fast at first, while many entries are
near-useless; slow near the end), reaching it at ``prune_until`` of the steps; the last steps train
the final pattern alone. The score is the empirical Fisher θ²·Σ_t g_t² accumulated over the tune's
steps ("fisher", OSD's score at the point the tune has reached) or |θ| ("magnitude", the control).
Entries once pruned stay pruned. The file's pattern and bit accounting are the same as one-shot
selection's (factorize.kept_layer), so nothing downstream changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from edgepack.runtime.delta_file import LayerDelta
from edgepack.toolchain import distill
from edgepack.toolchain.delta import budget, factorize, tune
from torch import nn

SCORES = ("fisher", "magnitude")


@dataclass(frozen=True)
class PruneSettings:
    steps: int
    lr: float = 3e-4
    score: str = "fisher"
    allocation: str = "global"  # "global": one budget for all layers; "layer": each its own
    prune_until: float = 0.5  # the budget is reached after this share of the steps
    every: int = 1  # steps between prunings
    batch: int = 2
    positions: int | None = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.score not in SCORES or self.allocation not in ("global", "layer"):
            raise ValueError(f"unknown pruning score {self.score!r} or allocation {self.allocation!r}")
        if not 0 < self.prune_until <= 1 or self.every < 1 or self.steps < 1:
            raise ValueError("pruning needs steps ≥ 1, every ≥ 1 and 0 < prune_until ≤ 1")


class _MaskedBranch:
    """Dense trainable U, V with masks of the entries still kept; the hook adds (x·(V∘m))·(U∘m)ᵀ."""

    def __init__(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.u, self.v = nn.Parameter(u.float().clone()), nn.Parameter(v.float().clone())
        self.mask_u, self.mask_v = torch.ones_like(self.u, dtype=torch.bool), torch.ones_like(self.v, dtype=torch.bool)
        self.fisher_u, self.fisher_v = torch.zeros_like(self.u), torch.zeros_like(self.v)

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        u, v = self.u * self.mask_u, self.v * self.mask_v
        return output + (inputs[0] @ v.to(output.dtype)) @ u.T.to(output.dtype)

    def accumulate(self) -> None:
        for fisher, p in ((self.fisher_u, self.u), (self.fisher_v, self.v)):
            if p.grad is not None:
                fisher.add_(p.grad.detach().square())

    def scores(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The score of every entry; pruned entries get -1, below any kept entry's."""
        out = []
        for p, fisher, mask in ((self.u, self.fisher_u, self.mask_u), (self.v, self.fisher_v, self.mask_v)):
            theta = p.detach()
            score = theta.square() * fisher if kind == "fisher" else theta.abs()
            out.append(torch.where(mask, score, torch.full_like(score, -1.0)))
        return out[0], out[1]

    def bits(self) -> int:
        return budget.sparse_bits(self.u.shape[0], self.v.shape[0], self.u.shape[1], int(self.mask_u.sum()),
                                  int(self.mask_v.sum()))


def full_bits(u: torch.Tensor, v: torch.Tensor) -> int:
    """What keeping every entry of U and V would cost as sparse entries."""
    return budget.sparse_bits(u.shape[0], v.shape[0], u.shape[1], u.numel(), v.numel())


def target_bits(start: int, end: int, step: int, until: int) -> int:
    """The cubic schedule: ``start`` bits at step 0, ``end`` from step ``until`` on."""
    left = max(0.0, 1.0 - step / until)
    return int(end + (start - end) * left ** 3)


def gradual(model: nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], budgets: dict[str, int],
            dense: dict[str, torch.Tensor], windows: Sequence[Sequence[int]], teacher: torch.Tensor,
            settings: PruneSettings) -> tuple[dict[str, LayerDelta], list[float], list[int]]:
    """Kept entries of ``factors`` (name → dense U, V at rank k) within ``budgets`` (name → bits; their sum
    is the global budget), chosen and trained during a distillation tune toward ``teacher``
    (tune.teacher_states). Returns the layers, the loss of every step and the kept bits after each step."""
    branches = {n: _MaskedBranch(u, v) for n, (u, v) in factors.items()}
    start = {n: full_bits(u, v) for n, (u, v) in factors.items()}
    until = max(1, round(settings.prune_until * settings.steps))
    head = model.get_output_embeddings()
    ids = torch.tensor([list(w) for w in windows])
    kept: list[int] = []

    def batch_loss(batch: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return tune._loss(model, head, ids[batch], teacher[batch], settings.positions, g)

    def after_step(done: int) -> None:
        for b in branches.values():
            b.accumulate()
        if done <= until and (done % settings.every == 0 or done == until):
            _prune(branches, start, budgets, done, until, settings)
        kept.append(sum(b.bits() for b in branches.values()))

    params = [p for b in branches.values() for p in (b.u, b.v)]
    with distill.frozen(model), tune._with_delta(model, branches, dense):
        losses = distill.train(params, len(windows), settings.steps, settings.lr, settings.batch, settings.seed,
                               batch_loss, f"tuning and pruning ({settings.score})", callback=after_step)
    layers = {}
    for name, b in branches.items():
        keep_u, keep_v = (np.flatnonzero(m.numpy().ravel()) for m in (b.mask_u, b.mask_v))
        layers[name] = factorize.kept_layer(name, b.u.detach(), b.v.detach(), keep_u, keep_v)
    assert sum(layer.bits for layer in layers.values()) <= sum(budgets.values()), "pruning overspent the budget"
    return layers, losses, kept


def _prune(branches: dict[str, _MaskedBranch], start: dict[str, int], budgets: dict[str, int], done: int,
           until: int, settings: PruneSettings) -> None:
    """Shrink every mask to this step's scheduled bits, lowest score per bit first."""
    if settings.allocation == "global":
        target = target_bits(sum(start.values()), sum(budgets.values()), done, until)
        chosen = factorize.select_global({n: (b.u.detach(), b.v.detach(), *b.scores(settings.score))
                                          for n, b in branches.items()}, target)
        for name, b in branches.items():
            _restrict(b, chosen[name].u.index, chosen[name].v.index)
        return
    for name, b in branches.items():
        target = target_bits(start[name], budgets[name], done, until)
        cost_u, cost_v = budget.entry_bits(b.u.shape[0], b.v.shape[0], b.u.shape[1])
        su, sv = b.scores(settings.score)
        _restrict(b, *factorize.select(su.ravel().numpy(), sv.ravel().numpy(), cost_u, cost_v, target))


def _restrict(branch: _MaskedBranch, keep_u: np.ndarray, keep_v: np.ndarray) -> None:
    """Masks to the entries at ``keep_u`` / ``keep_v`` that were still kept (pruned entries never return)."""
    for mask, keep in ((branch.mask_u, keep_u), (branch.mask_v, keep_v)):
        new = torch.zeros(mask.numel(), dtype=torch.bool)
        new[torch.from_numpy(np.asarray(keep, np.int64))] = True
        mask.logical_and_(new.view_as(mask))
