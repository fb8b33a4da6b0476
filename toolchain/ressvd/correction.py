"""Closed-form correction of a group of linear layers for the compression error upstream, with a ridge.

A group is the linear layers fed the very same tensor (q/k/v; gate/up; o; down). With X the dense
model's inputs and X̂ those of the partly compressed model, G = X̂ᵀX̂ and C = XᵀX̂, the replacement W'
of each W in the group minimizing ‖X·Wᵀ − X̂·W'ᵀ‖² + λ·‖W' − W‖² is

    W*(λ) = W·(C + λI)·(G + λI)⁻¹,  and the objective is ‖(W' − W*)·S‖² + const,  S·Sᵀ = G + λI,

so the rank-r replacement is SVD-LLM's whitened truncation of W* under S. Without the ridge
(λ = 0) the least-squares map fits noise along directions the calibration data barely spans, and
with half of each of 12 layers removed that made a broken model (perplexity 2.5e5). The ridge pulls
toward W, not toward 0: what the data cannot pin down keeps the original weights. λ is relative to
the mean of diag(G); ``choose_ridge`` picks it per group on held-out calibration windows, with "no
correction" (W itself, whitened by G) among the candidates, so a group is never corrected by a map
that does worse than leaving it alone on data it was not fitted to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from edgepack.toolchain.ressvd import factorize
from edgepack.toolchain.ressvd.calibration import cross_f64, gram_f64

Tensor = torch.Tensor
NO_CORRECTION = math.inf
# 1e-3 was never chosen for the Pi Zero plan (groups chose 1e-2: 7, 1e-1: 29, 1: 11, none: 1 of 48).
RIDGE_GRID = (1e-2, 1e-1, 1.0, NO_CORRECTION)
FALLBACK_RIDGE = 1e-2  # with a single calibration window nothing is held out


@dataclass
class Moments:
    g: Tensor  # X̂ᵀX̂, float64
    c: Tensor | None  # XᵀX̂, float64 (None where the caller has W·C itself: ``narrow``)
    gxx: Tensor | None = None  # XᵀX: only held-out moments need it, to score a map without its rows

    @classmethod
    def of(cls, x: Tensor, x_hat: Tensor, dense_gram: bool = False) -> Moments:
        x, x_hat = x.reshape(-1, x.shape[-1]), x_hat.reshape(-1, x_hat.shape[-1])
        return cls(gram_f64(x_hat), cross_f64(x, x_hat), gram_f64(x) if dense_gram else None)

    @classmethod
    def narrow(cls, product: Tensor, x_hat: Tensor) -> tuple[Moments, Tensor]:
        """The moments without C, and W·C itself as (X·Wᵀ)ᵀ·X̂ from the dense pass's product X·Wᵀ: N·out·in
        multiply-adds where C costs N·in² (down, 576 × 1536: 2.7× fewer; 0.3 s of each compressed layer)."""
        product, x_hat = product.reshape(-1, product.shape[-1]), x_hat.reshape(-1, x_hat.shape[-1])
        return cls(gram_f64(x_hat), None), cross_f64(product, x_hat)

    def __add__(self, other: Moments) -> Moments:
        return Moments(self.g + other.g, self.c + other.c)


def corrected_map(weights: Sequence[Tensor], m: Moments, ridge: float, damping: float,
                  wc: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
    """W*(λ) for every weight of a group, and the whitening S of the truncation metric (float64).
    ``wc``: the stacked W·C, when the caller reuses it over several λ."""
    eye = torch.eye(m.g.shape[0], dtype=torch.float64)
    if ridge == NO_CORRECTION:
        return [w.double() for w in weights], factorize.whitening(m.g, damping)
    lam = ridge * float(m.g.diagonal().mean().clamp_min(1e-12))
    s = factorize.whitening(m.g + lam * eye, damping)
    stacked = torch.cat([w.double() for w in weights])
    rhs = ((stacked @ m.c if wc is None else wc) + lam * stacked).T  # a plain product: it keeps both threads
    # W·(C + λI)·(G + λI)⁻¹ by two triangular solves with S (no explicit inverse). A solve with many right-hand
    # sides is one blocked BLAS-3 call, like a product, so it keeps both threads too (unlike the SVDs and
    # eigensolvers of factorize.one_thread): 25 against 55 ms for gate/up's 3072 columns.
    y = torch.linalg.solve_triangular(s, rhs, upper=False)
    w_star = torch.linalg.solve_triangular(s.T, y, upper=True).T
    return list(torch.split(w_star, [w.shape[0] for w in weights])), s


class HeldOut:
    """‖X·Wᵀ − X̂·W'ᵀ‖² / ‖X·Wᵀ‖² summed over a group on held-out rows, from their moments alone:
    ‖X·Wᵀ‖² − 2·tr(W·C·W'ᵀ) + tr(W'·G·W'ᵀ). Re-running the rows through every candidate map took
    58 of 379 s of a whole compression; this costs one d×d product per candidate."""

    def __init__(self, weights: Sequence[Tensor], held: Moments) -> None:
        w = torch.cat([x.double() for x in weights])
        self.den = float(((w @ held.gxx) * w).sum())
        self.wc, self.g = w @ held.c, held.g

    def error(self, maps: Sequence[Tensor]) -> float:
        w2 = torch.cat([x.double() for x in maps])
        num = self.den - 2 * float((self.wc * w2).sum()) + float(((w2 @ self.g) * w2).sum())
        return max(num, 0.0) / max(self.den, 1e-30)


def choose_ridge(weights: Sequence[Tensor], x: Tensor, x_hat: Tensor, damping: float,
                 grid: Sequence[float] = RIDGE_GRID) -> tuple[float, Moments, dict[float, float]]:
    """Fit each λ of ``grid`` on all windows but the last eighth, keep the one with the least error on
    that eighth; returns it, the moments of all windows (for the refit) and the held-out curve."""
    held = max(1, x.shape[0] // 8) if x.dim() == 3 and x.shape[0] >= 2 else 0
    if not held:
        raise ValueError("choosing the ridge needs at least 2 calibration windows")
    fit, val = Moments.of(x[:-held], x_hat[:-held]), Moments.of(x[-held:], x_hat[-held:], dense_gram=True)
    score, wc = HeldOut(weights, val), torch.cat([w.double() for w in weights]) @ fit.c
    curve = {lam: score.error(weights if lam == NO_CORRECTION else corrected_map(weights, fit, lam, damping, wc)[0])
             for lam in grid}
    best = min(curve, key=lambda lam: (curve[lam], -lam))  # ties go to the stronger ridge
    return best, fit + val, curve
