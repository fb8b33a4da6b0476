"""The ``edgepack`` command. Runtime commands live here; toolchain commands register themselves
from ``edgepack.toolchain.cli`` without importing torch until they run, so the CLI also works
where only the runtime is installed. Errors become one line and an exit code here, in one place:
0 ok, 2 bad usage or input, 1 internal error."""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from edgepack.runtime import commands
from edgepack.runtime.errors import EdgepackError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepack",
        description="Turn a Hugging Face causal LM into a small onnxruntime package and run it.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    try:
        from edgepack.toolchain import cli as toolchain_cli
    except ImportError:  # a runtime-only install may ship without the toolchain modules
        toolchain_cli = None
    if toolchain_cli is not None:
        toolchain_cli.register(sub)
    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except EdgepackError as e:
        print(f"edgepack: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgepack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # the last line of defence: a message, never a raw traceback
        if os.environ.get("EDGEPACK_DEBUG"):
            traceback.print_exc()
        print(
            f"edgepack: internal error: {type(e).__name__}: {e} "
            "(set EDGEPACK_DEBUG=1 for a traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
