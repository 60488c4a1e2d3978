"""The client library's typed values: what the daemon's replies become (frozen, plain data).

:class:`Domain` (and :data:`DomainKey`, what the domain methods accept) and :class:`HostInfo`
are here; the values of job, event, location and history replies are in
:mod:`virtmig.client.records` and re-exported here, imported on first use (PEP 562): most
commands never build one, and each frozen dataclass costs an import (issue 17: start-up).  Each
value is built from its wire message in one ``from_msg``; nothing here talks to a daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtmig.client import _lazy_getattr
from virtmig.proto.flags import DomainState
from virtmig.proto.record import record

if TYPE_CHECKING:
    from virtmig.client.records import DomainInfo, Event, GuestLocation, HistoryEntry, JobInfo
    from virtmig.proto import virtmig_pb2 as pb

__all__ = ["Domain", "DomainInfo", "DomainKey", "Event", "GuestLocation", "HistoryEntry",
           "HostInfo", "JobInfo"]


@record
class Domain:
    """A domain handle, as the daemon described it at the time of the call."""

    name: str
    uuid: str
    id: int
    persistent: bool
    state: DomainState
    reason: int
    reason_name: str

    @classmethod
    def from_msg(cls, m: pb.Domain) -> Domain:
        return cls(m.name, m.uuid, m.id, m.persistent, _STATES.get(m.state) or DomainState(m.state),
                   m.reason, m.reason_name)


_STATES = {int(s): s for s in DomainState}


# What the domain methods accept: a handle, a name, a UUID or a (virsh-style) numeric id.
DomainKey = str | Domain


@record
class HostInfo:
    """What the daemon says of its host (``GetHost``): names, version, backend, features and
    resources.  (A docstring of its own also spares ``dataclass`` building one from
    ``inspect.signature`` at import: every command that connects imports this class.)"""

    hostname: str
    host_uuid: str
    version: str
    backend: str
    features: frozenset[str]
    cpus: int
    memory_kib: int
    arch: str
    active_domains: int
    inactive_domains: int

    @classmethod
    def from_msg(cls, m: pb.HostInfo) -> HostInfo:
        return cls(m.hostname, m.host_uuid, m.version, m.backend, frozenset(m.features), m.cpus,
                   m.memory_kib, m.arch, m.active_domains, m.inactive_domains)


# The values of job, event, location and history replies, imported on first use.
__getattr__ = _lazy_getattr(globals(), {
    name: "virtmig.client.records"
    for name in ("DomainInfo", "Event", "GuestLocation", "HistoryEntry", "JobInfo")})
