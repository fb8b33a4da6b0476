"""Reliability report: hostile inputs, injected faults, a 1,000-turn chat and concurrent sessions.

    python benchmarks/reliability/run.py [--turns 1000] [--kill-loops 3] [--package PKG] [--skip-tests]

1. Runs the fuzz and fault-injection tests (hypothesis fuzzing of archives, manifests, device profiles
   and safetensors headers; crafted hostile archives; ``kill -9`` loops of build, compress and the
   default-model cache fill; full disks) and counts the inputs fuzzed and faults injected they log.
2. Chats ``--turns`` turns in one session on a package (default: the tiny random model, built here;
   its 256-token context overflows every few turns, so the drop-oldest-turns path runs throughout),
   reading RSS every ``--every`` turns, and checks that RSS after the first measurement grows by no
   more than the package's full-context KV cache plus ``--slack-mib`` of allocator noise.
3. Runs ``--threads`` sessions at once on one loaded model and compares their greedy answers with the
   same sessions run one after another.
Writes ``results/reliability.md`` (tables) and ``results/rss.png`` (the RSS curve); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

from common import markdown_table, results_dir  # noqa: E402
from reliability_counts import ENV, totals  # noqa: E402

MB = 1 << 20
TEST_FILES = ["tests/runtime/test_fuzz_loaders.py", "tests/runtime/test_fuzz_archive.py",
              "tests/runtime/test_fuzz_delta.py", "tests/runtime/test_fuzz_profiles.py",
              "tests/toolchain/test_fuzz_safetensors.py",
              "tests/runtime/test_archive.py", "tests/test_interrupts.py", "tests/toolchain/test_disk_full.py",
              "tests/runtime/test_long_sessions.py", "tests/runtime/test_resources.py"]
PROMPTS = ["tell me about the for statement", "what does a while loop do", "explain iterators",
           "how are exceptions raised", "what is a class", "describe the with statement"]


def run_tests(kill_loops: int) -> dict:
    log = Path(tempfile.mkstemp(prefix="reliability-", suffix=".log")[1])
    env = {**os.environ, ENV: str(log), "EDGEPACK_KILL_LOOPS": str(kill_loops)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "e2e or not e2e",
                           *TEST_FILES], cwd=ROOT, env=env, capture_output=True, text=True)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-500:]
    found = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|error|errors|skipped)", summary)}
    counts = totals(str(log))
    log.unlink(missing_ok=True)
    print(f"tests: {summary}", file=sys.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-4000:], file=sys.stderr)
    return {"summary": summary, "passed": found.get("passed", 0),
            "failed": found.get("failed", 0) + found.get("error", 0) + found.get("errors", 0),
            "skipped": found.get("skipped", 0), "fuzzed": counts.get("fuzz", 0), "faults": counts.get("fault", 0),
            "seconds": time.perf_counter() - start, "returncode": proc.returncode}


def tiny_package(folder: Path) -> Path:
    import tiny
    from edgepack.toolchain.build import BuildConfig, build

    out = folder / "tiny-package"
    if not (out / "manifest.json").is_file():
        build(BuildConfig(model=str(tiny.save_tiny(folder / "tiny-model"))), out)
    return out


def long_session(model, turns: int, every: int, max_new_tokens: int) -> dict:
    proc = psutil.Process()
    session = model.session(system="Be brief.")
    curve, dropped_at = [], 0
    start = time.perf_counter()
    for i in range(1, turns + 1):
        before = len(session.messages)
        session.ask(f"{i}: {PROMPTS[i % len(PROMPTS)]}", max_new_tokens=max_new_tokens)
        dropped_at += len(session.messages) < before + 2
        if i % every == 0 or i == 1:
            curve.append((i, proc.memory_info().rss))
    return {"curve": curve, "turns": turns, "turns_with_drops": dropped_at, "seconds": time.perf_counter() - start,
            "final_messages": len(session.messages), "cache_length": session.cache.length}


def conversation(model, offset: int, turns: int) -> list[str]:
    session = model.session(system="Be brief.")
    return [session.ask(PROMPTS[(offset + i) % len(PROMPTS)], max_new_tokens=12) for i in range(turns)]


def concurrent_sessions(model, threads: int, turns: int) -> dict:
    serial = [conversation(model, k, turns) for k in range(threads)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        threaded = list(pool.map(lambda k: conversation(model, k, turns), range(threads)))
    mismatches = sum(a != b for a, b in zip(serial, threaded))
    return {"sessions": 2 * threads, "turns": 2 * threads * turns, "mismatches": mismatches}


def plot(curve, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([t for t, _ in curve], [r / MB for _, r in curve], marker=".")
    ax.set_xlabel("chat turn")
    ax.set_ylabel("RSS (MiB)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--kill-loops", type=int, default=3)
    parser.add_argument("--slack-mib", type=float, default=2.0)
    parser.add_argument("--package", help="package to chat with (default: the tiny random model, built here)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "edgepack-reliability"))
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()

    from edgepack.runtime import load
    from edgepack.runtime.memory import ModelShape, kv_cache_bytes

    tests = None if args.skip_tests else run_tests(args.kill_loops)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    package = Path(args.package) if args.package else tiny_package(work)
    model = load(package)
    manifest = model.package.manifest
    context = model.generation.context_length
    kv_budget = kv_cache_bytes(ModelShape(**manifest.model["shape"]), context)
    chat = long_session(model, args.turns, args.every, args.max_new_tokens)
    curve = chat["curve"]
    base = curve[1][1] if len(curve) > 1 else curve[0][1]  # after the first `every` turns: caches warm
    growth = max(r for _, r in curve[1:]) - base if len(curve) > 1 else 0
    limit = kv_budget + args.slack_mib * MB
    memory_ok = growth <= limit
    conc = concurrent_sessions(model, args.threads, 5)

    test_failures = (tests["failed"] or int(tests["returncode"] != 0)) if tests else 0
    failures = test_failures + (not memory_ok) + conc["mismatches"]
    out = results_dir(__file__)
    name = f"{manifest.name} ({manifest.dtype}, graph {manifest.plan.get('graph')}, context {context})"
    plot(curve, out / "rss.png", f"RSS over {chat['turns']} chat turns, {name}")
    rows = [
        ["inputs fuzzed (hypothesis)", tests["fuzzed"] if tests else "-"],
        ["faults injected (kill -9, full disk)", tests["faults"] if tests else "-"],
        ["reliability tests passed / failed / skipped",
         f"{tests['passed']} / {tests['failed']} / {tests['skipped']}" if tests else "-"],
        ["chat turns in one session", chat["turns"]],
        ["turns that dropped old history", chat["turns_with_drops"]],
        [f"RSS after turn 1 / after turn {curve[1][0] if len(curve) > 1 else 1} / max (MiB)",
         " / ".join(f"{v / MB:.1f}" for v in (curve[0][1], base, max(r for _, r in curve)))],
        ["RSS growth after warm-up (MiB)", f"{growth / MB:.2f}"],
        ["allowed: full-context KV cache + slack (MiB)", f"{kv_budget / MB:.2f} + {args.slack_mib:.1f}"],
        ["concurrent sessions run (threads + serial)", conc["sessions"]],
        ["threaded answers differing from serial", conc["mismatches"]],
        ["failures", failures],
    ]
    text = (f"# Reliability\n\n`python benchmarks/reliability/run.py --turns {args.turns} --kill-loops "
            f"{args.kill_loops}`; package: {name}; {chat['seconds']:.0f} s for the chat"
            + (f", {tests['seconds']:.0f} s for the tests" if tests else "") + ".\n\n"
            + markdown_table(["what", "count"], rows) + "\n![rss](rss.png)\n")
    (out / "reliability.md").write_text(text)
    print(text)
    for label, value in rows:
        print(f"{label}: {value}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
