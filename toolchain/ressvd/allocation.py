"""Per-matrix ranks within a decoder layer, from the whitened spectra of its linear layers.

The last-k rule gives every matrix of a compressed layer the same parameter ratio. Matrices differ in
how much of their output a rank carries: a spectrum that falls fast loses little at a low rank. Here a
layer's parameter budget (the same as the uniform rule's) is spent greedily on the rank components with
the largest share of their matrix's whitened output energy per parameter they cost: σᵢ² / ‖W·S‖²
divided by (in + out), where σᵢ² are the eigenvalues of W·X·Xᵀ·Wᵀ (X the layer's calibration inputs).
The relative energy makes matrices of different output scales comparable; SVD-LLM v2 allocates by a
similar truncation loss. The spectra are of the dense weights on the dense model's inputs (the
propagation then fits its corrected maps at these ranks). Ranks are rounded to ``multiple`` for the
int4 blocks and kept in [``floor`` · uniform rank, the rank past which the pair no longer saves
parameters].
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch
from edgepack.toolchain.ressvd.factorize import one_thread

Tensor = torch.Tensor


def energy_spectrum(weight: Tensor, gram: Tensor) -> Tensor:
    """Descending σᵢ² / Σσ² of W·S, S·Sᵀ = ``gram`` (XᵀX of the layer's inputs), via the smaller Gram matrix."""
    w, gram = weight.detach().double(), gram.double()
    with one_thread():
        if w.shape[0] <= w.shape[1]:
            values = torch.linalg.eigvalsh(w @ gram @ w.T)
        else:  # same non-zero spectrum: (W S)ᵀ(W S) = Sᵀ Wᵀ W S, similar to Wᵀ W G
            s = torch.linalg.cholesky_ex(gram + 1e-8 * gram.diagonal().mean() * torch.eye(gram.shape[0],
                                                                                     dtype=gram.dtype))[0]
            values = torch.linalg.eigvalsh(s.T @ w.T @ w @ s)
    values = values.flip(0).clamp_min(0)
    return values / values.sum().clamp_min(1e-300)


def allocate(shapes: Sequence[tuple[int, int]], spectra: Sequence[Tensor], uniform: Sequence[int],
             floor: float = 0.5, multiple: int = 8) -> list[int]:
    """Ranks for matrices of ``shapes`` (out, in) with the parameter budget of ``uniform`` ranks."""
    cost = [o + i for o, i in shapes]
    budget = sum(r * c for r, c in zip(uniform, cost))
    cap = [max(1, (o * i) // (o + i)) for o, i in shapes]
    ranks = [min(cap[m], max(1, int(floor * uniform[m]) // multiple * multiple)) for m in range(len(shapes))]
    spent = sum(r * c for r, c in zip(ranks, cost))

    def gain(m: int) -> float:  # energy of the next ``multiple`` components per parameter
        spec = spectra[m]
        return float(spec[ranks[m]:ranks[m] + multiple].sum()) / (multiple * cost[m])

    heap = [(-gain(m), m) for m in range(len(shapes)) if ranks[m] < cap[m]]
    heapq.heapify(heap)
    while heap:
        _, m = heapq.heappop(heap)
        step = min(multiple, cap[m] - ranks[m])
        if spent + step * cost[m] > budget:
            continue  # a smaller matrix may still fit
        ranks[m] += step
        spent += step * cost[m]
        if ranks[m] < cap[m]:
            heapq.heappush(heap, (-gain(m), m))
    return ranks
