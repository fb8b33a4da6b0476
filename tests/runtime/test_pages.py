"""runtime/pages.py: the resident pages of a mapped file are given back, and its data reads back intact."""

from __future__ import annotations

import mmap
import sys

import numpy as np
import pytest
from edgepack.runtime.pages import release_file_pages


def _resident_kb(path) -> int:
    total, inside = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                inside = len(parts) >= 6 and parts[5] == str(path)
            elif inside and parts[0] == "Rss:":
                total += int(parts[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and MADV_PAGEOUT are Linux's")
def test_mapped_pages_are_released_and_read_back(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        assert int(view.sum()) == int(data.sum())  # every page touched
        before = _resident_kb(path.resolve())
        assert before >= 7 << 10
        assert release_file_pages(path) >= 8 << 20
        assert _resident_kb(path.resolve()) < before // 4
        assert np.array_equal(view, data)  # pages fault back in from the file
        del view


def test_unmapped_or_missing_file_is_a_no_op(tmp_path):
    assert release_file_pages(tmp_path / "absent.data") == 0
