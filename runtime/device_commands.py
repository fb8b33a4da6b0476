"""Runtime subcommands for devices: ``profile`` (measure this host, list/show/save profiles) and
``bench`` (time to first token, tokens/s and peak RSS of a package, against a device's budget)."""

from __future__ import annotations

import argparse
import json
import sys

from edgepack.runtime.errors import UsageError
from edgepack.runtime.profiles import MB

OVER_BUDGET = 3  # bench --device: the package does not fit the device


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profile", help="measure this host, or list / show device profiles",
                       description="Measure this host (cores, RAM, ISA flags, memory bandwidth, execution "
                       "providers, matmul throughput for float32/int8/int4) and print it as a device profile; "
                       "--save NAME writes it where 'edgepack plan --device NAME' finds it.")
    p.add_argument("--save", metavar="NAME", help="save the measured profile under this name")
    p.add_argument("--list", action="store_true", help="list the known device profiles")
    p.add_argument("--show", metavar="NAME", help="print a known profile")
    p.add_argument("--share", type=float, default=0.6, help="share of RAM budgeted for one app (default 0.6)")
    p.add_argument("--json", action="store_true", help="print the measurement as JSON")
    p.set_defaults(handler=profile)

    p = sub.add_parser("bench", help="measure a package: first token, tokens/s, peak memory",
                       description="Run PACKAGE in a fresh process over a fixed prompt set (greedy, fixed "
                       "length) and report time to first token, decode tokens/s and peak RSS; --device compares "
                       f"with that profile's memory and storage budget (exit code {OVER_BUDGET} if over).")
    p.add_argument("package", help="package folder")
    p.add_argument("--device", help="device profile to check the package against")
    p.add_argument("--fill", type=int, default=0, help="KV positions to fill before the prompts (measure a context)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per prompt (default 32)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime threads (0 = its default)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for standard output)")
    p.set_defaults(handler=bench)


def profile(args: argparse.Namespace) -> int:
    from edgepack.runtime import profiles

    if args.list:
        for name, path in sorted(profiles.available().items()):
            p = profiles.load_profile(path)
            print(f"{name:24s} {p.kind:15s} app memory {p.app_memory_mb:>7g} MiB  {p.description}")
        return 0
    if args.show:
        print(profiles.load_profile(args.show).to_yaml(), end="")
        return 0
    if not 0 < args.share <= 1:
        raise UsageError(f"--share must be in (0, 1], got {args.share}")
    from edgepack.runtime.profiling import measure

    m = measure()
    prof = m.to_profile(args.save or "this-host", args.share)
    if args.json:
        print(json.dumps(m.to_dict(), indent=2))
    else:
        print(f"# bandwidth {m.bandwidth_gb_s:.1f} GB/s; matmul GOP/s: "
              + ", ".join(f"{k} {v:.1f}" for k, v in m.matmul_gops.items()))
        print(prof.to_yaml(), end="")
    if args.save:
        print(f"saved {profiles.save_profile(prof)}", file=sys.stderr)
    return 0


def bench(args: argparse.Namespace) -> int:
    from edgepack.runtime.bench import BenchConfig
    from edgepack.runtime.bench import bench as run_bench

    device = None
    if args.device:
        from edgepack.runtime.profiles import load_profile

        device = load_profile(args.device)
    report = run_bench(args.package, BenchConfig(max_new_tokens=args.max_tokens, threads=args.threads,
                                                 fill=args.fill))
    out = report.to_dict()
    print(f"{'prompt tokens':>13} {'cache':>6} {'first token ms':>14} {'tokens/s':>9}")
    for r in report.runs:
        print(f"{r['prompt_tokens']:>13} {r['cache_tokens']:>6} {r['first_token_ms']:>14.1f} {r['tokens_per_s']:>9.1f}")
    print(f"median: first token {report.first_token_ms:.1f} ms, {report.tokens_per_s:.1f} tokens/s; "
          f"peak RSS {report.peak_rss_bytes / MB:.0f} MiB (runtime alone {report.baseline_rss_bytes / MB:.0f}, "
          f"after load {report.loaded_rss_bytes / MB:.0f}); package {report.size_bytes / MB:.1f} MiB")
    code = 0
    if device is not None:
        out["device"] = _compare(report, device)
        fits = out["device"]["fits"]
        print(f"{device.name}: peak {report.peak_rss_bytes / MB:.0f} of {device.app_memory_mb:g} MiB, size "
              f"{report.size_bytes / MB:.1f} of {device.storage_mb:g} MiB -> {'fits' if fits else 'DOES NOT FIT'}")
        code = 0 if fits else OVER_BUDGET
    if args.json:
        text = json.dumps(out, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return code


def _compare(report, device) -> dict:
    fits_memory = report.peak_rss_bytes <= device.budget_bytes
    fits_storage = report.size_bytes <= device.storage_bytes
    return {"name": device.name, "budget_bytes": device.budget_bytes, "storage_bytes": device.storage_bytes,
            "fits_memory": fits_memory, "fits_storage": fits_storage, "fits": fits_memory and fits_storage}
