"""Tokens/s of edgepack's runtime against its peers on the default model, side by side in one run.

    python benchmarks/peers/run.py [--runs 5] [--new-tokens 64] [--work DIR]

Every system gets the same prompt tokens and generates exactly N new tokens greedily. Each is timed
generating 1 token (time to first token, i.e. prefill) and N tokens; the decode rate is
(N - 1) / (t_N - t_1), medians over --runs. Writes results/peers.md and results/peers.png.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import folder_size, markdown_table, median_seconds, results_dir  # noqa: E402

PROMPT = ("The Python for statement iterates over the items of any sequence, such as a list or a string, "
          "in the order that they appear. Explain it briefly:")


def ensure_package(out: Path, int4: bool, rebuild: bool, graph: str = "optimum") -> Path:
    from edgepack.runtime.errors import PackageError
    from edgepack.runtime.package import open_package
    from edgepack.toolchain.build import BuildConfig, build

    if not rebuild:
        try:
            open_package(out)
            return out
        except PackageError:
            pass
    build(BuildConfig(model="default", int4=int4, graph=graph), out)
    return out


def edgepack_runner(package: Path, prompt: list[int]):
    from edgepack.runtime import load

    model = load(package)

    def run(n: int) -> None:
        for _ in model.stream_ids(prompt, max_new_tokens=n, ignore_eos=True):
            pass

    return run


def torch_runner(model, prompt: list[int]):
    import torch

    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=model.config.pad_token_id)

    return run


def optimum_runner(package: Path, hf_model, prompt: list[int], work: Path):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    folder = work / f"optimum-{package.name}"
    folder.mkdir(parents=True, exist_ok=True)
    for f in package.glob("model.onnx*"):
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    hf_model.config.save_pretrained(folder)
    hf_model.generation_config.save_pretrained(folder)
    model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, use_io_binding=False)
    ids = torch.tensor([prompt])

    def run(n: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=hf_model.config.pad_token_id)

    return run


def measure(name: str, run, runs: int, new_tokens: int, size: int) -> list[object]:
    run(4)  # warm up: first-call allocations and graph preparation are not what users feel per token
    t1 = median_seconds(lambda: run(1), runs)
    tn = median_seconds(lambda: run(new_tokens), runs)
    rate = (new_tokens - 1) / (tn - t1)
    print(f"{name:40s} {rate:6.1f} tok/s, first token {t1 * 1000:.0f} ms", file=sys.stderr)
    return [name, rate, t1 * 1000, size / 1e6]


def plot(rows: list[list[object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    names = [r[0] for r in rows]
    rates = [r[1] for r in rows]
    colors = ["tab:blue" if n.startswith("edgepack") else "tab:gray" for n in names]
    ax.barh(names, rates, color=colors)
    for i, v in enumerate(rates):
        ax.text(v, i, f" {v:.1f}", va="center")
    ax.invert_yaxis()
    ax.set_xlabel("decode tokens/s (higher is better)")
    ax.set_title("SmolLM2-135M-Instruct: greedy decoding, same prompt, one run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgepack-bench")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the edgepack packages")
    args = parser.parse_args()

    import torch
    from edgepack.toolchain import sources

    torch.set_num_threads(os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    f32 = ensure_package(args.work / "smollm2-float32", int4=False, rebuild=args.rebuild)
    int4 = ensure_package(args.work / "smollm2-int4", int4=True, rebuild=args.rebuild)
    fused_f32 = ensure_package(args.work / "smollm2-fused-float32", int4=False, rebuild=args.rebuild, graph="fused")
    fused_int4 = ensure_package(args.work / "smollm2-fused-int4", int4=True, rebuild=args.rebuild, graph="fused")
    loaded = sources.load("default")
    prompt = loaded.tokenizer(PROMPT)["input_ids"]
    gguf = Path(loaded.source.path) / loaded.source.gguf_file

    systems = [
        ("PyTorch eager, float32", lambda: torch_runner(loaded.model, prompt), 4 * sum(
            p.numel() for p in loaded.model.parameters())),
        ("optimum ORTModelForCausalLM, float32", lambda: optimum_runner(f32, loaded.model, prompt, args.work),
         folder_size(f32)),
        ("optimum ORTModelForCausalLM, int4", lambda: optimum_runner(int4, loaded.model, prompt, args.work),
         folder_size(int4)),
        ("edgepack, float32", lambda: edgepack_runner(f32, prompt), folder_size(f32)),
        ("edgepack, int4", lambda: edgepack_runner(int4, prompt), folder_size(int4)),
        ("edgepack fused, float32", lambda: edgepack_runner(fused_f32, prompt), folder_size(fused_f32)),
        ("edgepack fused, int4", lambda: edgepack_runner(fused_int4, prompt), folder_size(fused_int4)),
    ]
    rows = [measure(name, make(), args.runs, args.new_tokens, size) for name, make, size in systems]

    out = results_dir(__file__)
    header = (f"Default model, {len(prompt)}-token prompt, {args.new_tokens} greedy new tokens, median of "
              f"{args.runs} runs, {os.cpu_count()} CPU threads, {platform.processor() or platform.machine()}. "
              f"Source GGUF {gguf.stat().st_size / 1e6:.0f} MB.\n\n")
    table = markdown_table(["system", "decode tokens/s", "first token (ms)", "size on disk (MB)"], rows)
    (out / "peers.md").write_text(header + table)
    plot(rows, out / "peers.png")
    print(header + table)


if __name__ == "__main__":
    main()
