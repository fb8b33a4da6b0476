"""Single-file packages: round trip, cache reuse, and one crafted archive for each refusal."""

import json
import stat
import struct
import tarfile
import warnings
import zipfile

import pytest
from edgepack.runtime import archive, load
from edgepack.runtime.cli import main
from edgepack.runtime.errors import IntegrityError, PackageError
from edgepack.runtime.package import open_package, read_manifest


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPACK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "packages"


@pytest.fixture
def packed(tiny_package, tmp_path):
    return archive.pack(tiny_package, tmp_path / "tiny.edgepack")


def members_of(path):
    with zipfile.ZipFile(path) as zf:
        return {i.filename: zf.read(i) for i in zf.infolist()}


def write_zip(path, members, mode=stat.S_IFREG | 0o644, compression=zipfile.ZIP_STORED):
    """``members``: name → bytes, or name → (bytes, unix mode)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate names some tests need
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, value in members:
                data, m = value if isinstance(value, tuple) else (value, mode)
                info = zipfile.ZipInfo(name)
                info.external_attr = m << 16
                info.compress_type = compression
                zf.writestr(info, data)
    return path


def assert_nothing_unpacked(cache):
    assert not cache.exists() or not any(cache.iterdir()), list(cache.iterdir())


def test_pack_round_trip_generates_like_the_folder(tiny_package, packed, private_cache):
    assert zipfile.is_zipfile(packed)
    with zipfile.ZipFile(packed) as zf:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
    from_folder = load(tiny_package).generate("hello", max_new_tokens=8).tokens
    model = load(packed)
    assert model.package.path.parent == private_cache
    assert model.generate("hello", max_new_tokens=8).tokens == from_folder
    assert read_manifest(packed) == read_manifest(tiny_package)


def test_second_load_reuses_the_unpacked_copy(packed):
    first = archive.unpack(packed)
    stamp = (first / "model.onnx").stat().st_mtime_ns
    assert archive.unpack(packed) == first
    assert (first / "model.onnx").stat().st_mtime_ns == stamp


def test_damaged_cached_copy_is_unpacked_again(packed):
    first = archive.unpack(packed)
    (first / "tokenizer.json").write_text("{}")
    again = open_package(packed)
    assert again.path == first
    open_package(first)  # verifies: the copy was replaced by a good one


def test_cli_pack_run_inspect(tiny_package, tmp_path, capsys):
    out = tmp_path / "cli.edgepack"
    assert main(["pack", str(tiny_package), "-o", str(out)]) == 0
    assert main(["run", str(out), "hello", "--max-tokens", "4"]) == 0
    assert main(["inspect", str(out), "--verify"]) == 0
    assert "verified" in capsys.readouterr().out


def test_cli_refuses_a_bad_archive_with_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.edgepack"
    bad.write_bytes(b"PK\x03\x04 not really")
    assert main(["run", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "edgepack: error:" in err and len(err.strip().splitlines()) == 1


def hostile(packed, tmp_path, extra=(), drop=(), replace=None, **kwargs):
    members = [(n, d) for n, d in members_of(packed).items() if n not in drop]
    if replace:
        members = [(n, replace.get(n, d)) for n, d in members]
    return write_zip(tmp_path / "hostile.edgepack", [*members, *extra], **kwargs)


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil", "a/../../evil", "C:evil", "dir\\..\\evil",
                                  "./model.onnx", "a//b", ""])
def test_unsafe_names_are_refused(packed, tmp_path, name, private_cache):
    with pytest.raises(PackageError, match="unsafe member name"):
        open_package(hostile(packed, tmp_path, extra=[(name, b"x")]))
    assert_nothing_unpacked(private_cache)
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("mode, message", [
    (stat.S_IFLNK | 0o777, "symbolic link"),
    (stat.S_IFCHR | 0o600, "device"),
    (stat.S_IFIFO | 0o600, "device, pipe"),
    (stat.S_IFBLK | 0o600, "device"),
])
def test_links_and_special_files_are_refused(packed, tmp_path, mode, message, private_cache):
    # a listed name, so only the file type can be the reason
    victim = hostile(packed, tmp_path, replace={"chat_template.jinja": (b"/etc/passwd", mode)})
    with pytest.raises(PackageError, match=message):
        open_package(victim)
    assert_nothing_unpacked(private_cache)


def test_directory_entries_are_refused(packed, tmp_path):
    with pytest.raises(PackageError, match="directory entry"):
        open_package(hostile(packed, tmp_path, extra=[("sub/", (b"", stat.S_IFDIR | 0o755))]))


def test_hardlinks_cannot_come_in_a_tar(tiny_package, tmp_path):
    path = tmp_path / "links.edgepack"
    with tarfile.open(path, "w") as tf:
        tf.add(tiny_package / "manifest.json", arcname="manifest.json")
        link = tarfile.TarInfo("model.onnx")
        link.type, link.linkname = tarfile.LNKTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(PackageError, match="nor a valid .edgepack archive"):
        open_package(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "manifest.json", "Tokenizer.JSON"])
def test_duplicate_names_are_refused(packed, tmp_path, name, private_cache):
    with pytest.raises(PackageError, match="twice|more than one"):
        open_package(hostile(packed, tmp_path, extra=[(name, b"{}")]))
    assert_nothing_unpacked(private_cache)


def test_members_not_in_the_manifest_are_refused(packed, tmp_path, private_cache):
    with pytest.raises(PackageError, match="does not list"):
        open_package(hostile(packed, tmp_path, extra=[("payload.so", b"\x7fELF")]))
    assert_nothing_unpacked(private_cache)


def test_missing_members_are_refused(packed, tmp_path):
    with pytest.raises(IntegrityError, match="lacks 'generation.json'"):
        open_package(hostile(packed, tmp_path, drop=["generation.json"]))


def test_no_manifest_is_refused(packed, tmp_path):
    with pytest.raises(PackageError, match="no manifest.json"):
        open_package(hostile(packed, tmp_path, drop=["manifest.json"]))


def test_wrong_checksum_is_refused(packed, tmp_path, private_cache):
    data = bytearray(members_of(packed)["model.onnx"])
    data[len(data) // 2] ^= 0xFF
    with pytest.raises(IntegrityError, match="sha256"):
        open_package(hostile(packed, tmp_path, replace={"model.onnx": bytes(data)}))
    assert_nothing_unpacked(private_cache)


def test_declared_size_differing_from_the_manifest_is_refused(packed, tmp_path):
    data = members_of(packed)["tokenizer.json"]
    with pytest.raises(IntegrityError, match="declares"):
        open_package(hostile(packed, tmp_path, replace={"tokenizer.json": data[:-10]}))


def test_truncated_archive_is_refused(packed, tmp_path):
    cut = tmp_path / "cut.edgepack"
    cut.write_bytes(packed.read_bytes()[: packed.stat().st_size // 2])
    with pytest.raises(PackageError):
        open_package(cut)


def test_size_limits_are_checked_before_writing(packed, monkeypatch, private_cache):
    monkeypatch.setattr(archive, "MAX_TOTAL_BYTES", 1000)
    with pytest.raises(PackageError, match="unpacks to"):
        open_package(packed)
    monkeypatch.setattr(archive, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(PackageError, match="declares"):
        read_manifest(packed)
    assert_nothing_unpacked(private_cache)


def _lie_about_size(path, name, size):
    """Patch the uncompressed size of ``name`` in its local header and central directory entry."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    for sig, size_at, name_len_at, name_at in ((b"PK\x03\x04", 22, 26, 30), (b"PK\x01\x02", 24, 28, 46)):
        pos = data.find(sig)
        while pos >= 0:
            n = struct.unpack_from("<H", data, pos + name_len_at)[0]
            if bytes(data[pos + name_at:pos + name_at + n]) == encoded:
                struct.pack_into("<I", data, pos + size_at, size)
            pos = data.find(sig, pos + 4)
    path.write_bytes(bytes(data))


