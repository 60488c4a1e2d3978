"""The daemon's files: host identity, persistent definitions and live status, written atomically.

Layout under the state dir::

    host-uuid                  generated once, kept for the life of the state dir
    domains/<uuid>.xml         persistent definitions (libvirt domain XML)
    domains.index              the definition index: what a start needs of each definition
                               (a cache the files overrule: ``virtmig.daemon.domindex``)
    status/<uuid>.xml          live status: state, reason, id, live definition, migration job

At start the daemon loads these files in one fixed order (by file name) with one set of rules
(``virtmig.daemon.registry``): a file that contradicts another or itself is reported and moved
aside with :meth:`StateDir.reject` (``<file>.rejected``, never read again), so that the
definitions loaded are never ambiguous; so is one beyond ``registry.MAX_DOMAINS`` domains.

Every write goes to a temporary file in the same folder, is fsynced and renamed over the target:
a crash leaves either the old file or the new one, never a torn one.  For definitions and the
host UUID the folder is fsynced too, so that the rename itself survives a power loss.  Status
files skip that (``sync_dir=False``): they describe live QEMU processes, which a power loss ends
anyway, and a daemon crash does not lose a completed rename.  Most status writes of a migration
skip the file's fsync as well (``fsync=False``; which ones, and why recovery does not need them,
is :func:`virtmig.daemon.statusxml.status_needs_fsync`'s rule): fsync only matters for a power
loss or a kernel crash, and a daemon killed at any point still leaves the last file it renamed.

A write that must be durable before its caller goes on, on a migration's path, is
:func:`atomic_write_durably`: the same write with its fsyncs in a worker thread, so that the
event loop serves other calls (and other migrations' fsyncs share the filesystem's journal
commits) while the caller waits; a write of the same file made meanwhile is newer and wins.

The file a rename replaces is released (its blocks freed) by a background thread
(:func:`release_later`): on ext4 freeing the replaced file's blocks took ~3 ms per status write
on the test machine, inside ``rename``, on the event loop; the new file is in place either way.

``SYNC_COUNTER`` (tests, benchmarks) counts the fsyncs this module makes, by kind.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import queue
import threading
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

#: fsyncs made by this module, by kind (``file``, ``dir``): read by tests and benchmarks.
SYNC_COUNTER: collections.Counter[str] = collections.Counter()


#: Writes and removals per path (only while a durable write of it awaits its fsync): a
#: durable write whose path changed meanwhile leaves the newer file in place.
_versions: dict[Path, int] = {}


def _bump(path: Path) -> int:
    if path in _versions:
        _versions[path] += 1
        return _versions[path]
    return 0


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically; ``fsync``: make the content durable before the
    rename; ``sync_dir``: also the rename (implies ``fsync``)."""
    _bump(path)
    with _staged(path, data) as (fd, tmp):
        if fsync or sync_dir:
            SYNC_COUNTER["file"] += 1
            os.fsync(fd)
        _replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


