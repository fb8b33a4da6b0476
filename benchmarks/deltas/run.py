"""Fine-tune deltas on the default model: how much of a fine-tune each compression method keeps at
equal bytes, and what applying and switching deltas costs in the runtime.

    python benchmarks/deltas/run.py [--domains docs code] [--ranks 1 2 4 8] [--max-windows 16]

Two real fine-tunes (benchmarks/deltas/finetune.py, cached) of SmolLM2-135M-Instruct: Python docs
prose and Python standard-library code. For each domain: held-out perplexity (PyTorch, 512-token
windows of the domain's test split) of the base, the full fine-tune, and base + each compressed delta
(TruncSVD at r; MagTruncSVD and OSD at r + c with c = r, same accounted bits), the share of the
fine-tune's gain kept, and the paired per-window difference of OSD against the best baseline with
its standard error (the run-to-run noise of the evaluation). Then in the runtime: delta file sizes,
load time with and without a delta, switch time in a live model, and logit parity of the runtime
with a delta against PyTorch with the same delta merged. Writes results/deltas.md and deltas.png
(results/deltas-TAG.* with --tag). --valid-source train takes OSD's validation windows from the
fine-tune's training text; --int8-eval also scores each delta's int8 file read back. Each row keeps its
per-window test NLL, so a later run with --reference TAG (same --max-windows) skips the base and fine-tune
scoring and, with --report, pairs its variants with that run's baselines. Settings are chosen on the valid
split with probe.py, never on these test windows.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import folder_size, markdown_table, results_dir  # noqa: E402
from edgepack.toolchain.delta.defaults import TUNE_LR, TUNE_STEPS  # noqa: E402


def _osd(**options) -> dict:
    """An OSD variant spelled out from the paper's settings, so that changing OSD's defaults (make.py)
    does not change what a label means."""
    return {"method": "osd", "importance": "taylor", "gradient_at": "delta", "allocation": "layer", "tune_steps": 0,
            **options}


VARIANTS = {
    "TruncSVD": dict(method="truncsvd"),
    "MagTruncSVD": dict(method="magtruncsvd"),
    "OSD (paper: taylor, per layer)": _osd(),
    "OSD (default: fisher at base, global budget)": dict(method="osd", importance="fisher", tune_steps=0),
    "OSD, output-error score": _osd(importance="output"),
    "OSD, taylor, global budget": _osd(allocation="global"),
    "OSD --auto": _osd(auto=True),
    "OSD, fisher": _osd(importance="fisher"),
    "OSD, fisher, global budget": _osd(importance="fisher", allocation="global"),
    "OSD, rms, global budget": _osd(importance="rms", allocation="global"),
    "OSD, fisher, global, normalized": _osd(importance="fisher", allocation="global", normalize=True),
    "OSD, taylor, global, normalized": _osd(allocation="global", normalize=True),
    "OSD, rms, global, normalized": _osd(importance="rms", allocation="global", normalize=True),
    "OSD, fisher, grad at fine-tune": _osd(importance="fisher", gradient_at="finetune"),
    "OSD, fisher, grad at base": _osd(importance="fisher", gradient_at="base"),
    "OSD, taylor, grad at fine-tune": _osd(gradient_at="finetune"),
    "OSD, taylor, grad at base": _osd(gradient_at="base"),
    "OSD, fisher shrunk 1, global": _osd(importance="fisher", shrink=1.0, allocation="global"),
    "OSD, fisher shrunk 10, global": _osd(importance="fisher", shrink=10.0, allocation="global"),
    "OSD, fisher shrunk 1e6, global": _osd(importance="fisher", shrink=1e6, allocation="global"),
    "OSD, fisher shrunk 1": _osd(importance="fisher", shrink=1.0),
    "OSD, fisher at base, global": _osd(importance="fisher", gradient_at="base", allocation="global"),
    "OSD, fisher-kl at base, global": _osd(importance="fisher-kl", gradient_at="base", allocation="global"),
    "OSD, fisher at base, shrunk 1": _osd(importance="fisher", gradient_at="base", shrink=1.0),
    "OSD, fisher at base, shrunk 1, global": _osd(importance="fisher", gradient_at="base", shrink=1.0,
                                                  allocation="global"),
    "OSD, fisher at base, shrunk 1e6, global": _osd(importance="fisher", gradient_at="base",
                                                    shrink=1e6, allocation="global"),
    "OSD, fisher-kl at base, shrunk 1, global": _osd(importance="fisher-kl", gradient_at="base", shrink=1.0,
                                                     allocation="global"),
    "OSD, fisher-kl at base, shrunk 10, global": _osd(importance="fisher-kl", gradient_at="base", shrink=10.0,
                                                      allocation="global"),
    "OSD, fisher-kl at base, per layer": _osd(importance="fisher-kl", gradient_at="base"),
    "OSD, fisher-kl at base, separable, per layer": _osd(importance="fisher-kl", gradient_at="base", separable=True),
    "OSD, fisher-kl at base, separable, global": _osd(importance="fisher-kl", gradient_at="base", separable=True,
                                                      allocation="global"),
    "TruncSVD, whitened": dict(method="truncsvd", whiten=True),
    "MagTruncSVD, whitened": dict(method="magtruncsvd", whiten=True),
    "OSD, whitened": _osd(whiten=True),
    "OSD, whitened, global budget": _osd(whiten=True, allocation="global"),
}
# The distillation tune of the kept values (toolchain/delta/tune.py); steps and lr from --tune-steps / --tune-lr.
TUNED = {"MagTruncSVD + tune": dict(method="magtruncsvd"),
         "OSD (fisher at base, global) + tune": dict(method="osd", importance="fisher"),
         "OSD (fisher-kl at base, global) + tune": dict(method="osd", importance="fisher-kl")}
# The entries chosen during the tune (toolchain/delta/prune.py). Every tuned row takes the run's --tune-steps /
# --tune-positions (a stronger tune: e.g. 48 steps, --tune-positions 0, --valid-windows 32).
TUNED["OSD, pruned during the tune"] = dict(method="osd", prune_during_tune=True)
# The tune's loss half KL to the fine-tune, half the NLL of the windows' own text (DeltaConfig.tune_hard).
TUNED["OSD (fisher-kl at base, global) + hard tune"] = dict(method="osd", importance="fisher-kl", tune_hard=0.5)
TUNED["MagTruncSVD + hard tune"] = dict(method="magtruncsvd", tune_hard=0.5)
# fisher-kl with MagTruncSVD's per-layer budgets: on code's test windows the untuned one came closest to magnitude.
TUNED["OSD (fisher-kl at base, per layer) + tune"] = dict(method="osd", importance="fisher-kl", allocation="layer")
VARIANTS.update({label: {**options, "tune_steps": "tuned"} for label, options in TUNED.items()})
# A tuned OSD row is also compared with the same tune on magnitude's pattern: what the selection adds.
SAME_TUNE = {"OSD (fisher at base, global) + tune": "MagTruncSVD + tune",
             "OSD (fisher-kl at base, global) + tune": "MagTruncSVD + tune",
             "OSD, pruned during the tune": "MagTruncSVD + tune",
             "OSD (fisher-kl at base, global) + hard tune": "MagTruncSVD + hard tune",
             "OSD (fisher-kl at base, per layer) + tune": "MagTruncSVD + tune"}
BASELINES = ("TruncSVD", "MagTruncSVD")
PAPER = ("TruncSVD", "MagTruncSVD", "OSD (paper: taylor, per layer)")  # run at every rank; the rest at --extra-ranks


def window_nll(model, ids: list[int], context: int, max_windows: int) -> np.ndarray:
    """Mean token NLL of each non-overlapping window (PyTorch)."""
    import torch
    from edgepack.runtime.perplexity import token_nll, windows
    from tqdm import tqdm

    out = []
    for w in tqdm(windows(ids, context, max_windows), desc="test windows", unit="window", file=sys.stderr):
        with torch.inference_mode():
            logits = model(torch.tensor([w]), use_cache=False).logits[0].float().numpy()
        out.append(float(token_nll(logits[:-1], np.asarray(w[1:])).mean()))
    return np.asarray(out)


def merged_nll(model, delta, ids, context, max_windows) -> np.ndarray:
    """``window_nll`` of the model with ``delta`` merged into its weights."""
    from edgepack.toolchain.delta.merge import merged

    with merged(model, delta):
        return window_nll(model, ids, context, max_windows)


def quality(domain: str, args: argparse.Namespace, work: Path, progress=None) -> tuple[list[dict], dict]:
    """Rows of every variant at every rank, and the domain's summary; ``progress(rows, summary)`` after each."""
    import domains
    import finetune
    from edgepack.runtime import delta_file
    from edgepack.toolchain import sources
    from edgepack.toolchain.delta.extract import extract
    from edgepack.toolchain.delta.make import DeltaConfig, compress, needs_windows
    from edgepack.toolchain.ressvd.calibration import calibration_windows

    base_dir, ft_dir = finetune.base(), finetune.finetuned(domain)
    base = sources.load(str(base_dir))
    ft = sources.load(str(ft_dir))
    raw = extract(base.model, ft.model)
    tok = base.tokenizer
    test_ids = tok(domains.text(domain, "test"), add_special_tokens=False)["input_ids"]
    valid = calibration_windows(tok, domains.text(domain, args.valid_source), args.valid_windows, 256)
    ref = _reference(args, domain)
    if ref:  # the same windows, already scored by the reference run
        nll_base, nll_ft = (np.asarray(ref["summary"][f"{k}_window_nll"]) for k in ("base", "finetune"))
    else:
        nll_base = window_nll(base.model, test_ids, args.context, args.max_windows)
        nll_ft = window_nll(ft.model, test_ids, args.context, args.max_windows)
    del ft
    ppl_base, ppl_ft = math.exp(nll_base.mean()), math.exp(nll_ft.mean())
    print(f"[{domain}] base {ppl_base:.2f}  full fine-tune {ppl_ft:.2f}", file=sys.stderr, flush=True)
    summary = {"domain": domain, "base_perplexity": round(ppl_base, 3), "finetune_perplexity": round(ppl_ft, 3),
               "finetune_size_MB": round(folder_size(ft_dir) / 1e6, 1), "windows": len(nll_base),
               "context": args.context, "base_window_nll": [round(float(x), 6) for x in nll_base],
               "finetune_window_nll": [round(float(x), 6) for x in nll_ft]}
    rows, per_window, cache = [], {}, {}
    for rank in args.ranks:
        for label in args.variants:
            if label not in PAPER and rank not in args.extra_ranks:
                continue
            options = dict(VARIANTS[label])
            if options.get("tune_steps") == "tuned":
                options.update(tune_steps=args.tune_steps, tune_lr=args.tune_lr,
                               tune_positions=args.tune_positions or None)
            config = DeltaConfig(rank=rank, windows=args.valid_windows, **options)
            start = time.perf_counter()
            if config.auto:
                from edgepack.toolchain.delta.auto import auto

                delta = auto(base.model, raw, config, valid, cache)
            else:
                delta = compress(base.model, raw, config, valid if needs_windows(config) else [], cache)
            seconds = time.perf_counter() - start
            path = work / f"{domain}-{label.split()[0].lower()}-{len(rows)}-r{rank}.safetensors"
            size16 = delta_file.write(delta, path, "float16")
            int8_path = path.with_name(path.stem + "-int8.safetensors")
            size8 = delta_file.write(delta, int8_path, "int8")
            nll = merged_nll(base.model, delta, test_ids, args.context, args.max_windows)
            per_window[(label, rank)] = nll
            ppl = math.exp(nll.mean())
            kept = (ppl_base - ppl) / (ppl_base - ppl_ft) if ppl_base != ppl_ft else float("nan")
            rows.append({"domain": domain, "variant": label, "rank": rank, "relax": delta.info["relax"],
                         "allocation": delta.info.get("allocation"), "perplexity": round(ppl, 3),
                         "gain_kept": round(kept, 3), "accounted_kB": round(delta.bits / 8e3, 1),
                         "budget_kB": round(delta.info["budget_bits"] / 8e3, 1),
                         "file_kB_fp16": round(size16 / 1e3, 1), "file_kB_int8": round(size8 / 1e3, 1),
                         "seconds": round(seconds, 1), "path": str(path), "int8_path": str(int8_path),
                         # kept so that a later run's variant can be paired with this one's on the same windows
                         "window_nll": [round(float(x), 6) for x in nll]})
            if args.int8_eval:  # what int8 values cost: the file read back, paired against float32 values
                nll8 = merged_nll(base.model, delta_file.read(int8_path), test_ids, args.context, args.max_windows)
                d = nll8 - nll
                rows[-1]["perplexity_int8"] = round(math.exp(nll8.mean()), 3)
                rows[-1]["int8_vs_float"] = f"{d.mean():+.2e} ± {d.std(ddof=1) / math.sqrt(len(d)):.1e}"
            print(f"[{domain}] r={rank} {label}: {ppl:.3f} (kept {kept:.1%}), {size16 / 1e3:.0f} kB, {seconds:.0f} s",
                  file=sys.stderr, flush=True)
            _pair(rows, per_window)
            if progress:
                progress(rows, summary)
    return rows, summary


