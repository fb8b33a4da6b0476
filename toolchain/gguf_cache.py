"""A float32 Hugging Face copy of a GGUF model, written on its first load and read on the next ones.

transformers dequantizes a GGUF on every load and parses its header once per reader (config, tokenizer,
weights): 24 s of every command on the default model on the 2-core AVX2 machine, against 0.2 s for the
same weights from a safetensors folder. So the first load saves what it got (``save_pretrained`` of the
model and tokenizer: safetensors, JSON) under ``$EDGEPACK_CACHE/gguf/<sha256 of the GGUF>-<transformers
version>`` (the version is in the key because the conversion is transformers'), atomically, with a record
holding the sha256 of every file; a later load checks them all (0.4 s for the default model's 538 MB) and
falls back to the GGUF, rewriting the copy, if anything differs. ``EDGEPACK_GGUF_CACHE=0`` turns it off.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from edgepack.runtime.files import atomic_dir, sha256_file
from edgepack.toolchain.default_model import cache_dir, locked

RECORD = "edgepack-gguf-copy.json"
ENV = "EDGEPACK_GGUF_CACHE"
# The copy is float32 (4 bytes a parameter, 4-8x the GGUF): skip it where it would leave less than this free.
_MIN_FREE_AFTER = 1 << 30


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def folder_for(gguf_sha256: str, tokenizer_sha256: str | None = None) -> Path:
    """``tokenizer_sha256``: of a tokenizer.json beside the GGUF, which some loads read instead of the GGUF's own
    (sources.py), so a copy made before one was put there is not reused."""
    import transformers

    # -r1: read with gguf_repair.py, so copies made before it (another config, maybe other weights) are not reused
    name = f"{gguf_sha256[:32]}-transformers-{transformers.__version__}-r1"
    return cache_dir() / "gguf" / (f"{name}-tokenizer-{tokenizer_sha256[:12]}" if tokenizer_sha256 else name)


def lookup(gguf_sha256: str, tokenizer_sha256: str | None = None) -> Path | None:
    """The verified copy of the GGUF with this sha256, or None when there is none (or it is damaged)."""
    folder = folder_for(gguf_sha256, tokenizer_sha256)
    try:
        record = json.loads((folder / RECORD).read_text())
    except (OSError, ValueError):
        return None
    files = record.get("files") if isinstance(record, dict) else None
    if record.get("gguf_sha256") != gguf_sha256 or not isinstance(files, dict) or not files:
        return None
    for name, digest in files.items():
        path = folder / name
        if Path(name).name != name or not path.is_file() or sha256_file(path) != digest:
            print(f"edgepack: the cached copy in {folder} is damaged ({name}); reading the GGUF again",
                  file=sys.stderr)
            return None
    return folder


def store(gguf_sha256: str, model: Any, tokenizer: Any, tokenizer_sha256: str | None = None) -> Path | None:
    """Save ``model`` and ``tokenizer`` (just loaded from that GGUF) as the copy; None where it is skipped."""
    folder = folder_for(gguf_sha256, tokenizer_sha256)
    need = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    with locked(folder.parent):  # creates the parent, so its free space can be read
        free = shutil.disk_usage(folder.parent).free
        if free - need < _MIN_FREE_AFTER:
            print(f"edgepack: not caching a float32 copy of the GGUF ({need / 1e6:.0f} MB, {free / 1e6:.0f} MB "
                  "free); each load dequantizes it again", file=sys.stderr)
            return None
        with atomic_dir(folder) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
            (staging / RECORD).write_text(json.dumps({"gguf_sha256": gguf_sha256, "files": files}, indent=1))
    print(f"edgepack: cached a float32 copy of the GGUF in {folder} ({need / 1e6:.0f} MB; later loads read it "
          f"instead, {ENV}=0 turns this off)", file=sys.stderr)
    return folder

