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
anyway, and a daemon crash does not lose a completed rename; they are written up to ten times per
migration, on its critical path.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid as uuidlib
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
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
    if sync_dir:
        _fsync_dir(path.parent)


def remove(path: Path, *, sync_dir: bool = True) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        if sync_dir:
            _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
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
