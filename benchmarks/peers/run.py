"""edgepack's runtime against its peers on the default model, side by side in one run.

    python benchmarks/peers/run.py [--with-llama-cpp] [--runs 5] [--new-tokens 64] [--ppl-windows 20]
                                   [--work DIR] [--rebuild] [--only NAME ...] [--package NAME DIR ...]

Every system runs in its own worker process (worker.py), so its peak RSS is its own, and gets the
same token ids: a chat-templated question (~30 tokens) and a 256-token passage, greedy, exactly N new
tokens (end-of-sequence ignored), the same thread count (onnxruntime intra-op threads, torch threads,
llama.cpp n_threads) and the same context (llama.cpp n_ctx = the packages' context length).
Timed requests go round-robin over the systems (A, B, C, A, B, C, ...; each round starts one system
later), so background load on a shared machine falls on all of them alike; the 1-minute load average
is sampled every round and recorded. Per round and system: t_1 and t_N on the short prompt (decode rate
(N - 1) / (t_N - t_1)) and t_1 on the 256-token prompt (time to first token); medians over rounds.
``--with-llama-cpp`` pip-installs llama-cpp-python (compiles llama.cpp, minutes) when it is missing;
llama.cpp is benchmarked whenever it is importable. Writes results/peers.{md,json,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import llamacpp  # noqa: E402
import report  # noqa: E402
from common import folder_size, results_dir  # noqa: E402

QUESTION = "Explain briefly what a Python list comprehension is."
LONG_PROMPT_TOKENS = 256
WORKER = Path(__file__).resolve().parent / "worker.py"
RESSVD = "edgepack, ResSVD 20 % + int4 (fused graph)"
INT8 = "edgepack, int8 (fused graph)"
SETTLE_S = 0.2  # pause between requests: idle thread pools (OpenMP, onnxruntime) stop spinning


@dataclass(frozen=True)
class System:
    name: str
    kind: str  # worker.py runner
    path: Path
    size_bytes: int | None
    package: Path | None = None  # an edgepack package: perplexity is measured on it
    env: tuple[tuple[str, str], ...] = ()  # extra environment of its worker


def ensure_package(out: Path, rebuild: bool, model: str = "default", **config: object) -> Path:
    from edgepack.runtime.errors import PackageError
    from edgepack.runtime.package import open_package
    from edgepack.toolchain.build import BuildConfig, build

    if not rebuild:
        try:
            open_package(out)
            return out
        except PackageError:
            pass
    print(f"peers: building {out.name}", file=sys.stderr)
    build(BuildConfig(model=model, **config), out)
    return out


def prepare(args: argparse.Namespace) -> tuple[list[System], dict[str, list[int]]]:
    """Build the packages, write optimum's folders, make the prompts; the PyTorch model is freed after."""
    from edgepack.runtime import text
    from edgepack.toolchain import default_model, sources
    from edgepack.toolchain.ressvd import ResSVDConfig

    w = args.work
    f32 = ensure_package(w / "smollm2-float32", args.rebuild, graph="optimum")  # optimum's own graph, for optimum
    int4 = ensure_package(w / "smollm2-int4", args.rebuild, graph="optimum", int4=True)
    fused_f32 = ensure_package(w / "smollm2-fused-float32", args.rebuild, graph="fused")
    fused_int4 = ensure_package(w / "smollm2-fused-int4", args.rebuild, graph="fused", int4=True)
    fused_int8 = w / "smollm2-fused-int8"
    if wanted(args, INT8):
        ensure_package(fused_int8, args.rebuild, graph="fused", int8=True)
    # From a folder of `edgepack compress default --ratio 0.2` when given, else compressed inline as
    # `edgepack build default --ratio 0.2 --int4` does (its factor tune then runs through the int4 rounding).
    ressvd = w / "smollm2-fused-int4-ressvd20"
    if wanted(args, RESSVD):  # compressing takes minutes: not for a run that leaves it out
        ensure_package(ressvd, args.rebuild, graph="fused", int4=True,
                       **({"model": str(args.ressvd_model)} if args.ressvd_model else
                          {"compression": ResSVDConfig(ratio=0.2)}))
    loaded = sources.load("default")
    tok = loaded.tokenizer
    short = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                    tokenize=True)
    long = tok(text.evaluation_text(), add_special_tokens=False)["input_ids"][:LONG_PROMPT_TOKENS]
    prompts = {"short": [int(t) for t in short], "long": [int(t) for t in long]}
    folders = {}
    for package in (f32, int4):
        folder = w / f"optimum-{package.name}"
        folder.mkdir(parents=True, exist_ok=True)
        for f in package.glob("model.onnx*"):
            if not (folder / f.name).exists():
                (folder / f.name).symlink_to(f.resolve())
        loaded.model.config.save_pretrained(folder)
        loaded.model.generation_config.save_pretrained(folder)
        folders[package] = folder
    torch_bytes = 4 * sum(p.numel() for p in loaded.model.parameters())
    del loaded
    gc.collect()
    gguf = default_model.default_gguf_path()
    systems = [
        System("PyTorch eager, float32", "torch", gguf, torch_bytes),
        System("optimum ORTModelForCausalLM, float32", "optimum", folders[f32], folder_size(f32)),
        System("optimum ORTModelForCausalLM, int4", "optimum", folders[int4], folder_size(int4)),
        System("edgepack, float32 (fused graph)", "edgepack", fused_f32, folder_size(fused_f32), fused_f32),
        System(INT8, "edgepack", fused_int8, folder_size(fused_int8), fused_int8),
        System("edgepack, int4 (fused graph)", "edgepack", fused_int4, folder_size(fused_int4), fused_int4),
        System(RESSVD, "edgepack", ressvd, folder_size(ressvd), ressvd),
    ]
    for name, folder in args.package:
        systems.append(System(name, "edgepack", folder, folder_size(folder), folder))
    if llamacpp.installed():
        systems.append(System("llama.cpp Q4_1 (llama-cpp-python)", "llama-cpp", gguf, gguf.stat().st_size))
        if args.llama_passive:  # OpenMP threads that sleep instead of spinning between barriers
            systems.append(System("llama.cpp Q4_1, OMP_WAIT_POLICY=passive", "llama-cpp", gguf,
                                  gguf.stat().st_size, env=(("OMP_WAIT_POLICY", "passive"),)))
    else:
        print("peers: llama-cpp-python is not installed; --with-llama-cpp installs it", file=sys.stderr)
    return [s for s in systems if wanted(args, s.name) or s.name in dict(args.package)], prompts


