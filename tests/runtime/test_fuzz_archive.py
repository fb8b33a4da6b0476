"""Hostile archives: random bytes, mutated real archives and generated zips all end in a PackageError
(or, for a harmless mutation, in a package whose files match its manifest), never another exception,
a write outside the cache, or a hang."""

import hashlib
import json
import stat
import warnings
import zipfile

import pytest
from edgepack.runtime import archive
from edgepack.runtime.errors import PackageError
from edgepack.runtime.package import open_package, verify_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_counts import count

FIXTURES = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@pytest.fixture(scope="module")
def packed_bytes(tiny_package, tmp_path_factory):
    return archive.pack(tiny_package, tmp_path_factory.mktemp("packed") / "tiny.edgepack").read_bytes()


def try_open(path, root):
    """Open ``path`` as a package; on success, the unpacked folder must sit in ``root`` and verify."""
    try:
        pkg = open_package(path)
    except PackageError:
        return None
    assert pkg.path.resolve().parent == root.resolve()
    verify_files(pkg.path, pkg.manifest)
    return pkg


def fresh(tmp_path_factory, monkeypatch_env, data):
    work = tmp_path_factory.mktemp("fz")
    monkeypatch_env(work / "cache")
    path = work / "x.edgepack"
    path.write_bytes(data)
    return path, work / "cache" / "packages"


@pytest.fixture
def set_cache(monkeypatch):
    return lambda p: monkeypatch.setenv("EDGEPACK_CACHE", str(p))


def assert_no_escape(work):
    # nothing but the archive and the cache may appear in the test's folder
    assert {p.name for p in work.iterdir()} <= {"x.edgepack", "cache"}


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(st.binary(max_size=2000))
def test_random_bytes(tmp_path_factory, set_cache, blob):
    count("fuzz")
    path, root = fresh(tmp_path_factory, set_cache, blob)
    assert try_open(path, root) is None
    assert_no_escape(path.parent)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(st.data())
def test_mutated_real_archive(tmp_path_factory, set_cache, packed_bytes, data):
    count("fuzz")
    blob = bytearray(packed_bytes)
    for _ in range(data.draw(st.integers(1, 8))):
        # bias towards headers and the central directory at the end, where a flip changes structure
        pos = data.draw(st.one_of(st.integers(0, 200), st.integers(len(blob) - 3000, len(blob) - 1),
                                  st.integers(0, len(blob) - 1)))
        blob[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        blob = blob[: data.draw(st.integers(0, len(blob)))]
    path, root = fresh(tmp_path_factory, set_cache, bytes(blob))
    try_open(path, root)
    assert_no_escape(path.parent)


NAMES = st.one_of(
    st.sampled_from(["model.onnx", "tokenizer.json", "generation.json", "chat_template.jinja", "manifest.json",
                     "../x", "/abs", "a/../../x", "C:x", "a\\b", "sub/", "sub/f", ".", "", "x\x00y", "MODEL.ONNX"]),
    st.text(alphabet="ab./\\:", max_size=8),
)
MODES = st.sampled_from([stat.S_IFREG | 0o644, 0, stat.S_IFLNK | 0o777, stat.S_IFCHR | 0o600, stat.S_IFDIR | 0o755,
                         stat.S_IFIFO | 0o600])


def manifest_for(members, lie):
    files = {}
    for name, data, _ in members:
        if name == "manifest.json":
            continue
        digest = hashlib.sha256(data).hexdigest()
        files[name] = {"size": len(data) + (1 if lie else 0), "sha256": digest}
    for required in ("model.onnx", "tokenizer.json", "generation.json"):
        files.setdefault(required, {"size": 1, "sha256": "0" * 64})
    return {"name": "fz", "dtype": "float32", "model": {}, "files": files}


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURES)
@given(st.lists(st.tuples(NAMES, st.binary(max_size=64), MODES), max_size=6), st.booleans(), st.booleans(),
       st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
def test_generated_zips(tmp_path_factory, set_cache, members, lie, with_manifest, compression):
    count("fuzz")
    work = tmp_path_factory.mktemp("fz")
    set_cache(work / "cache")
    path = work / "x.edgepack"
    entries = list(members)
    if with_manifest:
        entries.append(("manifest.json", json.dumps(manifest_for(members, lie)).encode(), stat.S_IFREG | 0o644))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, data, mode in entries:
                info = zipfile.ZipInfo(name or "_")
                info.filename = name  # bypass ZipInfo's own clean-up to write the name as given
                info.external_attr = mode << 16
                info.compress_type = compression
                zf.writestr(info, data)
    try_open(path, work / "cache" / "packages")
    assert_no_escape(work)
