"""The package manifest (format v1) and the generation settings a package carries.

A package is a folder:

    manifest.json        this file's ``Manifest``: format version, source, dtype, plan, sha256 of all
    model.onnx           the decoder with a KV cache (inputs ``past_key_values.N.key/value``)
    model.onnx.data      its weights as external data, when the exporter wrote them apart
    tokenizer.json       a ``tokenizers`` tokenizer
    chat_template.jinja  the chat template, when the model has one
    generation.json      ``GenerationSettings``: special tokens, context length, sampling defaults
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepack.runtime.errors import PackageError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MODEL_NAME = "model.onnx"
TOKENIZER_NAME = "tokenizer.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
GENERATION_NAME = "generation.json"


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 0:
            raise PackageError(f"file entry: size must be a non-negative integer, got {self.size!r}")
        if not isinstance(self.sha256, str):
            raise PackageError("file entry: sha256 must be a string of hexadecimal digits")


@dataclass(frozen=True)
class GenerationSettings:
    """What the runtime needs to know about the model's tokens and defaults, without transformers."""

    eos_token_ids: tuple[int, ...]
    context_length: int
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    bos_token: str | None = None  # chat templates refer to these by text
    eos_token: str | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.context_length <= 0:
            raise PackageError(f"generation settings: context_length must be > 0, got {self.context_length}")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationSettings:
        return _from_dict(cls, data, "generation settings")


@dataclass(frozen=True)
class Manifest:
    """Everything known about a package; ``files`` holds the size and sha256 of every other file."""

    name: str
    dtype: str
    model: dict[str, Any]
    files: dict[str, FileEntry]
    plan: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    build: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise PackageError(
                f"package format version {self.format_version} is not supported by this edgepack "
                f"(it reads version {FORMAT_VERSION}); rebuild the package or upgrade edgepack"
            )
        for key, kind in (("name", str), ("dtype", str), ("model", dict), ("plan", dict), ("parity", dict),
                          ("build", dict)):
            if not isinstance(getattr(self, key), kind):
                raise PackageError(f"manifest.json: '{key}' must be a {kind.__name__}; the package is invalid")
        for name in self.files:
            if (not name or "\x00" in name or name.startswith(("/", "\\")) or ".." in Path(name).parts
                    or name == MANIFEST_NAME):  # NUL: found by fuzzing (os.path raises ValueError on it)
                raise PackageError(f"manifest lists an unsafe file name {name!r}; the package is invalid")
        for required in (MODEL_NAME, TOKENIZER_NAME, GENERATION_NAME):
            if required not in self.files:
                raise PackageError(f"manifest does not list {required}; the package is incomplete")

    @property
    def total_size(self) -> int:
        return sum(e.size for e in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if not isinstance(data, dict):
            raise PackageError("manifest.json is not a JSON object")
        data = dict(data)
        files = data.get("files")
        if not isinstance(files, dict):
            raise PackageError("manifest.json has no 'files' table")
        data["files"] = {str(k): _from_dict(FileEntry, v, f"file entry {k!r}") for k, v in files.items()}
        return _from_dict(cls, data, "manifest.json")

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:  # RecursionError: absurd nesting (fuzzing found it)
            raise PackageError(f"manifest.json is not valid JSON ({e})") from None
        return cls.from_dict(data)


def _from_dict(cls: type, data: Any, what: str) -> Any:
    if not isinstance(data, dict):
        raise PackageError(f"{what}: expected a JSON object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise PackageError(f"{what}: unknown field(s) {sorted(unknown)}")
    try:
        return cls(**data)
    except (TypeError, ValueError, OverflowError) as e:  # e.g. int("a") or int(inf) in a token id list
        raise PackageError(f"{what}: {e}") from None
