"""File helpers shared by the toolchain and the runtime: hashing and atomic directory writes."""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgepack.runtime.errors import ResourceError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a fresh staging folder beside ``target``; on success it replaces ``target``.

    The staging folder sits in the same parent so the final rename never crosses a file system.
    If the body raises, the staging folder is removed and ``target`` is untouched. An existing
    ``target`` is moved aside first and deleted only after the new one is in place, so at every
    instant ``target`` is either the old complete folder, absent, or the new complete folder.
    The swap holds a lock, so two writers of one target finish one after the other (the last wins,
    never a mix). Folders left by a writer that was killed (``kill -9``, power loss) carry its pid
    and are swept by the next writer of the same target; a target left absent that way gets its
    previous version back first. A full disk becomes a one-line ``ResourceError``.
    """
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _swap_lock(target):
        sweep_stale(target)
    staging = Path(tempfile.mkdtemp(prefix=_prefix(target, "tmp"), dir=target.parent))
    try:
        yield staging
        with _swap_lock(target):
            old = None
            if target.exists():
                old = Path(tempfile.mkdtemp(prefix=_prefix(target, "old"), dir=target.parent))
                os.rename(target, old / target.name)
            os.rename(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise disk_full(target, e) from None
        raise


_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(target: Path, e: OSError) -> ResourceError:
    free = shutil.disk_usage(target.parent).free if target.parent.exists() else 0
    return ResourceError(f"no space left writing {target} ({e.strerror}; {free / 1e6:.1f} MB free there); nothing was "
                         "replaced: free some space or write elsewhere, then run it again")


def _prefix(target: Path, kind: str) -> str:
    return f".{target.name}.{kind}-{os.getpid()}-"


@contextlib.contextmanager
def _swap_lock(target: Path) -> Iterator[None]:
    if fcntl is None:  # no advisory locks on this platform: renames alone stay atomic
        yield
        return
    # The lock is taken on the parent folder itself, so no lock file is left beside the target.
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def sweep_stale(target: Path) -> list[Path]:
    """Remove what killed writers of ``target`` left beside it (call with the swap lock held).

    A writer killed between moving the old ``target`` aside and renaming the new one in leaves no
    ``target`` but an ``old`` folder holding the previous complete version: that is put back.
    """
    target = Path(target).absolute()
    removed = []
    for kind in ("old", "tmp", "work"):
        for p in target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"):
            pid = p.name[len(target.name) + len(kind) + 3:].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if kind == "old" and not target.exists() and (p / target.name).is_dir():
                os.rename(p / target.name, target)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def work_dir(target: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder beside ``target`` for intermediate files, swept like staging if its writer dies."""
    target = Path(target).absolute()
    target.parent.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=_prefix(target, "work"), dir=target.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file and a rename, so readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
