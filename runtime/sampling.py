"""Choosing the next token from logits: greedy, temperature, top-k, top-p, with a seeded RNG."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from edgepack.runtime.errors import UsageError


@dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0`` means greedy decoding; ``top_k == 0`` and ``top_p == 1`` disable those."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config
        self._rng = np.random.default_rng(config.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token from a 1-D row of logits."""
        cfg = self.config
        if cfg.greedy:
            return int(np.argmax(logits))
        scores = logits.astype(np.float64) / cfg.temperature
        if cfg.top_k and cfg.top_k < scores.size:
            kth = np.partition(scores, -cfg.top_k)[-cfg.top_k]
            scores = np.where(scores < kth, -np.inf, scores)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cumulative = np.cumsum(probs[order])
            # Keep the smallest prefix whose mass reaches top_p (always at least one token).
            cut = int(np.searchsorted(cumulative, cfg.top_p)) + 1
            keep = np.zeros_like(probs, dtype=bool)
            keep[order[:cut]] = True
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        return int(self._rng.choice(probs.size, p=probs))
