"""Perplexity of ResSVD and its baselines on the default model, at several compression ratios.

    python benchmarks/compression/run.py [--ratios 0.1 0.2 0.3 0.4] [--max-windows N]

Variants (each from a fresh copy of the dense model): dense; plain SVD on all layers; whitened
(SVD-LLM) on all layers; whitened on the last k layers (k searched); ResSVD as published (whitened
+ a plain-metric residual stage, last k searched); and both with propagation-aware truncation
(each layer corrected in closed form for the compressed layers before it). Perplexity is
measured in PyTorch on the held-out evaluation split
(512-token windows), with compression time and peak RSS. Writes results/compression.md and .png.
"""

from __future__ import annotations

import argparse
import copy
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, results_dir  # noqa: E402

VARIANTS = {
    "svd, all layers": dict(method="svd", layers="all"),
    "svd-llm, all layers": dict(method="svd-llm", layers="all", propagate=False),
    "svd-llm, last k (searched)": dict(method="svd-llm", layers="auto", propagate=False),
    "ressvd as published, last k": dict(method="ressvd", layers="auto", propagate=False),
    "svd-llm + propagation, last k": dict(method="svd-llm", layers="auto", propagate=True),
    "ressvd + propagation, last k": dict(method="ressvd", layers="auto", propagate=True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--max-windows", type=int, default=None, help="evaluation windows (default: all)")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()

    from edgepack.runtime import text
    from edgepack.runtime.perplexity import perplexity
    from edgepack.toolchain import sources
    from edgepack.toolchain.compression import compress_loaded
    from edgepack.toolchain.evaluate import torch_forward
    from edgepack.toolchain.ressvd import ResSVDConfig

    loaded = sources.load(args.model)
    ids = loaded.tokenizer(text.evaluation_text(), add_special_tokens=False)["input_ids"]

    def ppl(model) -> float:
        return perplexity(torch_forward(model), ids, 512, args.max_windows).perplexity

    dense = ppl(loaded.model)
    print(f"dense perplexity {dense:.2f}", file=sys.stderr)
    rows = [["dense", "0 %", dense, 1.0, "-", "-", "-"]]
    for ratio in args.ratios:
        for name in args.variants:
            variant = copy.copy(loaded)
            variant.model = copy.deepcopy(loaded.model)
            start = time.perf_counter()
            report = compress_loaded(variant, ResSVDConfig(ratio=ratio, **VARIANTS[name]))
            seconds = time.perf_counter() - start
            value = ppl(variant.model)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            rows.append([name, f"{ratio:.0%}", value, value / dense, report.layers_compressed, f"{seconds:.0f}",
                         f"{rss:.0f}"])
            print(rows[-1], file=sys.stderr)
            del variant
            _write(rows, args.max_windows)  # after every variant: a long run killed midway keeps its rows
    print((results_dir(__file__) / "compression.md").read_text())


def _write(rows, max_windows) -> None:
    out = results_dir(__file__)
    header = (f"Default model, evaluation split of pydoc_data.topics, 512-token windows"
              f"{'' if max_windows is None else f' (first {max_windows})'}; share of decoder linear "
              "parameters removed. Peak RSS is the process's high-water mark so far.\n\n")
    table = markdown_table(["variant", "removed", "perplexity", "× dense", "layers", "compress s", "peak RSS MB"],
                           rows)
    (out / "compression.md").write_text(header + table)
    _plot(rows, out / "compression.png")


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
