"""Factor a ΔW at rank k and keep the entries of the factors that fit a bit budget.

TruncSVD keeps the rank-r factors densely. MagTruncSVD and OSD factor at the relaxed rank k = r + c
and keep individual entries of U and V, chosen by a score, until the budget of TruncSVD at rank r
is spent (budget.py). Greedy by score per bit: an entry of the smaller factor has a shorter index
and so costs slightly less. A knapsack solver would squeeze out a few more entries; the greedy
order is within one entry's cost of it and takes milliseconds.
"""

from __future__ import annotations

import numpy as np
import torch
from edgepack.runtime.delta_file import FactorData, LayerDelta
from edgepack.toolchain.delta import budget


def svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [n_out, k], V [n_in, k]) with ΔW ≈ U·Vᵀ; √σ folded into each so both have the same scale
    (magnitude selection compares entries of U with entries of V)."""
    rank = min(rank, *delta.shape)
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    root = s[:rank].sqrt()
    return (u[:, :rank] * root).float(), (vh[:rank].T * root).float()


def dense_layer(name: str, delta: torch.Tensor, rank: int) -> LayerDelta:
    """TruncSVD: the rank-``rank`` factors, stored densely."""
    u, v = svd_factors(delta, rank)
    n_out, n_in = delta.shape
    k = u.shape[1]
    return LayerDelta(name, n_out, n_in, k, FactorData(u.numpy().ravel()), FactorData(v.numpy().ravel()),
                      budget.dense_bits(n_out, n_in, k))


def sparse_layer(name: str, u: torch.Tensor, v: torch.Tensor, score_u: torch.Tensor, score_v: torch.Tensor,
                 budget_bits: int) -> LayerDelta:
    """Keep the entries of U and V with the highest score per bit within ``budget_bits``."""
    n_out, k = u.shape
    n_in = v.shape[0]
    cost_u, cost_v = budget.entry_bits(n_out, n_in, k)
    keep_u, keep_v = select(score_u.ravel().numpy(), score_v.ravel().numpy(), cost_u, cost_v, budget_bits)
    factor_u = FactorData(u.numpy().ravel()[keep_u], keep_u.astype(np.int64))
    factor_v = FactorData(v.numpy().ravel()[keep_v], keep_v.astype(np.int64))
    bits = budget.sparse_bits(n_out, n_in, k, keep_u.size, keep_v.size)
    assert bits <= budget_bits, "selection overspent its budget"
    return LayerDelta(name, n_out, n_in, k, factor_u, factor_v, bits)


def select(score_u: np.ndarray, score_v: np.ndarray, cost_u: int, cost_v: int,
           budget_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted flat indices of the kept entries of U and V: highest score per bit first, until the budget."""
    scores = np.concatenate([score_u / cost_u, score_v / cost_v]).astype(np.float64)
    costs = np.concatenate([np.full(score_u.size, cost_u), np.full(score_v.size, cost_v)])
    order = np.argsort(-scores, kind="stable")
    spent = np.cumsum(costs[order])
    chosen = order[spent <= budget_bits]
    return np.sort(chosen[chosen < score_u.size]), np.sort(chosen[chosen >= score_u.size] - score_u.size)