def test_zip_bomb_stops_at_the_manifest_size(packed, tmp_path, private_cache):
    # A deflated member that declares the manifest's size but inflates to 64 MiB of zeros.
    real = members_of(packed)["tokenizer.json"]
    bomb = hostile(packed, tmp_path, replace={"tokenizer.json": bytes(64 << 20)}, compression=zipfile.ZIP_DEFLATED)
    assert bomb.stat().st_size < 1 << 20
    _lie_about_size(bomb, "tokenizer.json", len(real))
    with pytest.raises(PackageError) as info:
        open_package(bomb)
    # zipfile itself stops at the declared size and then finds the CRC wrong, or our own limit trips
    assert "past" in str(info.value) or "corrupt" in str(info.value)
    assert_nothing_unpacked(private_cache)


def test_encrypted_member_is_refused(packed, tmp_path):
    path = hostile(packed, tmp_path)
    data = bytearray(path.read_bytes())
    pos = data.find(b"PK\x01\x02")
    struct.pack_into("<H", data, pos + 8, struct.unpack_from("<H", data, pos + 8)[0] | 1)
    path.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="encrypted"):
        open_package(path)


def test_not_enough_disk_is_refused(packed, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(archive.shutil, "disk_usage", lambda p: usage(10, 10, 0))
    with pytest.raises(PackageError, match="MB free"):
        open_package(packed)


def test_manifest_with_unsafe_paths_in_an_archive_is_refused(packed, tmp_path):
    manifest = json.loads(members_of(packed)["manifest.json"])
    manifest["files"]["../x"] = {"size": 1, "sha256": "0" * 64}
    with pytest.raises(PackageError, match="unsafe file name"):
        open_package(hostile(packed, tmp_path, replace={"manifest.json": json.dumps(manifest).encode()}))


def test_pack_refuses_a_tampered_folder(package_copy, tmp_path):
    (package_copy / "generation.json").write_text("{}")
    with pytest.raises(IntegrityError):
        archive.pack(package_copy, tmp_path / "x.edgepack")
    assert not (tmp_path / "x.edgepack").exists()
    assert not list(tmp_path.glob(".x.edgepack.tmp-*"))



def test_an_archive_asking_for_a_newer_zip_version_is_refused(packed, tmp_path):
    data = bytearray(packed.read_bytes())
    entry = data.index(b"PK\x01\x02")  # first central directory entry
    struct.pack_into("<H", data, entry + 6, 64)  # "version needed to extract" 6.4: zipfile raises NotImplementedError
    bad = tmp_path / "newer.edgepack"
    bad.write_bytes(bytes(data))
    with pytest.raises(PackageError, match="neither a package folder nor a valid .edgepack archive"):
        open_package(bad)
