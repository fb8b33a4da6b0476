"""Two offline text domains for the fine-tune delta benchmark, each with three disjoint splits.

    train  what the fine-tunes learn from
    valid  a small set (a little over 8 windows of 256 tokens) for OSD's gradient importance
    test   held-out text for perplexity

``docs``: the Python docs prose of ``pydoc_data.topics``. train and valid come from the calibration
half of ``edgepack.runtime.text`` (valid is a fixed tail of it, cut at a paragraph and removed from
train); test is the evaluation half, so the held-out text is the same one the README's perplexities use.

``code``: the running interpreter's standard library source (``.py`` files), without
``site-packages``, test trees, ``idlelib``, ``lib2to3``, generated tables and ``pydoc_data`` (that is
the docs domain). Each file goes to one split by a hash of its relative path, so a file never
straddles splits; within a split files are taken in hash order (a spread over the whole library
rather than the alphabetically first packages) up to a character cap that keeps tokenizing fast.
The text depends on the Python version, as the stdlib does; the fine-tune cache keys on its hash.
"""

from __future__ import annotations

import functools
import hashlib
import sysconfig
from pathlib import Path

DOMAINS = ("docs", "code")
SPLITS = ("train", "valid", "test")

VALID_CHARS = 12_000  # about 2,700 prose / 3,500 code tokens: over 8 windows of 256 either way
CODE_CAPS = {"train": 1_500_000, "valid": VALID_CHARS, "test": 400_000}
# Whole top-level folders left out: tests, tools/apps that are mostly data, and the docs domain.
_SKIP_TOP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo",
             "pydoc_data", "encodings", "ensurepip", "__pycache__", "__phello__"}
# Any nested folder with these names is a test tree (unittest/test, ctypes/test, distutils/tests...).
_SKIP_ANY = {"test", "tests", "__pycache__", "idle_test"}
_CODE_BUCKETS = 20  # bucket 0 -> valid, 1..3 -> test, the rest -> train


def text(domain: str, split: str) -> str:
    """The text of one split of one domain; the same string on every call in every process."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {', '.join(DOMAINS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return _docs()[split] if domain == "docs" else _code()[split]


def fingerprint(domain: str, split: str) -> str:
    """Short sha256 of a split's text, for cache keys and reports."""
    return hashlib.sha256(text(domain, split).encode("utf-8")).hexdigest()[:12]


@functools.cache
def _docs() -> dict[str, str]:
    from edgepack.runtime.text import calibration_text, evaluation_text

    calib = calibration_text()
    # Cut at the first paragraph break at or after the cap from the end, so valid starts cleanly.
    cut = calib.find("\n\n", len(calib) - VALID_CHARS)
    if cut < 0:
        cut = len(calib) - VALID_CHARS
    return {"train": calib[:cut], "valid": calib[cut:].lstrip("\n"), "test": evaluation_text()}


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of every stdlib ``.py`` file the code domain may use, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIP_TOP or rel.parts[0].startswith("config-"):
            continue
        if _SKIP_ANY.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        out.append((rel.as_posix(), path))
    return sorted(out)


def _hash(rel: str) -> int:
    return int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big")


def code_split(rel: str) -> str:
    """Which split a stdlib file belongs to, from its relative path alone."""
    bucket = _hash(rel) % _CODE_BUCKETS
    return "valid" if bucket == 0 else "test" if bucket <= 3 else "train"


@functools.cache
def _code() -> dict[str, str]:
    parts: dict[str, list[str]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    for rel, path in sorted(stdlib_files(), key=lambda item: _hash(item[0])):
        split = code_split(rel)
        if used[split] >= CODE_CAPS[split]:
            continue
        body = path.read_text(encoding="utf-8", errors="replace").strip()
        if not body:
            continue
        # The path as a comment header gives each file a boundary the model can see.
        piece = f"# {rel}\n{body}\n"
        room = CODE_CAPS[split] - used[split]
        if len(piece) > room:
            piece = piece[: piece.rfind("\n", 0, room) + 1] or piece[:room]
        parts[split].append(piece)
        used[split] += len(piece)
    return {s: "\n".join(parts[s]) for s in SPLITS}