async def atomic_write_durably(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    """:func:`atomic_write` with its fsyncs in a worker thread: the event loop goes on (other
    calls, and concurrent fsyncs share the filesystem's journal commits) while the caller waits
    until ``data`` is durable.  If ``path`` is written or removed meanwhile, the newer file
    stays (it is newer) and is made durable instead."""
    version = _versions[path] = _versions.get(path, 0) + 1
    try:
        with _staged(path, data) as (fd, tmp):
            SYNC_COUNTER["file"] += 1
            await asyncio.to_thread(os.fsync, fd)
            if _versions[path] == version:
                _replace(tmp, path)
            else:  # superseded while it synced: the newer file is what must be durable
                os.unlink(tmp)
                await asyncio.to_thread(_fsync_path, path)
        if sync_dir:
            await asyncio.to_thread(_fsync_dir, path.parent)
    finally:
        if _versions.get(path) == version:
            del _versions[path]


#: The temporary files' names: ``.<target's name>.<pid>.<serial>`` (a name taken, by a file a
#: killed daemon of the same pid left, is skipped).  Cheaper than ``tempfile.mkstemp``'s random
#: names, and never ``*.xml`` or ``*.json``: start-up reads neither leftover.
_serial = itertools.count()
_STAGE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def _open_staged(path: Path) -> tuple[int, str]:
    """A new temporary file beside ``path`` (its folder made if missing), open for writing."""
    prefix = f"{path.parent}/.{path.name}.{os.getpid()}."
    while True:
        tmp = f"{prefix}{next(_serial)}"
        try:
            return os.open(tmp, _STAGE_FLAGS, 0o600), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:  # the folder only: made once, not checked every write
            path.parent.mkdir(parents=True, exist_ok=True)
            return os.open(tmp, _STAGE_FLAGS, 0o600), tmp


@contextlib.contextmanager
def _staged(path: Path, data: bytes) -> Iterator[tuple[int, str]]:
    """``data`` written to a new temporary file beside ``path``: yields its descriptor (open
    until the block ends) and name; the temporary is removed if the block raises."""
    fd, tmp = _open_staged(path)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            yield fd, tmp
        finally:
            os.close(fd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _replace(tmp: str, path: Path) -> None:
    old = _hold(path)
    try:
        os.replace(tmp, path)
    finally:
        release_later(old)


def _fsync_path(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            SYNC_COUNTER["file"] += 1
            os.fsync(fd)
        finally:
            os.close(fd)


def remove(path: Path, *, sync_dir: bool = True) -> None:
    _bump(path)
    old = _hold(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            if sync_dir:
                _fsync_dir(path.parent)
    finally:
        release_later(old)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        SYNC_COUNTER["dir"] += 1
        os.fsync(fd)
    finally:
        os.close(fd)


def _hold(path: Path) -> int | None:
    """A descriptor of the file at ``path`` (None if there is none), so that replacing or
    unlinking it does not free its blocks: the last close does, in :func:`release_later`."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None


_releases: queue.SimpleQueue[int] = queue.SimpleQueue()
_releaser: threading.Thread | None = None
_releaser_lock = threading.Lock()


def release_later(fd: int | None) -> None:
    """Close ``fd`` in the background thread (the close of a replaced file's last reference
    frees its blocks: milliseconds on some filesystems, which the caller need not wait for)."""
    global _releaser
    if fd is None:
        return
    if _releaser is None or not _releaser.is_alive():
        with _releaser_lock:
            if _releaser is None or not _releaser.is_alive():
                _releaser = threading.Thread(target=_release_loop, name="virtmig-release",
                                             daemon=True)
                _releaser.start()
    _releases.put(fd)


def _release_loop() -> None:
    while True:
        fd = _releases.get()
        with contextlib.suppress(OSError):
            os.close(fd)


class StateDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.domains = root / "domains"
        self.status = root / "status"
        for folder in (root, self.domains, self.status):
            folder.mkdir(parents=True, exist_ok=True)

    def host_uuid(self) -> str:
        """The host UUID, generated on first use and kept."""
        path = self.root / "host-uuid"
        try:
            return str(uuidlib.UUID(path.read_text().strip()))
        except (FileNotFoundError, ValueError):
            value = str(uuidlib.uuid4())
            atomic_write(path, (value + "\n").encode())
            return value

    def definition_path(self, uuid: str) -> Path:
        return self.domains / f"{uuid}.xml"

    def status_path(self, uuid: str) -> Path:
        return self.status / f"{uuid}.xml"

    def reject(self, path: Path) -> Path:
        """Move ``path`` aside as ``<name>.rejected`` (``.rejected.N`` if that exists); return
        where it went."""
        target = path.with_name(path.name + ".rejected")
        n = 0
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.rejected.{n}")
        os.replace(path, target)
        _fsync_dir(path.parent)
        return target

    def backend_dir(self, name: str) -> Path:
        path = self.root / "backend" / name
        path.mkdir(parents=True, exist_ok=True)
        return path
