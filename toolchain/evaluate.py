"""Perplexity of a source model in PyTorch, scored by the same windows and arithmetic as packages."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from edgepack.runtime.perplexity import PerplexityResult, perplexity


def torch_forward(model) -> Callable[[list[int]], np.ndarray]:
    import torch

    def forward(window: list[int]) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.tensor([window]), use_cache=False).logits[0].float().numpy()

    return forward


def evaluate_model(spec: str, text: str, context: int, max_windows: int | None = None,
                   progress: Callable[[int], None] | None = None) -> PerplexityResult:
    from edgepack.toolchain import sources

    loaded = sources.load(spec)
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    return perplexity(torch_forward(loaded.model), ids, context, max_windows, progress)
