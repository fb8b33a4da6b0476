"""Distillation shared by the two tunes: ResSVD's factor tune (ressvd/tune.py) and the delta tune
(delta/tune.py). Both train a few parameters so that a student's next-token distribution matches a
teacher's on calibration windows; they differ only in how a batch's hidden states are made.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import torch
from edgepack.toolchain.linear_kl import linear_kl
from torch.nn import functional as F
from tqdm import tqdm


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` with no parameter requiring gradients (a tune turns on only what it trains); every
    parameter's flag is restored on exit."""
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def sampled_kl(student: torch.Tensor, teacher: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
               positions: int | None, g: torch.Generator | None) -> torch.Tensor:
    """KL(teacher ‖ student) of the next-token distributions ``head`` gives the two [batch, tokens, hidden]
    states, on ``positions`` random positions (None: all). The head's full-vocabulary product dominates
    a step's cost, while every position's gradient reaches the trained parameters anyway."""
    student, teacher = _sampled(student, teacher, positions, g)
    with torch.no_grad():
        target = F.log_softmax(head(teacher).float(), dim=-1).flatten(0, 1)
    log_p = F.log_softmax(head(student).float(), dim=-1).flatten(0, 1)
    return F.kl_div(log_p, target, log_target=True, reduction="batchmean")


def sampled_kl_linear(student: torch.Tensor, teacher: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
                      linear: torch.nn.Linear, positions: int | None, g: torch.Generator | None,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sampled_kl`` with the head ``linear(norm(·))`` of a frozen linear layer, through linear_kl.py (the
    same positions and value, 1.35x faster on the default model's vocabulary)."""
    student, teacher = _sampled(student, teacher, positions, g)
    with torch.no_grad():
        teacher = norm(teacher).flatten(0, 1)
    return linear_kl(norm(student).flatten(0, 1), teacher, linear.weight, linear.bias, dtype)


def head_kl(student: torch.Tensor, teacher: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor],
            head: torch.nn.Module, positions: int | None, g: torch.Generator | None,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``sampled_kl`` through the head ``head(norm(·))``: by ``sampled_kl_linear`` where the head is a frozen
    plain linear layer (``frozen_linear``), else by the composed ops, under bfloat16 autocast when ``dtype``
    is bfloat16 (the products' dtype of the fused path)."""
    if frozen_linear(head):
        return sampled_kl_linear(student, teacher, norm, head, positions, g, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        return sampled_kl(student, teacher, lambda h: head(norm(h)), positions, g)


def frozen_linear(head: torch.nn.Module) -> bool:
    """Whether ``sampled_kl_linear`` can stand for ``sampled_kl`` with this head: exactly a linear layer (a
    subclass may change its forward), with no hook that would change its output (the delta tune hooks a
    branch onto linear layers), whose parameters do not train."""
    from torch.nn.modules import module

    hooked = head._forward_hooks or head._forward_pre_hooks or module._global_forward_hooks or \
        module._global_forward_pre_hooks
    return type(head) is torch.nn.Linear and not hooked and not any(p.requires_grad for p in head.parameters())


def _sampled(student: torch.Tensor, teacher: torch.Tensor, positions: int | None, g: torch.Generator | None):
    if positions is not None and positions < student.shape[1]:
        idx = torch.randperm(student.shape[1], generator=g)[:positions]
        return student[:, idx], teacher[:, idx]
    return student, teacher


def train(params: Sequence[torch.Tensor], windows: int, steps: int, lr: float, batch: int, seed: int,
          batch_loss: Callable[[torch.Tensor, torch.Generator], torch.Tensor], desc: str,
          callback: Callable[[int], None] | None = None) -> list[float]:
    """AdamW on ``params`` for ``steps`` steps of ``batch`` of the ``windows`` calibration windows (a seeded
    permutation, wrapping around); ``batch_loss(window indices, generator)`` gives a step's loss. Returns
    the loss of every step; ``callback(steps_done)`` runs after each."""
    optimizer = _adamw(params, lr)
    # Linear warm-up, then cosine to 0. Without the warm-up, Adam's first step (every parameter moved by
    # about lr) lifted ResSVD's KL from 0.51 to 3.38 on the default model, and 16 steps did not recover.
    warmup = max(1, steps // 8)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * step / steps)))
    g = torch.Generator().manual_seed(seed)
    order, losses = torch.randperm(windows, generator=g), []
    bar = tqdm(range(steps), desc=desc, unit="step", file=sys.stderr)
    for step in bar:
        loss = batch_loss(order[(torch.arange(batch) + step * batch) % windows], g)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if callback is not None:
            callback(step + 1)
    return losses


def _adamw(params: Sequence[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """AdamW with its fused kernel where torch has one for these tensors: one pass over each parameter
    instead of a dozen, 11 against 85 ms a step for the 21 M factor weights of the default model at 20 %
    on this 2-core machine (about 5 s of a 64-step tune); the update is the same."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a dtype or device without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
