"""OSD's importance of factor entries from gradients on a few validation windows.

The paper's score is first-order Taylor |θ·∂L/∂θ| with the gradient taken at the model the delta
will produce before sparsification (the base plus the rank-k reconstruction U·Vᵀ). Measured better
here (benchmarks/deltas): the second-order score θ²·Σ_w g_w² from one backward per window (the
empirical Fisher diagonal) with the gradient at the base, and best of all with each window's loss the
KL from the fine-tune to the model rather than the NLL of its text (make.py's "fisher-kl"): at the base
that gradient is zero wherever the two models already agree, so only what the fine-tune changed is
scored. With G = ∂L/∂ΔW, the chain rule through
ΔW = U·Vᵀ gives ∂L/∂U = G·V and ∂L/∂V = Gᵀ·U, so each window's G is projected onto the factors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from edgepack.toolchain.ressvd.calibration import gram_f64
from tqdm import tqdm


def weight_gradients(model: nn.Module, layers: dict[str, nn.Linear], shifts: dict[str, torch.Tensor],
                     windows: Sequence[Sequence[int]], grams: dict[str, torch.Tensor] | None = None,
                     per_window: Callable[[str, torch.Tensor], None] | None = None,
                     loss_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """∂L/∂W of each layer in ``layers`` with its weight moved by ``shifts[name]``; mean token loss
    over ``windows``. The model's weights are restored afterwards. A ``grams`` dict is filled with
    each layer's input X·Xᵀ / tokens (for the output-error criterion) from the same forward passes.
    ``per_window(name, grad)``: called with each window's own gradient (of its mean token loss), which
    is then cleared, so nothing is accumulated and an empty dict is returned. ``loss_fn(window index, ids)``:
    another loss than the next-token NLL of the window's own text (e.g. the KL to the fine-tune)."""
    saved = {}
    hooks = [] if grams is None else [layer.register_forward_hook(_gram_hook(grams, name, len(windows)))
                                      for name, layer in layers.items()]
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            for name, layer in layers.items():
                saved[name] = layer.weight.detach().clone()
                layer.weight.add_(shifts[name].to(layer.weight.dtype))
        for layer in layers.values():
            layer.weight.requires_grad_(True)
            layer.weight.grad = None
        for i, window in enumerate(tqdm(windows, desc="importance (backward)", unit="window", file=sys.stderr)):
            ids = torch.tensor([list(window)])
            loss = loss_fn(i, ids) if loss_fn else model(ids, labels=ids, use_cache=False).loss
            (loss if per_window else loss / len(windows)).backward()
            if per_window:
                for name, layer in layers.items():
                    per_window(name, layer.weight.grad)
                    layer.weight.grad = None
        if per_window:
            return {}
        return {name: layer.weight.grad.detach().clone() for name, layer in layers.items()}
    finally:
        with torch.no_grad():
            for name, layer in layers.items():
                layer.weight.grad = None
                if name in saved:
                    layer.weight.copy_(saved[name])
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
        for hook in hooks:
            hook.remove()


def _gram_hook(grams: dict[str, torch.Tensor], name: str, count: int):
    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])
        gram = gram_f64(x) / (x.shape[0] * count)
        grams[name] = grams[name] + gram if name in grams else gram

    return hook


def sampled_nll(model: nn.Module, samples: int = 4, seed: int = 0) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """A window's loss as the NLL of ``samples`` labels per position drawn from the model's own next-token
    distribution (seeded per window). Its per-window squared gradients estimate the true Fisher, the Hessian
    of KL(model ‖ ·) at the model itself: at the full fine-tune, OBD's second-order cost of moving away from
    it, where the gradient is zero. The empirical Fisher of the text's own labels is not that Hessian."""
    def loss(i: int, ids: torch.Tensor) -> torch.Tensor:
        logits = model(ids, use_cache=False).logits[0].float()
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(logits, -1), samples, replacement=True, generator=g)
        log_p = torch.log_softmax(logits, -1)
        return -log_p.gather(1, labels).mean()

    return loss


