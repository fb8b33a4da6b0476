"""Decode steps of several packages interleaved step by step in one process: per-step wall and thread CPU time.

    python benchmarks/compression/decode_steps.py PKG_A PKG_B [...] [--steps 200] [--threads 1]

On a shared, loaded machine a slow phase hits every package alike when their steps alternate
(A, B, C, A, B, C, ...; the order rotates each step), so the medians compare them fairly where whole
runs in turn do not. Each package prefills the same prompt, then decodes greedily ``steps`` tokens;
wall time is perf_counter around one ``forward``, CPU time is the process's CPU time over it.
"""

from __future__ import annotations

import argparse
import statistics
import time

from edgepack.runtime.decoder import SessionSettings
from edgepack.runtime.model import load

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _argmax(logits) -> int:
    return int(logits.reshape(-1, logits.shape[-1])[-1].argmax())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("packages", nargs="+")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    models = [load(pkg, verify=False, settings=SessionSettings(threads=args.threads)) for pkg in args.packages]
    caches = [m.decoder.new_cache() for m in models]
    ids = models[0].encode_prompt(PROMPT)
    nxt = [_argmax(m.decoder.forward(ids, c)) for m, c in zip(models, caches)]
    wall: list[list[float]] = [[] for _ in models]
    cpu: list[list[float]] = [[] for _ in models]
    for step in range(args.steps):
        order = [(step + i) % len(models) for i in range(len(models))]
        for i in order:
            c0, t0 = time.process_time(), time.perf_counter()
            logits = models[i].decoder.forward([nxt[i]], caches[i])
            wall[i].append(time.perf_counter() - t0)
            cpu[i].append(time.process_time() - c0)
            nxt[i] = _argmax(logits)
    base_w, base_c = statistics.median(wall[0]), statistics.median(cpu[0])
    for pkg, w, c in zip(args.packages, wall, cpu):
        mw, mc = statistics.median(w), statistics.median(c)
        print(f"{pkg}: median {1000 * mw:.2f} ms wall, {1000 * mc:.2f} ms cpu a step; "
              f"speed vs first x{base_w / mw:.3f} wall, x{base_c / mc:.3f} cpu")


if __name__ == "__main__":
    main()
