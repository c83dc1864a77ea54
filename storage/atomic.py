"""Crash-safe replacement of an index directory: writer lock, commit marker, swap and recovery.

Names (target ``T = parent/name``; every sibling lives in ``parent``, hence on the same filesystem):
``N = parent/.name.new`` (generation being written), ``A = parent/.name.old`` (old generation set aside),
``parent/.name.lock`` (writer lock), ``parent/.name.swap.lock`` (swap lock). Lock files are never deleted.

Protocol of a writer (``persist_index``):

1. take the writer lock: ``flock(LOCK_EX | LOCK_NB)``; held -> ``IndexLockedError``. Readers never take it.
2. under the swap lock: recover a crashed swap (below), then delete leftover ``N`` and ``A``.
3. write every file into ``N``, fsync each; last write ``N/index.commit`` (temporary name + rename)
   and fsync ``N``. The commit marker is self-checksummed and holds the format version, the
   generation's uid and the sha256 of the database, whose rows hold the sha256 of every tensor file.
   ``N`` is *complete* iff its commit marker is valid.
4. under the swap lock: rename ``T -> A`` (if ``T`` exists), fsync parent; rename ``N -> T``, fsync parent.
5. delete ``A``, fsync parent.

State after a crash at any instant, and what a load does:

* during 1-3: ``T`` is the old index (``N`` is ignored, deleted by the next writer).
* between the two renames of 4: ``T`` is missing, ``A`` (old) and ``N`` (new) are complete:
  the load *recovers*: if it gets the swap lock without waiting it renames ``N`` (else ``A``) to ``T``,
  otherwise (a writer is busy) it reads ``N`` (else ``A``) in place.
* during 5: ``T`` is the new index; ``A`` is ignored and deleted by the next writer.

A load may race with a swap (files of the generation it started with vanish). Every file is verified
against checksums chained from the commit marker, so a load either returns one whole generation or
fails; on failure the loader re-resolves the directory and retries when the generation changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Iterator

from sqattn_index.errors import CorruptIndexError, IndexFormatError, IndexLockedError

from .records import SUPPORTED_FORMAT_VERSIONS
from .tensor_files import fsync_path

__all__ = ["COMMIT_FILE", "IndexPaths", "writer_lock", "write_commit", "read_commit", "resolve_for_read",
           "recover_locked", "swap_in", "generation_changed", "crash_point"]

COMMIT_FILE = "index.commit"
CRASH_ENV = "SQATTN_STORAGE_CRASH_AT"  # test hook, see crash_point


def crash_point(name: str) -> None:
    """Test hook: when env ``SQATTN_STORAGE_CRASH_AT`` equals ``name``, announce ``CRASH_POINT name`` on
    stdout and wait to be SIGKILLed by the test (killed after 30 s by itself). Otherwise do nothing."""
    if os.environ.get(CRASH_ENV) != name:
        return
    sys.stdout.write(f"CRASH_POINT {name}\n")  # one write, so the line is not interleaved with others
    sys.stdout.flush()
    time.sleep(30)
    os.kill(os.getpid(), signal.SIGKILL)  # pragma: no cover


class IndexPaths:
    """The target directory of an index and its siblings (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.target = Path(os.path.abspath(os.fspath(directory)))
        parent, name = self.target.parent, self.target.name
        self.parent = parent
        self.new = parent / f".{name}.new"
        self.old = parent / f".{name}.old"
        self.lock = parent / f".{name}.lock"
        self.swap_lock = parent / f".{name}.swap.lock"


@contextlib.contextmanager
def _flock(path: Path, *, blocking: bool, holder: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            raise IndexLockedError(
                f"index at {holder} is locked by another writer (lock file {path}); "
                "wait until it has finished persisting, then try again."
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock (also when the process dies)


def writer_lock(directory: str | os.PathLike | IndexPaths):
    """Context manager: the writer lock of the index at ``directory``, taken without waiting
    (``flock(LOCK_EX | LOCK_NB)`` on ``parent/.name.lock``); IndexLockedError when another writer holds it."""
    paths = directory if isinstance(directory, IndexPaths) else IndexPaths(directory)
    paths.parent.mkdir(parents=True, exist_ok=True)
    return _flock(paths.lock, blocking=False, holder=str(paths.target))


def _swap_lock(paths: IndexPaths, blocking: bool = True):
    return _flock(paths.swap_lock, blocking=blocking, holder=str(paths.target))


def write_commit(directory: Path, body: dict) -> None:
    """Write the self-checksummed commit marker into ``directory`` (temp name + rename), fsync it and
    the directory. Layout: one line of JSON, then ``sha256 <hex of that line>``."""
    line = json.dumps(body, sort_keys=True).encode()
    data = line + b"\nsha256 " + hashlib.sha256(line).hexdigest().encode() + b"\n"
    tmp = directory / (COMMIT_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / COMMIT_FILE)
    fsync_path(directory)


def read_commit(directory: Path) -> dict:
    """The commit marker's body. CorruptIndexError when it is missing or fails its checksum;
    IndexFormatError when its format version is not one this code reads."""
    path = directory / COMMIT_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptIndexError(
            f"index file {path} is missing: {directory} is not a complete sqattn index "
            "(never persisted, or the write was interrupted). Persist the index again."
        ) from None
    parts = data.split(b"\n")
    ok = len(parts) == 3 and parts[2] == b"" and parts[1] == b"sha256 " + hashlib.sha256(parts[0]).hexdigest().encode()
    try:
        body = json.loads(parts[0]) if ok else None
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("format_version"), int):
        raise CorruptIndexError(f"index file {path} is corrupt (fails its checksum or is truncated); "
                                "rebuild the index (persist it again).")
    found = body["format_version"]
    if found not in SUPPORTED_FORMAT_VERSIONS:
        raise IndexFormatError(
            f"index at {directory} has format version {found}; this sqattn_index reads versions "
            f"{list(SUPPORTED_FORMAT_VERSIONS)}. Upgrade sqattn_index or rebuild the index with this version."
        )
    return body


def _is_complete(directory: Path) -> bool:
    try:
        read_commit(directory)
    except (OSError, ValueError):  # CorruptIndexError, IndexFormatError included
        return False
    return True


def _rename(src: Path, dst: Path, parent: Path) -> None:
    os.rename(src, dst)
    fsync_path(parent)


def _repair_swap(paths: IndexPaths) -> None:
    """Caller holds the swap lock. When the target is missing, roll a crashed swap forward (complete
    new generation) or back (complete old generation)."""
    if paths.target.exists():
        return
    for candidate in (paths.new, paths.old):
        if _is_complete(candidate):
            _rename(candidate, paths.target, paths.parent)
            return


def recover_locked(paths: IndexPaths) -> None:
    """Caller holds the writer lock: repair a crashed swap, then delete leftovers ``N`` and ``A``."""
    with _swap_lock(paths):
        _repair_swap(paths)
        for leftover in (paths.new, paths.old):
            if leftover.exists():
                shutil.rmtree(leftover)
        fsync_path(paths.parent)


def swap_in(paths: IndexPaths, uid: str) -> None:
    """Caller holds the writer lock and ``paths.new`` is complete generation ``uid``: make it the target
    (steps 4, 5)."""
    with _swap_lock(paths):
        if not paths.new.exists():
            # first persist only: a reader found no target but a complete N and rolled it forward already
            if read_commit(paths.target).get("index_uid") != uid:
                raise CorruptIndexError(f"{paths.new} vanished before it was swapped in; persist again.")
            return
        if paths.target.exists():
            _rename(paths.target, paths.old, paths.parent)
            crash_point("aside")
        _rename(paths.new, paths.target, paths.parent)
    crash_point("swapped")
    if paths.old.exists():
        shutil.rmtree(paths.old)
        fsync_path(paths.parent)


def _try_repair(paths: IndexPaths) -> None:
    """A reader's recovery: repair a crashed swap if the swap lock is free now; never wait."""
    try:
        with _swap_lock(paths, blocking=False):
            _repair_swap(paths)
    except (IndexLockedError, OSError):  # busy writer, read-only directory: read in place instead
        pass


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def resolve_for_read(paths: IndexPaths) -> tuple[Path, tuple[int, int]] | None:
    """The directory a reader should load now, with its identity (device, inode) to detect a swap
    later: the target, else (after trying a repair) a complete new or old generation. None if no index."""
    for _ in range(8):
        ident = _identity(paths.target)
        if ident is not None:
            return paths.target, ident
        for candidate in (paths.new, paths.old):
            ident = _identity(candidate)  # before the completeness check: a later swap changes it
            if ident is not None and _is_complete(candidate):
                _try_repair(paths)
                ident_target = _identity(paths.target)
                if ident_target is not None:
                    return paths.target, ident_target
                return candidate, ident
        time.sleep(0.001)  # a swap is between its two renames; look again
    return None


def generation_changed(path: Path, ident: tuple[int, int]) -> bool:
    """True when ``path`` no longer names the directory a load started with."""
    return _identity(path) != ident
