"""Write a package folder: model files, tokenizer, chat template, generation settings, manifest.

The manifest is written last, from the files as they are on disk, so its checksums describe
exactly what was written. Callers write into a staging folder (``files.atomic_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepack.runtime.files import sha256_file
from edgepack.runtime.manifest import (
    CHAT_TEMPLATE_NAME,
    GENERATION_NAME,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    FileEntry,
    GenerationSettings,
    Manifest,
)


def write_tokenizer_files(folder: Path, tokenizer_json: str, chat_template: str | None) -> None:
    (folder / TOKENIZER_NAME).write_text(tokenizer_json, encoding="utf-8")
    if chat_template:
        (folder / CHAT_TEMPLATE_NAME).write_text(chat_template, encoding="utf-8")


def write_generation(folder: Path, settings: GenerationSettings) -> None:
    (folder / GENERATION_NAME).write_text(json.dumps(settings.to_dict(), indent=2) + "\n", encoding="utf-8")


def write_manifest(folder: Path, *, name: str, dtype: str, model: dict[str, Any], plan: dict[str, Any],
                   parity: dict[str, Any], build: dict[str, Any]) -> Manifest:
    files = {
        p.relative_to(folder).as_posix(): FileEntry(size=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = Manifest(name=name, dtype=dtype, model=model, files=files, plan=plan, parity=parity,
                        build=build)
    (folder / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest
