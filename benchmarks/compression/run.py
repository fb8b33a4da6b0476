"""Perplexity of ResSVD and its baselines on the default model, at several compression ratios.

    python benchmarks/compression/run.py [--ratios 0.1 0.2 0.3 0.4] [--max-windows N]

Variants (each from a fresh copy of the dense model): dense; plain SVD on all layers; whitened
(SVD-LLM) on all layers; whitened on the last k layers (k searched); ResSVD as published (whitened
+ a plain-metric residual stage, last k searched); and propagation-aware truncation (each layer
corrected in closed form for the compressed layers before it, with the ridge chosen on held-out
calibration windows) on the last k = ⌈2·N·R⌉ layers (half of each removed, the planner's rule) or
on the last k searched by the non-propagated proxy. Perplexity is measured in PyTorch on the held-out
evaluation split (512-token windows), with compression time and peak RSS; "int4 ppl" fake-quantizes
every decoder linear weight (block 32, asymmetric, as the int4 export) to show whether the factors
survive int4. Rows are merged into results/compression.json by (variant, ratio), so separate runs
add up; results/compression.md and .png are rewritten from it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, results_dir  # noqa: E402

MLP_TARGETS = ("gate_proj", "up_proj", "down_proj", "gate_up_proj", "fc1", "fc2")
VARIANTS = {
    "svd, all layers": dict(method="svd", layers="all"),
    "svd-llm, all layers": dict(method="svd-llm", layers="all", propagate=False),
    "svd-llm, last k (searched)": dict(method="svd-llm", layers="auto", propagate=False),
    "ressvd as published, last k": dict(method="ressvd", layers="auto", propagate=False),
    "ressvd + propagation (ridge), last 2NR": dict(method="ressvd", layer_share=0.5, propagate=True),
    "ressvd + propagation (ridge), last 2.5NR": dict(method="ressvd", layer_share=0.4, propagate=True),
    "ressvd + propagation (ridge), last k searched": dict(method="ressvd", layers="auto", propagate=True),
    "ressvd + propagation (ridge), all layers": dict(method="ressvd", layers="all", propagate=True),
    "ressvd + propagation (ridge), last 2NR, 32 windows": dict(method="ressvd", layer_share=0.5, propagate=True,
                                                              calib_windows=32),
    "ressvd + propagation (ridge), last 2NR, spectrum ranks": dict(method="ressvd", layer_share=0.5, propagate=True,
                                                                  allocation="spectrum"),
    # Only the MLPs factorized (fewer ops a compressed layer: 5 MatMulNBits instead of 9), at the MLP ratio that
    # removes the same share of all decoder linears, over the last ⌈N·R_mlp/0.5⌉ layers.
    "ressvd + propagation (ridge), MLPs only, last 2NR": dict(method="ressvd", layer_share=0.5, propagate=True,
                                                             targets=MLP_TARGETS),
}
HEADERS = ["variant", "removed", "perplexity", "× dense", "int4 ppl", "layers", "compress s", "peak RSS MB"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: all)")
    parser.add_argument("--model", default="default")
    parser.add_argument("--int4", action="store_true", help="also the perplexity of fake-int4 weights")
    parser.add_argument("--reuse-dense", action="store_true",
                        help="take the dense perplexity from results/compression.json (same --max-windows)")
    args = parser.parse_args()

    from edgepack.runtime import text
    from edgepack.runtime.perplexity import perplexity
    from edgepack.toolchain import sources
    from edgepack.toolchain.evaluate import torch_forward
    from edgepack.toolchain.ressvd import ResSVDConfig, compress_
    from edgepack.toolchain.ressvd.calibration import calibration_windows

    loaded = sources.load(args.model)
    ids = loaded.tokenizer(text.evaluation_text(), add_special_tokens=False)["input_ids"]
    defaults = ResSVDConfig()
    corpus = text.calibration_text()

    def ppl(model) -> float:
        return perplexity(torch_forward(model), ids, 512, args.max_windows).perplexity

    from edgepack.toolchain.ressvd import selection

    per_layer = selection.target_linears(loaded.model, ResSVDConfig().targets)
    rows = {}  # this run's rows; _write merges them into what other runs wrote
    dense = _load_rows()[("dense", "0 %")][2] if args.reuse_dense else ppl(loaded.model)
    print(f"dense perplexity {dense:.2f}", file=sys.stderr)
    rows[("dense", "0 %")] = ["dense", "0 %", dense, 1.0, "-", "-", "-", "-"]
    for ratio in args.ratios:
        for name in args.variants:
            options = dict(VARIANTS[name])
            share = options.pop("layer_share", None)
            # A narrower set of targets removes the same share of *all* decoder linears: its own ratio is higher.
            own = selection.target_linears(loaded.model, options.get("targets", defaults.targets))
            own_ratio = ratio * sum(map(selection.params, per_layer)) / sum(map(selection.params, own))
            if share:  # the last ⌈N·R/share⌉ layers, each losing about ``share`` of its parameters
                k = math.ceil(len(own) * own_ratio / share)
                options["layers"] = max(selection.min_layers(own, own_ratio), k)
            model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            config = ResSVDConfig(ratio=own_ratio, **options)
            calib = calibration_windows(loaded.tokenizer, corpus, config.calib_windows, defaults.calib_length)
            report = compress_(model, config, calib if options["method"] != "svd" else [])
            seconds = time.perf_counter() - start
            value = ppl(model)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            int4 = "-"
            if args.int4:
                fake_int4_(model)
                int4 = ppl(model)
            rows[(name, f"{ratio:.0%}")] = [name, f"{ratio:.0%}", value, value / dense, int4, report.layers_compressed,
                                            f"{seconds:.0f}", f"{rss:.0f}"]
            print(rows[(name, f"{ratio:.0%}")], file=sys.stderr)
            del model
            _write(rows, args.max_windows)  # after every variant: a long run killed midway keeps its rows
    print((results_dir(__file__) / "compression.md").read_text())


def fake_int4_(model) -> None:
    """Round every decoder linear weight as the int4 export does (blocks of 32 along the input, asymmetric)."""
    import torch

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and "lm_head" not in name:
                out, inp = m.weight.shape
                w = torch.nn.functional.pad(m.weight, (0, (-inp) % 32)).reshape(out, -1, 32)
                low, high = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
                scale = ((high - low) / 15).clamp_min(1e-12)
                zero = torch.round(-low / scale)
                q = torch.clamp(torch.round(w / scale) + zero, 0, 15)
                m.weight.copy_(((q - zero) * scale).reshape(out, -1)[:, :inp])


def _load_rows() -> dict:
    path = results_dir(__file__) / "compression.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    return {(r[0], r[1]): r for r in rows}


def _write(rows: dict, max_windows) -> None:
    out = results_dir(__file__)
    rows = {**_load_rows(), **rows}
    order = sorted(rows.values(), key=lambda r: (float(r[1].rstrip(" %")), r[0] != "dense"))
    (out / "compression.json").write_text(json.dumps(order, indent=1) + "\n")
    header = (f"Default model, evaluation split of pydoc_data.topics, 512-token windows"
              f"{'' if max_windows is None else f' (first {max_windows})'}; share of decoder linear "
              "parameters removed. Peak RSS is the process's high-water mark so far.\n\n")
    (out / "compression.md").write_text(header + markdown_table(HEADERS, order))
    _plot(order, out / "compression.png")


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r[0] for r in rows[1:]):
        pts = [(float(r[1].rstrip(" %")), r[2]) for r in rows if r[0] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.axhline(rows[0][2], color="black", linestyle="--", label="dense")
    ax.set_yscale("log")
    ax.set_xlabel("decoder linear parameters removed (%)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
