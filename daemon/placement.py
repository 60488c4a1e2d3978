"""A guest runs in one place: what this host remembers, durably, of where each guest went.

One file per guest UUID, ``<state_dir>/placement/<uuid>.json``, written atomically
(:func:`virtmig.daemon.state.atomic_write`), holds:

* ``away``: the guest left this host by migration ``migration_id`` to the host ``peer`` (its host
  UUID and name from the cookie, and the URI by which this daemon reaches its daemon).  With
  ``uncertain`` the migration's outcome is unknown (a lost Finish reply, a caller gone after
  Perform, a restart): this host's copy, if any, stays paused until the destination answers
  (:mod:`virtmig.daemon.locate` asks it);
* ``arrived``: the id of the last incoming migration that finished here (and the source's host
  UUID): what a source asks about when it does not know how its migration ended.

The record is written when a migration ends (Confirm on the source, Finish on the destination,
through :meth:`PlacementStore.departed_durably` / :meth:`PlacementStore.arrived_durably`, whose
fsyncs run in a worker thread while the daemon serves other calls) and when an outcome becomes
unknown; ``away`` clears when the guest comes back (an incoming
migration of the same UUID finishes here) or when its destination reports it has no copy.
``notes`` (not stored) say what a guest whose outcome is unknown waits for, for ``domstate
--reason`` and the logs.

A file that cannot be read or does not match its name is logged at WARNING and moved aside as
``<file>.rejected``, as the registry does with definitions.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from virtmig.daemon import state as files
from virtmig.proto import logsafe
from virtmig.proto.migid import is_migration_id

log = logsafe.logger(__name__)

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_RECORD_BYTES = 64 * 1024


@dataclass(frozen=True)
class Peer:
    """Another host: its host UUID and name (from the migration cookie), and its daemon's URI as
    this host reaches it ("" when unknown)."""

    host_uuid: str
    hostname: str
    uri: str = ""

    def describe(self) -> str:
        return f"{self.hostname or '?'} ({self.host_uuid or 'unknown uuid'})"


@dataclass(frozen=True)
class Away:
    """The guest left this host by ``migration_id`` to ``peer``; ``uncertain``: whether it
    arrived there is unknown; ``pre_state``: its state before the migration ("running" or
    "paused"), what a failed migration puts back."""

    peer: Peer
    migration_id: str
    uncertain: bool = False
    pre_state: str = "running"


@dataclass(frozen=True)
class Record:
    uuid: str
    away: Away | None = None
    arrived: str = ""  # the last incoming migration that finished here
    arrived_from: str = ""  # its source's host UUID

    @property
    def empty(self) -> bool:
        return self.away is None and not self.arrived


@dataclass
class PlacementStore:
    """The records of one daemon (loaded at start), the notes, and the settling tasks."""

    root: Path
    _records: dict[str, Record] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    # One background task per guest whose outcome is being settled (virtmig.daemon.locate).
    tasks: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for path in sorted(self.root.glob("*.json")):
            try:
                record = _decode(path)
            except (OSError, ValueError, TypeError, KeyError) as exc:
                self._reject(path, str(exc))
                continue
            self._records[record.uuid] = record

    def get(self, uuid: str) -> Record:
        return self._records.get(uuid, Record(uuid))

    def away(self, uuid: str) -> Away | None:
        return self.get(uuid).away

    def uncertain(self) -> list[tuple[str, Away]]:
        return [(r.uuid, r.away) for r in self._records.values()
                if r.away is not None and r.away.uncertain]

    def departed(self, uuid: str, away: Away) -> None:
        """The guest left (or may have left) for ``away.peer``."""
        self._put(replace(self.get(uuid), away=away))
        if not away.uncertain:
            self.notes.pop(uuid, None)

    async def departed_durably(self, uuid: str, away: Away) -> None:
        """:meth:`departed`, its fsyncs in a worker thread (the daemon serves other calls)."""
        await self._put_durably(replace(self.get(uuid), away=away))
        if not away.uncertain:
            self.notes.pop(uuid, None)

    def arrived(self, uuid: str, migration_id: str, source_host_uuid: str) -> None:
        """An incoming migration finished here: the guest is back, whatever went before."""
        self._put(Record(uuid, None, migration_id, source_host_uuid))
        self.forget_task(uuid)

    async def arrived_durably(self, uuid: str, migration_id: str,
                              source_host_uuid: str) -> None:
        """:meth:`arrived`, its fsyncs in a worker thread (the daemon serves other calls)."""
        await self._put_durably(Record(uuid, None, migration_id, source_host_uuid))
        self.forget_task(uuid)

    def clear_away(self, uuid: str) -> None:
        self._put(replace(self.get(uuid), away=None))
        self.forget_task(uuid)

    def forget_task(self, uuid: str) -> None:
        """Stop settling ``uuid`` (its outcome is known now); a task never cancels itself."""
        self.notes.pop(uuid, None)
        task = self.tasks.pop(uuid, None)
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    def _put(self, record: Record) -> None:
        path = self.root / f"{record.uuid}.json"
        if record.empty:
            self._records.pop(record.uuid, None)
            files.remove(path)
            return
        self._records[record.uuid] = record
        files.atomic_write(path, json.dumps(asdict(record), sort_keys=True).encode())

    async def _put_durably(self, record: Record) -> None:
        if record.empty:
            self._put(record)
            return
        self._records[record.uuid] = record
        await files.atomic_write_durably(self.root / f"{record.uuid}.json",
                                         json.dumps(asdict(record), sort_keys=True).encode())

    def _reject(self, path: Path, problem: str) -> None:
        target = path.with_name(path.name + ".rejected")
        try:
            path.replace(target)
        except OSError as exc:
            log.error("rejected %s: %s; cannot move it aside: %s", path, problem, exc)
            return
        log.warning("rejected %s: %s; moved aside to %s", path, problem, target.name)


def _decode(path: Path) -> Record:
    data = path.read_bytes()
    if len(data) > MAX_RECORD_BYTES:
        raise ValueError(f"larger than {MAX_RECORD_BYTES} bytes")
    raw = json.loads(data)
    uuid = str(raw["uuid"])
    if uuid != path.stem or not _UUID_RE.fullmatch(uuid):
        raise ValueError(f"its uuid {uuid!r} does not match its file name")
    away = None
    if raw.get("away") is not None:
        a = raw["away"]
        p = a["peer"]
        away = Away(Peer(str(p["host_uuid"]), str(p["hostname"]), str(p.get("uri", ""))),
                    str(a["migration_id"]), bool(a.get("uncertain", False)),
                    str(a.get("pre_state", "running")))
        if away.migration_id and not is_migration_id(away.migration_id):
            raise ValueError("malformed migration id")
    arrived = str(raw.get("arrived", ""))
    if arrived and not is_migration_id(arrived):
        raise ValueError("malformed arrived migration id")
    return Record(uuid, away, arrived, str(raw.get("arrived_from", "")))


def new_migration_id() -> str:
    """A fresh migration id (32 hex digits; an identifier, not a secret)."""
    return secrets.token_hex(16)
