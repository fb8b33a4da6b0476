"""Give back the resident pages of a memory-mapped weights file once onnxruntime has loaded it.

onnxruntime maps external-data weights instead of copying them, but prepacking reads every byte of
the ones it re-lays out, so after loading the whole mapped file is resident and counted in the
process's RSS, although only the weights kept as they are (the embedding table, read a few rows per
token) are used again. ``MADV_PAGEOUT`` (Linux 5.4+) asks the kernel to reclaim those pages now; clean
file pages are dropped and fault back in from the file on their next use, and pages that were
written to are never lost (the hint swaps or keeps them). Best effort: elsewhere it does nothing.

``released_while`` does it *during* the load too, every few milliseconds from a thread (onnxruntime
releases the GIL while it builds a session): the weights are prepacked one after another, so the pages
of those already packed go while the next are read, instead of the whole file being resident at the
load's peak (#7, int4 default model: load peak 236 -> 200-215 MiB, load 0.55 -> 0.7-0.9 s).
``trim_heap`` returns the heap's free pages to the system (glibc), e.g. after a tokenizer's JSON parse.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MADV_PAGEOUT = 21
RELEASE_INTERVAL_S = 0.01


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


@contextmanager
def released_while(path: Path, interval_s: float = RELEASE_INTERVAL_S) -> Iterator[None]:
    """Give back ``path``'s resident pages every ``interval_s`` while the body runs, and once after it."""
    stop = threading.Event()

    def release() -> None:
        while not stop.wait(interval_s):
            release_file_pages(path)

    thread = threading.Thread(target=release, name="edgepack-release-pages", daemon=True)
    if sys.platform.startswith("linux"):
        thread.start()
    try:
        yield
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()
        release_file_pages(path)


def trim_heap() -> bool:
    """Return free heap memory to the system (glibc ``malloc_trim``); False where there is none."""
    try:
        return bool(ctypes.CDLL(None).malloc_trim(0))
    except (OSError, AttributeError):
        return False