def wanted(args: argparse.Namespace, name: str) -> bool:
    return not args.only or any(o.lower() in name.lower() for o in args.only)


class Worker:
    def __init__(self, system: System, threads: int, context: int) -> None:
        self.system = system
        cmd = [sys.executable, str(WORKER), system.kind, str(system.path), "--threads", str(threads),
               "--context", str(context)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **dict(system.env)})

    def request(self, **body: object) -> dict:
        self.proc.stdin.write(json.dumps(body) + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"peers: the worker for {self.system.name} exited (code {self.proc.wait()})")
        return json.loads(line)

    def time(self, prompt: list[int], n: int) -> float:
        seconds = self.request(prompt=prompt, new_tokens=n)["seconds"]
        time.sleep(SETTLE_S)
        return seconds

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def measure(systems: list[System], prompts: dict[str, list[int]], args: argparse.Namespace) -> tuple[list, list]:
    rows = [report.Row(s.name, s.size_bytes) for s in systems]
    workers = [Worker(s, args.threads, args.context) for s in systems]  # they load in parallel
    for row, worker in zip(rows, workers):
        row.load_s = worker.read()["load_s"]
        worker.time(prompts["short"], 4)  # warm-up: first-call allocations and graph preparation
        worker.time(prompts["long"], 1)
    loads = []
    for r in range(args.runs):
        order = list(range(len(workers)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            loads.append(os.getloadavg()[0])
            w, row = workers[i], rows[i]
            row.first_short_s.append(w.time(prompts["short"], 1))
            row.full_short_s.append(w.time(prompts["short"], args.new_tokens))
            row.first_long_s.append(w.time(prompts["long"], 1))
        print(f"peers: round {r + 1}/{args.runs} done, load average {loads[-1]:.2f}", file=sys.stderr)
    loads.append(os.getloadavg()[0])
    for row, worker in zip(rows, workers):
        row.peak_rss_bytes = worker.request(rss=True)["rss"]
        worker.close()
    return rows, loads


def perplexity(package: Path, windows: int, threads: int) -> float | None:
    cmd = [sys.executable, "-m", "edgepack.runtime.cli", "eval", str(package), "--max-windows", str(windows),
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    found = re.search(r"perplexity ([0-9.]+)", out.stdout)
    if not found:
        print(f"peers: eval of {package} failed: {out.stderr.strip()[-300:]}", file=sys.stderr)
    return float(found.group(1)) if found else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--with-llama-cpp", action="store_true", help="pip-install llama-cpp-python if missing")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--context", type=int, default=2048, help="the packages' context; llama.cpp's n_ctx")
    parser.add_argument("--ppl-windows", type=int, default=20, help="evaluation windows of 512 tokens (0: skip)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgepack-bench")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the edgepack packages")
    parser.add_argument("--ressvd-model", type=Path, help="build the ResSVD package from this folder written by "
                        "'edgepack compress default --ratio 0.2' (default: compress inline)")
    parser.add_argument("--package", nargs=2, action="append", default=[], metavar=("NAME", "DIR"),
                        type=str, help="also benchmark this edgepack package under NAME (repeatable)")
    parser.add_argument("--only", nargs="*", help="benchmark only systems whose name contains one of these")
    parser.add_argument("--llama-passive", action="store_true",
                        help="also llama.cpp with OMP_WAIT_POLICY=passive (how much its spinning costs under load)")
    parser.add_argument("--results", type=Path, default=None, help="folder for the results (default: results/)")
    args = parser.parse_args()
    args.package = [(name, _package_dir(folder)) for name, folder in args.package]
    if args.with_llama_cpp:
        llamacpp.ensure_installed()
    args.work.mkdir(parents=True, exist_ok=True)
    systems, prompts = prepare(args)
    start = time.time()
    rows, loads = measure(systems, prompts, args)
    elapsed = time.time() - start
    if args.ppl_windows:
        for system, row in zip(systems, rows):
            if system.package is not None:
                row.perplexity = perplexity(system.package, args.ppl_windows, args.threads)
    write_results(rows, loads, prompts, args, elapsed)


def _package_dir(folder: str) -> Path:
    from edgepack.runtime.errors import PackageError
    from edgepack.runtime.package import open_package

    try:
        open_package(Path(folder))
    except PackageError as exc:
        raise SystemExit(f"peers: --package {folder}: {exc}") from None
    return Path(folder)


def ratio_line(rows: list[report.Row], n: int) -> str:
    by_name = {r.name: r for r in rows}
    ours, peer = by_name.get("edgepack, int4 (fused graph)"), by_name.get("llama.cpp Q4_1 (llama-cpp-python)")
    if not (ours and peer and ours.decode_rate(n) and peer.decode_rate(n)):
        return ""
    per_round = [(tnp - t1p) / (tno - t1o) for t1o, tno, t1p, tnp in
                 zip(ours.first_short_s, ours.full_short_s, peer.first_short_s, peer.full_short_s)]
    return (f"edgepack int4 / llama.cpp, decode tokens/s: {ours.decode_rate(n) / peer.decode_rate(n):.2f}x "
            f"(median of per-round ratios {statistics.median(per_round):.2f}x); time to first token, 256-token "
            f"prompt: {ours.median_ms(ours.first_long_s):.0f} ms vs {peer.median_ms(peer.first_long_s):.0f} ms; "
            f"peak RSS {ours.peak_rss_bytes / 1e6:.0f} MB vs {peer.peak_rss_bytes / 1e6:.0f} MB.\n\n")


def write_results(rows: list[report.Row], loads: list[float], prompts: dict, args: argparse.Namespace,
                  elapsed: float) -> None:
    cpu = platform.processor() or platform.machine()
    header = (f"Default model, chat-templated {len(prompts['short'])}-token prompt and a {len(prompts['long'])}-token "
              f"passage, {args.new_tokens} greedy new tokens (EOS ignored), {args.threads} threads, context "
              f"{args.context}, {cpu}, {os.cpu_count()} cores. Medians of {args.runs} rounds, systems interleaved "
              f"round-robin, each in its own process ({elapsed:.0f} s). 1-minute load average during the run: "
              f"min {min(loads):.2f}, median {statistics.median(loads):.2f}, max {max(loads):.2f}.\n\n")
    out = args.results or results_dir(__file__)
    out.mkdir(parents=True, exist_ok=True)
    body = header + ratio_line(rows, args.new_tokens) + report.table(rows, args.new_tokens, args.ppl_windows)
    (out / "peers.md").write_text(body)
    meta = {"command": " ".join(sys.argv), "prompts": prompts, "loads": loads, "runs": args.runs,
            "new_tokens": args.new_tokens, "threads": args.threads, "context": args.context,
            "ppl_windows": args.ppl_windows, "elapsed_s": elapsed, "cpu": cpu, "when": time.strftime("%F %T")}
    report.save_json(rows, meta, out / "peers.json")
    report.plot(rows, args.new_tokens, out / "peers.png",
                f"SmolLM2-135M-Instruct, {args.threads} threads, one interleaved run "
                f"(load average median {statistics.median(loads):.1f})")
    print(body)


if __name__ == "__main__":
    main()
