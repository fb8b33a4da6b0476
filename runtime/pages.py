"""Give back the resident pages of a memory-mapped weights file once onnxruntime has loaded it.

onnxruntime maps external-data weights instead of copying them, but prepacking reads every byte of
the ones it re-lays out, so after loading the whole mapped file is resident and counted in the
process's RSS, although only the weights kept as they are (the embedding table, read a few rows per
token) are used again. ``MADV_PAGEOUT`` (Linux 5.4+) asks the kernel to reclaim those pages now; clean
file pages are dropped and fault back in from the file on their next use, and pages that were
written to are never lost (the hint swaps or keeps them). Best effort: elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MADV_PAGEOUT = 21


def release_file_pages(path: Path) -> int:
    """Ask the kernel to reclaim this process's resident pages mapped from ``path``; return the
    bytes of mappings advised (0 where unsupported)."""
    if not sys.platform.startswith("linux"):
        return 0
    target = os.path.realpath(path)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        madvise = libc.madvise
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[5].rstrip("\n") != target:
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised
