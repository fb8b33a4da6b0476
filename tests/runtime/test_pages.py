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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/smaps and MADV_PAGEOUT are Linux's")
def test_pages_are_released_while_the_body_runs(tmp_path):
    """released_while gives pages back during the body (as onnxruntime prepacks), not only at its end."""
    import time

    from edgepack.runtime.pages import released_while

    data = np.random.default_rng(1).integers(0, 255, 8 << 20, dtype=np.uint8)
    path = tmp_path / "model.onnx.data"
    path.write_bytes(data.tobytes())
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, np.uint8)
        with released_while(path, interval_s=0.001):
            assert int(view.sum()) == int(data.sum())  # 8 MiB touched; left alone they would stay resident
            deadline = time.monotonic() + 5
            while _resident_kb(path.resolve()) >= 2 << 10 and time.monotonic() < deadline:
                time.sleep(0.005)
            during = _resident_kb(path.resolve())
        assert during < 2 << 10, during
        assert np.array_equal(view, data)
        del view


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_trim_heap_gives_freed_heap_pages_back():
    from edgepack.runtime.pages import trim_heap

    blocks = [bytearray(b"x" * (1 << 16)) for _ in range(800)]  # 50 MiB of heap (under the mmap threshold)
    keep = blocks[::16]  # every 16th stays, so free() cannot shrink the heap from its top
    del blocks
    before = _rss_kb()
    assert trim_heap()
    assert before - _rss_kb() > 20 << 10, (before, _rss_kb())
    del keep
