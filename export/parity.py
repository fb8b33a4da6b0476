"""Logit parity between the PyTorch model and the exported graph, run through the runtime itself.

For each prompt: the prefill logits of every position, then ``decode_steps`` single-token steps
that reuse the KV cache, feeding both sides the same (PyTorch's greedy) token.

Tolerance (float32): the exported graph computes the same float32 arithmetic in another order
(fused kernels, other matmul blocking), so differences are rounding, which grows with depth and
with the size of the logits. We scale it to the logits: ``max|Δ| ≤ rtol · max|logits|`` with
rtol = 1e-3, i.e. a thousandth of the logit range (about 0.02 on a model whose logits reach 20,
two orders above what measured rounding gives, and far below what any real export bug gives:
a wrong rotary, mask or cache slot moves logits by whole units). Top-1 agreement is reported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from edgepack.runtime.decoder import Decoder
from edgepack.runtime.errors import ParityError

RTOL = 1e-3


DECODE_STEPS = 3  # single-token steps after each prompt's prefill

@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    top1_agreement: float  # share of compared positions whose argmax agrees
    positions: int
    prompts: int
    decode_steps: int

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def _torch_steps(model: Any, prompt: Sequence[int], decode_steps: int) -> tuple[list[np.ndarray], list[int]]:
    """PyTorch logits for the prefill and each decode step, and the greedy tokens fed."""
    import torch

    with torch.inference_mode():
        out = model(torch.tensor([list(prompt)]), use_cache=True)
        logits = [out.logits[0].float().numpy()]
        past, fed = getattr(out, "past_key_values", None), []
        for _ in range(decode_steps):
            token = int(logits[-1][-1].argmax())
            fed.append(token)
            if past is None:  # a model whose cache is not a KV cache (Mamba's): the whole sequence again
                out = model(torch.tensor([[*prompt, *fed]]))
                logits.append(out.logits[0, -1:].float().numpy())
                continue
            out = model(torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[0].float().numpy())
    return logits, fed


def compare(model: Any, onnx_path: Path, prompts: Sequence[Sequence[int]], decode_steps: int = DECODE_STEPS,
            rtol: float = RTOL, decoder_class: type = Decoder) -> ParityReport:
    """``decoder_class`` is the runtime decoder of the graph's kind (``fused_decoder.decoder_class``)."""
    decoder = decoder_class(onnx_path)
    diffs, peaks, agree, total = [], [], 0, 0
    for prompt in prompts:
        reference, fed = _torch_steps(model, prompt, decode_steps)
        cache = decoder.new_cache()
        ours = [decoder.forward(list(prompt), cache, all_logits=True)]
        ours += [decoder.forward([t], cache, all_logits=True) for t in fed]
        for ref, got in zip(reference, ours):
            diffs.append(float(np.abs(ref - got).max()))
            peaks.append(float(np.abs(ref).max()))
            agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
            total += ref.shape[0]
    peak = max(peaks)
    return ParityReport(
        max_abs_diff=max(diffs), max_abs_logit=peak, tolerance=rtol * peak,
        top1_agreement=agree / total, positions=total, prompts=len(prompts), decode_steps=decode_steps,
    )


def check(model: Any, onnx_path: Path, prompts: Sequence[Sequence[int]], decode_steps: int = DECODE_STEPS,
          decoder_class: type = Decoder) -> ParityReport:
    """Compare and raise ``ParityError`` past the tolerance."""
    report = compare(model, onnx_path, prompts, decode_steps, decoder_class=decoder_class)
    if not report.passed:
        raise ParityError(
            f"exported model differs from PyTorch: max |Δlogit| {report.max_abs_diff:.4g} > "
            f"tolerance {report.tolerance:.4g} (top-1 agreement {report.top1_agreement:.1%}); "
            "the export is wrong for this architecture, please report it"
        )
    return report
