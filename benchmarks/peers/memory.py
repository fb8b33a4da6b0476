"""Where the fused int4 package's peak RSS goes, and what each onnxruntime memory option saves (#7).

    python benchmarks/peers/memory.py PACKAGE [--configs NAME ...] [--rounds 3] [--out FILE.json]

Every configuration runs in a fresh child process (so its peak is its own) that records, from
/proc/self/status, RSS / VmHWM / RssAnon / RssFile after the imports, after loading the model, after a
64-token generation from a 39-token prompt, and after a 256-token prompt plus 64 tokens; the KV cache
spans the full context (pages backed as written), or starts at 256 positions and doubles with ``kv256``.
Configurations are interleaved round-robin (A, B, A, B, ...), and decode speed is reported as the
median per-round ratio to the first configuration, because the machine is shared. Model variants
(one inline model.onnx, external data, ORT format, pre-packed weights) are written once under ``--work``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NEW_TOKENS = 64
SHORT, LONG = 39, 256
STAGES = ("imports", "load", "short", "long")

# name -> (model variant, SessionSettings fields, extra session config entries, initial KV capacity)
CONFIGS: dict[str, tuple[str, dict, dict, int | None]] = {
    "default": ("onnx", {}, {}, None),
    "kv256": ("onnx", {}, {}, 256),
    "no-release": ("onnx", {}, {}, None),  # mapped weight pages kept resident after load
    "before": ("inline", {}, {}, 256),  # the layout and cache before #7's memory work: one model.onnx
    "no-arena": ("onnx", {"cpu_arena": False}, {}, 256),
    "no-mempattern": ("onnx", {"memory_pattern": False}, {}, 256),
    "no-arena-no-pattern": ("onnx", {"cpu_arena": False, "memory_pattern": False}, {}, 256),
    "no-prepack": ("onnx", {"prepacking": False}, {}, 256),
    "external": ("external", {}, {}, 256),
    "external-no-arena": ("external", {"cpu_arena": False}, {}, 256),
    "ort-bytes": ("ort", {}, {"session.use_ort_model_bytes_directly": "1",
                              "session.use_ort_model_bytes_for_initializers": "1"}, 256),
    "ort": ("ort", {}, {}, 256),
    "prepacked": ("prepacked", {}, {}, 256),
    "prepacked-no-arena": ("prepacked", {"cpu_arena": False}, {}, 256),
    "trim": ("onnx", {}, {}, 256),  # glibc malloc_trim after the tokenizer and after the session load
    "mmap-threshold": ("onnx", {}, {}, 256),  # glibc: allocations over 1 MB mmapped (returned on free)
    "external-trim": ("external", {}, {}, 256),
    "external-mmap-threshold": ("external", {}, {}, 256),
    "external-both": ("external", {}, {}, 256),
}


def _status() -> dict[str, int]:
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile")
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k = line.split(":")[0]
            if k in keys:
                out[k] = int(line.split()[1]) * 1024
    return out


def child(model: Path, tokenizer: Path, name: str) -> None:
    """Load ``model`` with configuration ``name``, generate, print one JSON line of measurements."""
    import numpy as np
    import onnxruntime as ort
    from edgepack.runtime import fused_decoder, text
    from edgepack.runtime.decoder import SessionSettings
    from edgepack.runtime.fused_decoder import FusedDecoder
    from edgepack.runtime.tokenizer import Tokenizer  # noqa: F401  (the runtime's imports, as a real load has)
    from tokenizers import Tokenizer as HFTokenizer

    _, fields, entries, capacity = CONFIGS[name]
    import ctypes

    libc = ctypes.CDLL(None)
    trim = "trim" in name or "both" in name
    if "threshold" in name or "both" in name:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    tok = HFTokenizer.from_file(str(tokenizer))
    ids = tok.encode(text.evaluation_text()[:20000]).ids
    stages = {"imports": _status()}
    if trim:
        libc.malloc_trim(0)
    settings = SessionSettings(**fields)
    base = SessionSettings.to_ort

    def to_ort(self: SessionSettings, memory_pattern: bool = True) -> ort.SessionOptions:
        opts = base(self, memory_pattern)
        for k, v in entries.items():
            opts.add_session_config_entry(k, v)
        return opts

    SessionSettings.to_ort = to_ort  # probe only: extra config entries without touching the runtime
    FusedDecoder.initial_capacity = capacity
    if name == "no-release":
        fused_decoder.released_while = lambda path: contextlib.nullcontext()
    t0 = time.perf_counter()
    dec = FusedDecoder(model, settings)
    if trim:
        libc.malloc_trim(0)
    load_s = time.perf_counter() - t0
    stages["load"] = _status()
    speeds = []
    for stage, n in (("short", SHORT), ("long", LONG)):
        cache = dec.new_cache()
        logits = dec.forward(ids[:n], cache)
        t0 = time.perf_counter()
        for _ in range(NEW_TOKENS):
            logits = dec.forward([int(np.argmax(logits))], cache)
        speeds.append(NEW_TOKENS / (time.perf_counter() - t0))
        stages[stage] = _status()
        del cache
    print(json.dumps({"name": name, "load_s": load_s, "stages": stages, "tokens_per_s": speeds}), flush=True)


def make_variant(kind: str, package: Path, work: Path) -> Path:
    """The package's model.onnx in another form (written once)."""
    import onnx
    import onnxruntime as ort

    src = package / "model.onnx"
    if kind == "onnx":
        return src
    out = work / kind
    out.mkdir(parents=True, exist_ok=True)
    if kind == "inline":
        path = out / "model.onnx"
        if not path.exists():
            onnx.save_model(onnx.load(str(src)), str(path))
        return path
    if kind == "external":
        path = out / "model.onnx"
        if not path.exists():
            model = onnx.load(str(src))
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location="model.onnx.data", size_threshold=1024)
        return path
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if kind == "ort":
        path = out / "model.ort"
        opts.optimized_model_filepath = str(path)
        opts.add_session_config_entry("session.save_model_format", "ORT")
    elif kind == "prepacked":
        path = out / "model.onnx"
        opts.optimized_model_filepath = str(path)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    else:
        raise ValueError(kind)
    if not path.exists():
        ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("package", type=Path)
    parser.add_argument("--configs", nargs="*", default=["before", "default"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "edgepack-memory")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.model, args.package / "tokenizer.json", args.child)
        return
    models = {n: make_variant(CONFIGS[n][0], args.package, args.work) for n in args.configs}
    results: dict[str, list[dict]] = {n: [] for n in args.configs}
    for r in range(args.rounds):
        for name in args.configs:
            cmd = [sys.executable, __file__, str(args.package), "--child", name, "--model", str(models[name])]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            results[name].append(json.loads(line))
        print(f"memory: round {r + 1}/{args.rounds} done", file=sys.stderr)
    report(results, args.configs[0])
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


