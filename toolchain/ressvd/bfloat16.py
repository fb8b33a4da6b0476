"""Whether this CPU multiplies bfloat16 matrices faster than float32 ones.

The factor tune runs its matrix products under bfloat16 autocast where that pays: with avx512_bf16 it
cut a step from 3.40 to 2.12 CPU-s. Without hardware support torch emulates them: on an AVX2-only AMD
EPYC a 1024×576 by 576×1536 product took 1.57 s in bfloat16 against 0.025 s in float32 (63× slower),
which turned a 3-minute compression into an hour. CPU flags differ by vendor and OS and do not say how
well torch's kernels use them, so the answer is measured once per process on a product of the tune's
shape class.
"""

from __future__ import annotations

import functools
import time

import torch


@functools.cache
def fast() -> bool:
    """True when a bfloat16 matrix product takes less time than the same float32 one."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 384, generator=g), torch.randn(384, 512, generator=g)
    return _best(a.bfloat16(), b.bfloat16()) < _best(a, b)


def _best(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> float:
    a @ b  # first call: kernel selection, allocation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return min(times)
