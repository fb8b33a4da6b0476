"""The default text: CPython's ``pydoc_data.topics``, split into fixed calibration and evaluation
halves (sorted topic names; even positions calibrate, odd positions evaluate), so it is offline,
real English prose, and identical on every machine."""

from __future__ import annotations

from pathlib import Path

from edgepack.runtime.errors import UsageError


def _topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return sorted(topics.items())


def calibration_text() -> str:
    return "\n\n".join(body for i, (_, body) in enumerate(_topics()) if i % 2 == 0)


def evaluation_text() -> str:
    return "\n\n".join(body for i, (_, body) in enumerate(_topics()) if i % 2 == 1)


def read_text(path: str | Path) -> str:
    """A user's text: one file, or every ``.txt``/``.md`` file of a folder, joined."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in {".txt", ".md"} and f.is_file())
    else:
        raise UsageError(f"text not found: {path}")
    if not files:
        raise UsageError(f"{path} holds no .txt or .md files")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return text
