"""Paired per-window differences between rows of several probe result files (probe.py's JSON), so a new
candidate is compared with controls measured in earlier runs on the same valid windows without re-running them.

    python benchmarks/deltas/pair.py results/deltas-probe-code-reselect-r1.json \
        results/deltas-probe-code-prune32-r1.json --reference mag --rank 1

Rows are matched by (rank, candidate); a candidate found in several files must have the same per-window NLL
in each (a check that the runs are comparable: same windows, same deltas). Prints, for every candidate, its
Δ valid NLL and Δ KL against ``--reference`` (mean ± s.e. over windows; negative = better).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def rows(paths: list[Path], rank: int) -> dict[str, dict]:
    """Candidate → row at ``rank`` across ``paths``; a repeated candidate must agree window by window."""
    out: dict[str, dict] = {}
    for path in paths:
        for row in json.loads(path.read_text()):
            if row["rank"] != rank:
                continue
            name = row["candidate"]
            if name in out and not np.allclose(out[name]["window_nll"], row["window_nll"], atol=2e-6):
                raise SystemExit(f"{name} differs between runs ({path}): the files are not comparable")
            out.setdefault(name, row)
    return out


def paired(a: list[float], b: list[float]) -> str:
    d = np.asarray(a) - np.asarray(b)
    return f"{d.mean():+.4f} ± {d.std(ddof=1) / math.sqrt(len(d)):.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--reference", default="mag")
    parser.add_argument("--also", nargs="*", default=[], help="further references to pair every candidate against")
    args = parser.parse_args()
    found = rows(args.files, args.rank)
    refs = [args.reference, *args.also]
    header = ["candidate", "valid NLL", *(f"Δ NLL vs {r}" for r in refs), f"Δ KL vs {args.reference}"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name, row in found.items():
        cells = [name, f'{row["valid_nll"]:.5f}', *(paired(row["window_nll"], found[r]["window_nll"]) for r in refs),
                 paired(row["window_kl"], found[args.reference]["window_kl"])]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
