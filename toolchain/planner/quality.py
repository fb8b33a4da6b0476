"""Expected quality cost of a plan: held-out perplexity relative to the float32 package.

Measured points (README): int4 of the device layout (every weight int4, block 32) and ResSVD at 20 %
(PyTorch perplexity, 40 windows). Ratios between measured points are interpolated log-linearly in
the compression ratio (ResSVD's error grows smoothly with the removed share); the dtype and the
compression costs multiply. These are estimates for ranking plans, recorded as such in the plan.
"""

from __future__ import annotations

import math

# perplexity multiplier vs. the float32 package, by dtype (measured on the default model)
DTYPE_COST = {"float32": 1.0, "int4": 1.21}
# perplexity multiplier vs. dense, by ResSVD ratio: 0.2 measured (14.93 → 29.39); others interpolated
RATIO_COST = {0.0: 1.0, 0.2: 1.97}
BASIS = "int4: measured package perplexity; ResSVD 0.2: measured (PyTorch, 40 windows); other ratios extrapolated"


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
