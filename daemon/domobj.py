"""One domain as the daemon holds it: :class:`DomainObj` (kept in the
:class:`~virtmig.daemon.registry.Registry`).

A domain object holds the persistent definition (``config``, None for a transient domain), the
live definition while active, libvirt's state and reason, and at most one migration job.

Built for many domains (issue 17): the object has ``__slots__`` and creates its lock and job
condition on first use, and a definition found in the definition index
(:mod:`virtmig.daemon.domindex`) stays unparsed (*pending*) until something reads ``config``:
the registry resolves it then (:meth:`Registry.resolve
<virtmig.daemon.registry.Registry.resolve>`, with the checks of a load; a lookup resolves before
it returns the object).  ``job``, ``state`` and ``id`` tell the registry holding the object of
each change, so that it keeps the set of active domains and of domains with a job (what
``max_*_migrations``, ``GetHost`` and the job reaper read) without walking every domain.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from virtmig.daemon.domxml import DomainDef
from virtmig.daemon.job import JobRecord, MigrationJob
from virtmig.proto.errors import NoDomain
from virtmig.proto.flags import DomainState, reason_name

if TYPE_CHECKING:
    from virtmig.daemon.registry import Registry

_INACTIVE = (DomainState.SHUTOFF, DomainState.NOSTATE)


class DomainObj:
    __slots__ = ("_config", "_id", "_job", "_job_changed", "_lock", "_state", "completed",
                 "holder", "live", "max_downtime_ms", "max_speed_mib", "max_speed_postcopy_mib",
                 "name", "pending", "reason", "uuid")

    def __init__(self, uuid: str, name: str, config: DomainDef | None = None,
                 live: DomainDef | None = None, state: DomainState = DomainState.SHUTOFF,
                 reason: int = 0, id: int = -1, job: MigrationJob | None = None) -> None:
        self.uuid = uuid
        self.name = name
        self._config = config  # persistent definition (parsed)
        # A persistent definition not parsed yet: config reads domains/<uuid>.xml.
        self.pending = False
        self.live = live  # definition of the running instance
        self._state = state
        self.reason = reason
        self._id = id
        self._job = job
        self.completed: JobRecord | None = None
        # Migration settings kept between migrations (migrate-setmaxdowntime / migrate-setspeed).
        self.max_downtime_ms = 0  # 0: the daemon's default
        self.max_speed_mib = 0  # 0: unlimited
        self.max_speed_postcopy_mib = 0
        self._lock: asyncio.Lock | None = None
        self._job_changed: asyncio.Condition | None = None
        # The registry holding the object (told of job, state and id changes), None outside.
        self.holder: Registry | None = None

    def __repr__(self) -> str:
        return f"DomainObj(uuid={self.uuid!r}, name={self.name!r}, state={self._state!r})"

    # --- the persistent definition --------------------------------------------------------------

    @property
    def config(self) -> DomainDef | None:
        """The persistent definition (None: transient), parsed now if it is pending; one that
        no longer parses is dropped as a load drops it, and this raises NoDomain."""
        if self.pending and (self.holder is None or not self.holder.resolve(self)):
            raise NoDomain(f"no domain with matching uuid '{self.uuid}'")
        return self._config

    @config.setter
    def config(self, value: DomainDef | None) -> None:
        self._config = value
        self.pending = False

    @property
    def persistent(self) -> bool:
        return self._config is not None or self.pending

    @property
    def definition(self) -> DomainDef:
        """The definition in force: live when active, else the persistent one."""
        d = self.live if self.live is not None else self.config
        if d is None:  # pragma: no cover - an object always has one of the two
            raise NoDomain(f"no definition for domain '{self.name}'")
        return d

    # --- state, id and job: the registry's sets follow them ---------------------------------------

    @property
    def state(self) -> DomainState:
        return self._state

    @state.setter
    def state(self, value: DomainState) -> None:
        self._state = value
        if self.holder is not None:
            self.holder.track(self)

    @property
    def id(self) -> int:
        return self._id

    @id.setter
    def id(self, value: int) -> None:
        self._id = value
        if self.holder is not None:
            self.holder.track(self)

    @property
    def job(self) -> MigrationJob | None:
        return self._job

    @job.setter
    def job(self, value: MigrationJob | None) -> None:
        self._job = value
        if self.holder is not None:
            self.holder.track(self)

    @property
    def active(self) -> bool:
        return self._state not in _INACTIVE or self._id >= 0

    @property
    def reason_label(self) -> str:
        return reason_name(self._state, self.reason)

    # --- made on first use (most of 100,000 domains never need them) ----------------------------

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @property
    def job_changed(self) -> asyncio.Condition:
        if self._job_changed is None:
            self._job_changed = asyncio.Condition()
        return self._job_changed