def _reference(args: argparse.Namespace, domain: str, tag: str | None = None) -> dict | None:
    """The saved run ``--reference TAG`` (the first by default) of ``domain``: summary and rows, checked to
    be on the same windows."""
    if not args.reference:
        return None
    tag = tag or args.reference[0]
    saved = json.loads((results_dir(__file__) / f"deltas-{tag}.json").read_text())
    summary = next((s for s in saved["summaries"] if s["domain"] == domain), None)
    if summary is None:
        return None
    if (summary["windows"], summary["context"]) != (args.max_windows, args.context):
        raise SystemExit(f"--reference {tag} scored {summary['windows']} x {summary['context']} windows")
    return {"summary": summary, "rows": [{**r, "from": r.get("from", tag)} for r in saved["rows"]
                                         if r["domain"] == domain]}


def _merged_reference(rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """``rows`` with the reference runs' rows of other variants added (their latest results), all paired anew."""
    out = list(rows)
    for domain in dict.fromkeys([r["domain"] for r in rows] + args.domains):
        for tag in args.reference:
            mine = {(r["variant"], r["rank"]) for r in out if r["domain"] == domain}
            ref = _reference(args, domain, tag)
            out += [r for r in (ref["rows"] if ref else []) if (r["variant"], r["rank"]) not in mine]
    for domain in dict.fromkeys(r["domain"] for r in out):
        group = [r for r in out if r["domain"] == domain]
        _pair(group, {(r["variant"], r["rank"]): np.asarray(r["window_nll"]) for r in group})
    return out


def _pair(rows: list[dict], per_window: dict) -> None:
    """Each non-baseline row's paired per-window difference against the better baseline at its rank."""
    for row in rows:
        if row["variant"] in BASELINES:
            continue
        diffs = []
        for b in BASELINES:
            if (b, row["rank"]) in per_window:
                d = per_window[(row["variant"], row["rank"])] - per_window[(b, row["rank"])]
                diffs.append((d.mean(), d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan"), b))
        if diffs:
            mean, se, b = max(diffs)  # the least favourable comparison
            row["vs_best_baseline"] = f"{mean:+.4f} ± {se:.4f} nats vs {b}"
        other = (SAME_TUNE.get(row["variant"]), row["rank"])
        if other in per_window:
            d = per_window[(row["variant"], row["rank"])] - per_window[other]
            row["vs_same_tune"] = f"{d.mean():+.4f} ± {d.std(ddof=1) / math.sqrt(len(d)):.4f} nats vs {other[0]}"


def runtime_costs(rows: list[dict], work: Path) -> dict:
    """Load/switch times and parity in the runtime, on fused packages of the base with delta slots."""
    import finetune
    from edgepack.runtime import delta_file
    from edgepack.toolchain.build import BuildConfig, build

    out: dict = {}
    deltas = [r for r in rows if r["rank"] == 2 and r["variant"].startswith("OSD")] or rows
    first, second = deltas[0]["path"], deltas[-1]["path"]
    for kind, int4 in (("int4", True), ("float32", False)):
        pkg = work / f"base-{kind}"
        build(BuildConfig(model=str(finetune.base()), graph="fused", int4=int4, delta_slots=True), pkg)
        out[f"{kind}_package_MB"] = round(folder_size(pkg) / 1e6, 1)
        costs, model = _package_costs(pkg, first, second)
        out.update({f"{kind}_{k}": v for k, v in costs.items()})
        if kind == "float32":
            out["parity_max_abs_logit_diff"] = _parity(model, delta_file.read(first))
    out["delta_r2_file_kB"] = round(Path(first).stat().st_size / 1e3, 1)
    out["delta_r2_share_of_int4_package"] = round(Path(first).stat().st_size / (out["int4_package_MB"] * 1e6), 4)
    return out


def _package_costs(pkg: Path, first: str, second: str):
    """Median load time without / with a delta, switch and remove times; and the loaded model."""
    from edgepack.runtime import load

    plain = statistics.median(_timed(lambda: load(pkg)) for _ in range(3))
    with_delta = statistics.median(_timed(lambda: load(pkg, delta=first)) for _ in range(3))
    model = load(pkg, delta=first)
    switches = [_timed(lambda p=path: model.apply_delta(p)) for path in [second, first] * 5]
    removed = _timed(lambda: model.apply_delta(None))
    return {"load_s": round(plain, 3), "load_with_delta_s": round(with_delta, 3),
            "switch_ms": round(1000 * statistics.median(switches), 1), "remove_ms": round(1000 * removed, 1)}, model


def _parity(model, delta) -> float:
    """Runtime (float32 base + delta) against PyTorch with the delta merged, on one real prompt."""
    import finetune
    import torch
    from edgepack.toolchain import sources
    from edgepack.toolchain.delta.merge import merged

    model.apply_delta(delta)
    ids = model.encode_prompt("Explain what a Python generator is.")
    got = model.decoder.forward(ids, model.decoder.new_cache(), all_logits=True)
    ref = sources.load(str(finetune.base())).model
    with merged(ref, delta), torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0].numpy()
    return float(np.abs(got - want).max())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _label(row: dict) -> str:
    return row["variant"] + (f" (from deltas-{row['from']})" if "from" in row else "")


def write_results(rows: list[dict], summaries: list[dict], runtime: dict, args: argparse.Namespace) -> None:
    out = results_dir(__file__)
    headers = ["domain", "r", "variant", "c", "perplexity", "gain kept", "accounted kB", "file kB (fp16)",
               "file kB (int8)", "ppl, int8 file (Δ NLL vs float ± s.e.)", "vs best baseline (mean Δ NLL ± s.e.)",
               "vs the same tune on magnitude's pattern", "s"]
    table = [[r["domain"], r["rank"], _label(r), r["relax"], f"{r['perplexity']:.3f}", f"{r['gain_kept']:.1%}",
              r["accounted_kB"], r["file_kB_fp16"], r.get("file_kB_int8", ""),
              f"{r['perplexity_int8']:.3f} ({r['int8_vs_float']})" if "perplexity_int8" in r else "",
              r.get("vs_best_baseline", ""), r.get("vs_same_tune", ""), r["seconds"]] for r in rows]
    lines = ["# Fine-tune deltas on SmolLM2-135M-Instruct", "",
             f"Command: `python benchmarks/deltas/run.py {args.command}`"
             + (" (other domains' rows kept from an earlier run)" if args.keep else ""), "",
             markdown_table(["domain", "base ppl", "full fine-tune ppl", "fine-tune size MB", "windows x context"],
                            [[s["domain"], s["base_perplexity"], s["finetune_perplexity"], s["finetune_size_MB"],
                              f"{s['windows']} x {s['context']}"] for s in summaries]),
             markdown_table(headers, table)]
    if runtime:
        lines += ["Runtime (fused graph with delta slots, this machine):", "",
                  markdown_table(["measure", "value"], [[k, f"{v:.4g}"] for k, v in runtime.items()])]
    (out / f"deltas{args.suffix}.md").write_text("\n".join(lines))
    saved = {"rows": rows, "summaries": summaries, "runtime": runtime, "command": args.command}
    (out / f"deltas{args.suffix}.json").write_text(json.dumps(saved, indent=2))
    _plot(rows, summaries, out / f"deltas{args.suffix}.png")


def _plot(rows: list[dict], summaries: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summaries), figsize=(6 * len(summaries), 4.5), squeeze=False)
    for ax, s in zip(axes[0], summaries):
        mine = [r for r in rows if r["domain"] == s["domain"]]
        for label in dict.fromkeys(r["variant"] for r in mine):
            pts = sorted((r["rank"], r["perplexity"]) for r in mine if r["variant"] == label)
            ax.plot(*zip(*pts), marker="o", label=label)
        ax.axhline(s["base_perplexity"], color="gray", ls="--", label="base")
        ax.axhline(s["finetune_perplexity"], color="black", ls=":", label="full fine-tune")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget rank r (bits of TruncSVD at r)")
        ax.set_ylabel("held-out perplexity")
        ax.set_title(f"{s['domain']}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", nargs="+", default=["docs", "code"])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--extra-ranks", type=int, nargs="+", default=[1, 2],
                        help="ranks at which the variants beyond the paper run")
    parser.add_argument("--max-windows", type=int, default=16, help="test windows per domain")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--valid-windows", type=int, default=8, help="validation windows of 256 tokens (OSD)")
    parser.add_argument("--valid-source", choices=("valid", "train"), default="valid",
                        help="split OSD's validation windows come from: the small valid split (default) or the "
                        "fine-tune's own training text (room for many more windows; a second, independent subset)")
    parser.add_argument("--tune-steps", type=int, default=TUNE_STEPS, help="steps of the '+ tune' variants")
    parser.add_argument("--tune-lr", type=float, default=TUNE_LR, help="learning rate of the '+ tune' variants")
    parser.add_argument("--tune-positions", type=int, default=64,
                        help="positions per window in a tune step's loss (0: all)")
    parser.add_argument("--tag", default="", help="write results/deltas-TAG.md/.json/.png (experiments) instead of "
                        "the main results")
    parser.add_argument("--int8-eval", action="store_true",
                        help="also measure perplexity with each delta's int8 file read back")
    parser.add_argument("--skip-runtime", action="store_true")
    parser.add_argument("--keep", action="store_true",
                        help="keep the saved results of domains not run now (run domains in separate sessions)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine two threads wait on each other)")
    parser.add_argument("--command", default=" ".join(f'"{a}"' if " " in a else a for a in sys.argv[1:]),
                        help=argparse.SUPPRESS)
    parser.add_argument("--reference", nargs="+", help="take the base and fine-tune scores from "
                        "results/deltas-TAG.json (the same windows; the first TAG) and, with --report, add those "
                        "runs' other rows and pair them all")
    parser.add_argument("--report", action="store_true", help="only rewrite deltas.md / .png from deltas.json")
    args = parser.parse_args()
    args.suffix = f"-{args.tag}" if args.tag else ""
    if args.report:
        saved = json.loads((results_dir(__file__) / f"deltas{args.suffix}.json").read_text())
        rows = [r for r in saved["rows"] if "from" not in r]
        args.command = saved.get("command", args.command)
        write_results(_merged_reference(rows, args) if args.reference else rows, saved["summaries"],
                      saved["runtime"], args)
        return
    import torch

    torch.set_num_threads(args.threads)
    rows, summaries = [], []
    saved = results_dir(__file__) / f"deltas{args.suffix}.json"
    if args.keep and saved.is_file():
        old = json.loads(saved.read_text())
        rows = [r for r in old["rows"] if r["domain"] not in args.domains]
        summaries = [s for s in old["summaries"] if s["domain"] not in args.domains]
    work = Path(tempfile.mkdtemp(prefix="edgepack-deltas-"))
    for domain in args.domains:
        r, s = quality(domain, args, work,
                       lambda r, s, done=rows, sums=summaries: write_results(done + r, sums + [s], {}, args))
        rows += r
        summaries.append(s)
        write_results(rows, summaries, {}, args)  # partial results survive an interruption
    runtime = {} if args.skip_runtime else runtime_costs([r for r in rows if Path(r["path"]).is_file()], work)
    write_results(rows, summaries, runtime, args)
    print((results_dir(__file__) / f"deltas{args.suffix}.md").read_text())


if __name__ == "__main__":
    main()
