"""Expected quality cost of a plan: held-out perplexity relative to the float32 package.

Measured with the runtime on the first 20 evaluation windows (``benchmarks/devices/run.py``):
float32 14.78, the all-int4 device layout 19.49 (×1.32), and that layout with ResSVD 20 % over the last
12 layers (the planner's k) 55.0 (×3.72 = 1.32 × 2.82). Ratios between measured points are
interpolated log-linearly in the compression ratio and extrapolated past 0.2; dtype and compression
costs multiply. These are estimates for ranking plans, recorded as such in the plan.
"""

from __future__ import annotations

import math

# perplexity multiplier vs. the float32 package, by dtype (measured on the default model)
DTYPE_COST = {"float32": 1.0, "int4": 1.32}
# perplexity multiplier vs. uncompressed, by ResSVD ratio (0.2 measured; others interpolated/extrapolated)
RATIO_COST = {0.0: 1.0, 0.2: 2.82}
BASIS = "measured on 20 windows: int4 ×1.32, ResSVD 20 % ×2.82; other ratios extrapolated log-linearly"


def ratio_cost(ratio: float) -> float:
    """Log-linear in the ratio through the measured points (extrapolated past the last one)."""
    if ratio <= 0:
        return 1.0
    points = sorted(RATIO_COST.items())
    pairs = list(zip(points, points[1:]))
    (r0, c0), (r1, c1) = next((p for p in pairs if ratio <= p[1][0]), pairs[-1])
    slope = (math.log(c1) - math.log(c0)) / (r1 - r0)
    return math.exp(math.log(c0) + slope * (ratio - r0))


def expected_cost(dtype: str, ratio: float) -> float:
    return DTYPE_COST[dtype] * ratio_cost(ratio)
