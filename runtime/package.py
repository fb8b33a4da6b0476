"""Open a package folder: read its manifest and verify every file's size and sha256."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgepack.runtime import archive
from edgepack.runtime.errors import IntegrityError, PackageError
from edgepack.runtime.files import sha256_file
from edgepack.runtime.manifest import (
    CHAT_TEMPLATE_NAME,
    GENERATION_NAME,
    MANIFEST_NAME,
    MODEL_NAME,
    TOKENIZER_NAME,
    GenerationSettings,
    Manifest,
)

MAX_MANIFEST_BYTES = 4 << 20


@dataclass(frozen=True)
class Package:
    """A verified package on disk."""

    path: Path
    manifest: Manifest
    generation: GenerationSettings

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_NAME

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_NAME

    @property
    def chat_template(self) -> str | None:
        if CHAT_TEMPLATE_NAME not in self.manifest.files:
            return None
        return (self.path / CHAT_TEMPLATE_NAME).read_text(encoding="utf-8")


def read_manifest(path: Path | str) -> Manifest:
    """Read a package's manifest without checking its files (for ``inspect``); folder or archive."""
    path = Path(path)
    if not path.exists():
        raise PackageError(f"package not found: {path}")
    if archive.is_archive(path):
        return archive.read_manifest(path)
    if not path.is_dir():
        raise PackageError(f"{path} is not a package folder (expected a folder with {MANIFEST_NAME})")
    mpath = path / MANIFEST_NAME
    if not mpath.is_file():
        raise PackageError(f"{path} has no {MANIFEST_NAME}: not an edgepack package")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{mpath} is larger than {MAX_MANIFEST_BYTES} bytes; refusing to read it")
    return Manifest.from_json(mpath.read_text(encoding="utf-8", errors="replace"))


def verify_files(path: Path, manifest: Manifest) -> None:
    """Check that every listed file exists with the recorded size and sha256."""
    root = path.resolve()
    for name, entry in manifest.files.items():
        fpath = (path / name).resolve()
        if root not in fpath.parents:
            raise PackageError(f"package file {name!r} resolves outside the package; refusing it")
        if not fpath.is_file():
            raise IntegrityError(f"package file {name} is missing; rebuild or re-copy the package")
        size = fpath.stat().st_size
        if size != entry.size:
            raise IntegrityError(
                f"package file {name} is {size} bytes, the manifest says {entry.size} "
                "(truncated or modified); rebuild or re-copy the package"
            )
        digest = sha256_file(fpath)
        if digest != entry.sha256:
            raise IntegrityError(
                f"package file {name} fails its sha256 check (tampered or corrupt); "
                "rebuild or re-copy the package"
            )


def open_package(path: Path | str, verify: bool = True) -> Package:
    """Read and (by default) verify a package (a folder, or an archive, which is unpacked into the cache
    and checked as it is); raise ``PackageError`` on any problem."""
    path = Path(path)
    if archive.is_archive(path):
        path = archive.unpack(path, verify=verify)
        verify = False  # unpack hashed every file as it wrote it, or re-hashed the cached copy
    manifest = read_manifest(path)
    if verify:
        verify_files(path, manifest)
    try:
        data = json.loads((path / GENERATION_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError covers bad JSON and bad UTF-8
        raise PackageError(f"cannot read {GENERATION_NAME} of {path}: {e}") from None
    return Package(path=path, manifest=manifest, generation=GenerationSettings.from_dict(data))
