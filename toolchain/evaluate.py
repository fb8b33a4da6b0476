"""Perplexity of a source model in PyTorch, scored by the same windows and arithmetic as packages."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from edgepack.runtime.errors import UsageError
from edgepack.runtime.perplexity import PerplexityResult, perplexity


def torch_forward(model) -> Callable[[list[int]], np.ndarray]:
    import torch

    def forward(window: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.tensor([window]), use_cache=False).logits[0].float().numpy()

    return forward


def evaluate_model(spec: str, text: str, context: int | None, max_windows: int | None = None,
                   progress: Callable[[int], None] | None = None, default_context: int = 512) -> PerplexityResult:
    """``context`` None: ``default_context`` capped by the model's positions, as a package's eval caps it."""
    from edgepack.toolchain import sources

    loaded = sources.load(spec)
    context = window_length(context, getattr(loaded.model.config, "max_position_embeddings", None), default_context)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return perplexity(torch_forward(loaded.model), ids, context, max_windows, progress)


def window_length(requested: int | None, positions: int | None, default: int) -> int:
    """The eval window within the model's positions: past them a learned position table (GPT-2, OPT) has no row
    (an IndexError) and rotary models run beyond what they were trained on."""
    if requested is None:
        return min(default, positions) if positions else default
    if positions and requested > positions:
        raise UsageError(f"--context {requested} is longer than this model's {positions} positions; pass --context "
                         f"{positions} or less")
    return requested
