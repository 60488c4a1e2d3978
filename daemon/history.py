"""The migration history: one JSON line per finished migration, appended under the state dir.

``STATE_DIR/history/migrations.jsonl`` holds an :class:`Entry` per migration job that ended on
this daemon (source or destination side), in the order they ended; it is append-only (a line is
written whole with one ``write`` on an ``O_APPEND`` descriptor, never rewritten).  Its size is
bounded: once it passes ``history_max_bytes`` it becomes ``migrations.jsonl.1`` (replacing the
previous one) and a new file starts, so the history holds between one and two times that much of
the most recent migrations.  :meth:`History.read` returns the newest entries first, optionally of
one domain (by name or UUID), skipping a line that does not parse (a torn write after a crash),
and holds no more than the entries it returns while it reads.
``virtmig migrate-history`` reads it through the ``Migration/GetHistory`` RPC, whose reply holds
the newest entries that fit in :data:`MAX_REPLY_BYTES` (``virtmig.daemon.wire.history_reply``):
however large ``history_max_bytes`` is, the reply stays under gRPC's 4 MiB message limit.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from virtmig.daemon.settings import held
from virtmig.proto import logsafe

log = logsafe.logger(__name__)

FILE_NAME = "migrations.jsonl"
DEFAULT_MAX_BYTES: int = held("history_max_bytes")  # the settings schema's
MAX_READ = 10000  # entries one read returns at most
#: The most bytes of entries one ``GetHistory`` reply carries (gRPC's limit is 4 MiB): 10,000
#: entries of a long error each would need tens of MiB.
MAX_REPLY_BYTES = 3 * 1024 * 1024
_APPEND_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC


@dataclass(frozen=True)
class Entry:
    """One finished migration, as this daemon saw it."""

    time: str  # when it ended, ISO 8601 UTC
    migration_id: str
    domain: str
    uuid: str
    role: str  # "source" or "destination"
    source: str  # host names ("" when this side did not learn the peer's)
    destination: str
    mode: str  # "live", "non-live", "offline" or "postcopy"
    transport: str  # "direct", "p2p" or "tunnelled"
    protocol: str  # "v3+params", "v3", "v2" ("" if unknown)
    outcome: str  # "completed", "failed" or "cancelled"
    error: str
    duration_ms: int
    downtime_ms: int
    bytes: int

    def to_json(self) -> str:
        # its fields, in order (str and int only: asdict's deep copy would change nothing)
        return json.dumps(self.__dict__, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Entry | None:
        """The entry of ``line``; None for a line that is not one."""
        try:
            data = json.loads(line)
            kinds = {f.name: f.type for f in fields(cls)}
            if not isinstance(data, dict) or set(data) != set(kinds):
                return None
            for name, kind in kinds.items():
                want = int if kind == "int" else str
                if type(data[name]) is not want:
                    return None
            return cls(**data)
        except ValueError:
            return None


class History:
    """The history file of one daemon."""

    def __init__(self, folder: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.path = folder / FILE_NAME
        self.rotated = folder / (FILE_NAME + ".1")

    def append(self, entry: Entry) -> None:
        """Append ``entry``; a failure to write is logged, never raised (the migration is over
        whatever the history says)."""
        line = (entry.to_json() + "\n").encode()
        try:
            try:
                fd = os.open(self.path, _APPEND_FLAGS, 0o600)
            except FileNotFoundError:  # the folder: made on the first entry, not every one
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(self.path, _APPEND_FLAGS, 0o600)
            try:
                os.write(fd, line)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size >= self.max_bytes:
                os.replace(self.path, self.rotated)
        except OSError as exc:
            log.warning("cannot append to the migration history %s: %s", self.path, exc)

    def _lines(self) -> Iterator[str]:
        for path in (self.rotated, self.path):
            with contextlib.suppress(FileNotFoundError), path.open(encoding="utf-8",
                                                                   errors="replace") as f:
                yield from f

    def read(self, domain: str = "", limit: int = 0) -> list[Entry]:
        """Newest first; only ``domain``'s (a name or UUID) if given; at most ``limit`` (0: up
        to :data:`MAX_READ`)."""
        limit = min(limit or MAX_READ, MAX_READ)
        out: deque[Entry] = deque(maxlen=limit)  # the newest ``limit`` seen so far
        for line in self._lines():
            entry = Entry.from_json(line)
            if entry is not None and (not domain or domain in (entry.domain, entry.uuid)):
                out.append(entry)
        return list(reversed(out))


def entry_dict(entry: Entry) -> dict[str, Any]:
    return asdict(entry)
