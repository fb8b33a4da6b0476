"""Perplexity against steps of the factor tune (tune.py) after the default propagated compression.

    python benchmarks/compression/tune_curve.py [--ratio 0.2] [--steps 64] [--lrs 1e-4 3e-4] [--fp32]
                                                [--checkpoints 16 32 64] [--calib-windows 64] [--max-windows 20]
    python benchmarks/compression/tune_curve.py --runs 64:1e-4:64 48:1.5e-4:64 64:1e-4:32:1   # STEPS:LR:POSITIONS:SEED

Compresses the default model once (ResSVDConfig defaults, propagation with the ridge, last 2NR layers),
then, from a copy of that compressed model for each learning rate, runs one cosine-scheduled tune of
``--steps`` steps and measures PyTorch perplexity on the first evaluation windows at each checkpoint
(mid-run checkpoints are points of the longer schedule, not shorter runs). ``--runs`` instead runs one tune
per STEPS:LR[:POSITIONS[:SEED]] spec (positions: logits per window in the loss, 64 by default; seed: of the window
order and positions, 0 by default), each measured at its
end, with its tune's wall seconds. Writes results/tune.json/.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, results_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-4, 3e-4])
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--calib-windows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--tag", default="", help="a label for this run's rows (e.g. 'warm-up')")
    parser.add_argument("--skip-untuned", action="store_true", help="no perplexity before the tune")
    parser.add_argument("--fp32", action="store_true", help="tune in float32 (default: bfloat16 autocast)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="STEPS:LR[:POSITIONS[:SEED]]",
                        help="one tune per spec instead of --steps x --lrs")
    args = parser.parse_args()

    from edgepack.runtime import text
    from edgepack.runtime.perplexity import perplexity
    from edgepack.toolchain import sources
    from edgepack.toolchain.evaluate import torch_forward
    from edgepack.toolchain.ressvd import ResSVDConfig, selection, tune
    from edgepack.toolchain.ressvd.calibration import calibration_windows
    from edgepack.toolchain.ressvd.sequential import compress_sequential_

    loaded = sources.load("default")
    ids = loaded.tokenizer(text.evaluation_text(), add_special_tokens=False)["input_ids"]
    config = ResSVDConfig(ratio=args.ratio, calib_windows=args.calib_windows)
    windows = calibration_windows(loaded.tokenizer, text.calibration_text(), config.calib_windows, config.calib_length)

    def ppl(model) -> float:
        return perplexity(torch_forward(model), ids, 512, args.max_windows).perplexity

    per_layer = selection.target_linears(loaded.model, config.targets)
    ranks = selection.last_k_ranks(per_layer, args.ratio, selection.half_k(per_layer, args.ratio))
    from edgepack.toolchain.ressvd import factorize

    def truncate(w, rank, s):
        return factorize.residual(w, rank, s, config.residual_share)

    start = time.perf_counter()
    traces: list = []
    compress_sequential_(loaded.model, ranks, windows, config.damping, truncate, config.ridge, traces)
    compress_s = time.perf_counter() - start
    rows = [] if args.skip_untuned else [["none", args.calib_windows, 0, ppl(loaded.model), 0.0, f"{compress_s:.0f}"]]
    print(f"compression {compress_s:.0f} s", rows, file=sys.stderr, flush=True)
    runs = [_spec(r) for r in args.runs] if args.runs else [(args.steps, lr, 64, 0) for lr in args.lrs]
    for steps, lr, positions, seed in runs:
        checkpoints = [steps] if args.runs else args.checkpoints
        label = (f"{lr:g}{'' if positions == 64 else f' ({positions} positions)'}"
                 f"{'' if seed == 0 else f' (seed {seed})'}{args.tag}")
        model = copy.deepcopy(loaded.model)
        begun = time.perf_counter()
        paused = [0.0]

        def checkpoint(done: int, model=model, label=label, begun=begun, paused=paused,
                       checkpoints=checkpoints) -> None:
            if done in checkpoints:
                t = time.perf_counter()
                value = ppl(model)
                tuned_s = t - begun - paused[0]
                paused[0] += time.perf_counter() - t
                rows.append([label, args.calib_windows, done, value, 0.0, f"{compress_s + tuned_s:.0f}"])
                print(rows[-1], file=sys.stderr, flush=True)
                _write(rows, args)

        cpu = time.process_time()
        settings = tune.TuneSettings(steps, lr, args.batch, positions, seed, bf16=not args.fp32)
        losses = tune.tune_(model, traces[0], settings, checkpoint)
        # CPU seconds include the checkpoints' perplexity runs; with --checkpoints equal to --steps only the last.
        print(f"lr {lr:g} tune+checkpoints CPU {time.process_time() - cpu:.1f} s losses "
              f"{[round(v, 4) for v in losses]}", file=sys.stderr, flush=True)
        del model
    _write(rows, args)
    print((results_dir(__file__) / "tune.md").read_text())


def _spec(text: str) -> tuple[int, float, int, int]:
    parts = text.split(":")
    if len(parts) not in (2, 3, 4):
        raise SystemExit(f"--runs takes STEPS:LR[:POSITIONS[:SEED]], got {text!r}")
    positions = int(parts[2]) if len(parts) > 2 else 64
    seed = int(parts[3]) if len(parts) > 3 else 0
    return int(parts[0]), float(parts[1]), positions, seed


def _write(rows, args) -> None:
    for r in rows:
        r[4] = r[3] / 14.78  # dense perplexity on the first 20 evaluation windows (compression.md)
    out = results_dir(__file__)
    path = out / "tune.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    rows = [r for r in old if (r[0], r[2]) not in {(n[0], n[2]) for n in rows}] + rows  # runs add up
    path.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    header = (f"Factor tune after the default compression at {args.ratio:.0%} (KD to the dense logits, batch "
              f"{args.batch} × 256 tokens); each lr row is one cosine run (64 steps, no warm-up; 'warm-up': 128 "
              f"steps, linear warm-up over the first eighth), mid-run rows are points of that schedule; PyTorch "
              f"perplexity, first {args.max_windows} evaluation windows; seconds: compression + tune so far "
              "(shared machine, load 2-10).\n\n")
    headers = ["lr", "calib windows", "steps", "perplexity", "× dense", "seconds"]
    (out / "tune.md").write_text(header + markdown_table(headers, rows))


if __name__ == "__main__":
    main()
