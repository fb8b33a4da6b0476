"""KL(teacher ‖ student) of the next-token distributions a frozen linear head gives two sets of hidden
states, as one autograd function.

Written by hand because PyTorch has no fused linear + KL (its fused kernels cover cross-entropy on
GPUs only). Through autograd the composed ops (head, two log-softmaxes, ``kl_div`` and their
backward passes) make and sweep about ten [rows, vocabulary] float32 tensors a step; on the
default model (256 rows × 49152 tokens) that was 470 ms of a 1.8 s ResSVD tune step. Here the
gradient with respect to the student's states, (softmax(s) − softmax(t))·W / rows, is formed in the
forward pass from the logits already in hand, so the backward pass is one scale of a
[rows, hidden] tensor: 350 ms, three vocabulary products (student, teacher, gradient) and little else.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

# Rows of student and teacher per block: the head's weight (113 MB for the default model) is read once a
# block, and blocks of 256 were 1.35x faster than 128 on this 2-core machine; the logits of a block take
# 2 · 256 · vocabulary floats (100 MB for 49152 tokens).
BLOCK_ROWS = 256


def linear_kl(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Mean over rows of KL(softmax(t·Wᵀ + b) ‖ softmax(s·Wᵀ + b)) for [rows, hidden] ``student`` and
    ``teacher``; differentiable in ``student`` only (the head and the teacher are constants). ``dtype``: of
    the matrix products (bfloat16 where the CPU is fast at it); the softmaxes and the loss are float32."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("linear_kl treats the head as frozen; its weight must not require gradients")
    if student.shape != teacher.shape or student.dim() != 2:
        raise ValueError(f"student and teacher must be [rows, hidden] of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")
    return _LinearKL.apply(student, teacher.detach(), weight.detach(), None if bias is None else bias.detach(), dtype)


class _LinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, weight, bias, dtype):
        rows = student.shape[0]
        w = weight.to(dtype)
        grad = torch.empty(student.shape, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, rows, BLOCK_ROWS):
            s, t = student[start:start + BLOCK_ROWS], teacher[start:start + BLOCK_ROWS]
            logits = _logits(torch.cat([s, t]), w, bias)
            log_q, log_p = F.log_softmax(logits[:len(s)], -1), F.log_softmax(logits[len(s):], -1)
            p = log_p.exp()
            # Each row's sum in float32 (torch sums in cascades), the rows' total in float64: a float64 sum of
            # the whole block would first copy it to float64 (100 ms a step on the default model).
            total += (log_p - log_q).mul_(p).sum(-1).double().sum()
            # d KL / d logits of one row: softmax(s) − p
            grad[start:start + len(s)] = (log_q.exp_().sub_(p).to(dtype) @ w).float()
        ctx.save_for_backward(grad)
        ctx.rows, ctx.dtype = rows, student.dtype
        return (total / max(rows, 1)).to(torch.float32)

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * (grad_output / max(ctx.rows, 1))).to(ctx.dtype), None, None, None, None


def _logits(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = (x.to(w.dtype) @ w.T).float()
    return out if bias is None else out + bias.float()
