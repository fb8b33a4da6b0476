"""Interleaved A/B decode speed of packages: wall and CPU time per decoded token, round by round.

    python benchmarks/compression/decode_ab.py PKG_A PKG_B [...] [--rounds 5] [--tokens 64] [--threads 2]

Each round runs every package once, back to back, each in a fresh process (load, one warm-up
generation, then the measured one); per round the other packages' speed is reported as a ratio to
the first package's, so a load change between rounds cancels out. CPU time per token is the process
CPU (user + system, all threads) of a ``tokens``-token generation minus that of a 1-token one, over
``tokens - 1``: the decode steps alone, without prefill. Never asserts anything about time.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _child(package: str, tokens: int, threads: int) -> dict:
    from edgepack.runtime.decoder import SessionSettings
    from edgepack.runtime.model import load

    model = load(package, verify=False, settings=SessionSettings(threads=threads))
    ids = model.encode_prompt(PROMPT)

    def run(n: int):
        cache = model.decoder.new_cache()
        cpu, wall = _cpu(), time.perf_counter()
        result = _generate(model, ids, cache, n)
        return _cpu() - cpu, time.perf_counter() - wall, result

    run(tokens)  # warm-up: first-run allocations and kernel selection
    cpu_1, wall_1, _ = run(1)
    cpu_n, wall_n, result = run(tokens)
    return {"package": package, "ms_per_token": 1000 * result.decode_s / (tokens - 1),
            "cpu_ms_per_token": 1000 * (cpu_n - cpu_1) / (tokens - 1),
            "first_token_ms": 1000 * result.first_token_s}


def _generate(model, ids, cache, n):
    from edgepack.runtime.generation import GenerationResult

    result = GenerationResult()
    for _ in model.stream_ids(ids, max_new_tokens=n, cache=cache, result=result, ignore_eos=True):
        pass
    return result


def _cell(x: dict, base: dict) -> str:
    name = x["package"].rstrip("/").rsplit("/", 1)[-1]
    return (f"{name} {x['ms_per_token']:.2f} ms ({x['cpu_ms_per_token']:.2f} cpu) "
            f"speed x{base['ms_per_token'] / x['ms_per_token']:.3f} wall, "
            f"x{base['cpu_ms_per_token'] / x['cpu_ms_per_token']:.3f} cpu")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("packages", nargs="+")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.packages[0], args.tokens, args.threads)))
        return
    rows: list[list[dict]] = []
    for r in range(args.rounds):
        row = []
        for pkg in args.packages:
            out = subprocess.run([sys.executable, __file__, pkg, "--child", "--tokens", str(args.tokens),
                                  "--threads", str(args.threads)], capture_output=True, text=True, check=True)
            row.append(json.loads(out.stdout.strip().splitlines()[-1]))
        rows.append(row)
        base = row[0]
        print(f"round {r + 1}: " + "; ".join(_cell(x, base) for x in row), flush=True)
    print("median over rounds (speed vs the first package; >1 = faster):")
    for i, pkg in enumerate(args.packages):
        wall = statistics.median(row[0]["ms_per_token"] / row[i]["ms_per_token"] for row in rows)
        cpu = statistics.median(row[0]["cpu_ms_per_token"] / row[i]["cpu_ms_per_token"] for row in rows)
        ms = statistics.median(row[i]["ms_per_token"] for row in rows)
        cms = statistics.median(row[i]["cpu_ms_per_token"] for row in rows)
        print(f"  {pkg}: {ms:.2f} ms/token, {cms:.2f} cpu-ms/token; wall speed x{wall:.3f}, cpu x{cpu:.3f}")


if __name__ == "__main__":
    main()
