"""Joint factorization of the linear layers that read the same input (q/k/v; gate/up).

The stacked matrix [W_q; W_k; W_v] is truncated once, W ≈ A·B, with one shared in→r factor B and the
stacked r→out factor A = [A_q; A_k; A_v]: a joint rank r costs r·(in + Σout) parameters. In PyTorch each
member stays a drop-in ``Sequential(B, A_i)`` whose first module is the very same ``nn.Linear`` object
in every member (so it is trained, saved and counted once); the fused exporter sees that and emits the
group as two ops, B then the stacked A, instead of one op for the B's plus one per member (#4: at ~7 ms a
token, decoding a factorized layer is dominated by per-op overhead, not by its arithmetic).

The compression record lists each joint group under ``"groups"``; its members' ``"ranks"`` are the joint rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from edgepack.toolchain.ressvd import selection
from torch import nn

# Target names that read one tensor in the Llama family: q/k/v the attention norm's output, gate/up the MLP's.
JOINT_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

Linears = Sequence[Sequence[tuple[str, nn.Linear]]]


def groups_of(names: Sequence[str]) -> list[list[str]]:
    """The joint groups among module ``names`` (full names): members of one parent module whose last
    name parts are all of a ``JOINT_GROUPS`` entry, in that entry's order. Partial groups stay separate."""
    present = set(names)
    parents = dict.fromkeys(n.rpartition(".")[0] for n in names)
    out = []
    for parent in parents:
        for members in JOINT_GROUPS:
            full = [f"{parent}.{m}" for m in members]
            if all(f in present for f in full):
                out.append(full)
    return out


def joint_rank(shapes: Sequence[tuple[int, int]], layer_ratio: float) -> int:
    """Rank r keeping a share (1 − ratio) of the group's parameters, at r·(in + Σout) for the pair.
    ``shapes``: (out, in) of each member; they share ``in``."""
    n_in = shapes[0][1]
    outs = sum(o for o, _ in shapes)
    return max(1, int((1.0 - layer_ratio) * outs * n_in // (outs + n_in)))


def last_k_ranks(per_layer: Linears, ratio: float, k: int) -> tuple[dict[str, int], list[list[str]]]:
    """``selection.last_k_ranks`` with every joint group of the last ``k`` layers at its joint rank;
    returns the ranks and the groups."""
    layer_ratio = selection.last_k_ratio(per_layer, ratio, k)
    ranks = selection.last_k_ranks(per_layer, ratio, k)
    modules = {n: m for layer in per_layer for n, m in layer}
    groups = groups_of(list(ranks))
    for group in groups:
        r = joint_rank([(modules[n].out_features, modules[n].in_features) for n in group], layer_ratio)
        ranks.update(dict.fromkeys(group, r))
    return ranks, groups


def shared_pairs(a: torch.Tensor, b: torch.Tensor, outs: Sequence[int], biases: Sequence[torch.Tensor | None],
                 dtype: torch.dtype) -> list[nn.Sequential]:
    """``Sequential(B, A_i)`` per member, A = [A_1; A_2; ...] split by ``outs``, B one shared module."""
    first = nn.Linear(b.shape[1], b.shape[0], bias=False, dtype=dtype)
    with torch.no_grad():
        first.weight.copy_(b.to(dtype))
    pairs = []
    for a_i, bias in zip(torch.split(a, list(outs)), biases):
        second = nn.Linear(b.shape[0], a_i.shape[0], bias=bias is not None, dtype=dtype)
        with torch.no_grad():
            second.weight.copy_(a_i.to(dtype))
            if bias is not None:
                second.bias.copy_(bias.to(dtype))
        pairs.append(nn.Sequential(first, second))
    return pairs


def empty_shared_pairs(shapes: Sequence[tuple[int, int]], rank: int, biases: Sequence[bool],
                       dtype: torch.dtype) -> list[nn.Sequential]:
    """The structure ``shared_pairs`` makes, uninitialized (storage.load fills it)."""
    first = nn.Linear(shapes[0][1], rank, bias=False, dtype=dtype)
    return [nn.Sequential(first, nn.Linear(rank, out, bias=bias, dtype=dtype))
            for (out, _), bias in zip(shapes, biases)]

