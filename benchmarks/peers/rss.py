"""Peak RSS of peers under run.py's request sequence, one worker at a time (no timing, no contention).

    python benchmarks/peers/rss.py [--package PKG ...] [--gguf FILE] [--rounds 3]

Each system runs in a fresh worker.py process (as in run.py): load, the warm-up (39-token prompt, 4
tokens; 256-token prompt, 1 token), then ``--rounds`` rounds of (1 token, 64 tokens, 256-token prompt),
printing the worker's VmHWM (MB) after each request, so one sees which step sets the peak.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

WORKER = Path(__file__).resolve().parent / "worker.py"
SHORT, LONG = list(range(1000, 1039)), list(range(2000, 2256))  # token ids; RSS does not depend on which


def sequence(kind: str, path: Path, rounds: int, threads: int, context: int) -> list[tuple[str, float]]:
    cmd = [sys.executable, str(WORKER), kind, str(path), "--threads", str(threads), "--context", str(context)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def request(**body: object) -> dict:
        proc.stdin.write(json.dumps(body) + "\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    steps = [("load", json.loads(proc.stdout.readline())["rss"] / 1e6)]
    plan = [("warm 39+4", SHORT, 4), ("warm 256+1", LONG, 1)]
    plan += [(f"r{r + 1} {name}", p, n) for r in range(rounds)
             for name, p, n in (("39+1", SHORT, 1), ("39+64", SHORT, 64), ("256+1", LONG, 1))]
    for name, prompt, n in plan:
        request(prompt=prompt, new_tokens=n)
        steps.append((name, request(rss=True)["rss"] / 1e6))
    proc.stdin.close()
    proc.wait()
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", type=Path, nargs="*", default=[], help="edgepack packages")
    parser.add_argument("--gguf", type=Path, help="also llama.cpp on this GGUF (llama-cpp-python installed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=2048)
    args = parser.parse_args()
    systems = [("edgepack", p) for p in args.package] + ([("llama-cpp", args.gguf)] if args.gguf else [])
    for kind, path in systems:
        steps = sequence(kind, path, args.rounds, args.threads, args.context)
        peak = max(mb for _, mb in steps)
        print(f"{kind} {path.name}: peak {peak:.1f} MB, first reached at "
              f"'{next(n for n, mb in steps if mb == peak)}' | " + " | ".join(f"{n} {mb:.1f}" for n, mb in steps))


if __name__ == "__main__":
    main()
