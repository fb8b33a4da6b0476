"""Plan, build and measure the default model for every device profile.

    python benchmarks/devices/run.py [--out /tmp/ep-devices] [--windows 20]

Profiles whose plans agree share one build. Each package is benchmarked in a fresh process (peak
RSS, time to first token, tokens/s) with the KV cache nearly empty and nearly full (filled in the
plan's prefill chunks), its peak compared with the memory model's prediction, and its perplexity
measured on the first ``--windows`` evaluation windows. Writes ``results/devices.md`` and ``.json``.
Extra ``--validate PKG`` packages (e.g. the plain ``--int4`` build) join the memory-model table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

from edgepack.runtime.bench import BenchConfig, bench
from edgepack.runtime.memory import ModelShape, estimate_package, package_layout
from edgepack.runtime.package import read_manifest
from edgepack.runtime.profiles import available, load_profile
from edgepack.toolchain.planner.plan import PlanError, plan_for
from edgepack.toolchain.planner.report import describe

MB = 1 << 20
RESULTS = Path(__file__).parent / "results"
PROMPTS = ("What is the capital of France?", "Write a haiku about the sea.")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/ep-devices")
    ap.add_argument("--windows", type=int, default=20)
    ap.add_argument("--validate", action="append", default=[], help="extra package for the memory table")
    ap.add_argument("--reuse-perplexity", help="a previous devices.json whose perplexities to keep (skips eval)")
    args = ap.parse_args()
    out = Path(args.out)
    rows, builds = [], {}
    for name in sorted(available()):
        profile = load_profile(name)
        try:
            plan = plan_for("default", profile)
        except PlanError as e:
            rows.append({"device": name, "refused": str(e)})
            continue
        print(describe(plan, profile), file=sys.stderr)
        key = (plan.dtype, plan.ratio, plan.context, profile.mobile)
        builds.setdefault(key, {"package": out / name, "plan": plan, "devices": []})["devices"].append(name)
        rows.append({"device": name, "key": key, "budget_mb": profile.app_memory_mb})
    measured = {}
    for key, b in builds.items():
        pkg = b["package"]
        if not (pkg / "manifest.json").is_file():
            subprocess.run(["edgepack", "build", "default", "--device", b["devices"][0], "-o", str(pkg)], check=True)
        known = _known_perplexity(args.reuse_perplexity, key)
        measured[key] = measure(pkg, b["plan"].context, b["plan"].memory["chunk"], 0 if known else args.windows)
        if known:
            measured[key]["perplexity"] = known
        measured[key]["devices"] = b["devices"]
    validation = [v for m in measured.values() for v in m["memory"]]
    for extra in args.validate:
        validation += measure(Path(extra), 2048, 256, 0, shape=_default_shape())["memory"]
    RESULTS.mkdir(exist_ok=True)
    data = {"devices": rows, "builds": {str(k): v for k, v in measured.items()}, "memory": validation}
    (RESULTS / "devices.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / "devices.md").write_text(table(rows, measured, validation))
    print((RESULTS / "devices.md").read_text())


def measure(pkg: Path, context: int, chunk: int, windows: int, shape: ModelShape | None = None) -> dict:
    manifest = read_manifest(pkg)
    result = {"package": str(pkg), "size_mb": manifest.total_size / MB, "memory": []}
    for fill in (0, context - 64):
        r = bench(pkg, BenchConfig(max_new_tokens=16, fill=fill, chunk=chunk, prompts=PROMPTS))
        ctx = r.context_filled
        est = estimate_package(pkg, context=ctx, chunk=chunk if fill else max(x["prompt_tokens"] for x in r.runs),
                               shape=shape)
        result["memory"].append({
            "package": pkg.name, "context": ctx,
            "layout": package_layout(manifest, {n: e.size for n, e in manifest.files.items()}),
            "predicted_mb": est.peak / MB, "measured_mb": r.peak_rss_bytes / MB,
            "error": est.peak / r.peak_rss_bytes - 1, "tokens_per_s": r.tokens_per_s,
            "first_token_ms": r.first_token_ms})
    if windows:
        proc = subprocess.run(["edgepack", "eval", str(pkg), "--max-windows", str(windows)], capture_output=True,
                              text=True, check=True)
        result["perplexity"] = float(re.search(r"perplexity ([\d.]+)", proc.stdout).group(1))
    return result


def _known_perplexity(path: str | None, key: tuple) -> float | None:
    if not path:
        return None
    return json.loads(Path(path).read_text())["builds"].get(str(key), {}).get("perplexity")


def _default_shape() -> ModelShape:
    return ModelShape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)


def table(rows: list[dict], measured: dict, validation: list[dict]) -> str:
    lines = ["| device | budget (MiB) | plan | package (MiB) | peak predicted / measured (MiB), full context "
             "| fits | tokens/s here | perplexity |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['device']} | | refused: {row['refused'].split(': ', 1)[1]} | | | no | | |")
            continue
        m = measured[row["key"]]
        dtype, ratio, context, mobile = row["key"]
        full = m["memory"][-1]
        plan = f"{dtype}, ResSVD {ratio:.0%}, context {context}" + (", + .ort" if mobile else "")
        fits = "yes" if full["measured_mb"] <= row["budget_mb"] else "NO"
        lines.append(f"| {row['device']} | {row['budget_mb']:g} | {plan} | {m['size_mb']:.1f} | "
                     f"{full['predicted_mb']:.0f} / {full['measured_mb']:.0f} | {fits} | "
                     f"{m['memory'][0]['tokens_per_s']:.1f} | {m.get('perplexity', float('nan')):.2f} |")
    lines += ["", "| package | layout | context | predicted peak (MiB) | measured peak RSS (MiB) | error |",
              "|---|---|---|---|---|---|"]
    for v in validation:
        lines.append(f"| {v['package']} | {v['layout']} | {v['context']} | {v['predicted_mb']:.0f} | "
                     f"{v['measured_mb']:.0f} | {v['error']:+.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
