"""Expected quality cost of a plan: held-out perplexity relative to the float32 package.

Measured with the runtime on the first 20 evaluation windows of the default model (``edgepack eval PKG
--max-windows 20``): float32 14.78. Fused graph: int4 14.85 (×1.005: the source weights are Q4_1, which the
fused int4 layout holds exactly); ResSVD at the planner's k (⌈2·N·ratio⌉ last layers) built as the planner
builds it (``edgepack build default --ratio R --int4``: propagation, then the 64-step factor tune through the
package's int4 rounding) 18.90 / 22.97 / 26.68 / 31.19 at 10 / 20 / 30 / 40 % (a further ×1.273 / 1.546 /
1.796 / 2.100). optimum's all-int4 device layout (int4 embedding too; what device builds make on that graph):
19.49 (×1.32), and with ResSVD 20 % (the factor tune in float32: optimum's quantizer rounds the factors) 33.23
(a further ×1.705). Ratios between measured points are interpolated log-linearly in the compression ratio and
extrapolated past the last one; dtype and compression costs multiply (the ratio costs are measured on int4
packages, so slightly pessimistic for float32 ones). These are estimates for ranking plans, recorded as such
in the plan. (Stop 14; the 20 % points were ×2.07 / ×1.97 before the factor tune existed.)
"""

from __future__ import annotations

import math

# perplexity multiplier vs. the float32 package, by graph and dtype (measured on the default model)
DTYPE_COST = {"fused": {"float32": 1.0, "int4": 1.005}, "optimum": {"float32": 1.0, "int4": 1.32}}
# perplexity multiplier vs. uncompressed, by graph and ResSVD ratio (measured points; others inter/extrapolated)
RATIO_COST = {"fused": {0.0: 1.0, 0.1: 1.273, 0.2: 1.546, 0.3: 1.796, 0.4: 2.100}, "optimum": {0.0: 1.0, 0.2: 1.705}}


def basis(graph: str) -> str:
    cost = DTYPE_COST[graph]["int4"], RATIO_COST[graph][0.2]
    measured = ", ".join(f"{r:.0%}" for r in sorted(RATIO_COST[graph]) if r > 0)
    return (f"measured on 20 windows ({graph} graph): int4 ×{cost[0]:g}, ResSVD 20 % ×{cost[1]:g} (ResSVD measured "
            f"at {measured}; other ratios log-linear through them)")


BASIS = basis("optimum")


def ratio_cost(ratio: float, graph: str = "optimum") -> float:
    """Log-linear in the ratio through the measured points (extrapolated past the last one)."""
    if ratio <= 0:
        return 1.0
    points = sorted(RATIO_COST[graph].items())
    pairs = list(zip(points, points[1:]))
    (r0, c0), (r1, c1) = next((p for p in pairs if ratio <= p[1][0]), pairs[-1])
    slope = (math.log(c1) - math.log(c0)) / (r1 - r0)
    return math.exp(math.log(c0) + slope * (ratio - r0))


def expected_cost(dtype: str, ratio: float, graph: str = "optimum") -> float:
    return DTYPE_COST[graph][dtype] * ratio_cost(ratio, graph)
