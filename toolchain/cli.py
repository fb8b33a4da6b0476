"""Toolchain subcommands (``build``). Importing this module must not import torch: the handlers
import the toolchain when they run, and say which extra to install when it is missing."""

from __future__ import annotations

import argparse
import sys

from edgepack.runtime.errors import MissingExtraError, UsageError
from edgepack.runtime.memory import DEFAULT_FACTOR_BITS
from edgepack.runtime.profiles import MB


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a package from a model", description="Load MODEL ('default', a "
                       "Hugging Face model folder, or a .gguf file), export it to ONNX with a KV cache, check "
                       "its logits against PyTorch, optionally quantize to int4, and write a verified package.")
    p.add_argument("model", help="'default', a Hugging Face model folder, or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="package folder to write (replaced atomically)")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--int4", action="store_true", help="int4 weights (onnxruntime MatMulNBits, block 32)")
    weights.add_argument("--int8", action="store_true", help="int8 weights (onnxruntime MatMulNBits, block 32, "
                         "symmetric): twice int4's size, closer to float32")
    p.add_argument("--factor-bits", type=int, choices=(4, 8), default=None, help="with --int4 on the fused "
                   "graph: width of the ResSVD factor pairs' weights (default 4; 8: closer to the float "
                   "compressed model, a larger package)")
    p.add_argument("--context", type=int, default=None, help="context length in tokens (default 2048; with "
                   "--device, 2048 halved until the plan fits)")
    p.add_argument("--graph", choices=("auto", "optimum", "fused"), default="auto",
                   help="auto (default): fused when the architecture has it, else optimum; optimum: optimum's "
                        "export (any supported architecture); fused: edgepack's own inference graph for the "
                        "Llama family (GroupQueryAttention, fused norms, faster)")
    _compression_args(p, required=False)
    p.add_argument("--device", help="plan for this device profile (name or .yaml) and build that plan; "
                   "overrides --int4/--int8/--ratio (see 'edgepack plan')")
    p.add_argument("--delta-slots", action="store_true", help="add the low-rank side "
                   "branches through which 'run/chat/eval --delta' apply fine-tune deltas at load time")
    p.set_defaults(handler=build)

    p = sub.add_parser("plan", help="choose dtype and compression so a model fits a device",
                       description="From MODEL's config and a device profile, choose the dtype and ResSVD "
                       "ranks with the least expected quality loss whose predicted peak memory and size fit "
                       "the device; print the plan, or refuse with the smallest footprint reachable.")
    p.add_argument("model", help="'default', a Hugging Face model folder, or a .gguf file")
    p.add_argument("--device", required=True, help="device profile name (see 'edgepack profile --list') or .yaml")
    p.add_argument("--context", type=int, default=None,
                   help="context length in tokens (default: 2048, halved until the plan fits)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=plan)

    p = sub.add_parser("compress", help="compress a model with ResSVD", description="Factorize the linear "
                       "layers of the last decoder layers into pairs of linear ops (in→r, r→out) so that "
                       "--ratio of the decoder's linear parameters is removed; write a model folder that "
                       "'edgepack build' and 'edgepack eval' accept.")
    p.add_argument("model", help="'default', a Hugging Face model folder, or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="folder to write (replaced atomically)")
    _compression_args(p, required=True)
    p.set_defaults(handler=compress)

    from edgepack.toolchain import delta_cli

    delta_cli.register(sub)


def _compression_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("compression (ResSVD)")
    g.add_argument("--ratio", type=float, required=required, default=None,
                   help="share of decoder linear parameters to remove, e.g. 0.2")
    g.add_argument("--method", default="ressvd", help="ressvd (default) | svd-llm | svd")
    g.add_argument("--layers", default="auto",
                   help="auto (2·N·ratio layers; searched with --no-propagate) | all | K (the last K layers)")
    g.add_argument("--calib", help="calibration text file or folder (default: pydoc_data.topics split)")
    g.add_argument("--propagate", action=argparse.BooleanOptionalAction, default=True,
                   help="correct each layer for the error of the layers before it (default; --no-propagate: "
                        "the published recipe, k searched)")
    g.add_argument("--ridge", default="0.1", help="ridge of the propagation's correction, relative to mean "
                   "diag(X̂ᵀX̂): a number (default 0.1) or auto (chosen per group on held-out windows: ~35 s slower)")
    g.add_argument("--tune-steps", type=int, default=None, help="after propagation, N steps of distillation to the "
                   "dense model's logits on the calibration windows, training only the factors (default 64 with "
                   "propagation; 0: none)")
    g.add_argument("--quant-aware", choices=("auto", "none", "int4", "int8"), default="auto", help="run the tune "
                   "through the rounding a package applies to the factors, so they round to good codes (auto: "
                   "the package's factor width when 'build --ratio' compresses inline, else none)")
    g.add_argument("--joint", action=argparse.BooleanOptionalAction, default=False,
                   help="one shared factor pair for q/k/v and one for gate/up (fewer ops in the package)")
    g.add_argument("--allocation", choices=("uniform", "spectrum"), default="uniform",
                   help="how a compressed layer's parameters are spread over its linear layers: uniform (each "
                        "loses the same share) or spectrum (by their whitened spectra)")


def _compression_config(args: argparse.Namespace):
    from edgepack.toolchain.ressvd import ResSVDConfig

    ridge = args.ridge
    if ridge != "auto":
        try:
            ridge = float(ridge)
        except ValueError:
            raise UsageError(f"--ridge must be 'auto' or a number, got {ridge!r}") from None
    return ResSVDConfig(ratio=args.ratio, method=args.method, layers=args.layers, propagate=args.propagate,
                        tune_steps=args.tune_steps, ridge=ridge, quant_aware=args.quant_aware,
                        joint=args.joint, allocation=args.allocation)


def require_toolchain() -> None:
    try:
        import optimum.exporters.onnx  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingExtraError(
            f"this command needs the toolchain ({e.name} is missing): pip install torch==2.13.0 "
            "'edgepack[toolchain]'"
        ) from None


def check_text(path: str | None) -> None:
    """Read a text option once before the model loads (a minute for large models), so a bad file fails fast."""
    if path:
        from edgepack.runtime.text import read_text

        read_text(path)


def build(args: argparse.Namespace) -> int:
    require_toolchain()
    if getattr(args, "device", None):
        return _build_for_device(args)
    from edgepack.toolchain.build import BuildConfig
    from edgepack.toolchain.build import build as run_build

    compression = _compression_config(args) if args.ratio is not None else None
    check_text(args.calib)
    if args.factor_bits is not None and not args.int4:
        raise UsageError("--factor-bits sets the width of ResSVD factors in an int4 package: add --int4")
    config = BuildConfig(model=args.model, int4=args.int4, int8=args.int8, context=args.context or 2048,
                         compression=compression, factor_bits=args.factor_bits or DEFAULT_FACTOR_BITS,
                         calib=args.calib, graph=args.graph, delta_slots=args.delta_slots)
    manifest = run_build(config, args.output)
    parity = manifest.parity.get(manifest.dtype, {})
    print(f"built {args.output}: {manifest.dtype}, {manifest.total_size / 1e6:.1f} MB, "
          f"parity max |Δlogit| {parity.get('max_abs_diff', float('nan')):.3g}, "
          f"top-1 agreement {parity.get('top1_agreement', float('nan')):.1%}, "
          f"{manifest.build['seconds']} s", file=sys.stderr)
    return 0


def compress(args: argparse.Namespace) -> int:
    require_toolchain()
    from edgepack.toolchain.compression import compress as run_compress

    check_text(args.calib)
    report = run_compress(args.model, _compression_config(args), args.output, args.calib)
    print(f"compressed {args.model} -> {args.output}: {report.layers_compressed} layers factorized, "
          f"{report.removed_share:.1%} of decoder linear parameters removed, "
          f"{report.params_before / 1e6:.1f}M -> {report.params_after / 1e6:.1f}M parameters, {report.seconds} s",
          file=sys.stderr)
    for point in report.search:
        print(f"  k={point['k']:3d}  final hidden-state error {point['hidden_error']:.4f}", file=sys.stderr)
    return 0


def plan(args: argparse.Namespace) -> int:
    from edgepack.runtime.profiles import load_profile
    from edgepack.toolchain.planner.plan import plan_for
    from edgepack.toolchain.planner.report import describe

    profile = load_profile(args.device)
    result = plan_for(args.model, profile, args.context)
    print(result.to_json() if args.json else describe(result, profile), end="")
    return 0


def _build_for_device(args: argparse.Namespace) -> int:
    from edgepack.runtime.bench import BenchConfig, bench
    from edgepack.runtime.profiles import load_profile
    from edgepack.toolchain.planner.device_build import build_for_device
    from edgepack.toolchain.planner.report import describe

    profile = load_profile(args.device)
    chosen, manifest = build_for_device(args.model, args.device, args.output, args.context, args.calib,
                                        delta_slots=args.delta_slots)
    print(describe(chosen, profile), end="", file=sys.stderr)
    print(f"built {args.output}: {manifest.dtype}, {manifest.total_size / 1e6:.1f} MB, {manifest.build['seconds']} s",
          file=sys.stderr)
    # Prove the fit: run the package with its KV cache filled to the planned context, in a fresh process.
    fill = max(0, chosen.context - 64)
    report = bench(args.output, BenchConfig(max_new_tokens=16, fill=fill, chunk=chosen.memory["chunk"],
                                            prompts=("What is the capital of France?",)))
    fits = report.peak_rss_bytes <= profile.budget_bytes
    print(f"measured peak RSS {report.peak_rss_bytes / MB:.0f} MiB with {report.context_filled} tokens "
          f"in context (predicted {chosen.peak_bytes / MB:.0f}); budget {profile.app_memory_mb:g} MiB: "
          f"{'fits' if fits else 'DOES NOT FIT'}", file=sys.stderr)
    return 0 if fits else 3
