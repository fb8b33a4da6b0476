"""``edgepack delta``: compress the difference between a fine-tune and its base into a delta file.
Like toolchain/cli.py, importing this module must not import torch."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from edgepack.runtime.errors import UsageError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("delta", help="compress a fine-tune into a small delta file (OSD and baselines)",
                       description="Take ΔW = FINETUNED − BASE for every linear layer, compress it to the bit "
                       "budget of a rank-R truncated SVD (sparse factors of rank R+C chosen by magnitude, or by "
                       "OSD's gradient scores on --valid text), and write a delta file that 'edgepack run/chat/eval "
                       "PACKAGE --delta FILE' applies at load time. BASE must be the source the package was "
                       "built from.")
    p.add_argument("base", help="base model: 'default', a Hugging Face model folder, or a .gguf file")
    p.add_argument("finetuned", help="the fine-tuned model (same architecture and size)")
    p.add_argument("-o", "--output", required=True, help="delta file to write (.safetensors, atomically)")
    p.add_argument("--method", default="magtruncsvd", help="magtruncsvd (default: the best measured, see "
                   "benchmarks/deltas) | osd (gradient importance on --valid text) | truncsvd")
    p.add_argument("--rank", type=int, default=2, help="budget: a rank-R truncated SVD's bits per layer (default 2)")
    p.add_argument("--relax", type=int, default=None, help="rank relaxation C: factors of rank R+C (default C=R)")
    p.add_argument("--valid", help="validation text file or folder for OSD's importance (without it OSD falls "
                   "back to the data-free magnitude criterion and says so)")
    p.add_argument("--windows", type=int, default=8, help="validation windows of 256 tokens (default 8)")
    p.add_argument("--importance", choices=("taylor", "fisher", "fisher-kl", "rms", "output"), default=None,
                   help="OSD's entry score: fisher-kl θ²·Σ_w g_w² with each window's loss KL(fine-tune ‖ model) "
                   "(default: the best measured; one backward per validation window), fisher (the same with the "
                   "text's NLL), taylor |θ·∂L/∂θ| (the paper's), rms |θ|·sqrt(Σ_w g_w²), or output "
                   "(layer-output error of removing the entry, from the validation inputs)")
    p.add_argument("--gradient-at", choices=("delta", "finetune", "base"), default=None,
                   help="OSD: take the gradient at the base (default: the best measured), at base + the rank-(R+C) "
                   "delta (the paper's), or at the full fine-tune")
    p.add_argument("--shrink", type=float, default=0.0,
                   help="fisher: pull each entry's Fisher toward its factor's mean by this weight (default 0)")
    p.add_argument("--normalize", action="store_true",
                   help="OSD: divide each layer's scores by their mean (matters with --allocation global)")
    p.add_argument("--allocation", choices=("layer", "global"), default=None,
                   help="global: one budget for the whole delta, spent where the importance is highest (OSD's "
                   "default with gradient scores); layer: every matrix gets TruncSVD-at-R's bits (the paper's, and "
                   "the other methods')")
    p.add_argument("--auto", action="store_true", help="OSD: choose C and the allocation by validation loss")
    p.add_argument("--whiten", action="store_true", help="factor ΔW in the metric of the --valid text's layer "
                   "inputs (minimizes the delta's output error rather than its weight error)")
    p.add_argument("--refit", action="store_true", help="sparse methods: re-solve the kept entries by least squares "
                   "on ΔW once the pattern is chosen (same bits)")
    from edgepack.toolchain.delta.defaults import TUNE_LR, TUNE_STEPS

    p.add_argument("--tune-steps", type=int, default=None,
                   help="distil the kept values toward the fine-tune for N steps on the --valid text (same entries, "
                   f"same bits, new values); default: {TUNE_STEPS} for --method osd with --valid, 0 otherwise")
    p.add_argument("--tune-lr", type=float, default=None, help=f"learning rate of the tune (default {TUNE_LR:g})")
    p.add_argument("--tune-hard", type=float, default=None,
                   help="weight H in [0, 1] of the --valid text's own next-token NLL in the tune's loss, "
                   "(1 − H)·KL(fine-tune ‖ delta) + H·NLL (default 0: the KL alone); pass the fine-tune's "
                   "training text as --valid")
    p.add_argument("--prune-during-tune", action="store_true",
                   help="sparse methods with --valid: choose the kept entries during the tune (start from all entries "
                   "of the rank R+C factors, prune to the budget while distilling); measured no better than choosing "
                   "them before the tune (README, #6)")
    # int8 is the default: at r = 1, 2 it moved held-out NLL by under 1e-4 nats (benchmarks/deltas, --int8-eval)
    # and keeps an r = 2 delta of the default model under 1 % of its int4 package (float16: 0.99 %).
    p.add_argument("--values", choices=("float32", "float16", "int8"), default="int8",
                   help="how factor values are stored on disk: int8 with one scale per factor (default), float16 or "
                   "float32 (the accounting counts 32 bits for every method alike)")
    p.set_defaults(handler=delta)


def _tune_options(args: argparse.Namespace) -> dict:
    """Tune settings the user gave; unset ones take DeltaConfig's defaults for the method."""
    given = {"tune_steps": args.tune_steps, "tune_lr": args.tune_lr, "tune_hard": args.tune_hard}
    return {k: v for k, v in given.items() if v is not None}


def delta(args: argparse.Namespace) -> int:
    from edgepack.toolchain.cli import check_text, require_toolchain

    require_toolchain()
    from edgepack.runtime import delta_file
    from edgepack.toolchain.delta.make import DeltaConfig, make

    if not args.output.endswith(".safetensors"):
        raise UsageError(f"-o must name a .safetensors file, got {args.output!r}")
    config = DeltaConfig(method=args.method, rank=args.rank, relax=args.relax, valid=args.valid,
                         windows=args.windows, importance=args.importance, allocation=args.allocation,
                         auto=args.auto, whiten=args.whiten, refit=args.refit, gradient_at=args.gradient_at,
                         shrink=args.shrink, normalize=args.normalize, prune_during_tune=args.prune_during_tune,
                         **_tune_options(args))
    check_text(args.valid)
    result = make(args.base, args.finetuned, config)
    size = delta_file.write(result, args.output, args.values)
    info = result.info
    print(f"wrote {args.output}: {args.method}, r={info['rank']}, c={info['relax']}, {len(result.layers)} layers, "
          f"{result.bits / 8e3:.1f} kB accounted (factors {_factor_bits(result) / 8e3:.1f} kB of the "
          f"{info['budget_bits'] / 8e3:.1f} kB budget, changed norms/biases {_dense_bits(result) / 8e3:.1f} kB), "
          f"{size / 1e3:.1f} kB on disk; importance: {info['importance']}; {info['seconds']} s", file=sys.stderr)
    return 0


def _factor_bits(delta: Any) -> int:
    return sum(layer.bits for layer in delta.layers.values())


def _dense_bits(delta: Any) -> int:
    """Changed norms and biases, stored densely at 32 bits a value: counted in the size, outside the budget."""
    return delta.bits - _factor_bits(delta)
