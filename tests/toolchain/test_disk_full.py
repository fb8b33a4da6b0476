"""A full disk during build fails with one line and leaves no partial package: injected ENOSPC in the
package writer, and a real size-limited tmpfs when this process may mount one."""

import errno
import os
import shutil
import subprocess
import sys

import pytest
from edgepack.runtime.errors import ResourceError
from edgepack.runtime.package import open_package
from reliability_counts import count


def visible(folder):
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and not p.name.endswith(".lock"))


def test_injected_enospc_keeps_the_previous_package(tiny_model_dir, tiny_package, tmp_path, monkeypatch):
    from edgepack.export import package_writer
    from edgepack.toolchain.build import BuildConfig, build

    out = tmp_path / "pkg"
    shutil.copytree(tiny_package, out)
    before = (out / "manifest.json").read_bytes()

    def full(*args, **kwargs):
        count("fault")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(package_writer, "write_generation", full)
    with pytest.raises(ResourceError, match="no space left writing .*nothing was replaced"):
        build(BuildConfig(model=str(tiny_model_dir), graph="optimum"), out)
    assert (out / "manifest.json").read_bytes() == before
    open_package(out, verify=True)
    assert visible(tmp_path) == ["pkg"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".pkg.") and not p.name.endswith(".lock")] == []


@pytest.fixture
def small_tmpfs(tmp_path, request):
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = request.param
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


# 300k: full during the export; 530k: the optimum graph's model fits, the package's small files do not.
@pytest.mark.parametrize("graph, small_tmpfs", [("optimum", "300k"), ("optimum", "530k"), ("fused", "300k")],
                         indirect=["small_tmpfs"])
def test_real_full_disk_fails_cleanly(tiny_model_dir, small_tmpfs, graph):
    count("fault")
    proc = subprocess.run([sys.executable, "-m", "edgepack.runtime.cli", "build", str(tiny_model_dir), "-o",
                           str(small_tmpfs / "pkg"), "--graph", graph], capture_output=True, text=True)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgepack:")]
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert lines[-1].startswith("edgepack: error: no space left writing") and "Traceback" not in proc.stderr
    assert visible(small_tmpfs) == []
    assert [p.name for p in small_tmpfs.iterdir() if not p.name.endswith(".lock")] == []
