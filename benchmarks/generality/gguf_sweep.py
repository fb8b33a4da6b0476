"""GGUF sweep: every causal architecture transformers reads from GGUF, as llama.cpp writes it.

    python benchmarks/generality/gguf_sweep.py [--variants llama phi3 ...] [--tag TAG]

Each tiny model of ``tests/gguf_writer.py``'s VARIANTS (settings off their config class's defaults) is written
as a GGUF the way llama.cpp's converter writes one, then read back three ways and compared with the model it was
written from on one 40-token prompt (max |Δ logit|): transformers' own GGUF reader, edgepack's load (the same
reader plus ``toolchain/gguf_repair.py``), and the package ``edgepack build GGUF`` makes (float32, in the
runtime). Writes ``results/gguf.md`` (or ``gguf-TAG.md``) and a PNG of the three errors per variant.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "benchmarks")]

PROMPT = [5, 17, 33, 101, 7, 250, 3, 99, 12, 44] * 4


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.tensor([PROMPT])).logits[0].numpy()


def _error(got, want) -> float:
    return float(abs(got[:, :want.shape[1]] - want).max())


def _one(variant: str, folder: Path) -> dict:
    import gguf_writer
    import tiny
    import torch
    from edgepack.runtime import load
    from edgepack.runtime.errors import EdgepackError
    from edgepack.toolchain import sources
    from edgepack.toolchain.build import BuildConfig, build
    from transformers import AutoModelForCausalLM

    model = gguf_writer.make_model(variant)
    path = gguf_writer.write(model, tiny.make_tokenizer(), folder / f"{variant}.gguf")
    if variant == "lfm2":  # transformers has no converter for an LFM2 GGUF's tokenizer
        tiny.make_tokenizer().save_pretrained(folder)
    want = _logits(model)
    row: dict = {"variant": variant, "arch": gguf_writer.ARCH_NAMES[model.config.model_type]}
    mended = _unmend()  # transformers as it ships, without gguf_repair.mend_reader's entry from an earlier load
    try:
        plain = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name, dtype=torch.float32).eval()
        row["transformers"] = _error(_logits(plain), want)
    except Exception as e:  # what transformers alone does with the file is the point of the column
        row["transformers"] = f"error: {type(e).__name__}"
    finally:
        _config_table().update(mended)
    err = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stderr(err):
            row["edgepack"] = _error(_logits(sources.load(str(path)).model), want)
            manifest = build(BuildConfig(model=str(path), context=64), folder / "pkg")
        decoder = load(folder / "pkg").decoder
        row["package"] = _error(decoder.forward(PROMPT, decoder.new_cache(), all_logits=True)[None], want[None])
        row["graph"] = manifest.plan["graph"]
    except EdgepackError as e:
        row.setdefault("edgepack", f"refused: {str(e).split(': ', 1)[-1][:90]}")
    repaired = [line.split("leaves out: ", 1)[1] for line in err.getvalue().splitlines() if "leaves out: " in line]
    row["read"] = repaired[0] if repaired else "-"
    row["seconds"] = time.perf_counter() - start
    return row


def _config_table() -> dict:
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    return GGUF_TO_TRANSFORMERS_MAPPING["config"]


def _unmend() -> dict:
    table = _config_table()
    if table.get("qwen2_moe") is not None and table.get("qwen2_moe") is table.get("qwen2moe"):
        return {"qwen2_moe": table.pop("qwen2_moe")}
    return {}


def _cell(value) -> str:
    return f"{value:.1e}" if isinstance(value, float) else str(value if value is not None else "-")


def main() -> None:
    import gguf_writer
    import transformers
    from common import results_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="*", default=list(gguf_writer.VARIANTS))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    transformers.logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        import os

        os.environ["EDGEPACK_CACHE"] = str(Path(tmp) / "cache")
        for variant in args.variants:
            folder = Path(tmp) / variant
            folder.mkdir()
            rows.append(_one(variant, folder))
            print(f"{variant}: {rows[-1]}", file=sys.stderr)
    headers = ["variant", "GGUF arch", "transformers alone", "edgepack load", "package (runtime)", "graph",
               "read from the header by edgepack"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        cells = [r["variant"], r["arch"], r.get("transformers"), r.get("edgepack"), r.get("package"), r.get("graph"),
                 r["read"]]
        lines.append("| " + " | ".join(_cell(c).replace("|", "\\|") for c in cells) + " |")
    text = (f"GGUF sweep (`python benchmarks/generality/gguf_sweep.py`, transformers {transformers.__version__}): "
            "max |Δ logit| against the model each GGUF was written from, 40-token prompt.\n\n"
            + "\n".join(lines) + "\n")
    out = results_dir(__file__)
    stem = f"gguf-{args.tag}" if args.tag else "gguf"
    (out / f"{stem}.md").write_text(text, encoding="utf-8")
    _plot(rows, out / f"{stem}.png")
    print(text)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def height(value) -> float:  # log10 of the error; a load error drawn at the top, a match at the bottom
        if not isinstance(value, float):
            return 2.0 if value and str(value).startswith("error") else math.nan
        return max(math.log10(value), -8.0) if value > 0 else -8.0

    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.27
    for j, (key, label) in enumerate([("transformers", "transformers alone"), ("edgepack", "edgepack load"),
                                      ("package", "package (runtime)")]):
        ax.bar([i + (j - 1) * width for i in range(len(rows))], [height(r.get(key)) + 8 for r in rows], width,
               bottom=-8, label=label)
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=45, ha="right")
    ax.set_ylabel("log10 max |Δ logit| (2 = load error)")
    ax.set_title("tiny GGUFs written as llama.cpp writes them, read back")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
