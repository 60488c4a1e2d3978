"""What the test backend keeps of a migration once it has ended: a small outcome record.

A live migration (:class:`~.outgoing.Outgoing`, :class:`~.incoming.Incoming`) holds its guest,
and through it the guest's page structures, plus its own page maps.  Once its outcome is settled
only an :class:`Ended` record remains -- the final progress and the error, if any, as a type and
a message (no exception object: its traceback would keep the stream's frames, and through them
the guest, alive) -- so ``progress``, ``outgoing_wait`` and ``incoming_wait`` still answer after
the guests are gone (a destroyed post-copy destination still reports why it failed).  The
records live in :class:`EndedTable`, which keeps the last :data:`MAX_ENDED` guests' outcomes:
a daemon that migrates guest after guest holds a bounded amount for them, whatever it ran.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass

from virtmig.daemon.backend.base import BackendError, MigrationFailed, MigrationProgress

MAX_ENDED = 256  # guests whose last migration's outcome is kept


@dataclass(frozen=True)
class Ended:
    """The outcome of one ended migration (see the module docstring)."""

    incoming: bool  # the destination side (else the source)
    final: MigrationProgress
    error_type: type[BackendError] | None = None
    message: str = ""

    @classmethod
    def of(cls, incoming: bool, done: asyncio.Future[MigrationProgress],
           final: MigrationProgress | None) -> Ended:
        """The record of a settled ``done`` (``final``: the migration's frozen progress)."""
        if done.cancelled():
            return cls(incoming, final or MigrationProgress(), MigrationFailed,
                       "migration aborted")
        exc = done.exception()
        if exc is None:
            return cls(incoming, done.result())
        error_type = type(exc) if isinstance(exc, BackendError) else MigrationFailed
        return cls(incoming, final or MigrationProgress(), error_type, str(exc))

    def outcome(self) -> MigrationProgress:
        """The final progress, or the migration's error raised anew."""
        if self.error_type is not None:
            raise self.error_type(self.message)
        return self.final


class EndedTable:
    """The last ``limit`` guests' :class:`Ended` records, by guest UUID (the oldest go first)."""

    def __init__(self, limit: int = MAX_ENDED) -> None:
        self.limit = limit
        self._by_uuid: OrderedDict[str, Ended] = OrderedDict()

    def add(self, uuid: str, record: Ended) -> None:
        self._by_uuid.pop(uuid, None)
        self._by_uuid[uuid] = record
        while len(self._by_uuid) > self.limit:
            self._by_uuid.popitem(last=False)

    def get(self, uuid: str) -> Ended | None:
        return self._by_uuid.get(uuid)

    def __len__(self) -> int:
        return len(self._by_uuid)
