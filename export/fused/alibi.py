"""ALiBi (MPT, BLOOM) in the fused graph: GroupQueryAttention's ``attention_bias`` input, one tensor a step for
every layer.

The bias of a query on key j is slope_h · (j - (total - 1)): a linear function of the key's distance from the last
position. Softmax ignores a shift that is the same for a whole row, so this equals both MPT's slope · (j - last)
and BLOOM's slope · j, and keeps the values small next to the latest keys. GroupQueryAttention adds the bias after
its scale, as both models do, and wants it as [1, heads, S, total] (it broadcasts neither axis), so the per-head
row is expanded over this step's S queries; the causal mask is its own.
"""

from __future__ import annotations

import numpy as np
from edgepack.export.fused.builder import FLOAT, GraphBuilder


def alibi_bias(b: GraphBuilder, ids: str, total: str, slopes: tuple[float, ...]) -> str:
    """The [1, heads, S, total] ALiBi bias of this step's queries (``ids`` [1, S]) on all ``total`` keys."""
    last = b.op1("Cast", [b.op1("Sub", [b.const(1, np.int32), total], "alibi/first")], "alibi/first_f", to=FLOAT)
    keys = b.op1("Range", [last, b.const(np.float32(1.0), np.float32), b.const(np.float32(1.0), np.float32)],
                 "alibi/keys")  # 1 - total, ..., 0
    slope = b.const(np.asarray(slopes, np.float32).reshape(1, -1, 1, 1), np.float32)
    rows = b.op1("Mul", [slope, keys], "alibi/rows")  # [1, heads, 1, total]
    steps = b.op1("Shape", [ids], "alibi/steps", start=1, end=2)
    shape = b.op1("Concat", [b.const([1, 1]), steps, b.const([1])], "alibi/shape", axis=0)
    return b.op1("Expand", [rows, shape], "alibi/bias")
