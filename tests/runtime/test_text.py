"""User text (eval --text, compress --calib, delta --valid): decoded exactly or refused in one line."""

from __future__ import annotations

import pytest
from edgepack.runtime.errors import UsageError
from edgepack.runtime.text import read_text

PROSE = "Café crème, naïve façade. "


def test_utf8_and_bom_encodings_decode_exactly(tmp_path):
    for name, data in {"plain.txt": PROSE.encode(), "sig.txt": b"\xef\xbb\xbf" + PROSE.encode(),
                       "u16.txt": PROSE.encode("utf-16"), "u32.txt": PROSE.encode("utf-32")}.items():
        (tmp_path / name).write_bytes(data)
        assert read_text(tmp_path / name) == PROSE, name


@pytest.mark.parametrize("data, words", [
    (PROSE.encode("latin-1"), r"not UTF-8 text \(byte 3\)"),
    (bytes(range(256)) * 8, "looks binary"),
    (b"", "is empty"),
    (b"  \n\t ", "is empty"),
])
def test_bad_files_are_refused_by_name(tmp_path, data, words):
    path = tmp_path / "x.txt"
    path.write_bytes(data)
    with pytest.raises(UsageError, match=words) as info:
        read_text(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_folder_reads_text_and_code_files_and_skips_the_rest(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("beta = 1")
    (tmp_path / "weights.bin").write_bytes(b"\x00\x01")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD.txt").write_text("hidden")
    assert read_text(tmp_path) == "alpha\n\nbeta = 1"


def test_folder_with_a_bad_file_names_it(tmp_path):
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b.txt").write_bytes(PROSE.encode("latin-1"))
    with pytest.raises(UsageError, match="b.txt is not UTF-8"):
        read_text(tmp_path)


def test_missing_path_and_folder_without_text(tmp_path):
    with pytest.raises(UsageError, match="text not found"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "data.bin").write_bytes(b"\x00")
    with pytest.raises(UsageError, match="holds no text files"):
        read_text(tmp_path)
