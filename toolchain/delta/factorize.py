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
from edgepack.toolchain.ressvd.factorize import one_thread

_CACHED_RANK = 32  # singular triplets kept per matrix by a cache: enough for r + c at every budget tried


def svd_factors(delta: torch.Tensor, rank: int, cache: dict | None = None,
                whiten: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [n_out, k], V [n_in, k]) with ΔW ≈ U·Vᵀ; √σ folded into each so both have the same scale
    (magnitude selection compares entries of U with entries of V). ``cache`` keeps the leading
    singular triplets of each delta, so trying several ranks factors each matrix once.

    ``whiten``: a lower-triangular S with S·Sᵀ = the layer's input X·Xᵀ. Then ΔW·S is truncated, which
    minimizes the error of the layer's outputs on those inputs instead of the weights' (SVD-LLM's
    idea applied to the delta), and V is mapped back through S⁻ᵀ."""
    rank = min(rank, *delta.shape)
    key = ("svd", id(delta), whiten is not None)
    if cache is None or key not in cache or cache[key][1].numel() < rank:
        target = delta.double() if whiten is None else delta.double() @ whiten
        with one_thread():
            u, s, vh = torch.linalg.svd(target, full_matrices=False)
        keep = max(rank, _CACHED_RANK)
        triplet = (u[:, :keep].clone(), s[:keep].clone(), vh[:keep].clone())
        if cache is not None:
            cache[key] = triplet
    else:
        triplet = cache[key]
    u, s, vh = triplet
    root = s[:rank].sqrt()
    v = vh[:rank].T * root
    if whiten is not None:
        with one_thread():
            v = torch.linalg.solve_triangular(whiten.T, v, upper=True)
    return (u[:, :rank] * root).float(), v.float()


def dense_layer(name: str, u: torch.Tensor, v: torch.Tensor) -> LayerDelta:
    """TruncSVD: the factors (from ``svd_factors`` at rank r), stored densely."""
    (n_out, k), n_in = u.shape, v.shape[0]
    return LayerDelta(name, n_out, n_in, k, FactorData(u.numpy().ravel()), FactorData(v.numpy().ravel()),
                      budget.dense_bits(n_out, n_in, k))


def sparse_layer(name: str, u: torch.Tensor, v: torch.Tensor, score_u: torch.Tensor, score_v: torch.Tensor,
                 budget_bits: int) -> LayerDelta:
    """Keep the entries of U and V with the highest score per bit within ``budget_bits``."""
    n_out, k = u.shape
    cost_u, cost_v = budget.entry_bits(n_out, v.shape[0], k)
    keep_u, keep_v = select(score_u.ravel().numpy(), score_v.ravel().numpy(), cost_u, cost_v, budget_bits)
    layer = kept_layer(name, u, v, keep_u, keep_v)
    assert layer.bits <= budget_bits, "selection overspent its budget"
    return layer


def select_global(layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
                  budget_bits: int) -> dict[str, LayerDelta]:
    """One budget for all layers: the entries of every layer's U and V compete on score per bit, so a
    layer whose delta matters more to the loss gets more of the bytes. Needs scores on one scale
    across layers (an estimate of the loss change, like Taylor importance), not magnitudes.
    ``layers``: name → (U, V, score of U, score of V)."""
    names, ratios, costs, owners = [], [], [], []
    for i, (name, (u, v, score_u, score_v)) in enumerate(layers.items()):
        cost_u, cost_v = budget.entry_bits(u.shape[0], v.shape[0], u.shape[1])
        names.append(name)
        for score, cost in ((score_u, cost_u), (score_v, cost_v)):
            flat = score.ravel().double().numpy()
            ratios.append(flat / cost)
            costs.append(np.full(flat.size, cost))
        owners.append(i)
    ratio, cost = np.concatenate(ratios), np.concatenate(costs)
    order = np.argsort(-ratio, kind="stable")
    chosen = np.zeros(ratio.size, bool)
    chosen[order[np.cumsum(cost[order]) <= budget_bits]] = True
    out, start = {}, 0
    for name in names:
        u, v, _, _ = layers[name]
        end_u = start + u.numel()
        end_v = end_u + v.numel()
        keep_u, keep_v = np.flatnonzero(chosen[start:end_u]), np.flatnonzero(chosen[end_u:end_v])
        out[name] = kept_layer(name, u, v, keep_u, keep_v)
        start = end_v
    return out


def kept_layer(name: str, u: torch.Tensor, v: torch.Tensor, keep_u: np.ndarray, keep_v: np.ndarray) -> LayerDelta:
    """The sparse factor pair holding the entries at ``keep_u`` / ``keep_v`` (flat indices)."""
    n_out, k = u.shape
    n_in = v.shape[0]
    factor_u = FactorData(u.numpy().ravel()[keep_u], keep_u.astype(np.int64))
    factor_v = FactorData(v.numpy().ravel()[keep_v], keep_v.astype(np.int64))
    return LayerDelta(name, n_out, n_in, k, factor_u, factor_v,
                      budget.sparse_bits(n_out, n_in, k, keep_u.size, keep_v.size))


def select(score_u: np.ndarray, score_v: np.ndarray, cost_u: int, cost_v: int,
           budget_bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted flat indices of the kept entries of U and V: highest score per bit first, until the budget."""
    scores = np.concatenate([score_u / cost_u, score_v / cost_v]).astype(np.float64)
    costs = np.concatenate([np.full(score_u.size, cost_u), np.full(score_v.size, cost_v)])
    order = np.argsort(-scores, kind="stable")
    spent = np.cumsum(costs[order])
    chosen = order[spent <= budget_bits]
    return np.sort(chosen[chosen < score_u.size]), np.sort(chosen[chosen >= score_u.size] - score_u.size)


def refit(delta: torch.Tensor, layer: LayerDelta, sweeps: int = 2) -> LayerDelta:
    """Re-solve the kept entries' values for the least ‖ΔW − U·Vᵀ‖ with the sparsity pattern fixed
    (alternating least squares: U with V fixed, then V with U fixed). Zeroing entries leaves the
    survivors fitted to the factors they lived in; re-solving spends the same bits better."""
    if layer.u.index is None:
        return layer
    u_np, v_np = layer.factors()
    u, v = torch.from_numpy(u_np).double(), torch.from_numpy(v_np).double()
    mask_u, mask_v = (u != 0).double(), (v != 0).double()
    target = delta.double()
    for _ in range(sweeps):
        u = _masked_lstsq(target, v, mask_u)
        v = _masked_lstsq(target.T, u, mask_v)
    keep_u, keep_v = layer.u.index, layer.v.index
    return LayerDelta(layer.name, layer.n_out, layer.n_in, layer.rank,
                      FactorData(u.float().numpy().ravel()[keep_u], keep_u),
                      FactorData(v.float().numpy().ravel()[keep_v], keep_v), layer.bits)


def _masked_lstsq(target: torch.Tensor, other: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rows x_i minimizing ‖target[i] − x_i·otherᵀ‖ with x_i zero where mask[i] is: one batched solve
    of each row's normal equations restricted to its kept entries (identity rows elsewhere)."""
    gram = other.T @ other  # [k, k]
    rhs = (target @ other) * mask  # [rows, k]
    systems = mask[:, :, None] * gram[None] * mask[:, None, :] + torch.diag_embed(1 - mask)
    systems = systems + 1e-10 * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(systems, rhs[:, :, None])[:, :, 0] * mask
