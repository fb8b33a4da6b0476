"""llama.cpp (through llama-cpp-python) as a peer: installing it on demand and running the default GGUF."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

# The version FACTS.md measured; pinned so reruns compare the same llama.cpp.
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def ensure_installed() -> None:
    """pip-install llama-cpp-python into this interpreter's environment unless it is importable.

    There is no CPU wheel on PyPI, so pip compiles llama.cpp from source (about 7 minutes on 2 cores);
    pip's own output is shown so the wait is visible. CUDA is switched off explicitly.
    """
    if installed():
        return
    print(f"peers: installing {LLAMA_CPP_PYTHON} (compiles llama.cpp from source, several minutes)...",
          file=sys.stderr, flush=True)
    env = dict(os.environ)
    env["CMAKE_ARGS"] = (env.get("CMAKE_ARGS", "") + " -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF").strip()
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "-v", LLAMA_CPP_PYTHON]
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"peers: pip could not install {LLAMA_CPP_PYTHON} (exit {proc.returncode}); "
                         "see its output above")
    importlib.invalidate_caches()
    print("peers: llama-cpp-python installed", file=sys.stderr, flush=True)


if __name__ == "__main__":
    ensure_installed()
