"""ALiBi (MPT, BLOOM, Falcon-RW) in the fused graph: GroupQueryAttention's ``attention_bias`` input, one tensor a
step for every layer.

The bias of a query on key j is slope_h · (j - (total - 1)): a linear function of the key's distance from the last
position. Softmax ignores a shift that is the same for a whole row, so this equals both MPT's slope · (j - last)
and BLOOM's slope · j, and keeps the values small next to the latest keys. Falcon's differs in two ways the graph
copies: transformers rounds slope · j (j from the first position) to bfloat16, and adds it before the scores'
1 / sqrt(head_dim), so the bias is scaled too. GroupQueryAttention adds the bias after its scale, and wants it as
[1, heads, S, total] (it broadcasts neither axis), so the per-head row is expanded over this step's S queries; the
causal mask is its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from edgepack.export.fused.builder import FLOAT, GraphBuilder

BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


@dataclass(frozen=True)
class Alibi:
    slopes: tuple[float, ...]  # per head
    scale: float = 1.0  # the bias is multiplied by this (Falcon: the scores' 1 / sqrt(head_dim))
    bfloat16: bool = False  # slope · j, j from the first position, rounded to bfloat16 (Falcon)


def alibi_bias(b: GraphBuilder, ids: str, total: str, alibi: Alibi) -> str:
    """The [1, heads, S, total] ALiBi bias of this step's queries (``ids`` [1, S]) on all ``total`` keys."""
    one = b.const(np.float32(1.0), np.float32)
    if alibi.bfloat16:
        first = b.const(np.float32(0.0), np.float32)
        limit = b.op1("Cast", [total], "alibi/total", to=FLOAT)  # keys 0, ..., total - 1
    else:
        first = b.op1("Cast", [b.op1("Sub", [b.const(1, np.int32), total], "alibi/first")], "alibi/first_f", to=FLOAT)
        limit = one  # keys 1 - total, ..., 0
    keys = b.op1("Range", [first, limit, one], "alibi/keys")
    slope = b.const(np.asarray(alibi.slopes, np.float32).reshape(1, -1, 1, 1), np.float32)
    rows = b.op1("Mul", [slope, keys], "alibi/rows")  # [1, heads, 1, total]
    if alibi.bfloat16:
        rows = b.op1("Cast", [b.op1("Cast", [rows], "alibi/round", to=BFLOAT16)], "alibi/rounded", to=FLOAT)
    if alibi.scale != 1.0:
        rows = b.op1("Mul", [rows, b.const(np.float32(alibi.scale), np.float32)], "alibi/scaled")
    steps = b.op1("Shape", [ids], "alibi/steps", start=1, end=2)
    shape = b.op1("Concat", [b.const([1, 1]), steps, b.const([1])], "alibi/shape", axis=0)
    return b.op1("Expand", [rows, shape], "alibi/bias")
