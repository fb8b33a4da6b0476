"""Storage accounting of a compressed delta, in bits, as OSD (arXiv 2511.02681) counts it.

One accounting for every method so they compare at equal size: a dense factor value costs 32 bits;
a kept sparse entry costs its 32-bit value plus an index of ⌈log2(entries of its factor)⌉ bits.
The budget of a layer is what TruncSVD at rank r spends on it: 32·r·(n + d) bits for an n×d delta.
What the file takes on disk (float16 values, int32 indices) is reported separately.
"""

from __future__ import annotations

import math

VALUE_BITS = 32


def index_bits(entries: int) -> int:
    """Bits of an index into a factor of ``entries`` values."""
    return max(1, math.ceil(math.log2(entries))) if entries > 1 else 1


def dense_bits(n_out: int, n_in: int, rank: int) -> int:
    """TruncSVD's cost: both factors stored densely."""
    return VALUE_BITS * rank * (n_out + n_in)


def entry_bits(n_out: int, n_in: int, rank: int) -> tuple[int, int]:
    """Cost of one kept entry of U (n_out×rank) and of V (n_in×rank)."""
    return VALUE_BITS + index_bits(n_out * rank), VALUE_BITS + index_bits(n_in * rank)


def sparse_bits(n_out: int, n_in: int, rank: int, kept_u: int, kept_v: int) -> int:
    """Cost of a sparse factor pair keeping ``kept_u`` entries of U and ``kept_v`` of V."""
    cost_u, cost_v = entry_bits(n_out, n_in, rank)
    return cost_u * kept_u + cost_v * kept_v


def tensor_bits(numel: int) -> int:
    """A parameter stored densely (norms, biases that changed)."""
    return VALUE_BITS * numel
