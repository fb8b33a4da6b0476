"""``edgepack delta --auto``: choose OSD's rank relaxation c and its budget allocation by validation loss.

The paper leaves c and the sparsity hand-set (its stated future work). Here each candidate, c in
{r, 2r, 3r} × allocation per layer / global, is built at the same budget and scored by the mean
token loss of base + delta on the validation windows; the lowest wins, and every trial is recorded
in the delta's metadata. Global allocation is where the per-layer sparsity gets chosen: layers whose
delta matters more to the loss keep more entries.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import torch
from edgepack.runtime.delta_file import Delta
from edgepack.runtime.errors import UsageError
from edgepack.toolchain.delta import extract
from edgepack.toolchain.delta.make import DeltaConfig, compress
from edgepack.toolchain.delta.merge import merged


def auto(model: torch.nn.Module, raw: extract.RawDelta, config: DeltaConfig, windows: list[list[int]],
         cache: dict | None = None) -> Delta:
    if config.method != "osd":
        raise UsageError("--auto tunes OSD; TruncSVD and MagTruncSVD have nothing to choose")
    if not windows:
        raise UsageError("--auto chooses by validation loss: pass --valid FILE")
    trials, best = [], None
    cache = {} if cache is None else cache
    for relax in sorted({config.rank, 2 * config.rank, 3 * config.rank}):
        for allocation in ("layer", "global"):
            scored = config.importance if config.importance in ("taylor", "fisher", "rms") else "fisher"
            # Trials untuned: the tune costs far more than a trial, so only the winner gets it.
            candidate = dataclasses.replace(config, relax=relax, allocation=allocation, importance=scored, auto=False,
                                            tune_steps=0)
            delta = compress(model, raw, candidate, windows, cache)
            loss = validation_loss(model, delta, windows)
            trials.append({"relax": relax, "allocation": allocation, "validation_loss": round(loss, 5)})
            print(f"edgepack: --auto c={relax} allocation={allocation}: validation loss {loss:.4f}", file=sys.stderr)
            if best is None or loss < best[0]:
                best = (loss, delta, candidate)
    if config.tune_steps != 0:
        tuned = dataclasses.replace(best[2], tune_steps=config.tune_steps)
        best = (best[0], compress(model, raw, tuned, windows, cache), tuned)
    return dataclasses.replace(best[1], info={**best[1].info, "auto": trials})


def validation_loss(model: torch.nn.Module, delta: Delta, windows: Sequence[Sequence[int]]) -> float:
    """Mean token loss of ``model`` with ``delta`` merged, over ``windows``."""
    with merged(model, delta), torch.no_grad():
        losses = [float(model(torch.tensor([list(w)]), labels=torch.tensor([list(w)]), use_cache=False).loss)
                  for w in windows]
    return sum(losses) / len(losses)
