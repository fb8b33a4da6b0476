"""Perplexity of a package on a text, in the runtime (numpy + onnxruntime), so the figure describes
exactly what ships. Non-overlapping windows of ``context`` tokens; each window starts fresh."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from edgepack.runtime.errors import UsageError


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    tokens: int  # tokens scored
    windows: int
    context: int

    @property
    def nll(self) -> float:
        return math.log(self.perplexity)


def windows(ids: Sequence[int], context: int, max_windows: int | None = None) -> list[list[int]]:
    if context < 2:
        raise UsageError(f"--context must be at least 2 tokens, got {context}")
    out = [list(ids[i:i + context]) for i in range(0, len(ids) - 1, context)]
    out = [w for w in out if len(w) >= 2]
    if not out:
        raise UsageError("the text is too short to measure perplexity (needs at least 2 tokens)")
    return out[:max_windows] if max_windows else out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under each row of logits, in float64."""
    x = logits.astype(np.float64)
    peak = x.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(x - peak).sum(axis=-1)) + peak[:, 0]
    return log_z - x[np.arange(len(targets)), targets]


def perplexity(forward: Callable[[list[int]], np.ndarray], ids: Sequence[int], context: int,
               max_windows: int | None = None, progress: Callable[[int], None] | None = None) -> PerplexityResult:
    """``forward(window)`` returns logits for every position of ``window`` (2-D)."""
    total, count = 0.0, 0
    parts = windows(ids, context, max_windows)
    for window in parts:
        logits = forward(window)
        nll = token_nll(logits[:-1], np.asarray(window[1:]))
        total += float(nll.sum())
        count += nll.size
        if progress:
            progress(1)
    return PerplexityResult(math.exp(total / count), count, len(parts), context)
