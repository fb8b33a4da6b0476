"""Single-file packages: a package folder as one uncompressed zip (``.edgepack``), and a safe unpacker.

An archive travels over networks, so unpacking trusts nothing in it: every member must be a plain
file with a safe relative name listed in the archive's own manifest, at the size the manifest
records; links, devices, directories with odd names, duplicates, encryption and size bombs are
refused before a byte is written, reading stops at the manifest's size, and each file's sha256 is
computed while it is written. Unpacked packages are kept under ``$EDGEPACK_CACHE/packages`` (keyed by
the manifest's sha256), so a second load costs only the usual checksum pass. Torch-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import shutil
import stat
import tempfile
import uuid
import zipfile
from pathlib import Path

from edgepack.runtime.errors import IntegrityError, PackageError
from edgepack.runtime.manifest import MANIFEST_NAME, Manifest

SUFFIX = ".edgepack"
MAX_MEMBERS = 256
MAX_MANIFEST_BYTES = 4 << 20
MAX_MEMBER_BYTES = 32 << 30  # no single model file of an edge package comes near this
MAX_TOTAL_BYTES = 64 << 30
_CHUNK = 1 << 20
_ALLOWED_COMPRESSION = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


def is_archive(path: Path | str) -> bool:
    """True for an existing regular file (a package folder is a directory)."""
    return Path(path).is_file()


def cache_root() -> Path:
    """Where archives are unpacked: ``$EDGEPACK_CACHE/packages`` (same default as the model cache)."""
    if env := os.environ.get("EDGEPACK_CACHE"):
        return Path(env).expanduser() / "packages"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgepack" / "packages"


def pack(folder: Path | str, output: Path | str) -> Path:
    """Write package ``folder`` (verified first) as one stored zip at ``output``, atomically."""
    from edgepack.runtime.package import open_package

    output = Path(output)
    package = open_package(folder, verify=True)
    folder = package.path  # an archive given here was unpacked: re-pack its folder
    names = [MANIFEST_NAME, *sorted(package.manifest.files)]
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.tmp-", dir=output.parent)
    os.close(fd)
    try:
        # Stored, not deflated: int4 and float32 weights barely compress, and stored members can be
        # read at disk speed.
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in names:
                info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o644) << 16
                with open(folder / name, "rb") as src, zf.open(info, "w", force_zip64=True) as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return output


def read_manifest(path: Path | str) -> Manifest:
    """The manifest of an archive, without unpacking the rest (for ``inspect``)."""
    with _open_zip(Path(path)) as zf:
        manifest, _ = _checked_manifest(zf, Path(path))
    return manifest


def unpack(path: Path | str, verify: bool = True, root: Path | None = None) -> Path:
    """Unpack an archive into the cache (or reuse an earlier unpacking); return the package folder.

    With ``verify``, a cached copy is re-hashed and unpacked again if it no longer matches.
    """
    path = Path(path)
    with _open_zip(path) as zf:
        manifest, manifest_bytes = _checked_manifest(zf, path)
        infos = _checked_members(zf, manifest, path)
        root = Path(root) if root is not None else cache_root()
        target = root / f"{_safe_stem(manifest.name)}-{hashlib.sha256(manifest_bytes).hexdigest()[:16]}"
        if target.is_dir() and _cached_copy_ok(target, manifest, manifest_bytes, verify):
            return target
        root.mkdir(parents=True, exist_ok=True)
        _check_free_space(root, manifest.total_size, path)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
        try:
            for info in infos:
                _extract_member(zf, info, staging, manifest, path)
            _install(staging, target, manifest_bytes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


@contextlib.contextmanager
def _open_zip(path: Path):
    if not path.exists():
        raise PackageError(f"package not found: {path}")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as e:
        # NotImplementedError: a central directory entry asks for a zip version zipfile does not read
        raise PackageError(f"{path} is neither a package folder nor a valid .edgepack archive ({e})") from None
    with zf:
        try:
            yield zf
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
            # zipfile reports a corrupt member (bad CRC, bad local header, ...) with these
            raise PackageError(f"archive {path} is corrupt: {e}") from None


def _checked_manifest(zf: zipfile.ZipFile, path: Path) -> tuple[Manifest, bytes]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise PackageError(f"archive {path} has {len(infos)} members (at most {MAX_MEMBERS}); not a package")
    matches = [i for i in infos if i.filename == MANIFEST_NAME]
    if len(matches) != 1:
        what = "no" if not matches else "more than one"
        raise PackageError(f"archive {path} has {what} {MANIFEST_NAME}; not an edgepack package archive")
    info = matches[0]
    _check_member_header(info, path)
    if info.file_size > MAX_MANIFEST_BYTES:
        raise PackageError(f"{MANIFEST_NAME} in {path} declares {info.file_size} bytes (at most "
                           f"{MAX_MANIFEST_BYTES}); refusing it")
    data = _read_limited(zf, info, MAX_MANIFEST_BYTES, path)
    return Manifest.from_json(data.decode("utf-8", errors="replace")), data


def _checked_members(zf: zipfile.ZipFile, manifest: Manifest, path: Path) -> list[zipfile.ZipInfo]:
    """Every member but the manifest, after all structural checks; nothing is written before this."""
    seen: set[str] = set()
    members: list[zipfile.ZipInfo] = []
    total = 0
    for info in zf.infolist():
        name = info.filename
        _check_name(name, path)
        key = name.rstrip("/").casefold()  # case-insensitive file systems would merge these
        if key in seen:
            raise PackageError(f"archive {path} holds {name!r} twice; refusing an ambiguous archive")
        seen.add(key)
        _check_member_header(info, path)
        if name == MANIFEST_NAME:
            continue
        entry = manifest.files.get(name)
        if entry is None:
            raise PackageError(f"archive {path} holds {name!r}, which its manifest does not list; refusing it")
        if info.file_size != entry.size:
            raise IntegrityError(f"{name} in archive {path} declares {info.file_size} bytes, the manifest says "
                                 f"{entry.size}; re-copy or rebuild the archive")
        if info.file_size > MAX_MEMBER_BYTES:
            raise PackageError(f"{name} in {path} is {info.file_size} bytes (at most {MAX_MEMBER_BYTES})")
        total += info.file_size
        members.append(info)
    if total > MAX_TOTAL_BYTES:
        raise PackageError(f"archive {path} unpacks to {total} bytes (at most {MAX_TOTAL_BYTES}); refusing it")
    missing = sorted(set(manifest.files) - {i.filename for i in members})
    if missing:
        raise IntegrityError(f"archive {path} lacks {missing[0]!r}, which its manifest lists; re-copy or rebuild it")
    return members


def _check_name(name: str, path: Path) -> None:
    bad = (
        not name or "\\" in name or "\x00" in name or name.startswith("/") or (len(name) > 1 and name[1] == ":")
        or any(part in ("", ".", "..") for part in name.rstrip("/").split("/"))
        or posixpath.normpath(name) != name.rstrip("/")
    )
    if bad:
        raise PackageError(f"archive {path} holds an unsafe member name {name!r} (absolute, '..' or odd); refusing it")


def _check_member_header(info: zipfile.ZipInfo, path: Path) -> None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if info.is_dir() or info.filename.endswith("/"):
        raise PackageError(f"archive {path} holds a directory entry {info.filename!r}; package archives hold "
                           "only files (write them with 'edgepack pack')")
    if kind not in (0, stat.S_IFREG):  # 0: written by a tool that records no Unix mode
        what = "a symbolic link" if stat.S_ISLNK(mode) else "a device, pipe or other special file"
        raise PackageError(f"archive {path}: member {info.filename!r} is {what}; refusing it")
    if info.flag_bits & 0x1:
        raise PackageError(f"archive {path}: member {info.filename!r} is encrypted; refusing it")
    if info.compress_type not in _ALLOWED_COMPRESSION:
        raise PackageError(f"archive {path}: member {info.filename!r} uses compression method "
                           f"{info.compress_type}; only stored or deflated members are read")


def _read_limited(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path: Path) -> bytes:
    out = bytearray()
    with zf.open(info) as f:
        while chunk := f.read(min(_CHUNK, limit + 1 - len(out))):
            out += chunk
            if len(out) > limit:
                raise PackageError(f"{info.filename} in {path} unpacks past {limit} bytes; refusing it")
    return bytes(out)


def _extract_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, staging: Path, manifest: Manifest,
                    path: Path) -> None:
    entry = manifest.files[info.filename]
    dest = staging / info.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    if staging.resolve() not in dest.resolve().parents:
        raise PackageError(f"archive {path}: member {info.filename!r} resolves outside the package; refusing it")
    digest = hashlib.sha256()
    written = 0
    with zf.open(info) as src, open(dest, "xb") as dst:
        # Read at most one byte past the manifest's size: a member that inflates further is a bomb.
        while chunk := src.read(min(_CHUNK, entry.size + 1 - written)):
            written += len(chunk)
            if written > entry.size:
                raise IntegrityError(f"{info.filename} in archive {path} unpacks past the {entry.size} bytes its "
                                     "manifest records; refusing it")
            digest.update(chunk)
            dst.write(chunk)
    if written != entry.size:
        raise IntegrityError(f"{info.filename} in archive {path} is {written} bytes, the manifest says {entry.size} "
                             "(truncated); re-copy or rebuild the archive")
    if digest.hexdigest() != entry.sha256:
        raise IntegrityError(f"{info.filename} in archive {path} fails its sha256 check (tampered or corrupt); "
                             "re-copy or rebuild the archive")


def _install(staging: Path, target: Path, manifest_bytes: bytes) -> None:
    """Write the manifest last, then rename ``staging`` into place (an existing copy is swapped out)."""
    (staging / MANIFEST_NAME).write_bytes(manifest_bytes)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():  # another process installed the same archive first: use theirs
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _cached_copy_ok(target: Path, manifest: Manifest, manifest_bytes: bytes, verify: bool) -> bool:
    from edgepack.runtime.package import verify_files

    mpath = target / MANIFEST_NAME
    if not mpath.is_file() or mpath.stat().st_size != len(manifest_bytes) or mpath.read_bytes() != manifest_bytes:
        return False
    if not verify:
        return True
    try:
        verify_files(target, manifest)
    except PackageError:
        return False
    return True


def _check_free_space(root: Path, needed: int, path: Path) -> None:
    free = shutil.disk_usage(root).free
    if needed > free:
        raise PackageError(f"unpacking {path} needs {needed / 1e6:.1f} MB but {root} has {free / 1e6:.1f} MB free; "
                           "free some space or set EDGEPACK_CACHE to a larger disk")


def _safe_stem(name: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:48].strip(".")
    return stem or "package"

