"""Before loading: does the package's predicted peak memory fit in what this machine has free?

The prediction is the memory model's (``runtime/memory.py``) at the package's full context: a device
build's manifest records the planner's figure, any other package with a recorded model shape is
estimated from its files. Loading anyway is one flag away (``load(..., check_memory=False)``,
``--no-memory-check``): the model is conservative (it assumes a full KV cache), and memory that the
OS would reclaim from caches is counted as available only as far as psutil says so.
"""

from __future__ import annotations

import psutil
from edgepack.runtime.errors import PackageError, ResourceError
from edgepack.runtime.memory import estimate_package
from edgepack.runtime.package import Package
from edgepack.runtime.profiles import MB


def predicted_peak(package: Package, chunk: int = 256) -> int | None:
    """Predicted peak resident bytes of running ``package``, or None when it records too little to say."""
    device = package.manifest.plan.get("device")
    recorded = (device or {}).get("memory", {}).get("peak") if isinstance(device, dict) else None
    if isinstance(recorded, int | float) and recorded > 0:
        return int(recorded)
    try:
        return estimate_package(package.path, chunk=chunk).peak
    except (PackageError, KeyError, TypeError, ValueError):  # built before the manifest recorded a shape
        return None


def available_bytes() -> int:
    return int(psutil.virtual_memory().available)


def check_memory(package: Package, chunk: int = 256) -> None:
    """Raise ``ResourceError`` with the figures when the predicted peak exceeds available memory."""
    peak = predicted_peak(package, chunk)
    if peak is None:
        return
    free = available_bytes()
    if peak > free:
        raise ResourceError(
            f"{package.manifest.name} needs about {peak / MB:.0f} MiB at its full context (predicted peak) but "
            f"only {free / MB:.0f} MiB is available; free memory, build a smaller package "
            "('edgepack build MODEL --device ...'), or load anyway with --no-memory-check "
            "(load(..., check_memory=False))")
