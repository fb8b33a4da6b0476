"""Truncation of one weight matrix W (out × in) to a factor pair A (out × r), B (r × in), W ≈ A·B.

All in float64. ``whitened`` truncates W·S, where S·Sᵀ = X·Xᵀ (the layer's calibration inputs), so
that it minimizes the error of the layer's outputs on that data rather than of its weights
(SVD-LLM). ``residual`` adds ResSVD's second stage: the residual of a rank r_i truncation is itself
truncated to rank r_r under the *plain* weight metric; using the same metric twice would equal a
single rank r_i + r_r truncation (Eckart–Young), so the stages must differ to change anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

Tensor = torch.Tensor


@contextmanager
def one_thread() -> Iterator[None]:
    """LAPACK factorizations (SVD, eigh, Cholesky) on one thread. With two threads on a 2-core machine
    that other jobs share, MKL's threads spin on each other at their many synchronization points: a
    1536×576 SVD took 23.5 s on two threads against 0.44 s on one (same load). Matrix products and
    triangular solves with many right-hand sides, single blocked BLAS-3 calls, keep their threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def plain(weight: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    with one_thread():
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def whitening(gram: Tensor, damping: float) -> Tensor:
    """Lower-triangular S with S·Sᵀ = X·Xᵀ (+ damping when X·Xᵀ is singular)."""
    gram = gram.double()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    lam = 0.0
    for _ in range(8):
        with one_thread():
            factor, info = torch.linalg.cholesky_ex(gram + lam * scale * eye)
        if int(info) == 0:
            return factor
        lam = damping if lam == 0.0 else lam * 10
    raise ValueError("X·Xᵀ is not positive definite even with damping; calibration data may be degenerate")


def whitened(weight: Tensor, rank: int, s: Tensor) -> tuple[Tensor, Tensor]:
    u, sig, vh = top_svd(weight.double() @ s, rank)
    return unwhiten(u, sig, vh, s, rank)


def top_svd(m: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """The leading ``rank`` singular triplets of ``m`` (float64) from the eigenvectors of its smaller
    Gram matrix: 2.4× faster than a full SVD of a 1536×576 matrix on one thread. Squaring the matrix
    costs precision only for singular values near 1e-8 of the largest, far below any kept rank."""
    tall = m.shape[0] >= m.shape[1]
    gram = m.T @ m if tall else m @ m.T
    with one_thread():
        values, vectors = torch.linalg.eigh(gram)
    values, vectors = values.flip(0)[:rank], vectors.flip(1)[:, :rank]
    sig = values.clamp_min(0).sqrt()
    other = (m @ vectors if tall else m.T @ vectors) / sig.clamp_min(torch.finfo(m.dtype).tiny)
    return (other, sig, vectors.T) if tall else (vectors, sig, other.T)


def unwhiten(u: Tensor, sig: Tensor, vh: Tensor, s: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors from the SVD of W·S: A = Uᵣ·Σ½, B = Σ½·Vᵣᵀ·S⁻¹."""
    root = sig[:rank].sqrt()
    # S⁻¹ is applied as a triangular solve rather than an explicit inverse (a BLAS-3 call: both threads).
    b = torch.linalg.solve_triangular(s.T, (root[:, None] * vh[:rank]).T, upper=True).T
    return u[:, :rank] * root, b


def residual(weight: Tensor, rank: int, s: Tensor, share: float,
             first_stage: Callable[[int], tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """``first_stage(rank)`` may supply the whitened factors from an SVD already computed."""
    stage = first_stage or (lambda r: whitened(weight, r, s))
    r_res = int(round(rank * share))
    if r_res == 0 or r_res >= rank:
        return stage(rank)
    a1, b1 = stage(rank - r_res)
    a2, b2 = plain_lowrank(weight.double() - a1 @ b1, r_res)
    return torch.cat([a1, a2], dim=1), torch.cat([b1, b2], dim=0)


def plain_lowrank(weight: Tensor, rank: int, oversample: int = 10,
                  iterations: int = 4) -> tuple[Tensor, Tensor]:
    """``plain`` for a small rank by a randomized range finder (Halko et al.; torch.svd_lowrank): the
    residual stage keeps a few directions of a 1536×576 matrix, and a full SVD for them was half the
    SVD time of a compression. Seeded, so a compression is reproducible."""
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(weight.double(), q=min(rank + oversample, *weight.shape), niter=iterations)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * v[:, :rank].T
