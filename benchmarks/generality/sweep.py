"""Generality sweep: every CLI command on tiny random models of many architectures.

    python benchmarks/generality/sweep.py [--archs llama qwen2 ...] [--out DIR] [--timeout 900]

The models are ``tests/tiny_archs.py``'s (hidden 64, 2 layers, random). One worker process per
architecture runs the commands through ``edgepack.runtime.cli.main`` (in
process: importing torch once per architecture, not once per command), records each command's exit
code, last stderr line and seconds, and the table is printed as Markdown. A worker that outlives
``--timeout`` is killed and its remaining commands are marked as a hang.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("build", "build-int4", "run", "eval-pkg", "eval-src", "long-pkg", "long-src", "compress", "build-ratio",
            "build-slots", "delta", "eval-delta", "plan")


def _argv(name: str, d: Path) -> list[str]:
    src, text = str(d / "src"), str(d / "text.txt")
    return {
        "build": ["build", src, "-o", str(d / "P")],
        "build-int4": ["build", src, "-o", str(d / "P4"), "--int4"],
        "run": ["run", str(d / "P"), "hello", "--max-tokens", "5"],
        "eval-pkg": ["eval", str(d / "P"), "--text", text, "--context", "64", "--max-windows", "2"],
        "eval-src": ["eval", src, "--text", text, "--context", "64", "--max-windows", "2"],
        # 200 positions: past a 32-token sliding window and a 64-position rope original length
        "long-pkg": ["eval", str(d / "P"), "--text", text, "--context", "200", "--max-windows", "1"],
        "long-src": ["eval", src, "--text", text, "--context", "200", "--max-windows", "1"],
        "compress": ["compress", src, "--ratio", "0.2", "--tune-steps", "2", "-o", str(d / "C")],
        "build-ratio": ["build", src, "--ratio", "0.2", "--int4", "--tune-steps", "2", "-o", str(d / "PC")],
        "build-slots": ["build", src, "--delta-slots", "--int4", "-o", str(d / "PD")],
        "delta": ["delta", src, str(d / "ft"), "-o", str(d / "d.safetensors"), "--method", "osd", "--rank", "1",
                  "--valid", text, "--windows", "2", "--tune-steps", "2"],
        "eval-delta": ["eval", str(d / "PD"), "--delta", str(d / "d.safetensors"), "--text", text, "--context",
                       "64", "--max-windows", "2"],
        "plan": ["plan", src, "--device", "raspberry-pi-4"],
    }[name]


def _one(argv: list[str]) -> dict:
    from edgepack.runtime.cli import main

    err, out = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else 2
        except BaseException as e:  # main() should never let one through: that is a finding
            import traceback

            traceback.print_exc()
            rc = f"raised {type(e).__name__}"
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if ln.strip()]
    notes = [ln for ln in lines if ln.startswith("edgepack:") or ln.startswith("built") or "parity" in ln]
    return {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "stdout": out.getvalue()[-300:],
            "last": (lines[-1] if lines else "")[:400], "notes": notes[-4:],
            "traceback": "Traceback" in err.getvalue()}


def worker(arch: str, d: Path, log: Path) -> None:
    os.environ["EDGEPACK_DEBUG"] = "1"
    from edgepack.runtime.text import evaluation_text
    from tiny_archs import save, save_finetune

    d.mkdir(parents=True, exist_ok=True)
    save(arch, d / "src")
    save_finetune(d / "src", d / "ft")
    (d / "text.txt").write_text(evaluation_text()[:20000], encoding="utf-8")
    for name in COMMANDS:
        result = {"arch": arch, "command": name, **_one(_argv(name, d))}
        with log.open("a") as f:
            f.write(json.dumps(result) + "\n")


def main() -> None:
    from tiny_archs import ARCHS

    ap = argparse.ArgumentParser()
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    ap.add_argument("--out", default="/tmp/generality")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    log = out / "results.jsonl"
    if args.worker:
        worker(args.worker, out / args.worker, log)
        return
    out.mkdir(parents=True, exist_ok=True)
    for arch in args.archs:
        print(f"== {arch}", file=sys.stderr, flush=True)
        try:
            subprocess.run([sys.executable, __file__, "--worker", arch, "--out", str(out)], timeout=args.timeout,
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            with log.open("a") as f:
                f.write(json.dumps({"arch": arch, "command": "(rest)", "rc": "timeout", "last": ""}) + "\n")
    print(table(log))


def table(log: Path) -> str:
    rows: dict[str, dict[str, str]] = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        mark = "OK" if r["rc"] == 0 else "refused" if r["rc"] == 2 else f"FAIL({r['rc']})"
        ppl = re.search(r"perplexity ([0-9.]+|nan|inf)", r.get("stdout", ""))
        parity = re.search(r"top-1 agreement ([0-9.]+%)", r.get("last", ""))
        mark += f" {ppl.group(1)}" if ppl else f" {parity.group(1)}" if parity else ""
        rows.setdefault(r["arch"], {})[r["command"]] = mark
    head = "| arch | " + " | ".join(COMMANDS) + " |"
    lines = [head, "|" + "---|" * (len(COMMANDS) + 1)]
    for arch, cells in rows.items():
        lines.append(f"| {arch} | " + " | ".join(cells.get(c, "-") for c in COMMANDS) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "tests"))  # tiny_archs.py, tiny.py: the tests' tiny models
    main()