def report(results: dict[str, list[dict]], ref: str) -> None:
    mb = 1 / 2**20
    print("| config | RSS after load | anon / file after load | peak after load | peak after 39+64 | "
          "peak after 256+64 | decode speed / " + ref + " (median of rounds) |")
    print("|---|---|---|---|---|---|---|")
    for name, runs in results.items():
        s = runs[-1]["stages"]
        ratios = [statistics.mean(run["tokens_per_s"]) / statistics.mean(refrun["tokens_per_s"])
                  for run, refrun in zip(runs, results[ref])]
        print(f"| {name} | {s['load']['VmRSS'] * mb:.0f} | {s['load']['RssAnon'] * mb:.0f} / "
              f"{s['load']['RssFile'] * mb:.0f} | {s['load']['VmHWM'] * mb:.0f} | {s['short']['VmHWM'] * mb:.0f} | "
              f"{s['long']['VmHWM'] * mb:.0f} | {statistics.median(ratios):.2f} |")
    s = results[ref][-1]["stages"]["imports"]
    print(f"\nafter imports ({ref}): RSS {s['VmRSS'] * mb:.0f} MB (anon {s['RssAnon'] * mb:.0f}, "
          f"file {s['RssFile'] * mb:.0f})")


if __name__ == "__main__":
    main()
