"""The on-disk cache the examples share, safe when several runs start together on one machine.

Readers never take a lock: they trust whatever is at a cache path, so nothing may appear there
until it is complete. Files are written under a temporary name in the same directory, flushed to
disk and renamed into place (`os.replace` is atomic within a filesystem); directories are filled
under a temporary name and renamed the same way. Work that is slow or must not be repeated
(downloads, tokenizer training) runs under an exclusive `fcntl.flock`, so a second run waits for
the first and then reads its result instead of doing the work again. The rename alone keeps
readers safe where locks do not work (some network filesystems): the work is then done twice,
and the second copy is discarded.

A run killed mid-build leaves its temporary name behind; the next builder of the same path holds
the lock, so any temporary of that path it finds is stale and is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Iterator

DONE = ".complete"  # inside a cached directory; also what caches written before this module used


def cache_root() -> Path:
    """INTRADISTILL_CACHE, else ~/.cache/intradistill_kernels (created)."""
    path = Path(os.environ.get("INTRADISTILL_CACHE") or Path.home() / ".cache" / "intradistill_kernels")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _temp_name(path: Path) -> Path:
    # Hidden, and recognisable per target, so that stale ones can be found and no glob over the
    # cache directory matches a half-written file.
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _remove_stale(path: Path) -> None:
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    # Without this, a crash after the rename could leave a complete-looking entry with empty files.
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                _fsync(Path(dirpath, name))
        _fsync(Path(dirpath))


@contextlib.contextmanager
def exclusive(lock_file: Path) -> Iterator[None]:
    """Holds an exclusive lock on `lock_file` (created if missing, never deleted: deleting it would
    let a later process lock a fresh file while an earlier one still holds the old one)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released by the kernel if the process dies
        yield
    finally:
        os.close(fd)


def _lock_for(path: Path) -> Path:
    return path.with_name(f".{path.name}.lock")


def cached_file(path: Path, build: Callable[[Path], None], lock: Path | None = None) -> Path:
    """Returns `path`, first building it once if it is missing: `build(tmp)` must write the whole
    file at `tmp`, a temporary name beside `path`, which is then published with an atomic rename.
    `lock` (default: a hidden file beside `path`) serialises the builders."""
    path = Path(path)
    if path.exists():
        return path
    with exclusive(Path(lock) if lock else _lock_for(path)):
        if path.exists():  # built by the run that held the lock before us
            return path
        _remove_stale(path)
        tmp = _temp_name(path)
        try:
            build(tmp)
            if not tmp.is_file():
                raise RuntimeError(f"building {path} wrote no file")
            _fsync(tmp)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync(path.parent)
    return path


def cached_dir(path: Path, build: Callable[[Path], None], lock: Path | None = None) -> Path:
    """Returns the directory `path`, first building it once if it is missing: `build(tmp)` fills
    the empty directory `tmp`, which is then renamed to `path`. Complete entries hold a marker file
    (written before the rename), so a directory left at `path` by an interrupted older writer is
    replaced rather than trusted."""
    path = Path(path)
    if (path / DONE).exists():
        return path
    with exclusive(Path(lock) if lock else _lock_for(path)):
        if (path / DONE).exists():
            return path
        _remove_stale(path)
        tmp = _temp_name(path)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            (tmp / DONE).touch()
            _fsync_tree(tmp)
            _publish_dir(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _fsync(path.parent)
    return path


def _publish_dir(tmp: Path, path: Path) -> None:
    if path.exists() and not (path / DONE).exists():
        # Incomplete (an interrupted writer that did not use this module): move it aside with one
        # atomic rename, so no reader ever sees it half-deleted.
        trash = _temp_name(path)
        with contextlib.suppress(FileNotFoundError):
            os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, path)
    except OSError:
        # Another builder won the race (possible only where flock is not honoured): its copy is
        # complete, ours is discarded by the caller.
        if not (path / DONE).exists():
            raise
