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


# Plain-text and source-code files a folder of text is made of; anything else in the folder is ignored.
TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".text", ".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java",
                           ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".html", ".tex", ".json", ".yaml", ".yml",
                           ".toml", ".csv"})
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def read_text(path: str | Path) -> str:
    """A user's text: one file, or every text file of a folder (``TEXT_SUFFIXES``, hidden ones
    skipped), joined. UTF-8, or UTF-16/32 with a byte-order mark; anything else is refused rather
    than read as replacement characters, which would score or calibrate on garbage."""
    p = Path(path).expanduser()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix.lower() in TEXT_SUFFIXES and f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    else:
        raise UsageError(f"text not found: {path}")
    if not files:
        raise UsageError(f"{path} holds no text files (.txt, .md, .py and other text suffixes); pass a file or a "
                         "folder of them")
    text = "\n\n".join(_decode(f) for f in files)
    if not text.strip():
        raise UsageError(f"{path} is empty")
    return text


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError:
                break
    if b"\x00" in data[:65536]:
        raise UsageError(f"{path} looks binary (it holds NUL bytes), not text; pass a UTF-8 text file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}); convert it first, e.g. "
                         f"iconv -f latin1 -t utf-8 {path.name} > {path.stem}.utf8{path.suffix}") from None
