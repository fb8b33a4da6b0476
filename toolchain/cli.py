"""Toolchain subcommands (``build``). Importing this module must not import torch: the handlers
import the toolchain when they run, and say which extra to install when it is missing."""

from __future__ import annotations

import argparse
import sys

from edgepack.runtime.errors import MissingExtraError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build", help="build a package from a model", description="Load MODEL ('default', a "
                       "Hugging Face model folder, or a .gguf file), export it to ONNX with a KV cache, check "
                       "its logits against PyTorch, optionally quantize to int4, and write a verified package.")
    p.add_argument("model", help="'default', a Hugging Face model folder, or a .gguf file")
    p.add_argument("-o", "--output", required=True, help="package folder to write (replaced atomically)")
    p.add_argument("--int4", action="store_true", help="int4 weights (onnxruntime MatMulNBits, block 32)")
    p.add_argument("--context", type=int, default=2048, help="context length in tokens (default 2048)")
    p.set_defaults(handler=build)


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


def build(args: argparse.Namespace) -> int:
    require_toolchain()
    from edgepack.toolchain.build import BuildConfig
    from edgepack.toolchain.build import build as run_build

    manifest = run_build(BuildConfig(model=args.model, int4=args.int4, context=args.context), args.output)
    parity = manifest.parity.get(manifest.dtype, {})
    print(f"built {args.output}: {manifest.dtype}, {manifest.total_size / 1e6:.1f} MB, "
          f"parity max |Δlogit| {parity.get('max_abs_diff', float('nan')):.3g}, "
          f"top-1 agreement {parity.get('top1_agreement', float('nan')):.1%}, "
          f"{manifest.build['seconds']} s", file=sys.stderr)
    return 0
