"""Counts for the reliability report: fuzz inputs and injected faults, appended to the file named by
``$EDGEPACK_RELIABILITY_LOG`` (one line per event) when it is set; a no-op otherwise."""

from __future__ import annotations

import os

ENV = "EDGEPACK_RELIABILITY_LOG"


def count(kind: str, n: int = 1) -> None:
    path = os.environ.get(ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:  # O_APPEND: safe from several processes
            f.write(f"{kind} {n}\n")


def totals(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            for line in f:
                kind, _, n = line.partition(" ")
                out[kind] = out.get(kind, 0) + int(n)
    return out