def taylor_scores(u: torch.Tensor, v: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """|θ·∂L/∂θ| for every entry of U [n_out, k] and V [n_in, k], given G = ∂L/∂ΔW [n_out, n_in]."""
    g = grad.float()
    return (u * (g @ v)).abs(), (v * (g.T @ u)).abs()


def output_scores(u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How much the layer's output moves, in mean squared error over the validation inputs, when one
    factor entry is zeroed: removing U[i, j] takes U[i, j]·V[:, j] from row i of ΔW, costing
    U[i, j]²·(V[:, j]ᵀ·C·V[:, j]); removing V[l, j] costs V[l, j]²·‖U[:, j]‖²·C[l, l] (C = E[x·xᵀ])."""
    c = gram.float()
    col_energy = torch.einsum("ij,ik,kj->j", v, c, v)  # V_jᵀ C V_j for every column j
    return u.square() * col_energy, v.square() * (u.square().sum(0) * torch.diagonal(c)[:, None])


def input_grams(model: nn.Module, layers: dict[str, nn.Linear], windows: Sequence[Sequence[int]]
                ) -> dict[str, torch.Tensor]:
    """Each layer's mean input X·Xᵀ over ``windows`` (float64), from forward passes alone."""
    grams: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_hook(_gram_hook(grams, name, len(windows))) for name, layer in layers.items()]
    try:
        with torch.no_grad():
            for window in tqdm(windows, desc="input statistics", unit="window", file=sys.stderr):
                model(torch.tensor([list(window)]), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return grams


def factor_gradient_stats(model: nn.Module, layers: dict[str, nn.Linear], shifts: dict[str, torch.Tensor],
                          factors: dict[str, tuple[torch.Tensor, torch.Tensor]], windows: Sequence[Sequence[int]],
                          loss_fn: Callable[[int, torch.Tensor], torch.Tensor] | None = None
                          ) -> dict[str, tuple[torch.Tensor, ...]]:
    """Per layer (mean ∂L/∂U, mean ∂L/∂V, Σ_w (∂L_w/∂U)², Σ_w (∂L_w/∂V)²) over the windows, with the
    weights moved by ``shifts``: one backward per window, each window's ΔW-gradient G_w projected onto
    the factors (G_w·V, G_wᵀ·U) before the next. The squared sums are the empirical Fisher diagonal of
    the factor entries, which a batch-mean gradient cannot give: entries whose per-window gradients
    cancel look unimportant to |θ·ḡ| but not to θ²·Σg²."""
    stats: dict[str, list[torch.Tensor]] = {}

    def accumulate(name: str, grad: torch.Tensor) -> None:
        u, v = factors[name]
        g = grad.float()
        gu, gv = g @ v, g.T @ u
        parts = (gu / len(windows), gv / len(windows), gu.square(), gv.square())
        if name in stats:
            for total, part in zip(stats[name], parts):
                total.add_(part)
        else:
            stats[name] = [p.clone() for p in parts]

    weight_gradients(model, layers, shifts, windows, per_window=accumulate, loss_fn=loss_fn)
    return {name: tuple(parts) for name, parts in stats.items()}


def fisher_scores(u: torch.Tensor, v: torch.Tensor, sq_u: torch.Tensor, sq_v: torch.Tensor, shrink: float = 0.0,
                  separable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """θ²·Σ_w g_w²: the second-order (Optimal Brain Damage) loss change of zeroing an entry, with the
    empirical Fisher diagonal standing in for the Hessian's. ``shrink`` λ pulls each entry's Fisher
    toward its factor's mean, θ²·(F + λ·mean F): a few thousand validation tokens estimate one entry's
    Fisher noisily but a factor's mean well; λ → ∞ is magnitude within a factor, Fisher-weighted across.
    ``separable``: F replaced by its row × column estimate F̂_ij = (Σ_j F_ij)·(Σ_i F_ij) / Σ F, which keeps
    how much each output (or input) and each factor column matter, and averages out the per-entry noise."""
    if separable:
        sq_u, sq_v = _separable(sq_u), _separable(sq_v)
    return u.square() * (sq_u + shrink * sq_u.mean()), v.square() * (sq_v + shrink * sq_v.mean())


def _separable(f: torch.Tensor) -> torch.Tensor:
    total = f.sum()
    return torch.outer(f.sum(1), f.sum(0)) / total if total > 0 else f


def rms_scores(u: torch.Tensor, v: torch.Tensor, sq_u: torch.Tensor, sq_v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """|θ|·sqrt(Σ_w g_w²): the Fisher score's square root, on the scale of |θ·g| (it ranks a layer's
    entries as ``fisher_scores`` does; it differs only when layers compete in one global budget)."""
    return u.abs() * sq_u.sqrt(), v.abs() * sq_v.sqrt()


def normalized(scores: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's scores divided by their mean: the per-layer scale of gradient scores spans orders of
    magnitude, so a global budget otherwise goes almost wholly to a few layers."""
    out = {}
    for name, (su, sv) in scores.items():
        mean = (su.sum() + sv.sum()) / (su.numel() + sv.numel())
        scale = mean if mean > 0 else torch.ones(())
        out[name] = (su / scale, sv / scale)
    return out
