"""The async client: :class:`AsyncConnection`, one daemon's RPCs plus the migration drivers.

:class:`~virtmig.client.rpc.RpcConnection` has the RPCs and :mod:`virtmig.client.migrate` drives a
migration over RpcConnections; this module joins the two, so that neither imports the other.  The
typed values are re-exported here (``from virtmig.client.connection import JobInfo`` keeps
working); ``virtmig.client.Connection`` is the synchronous facade over this class.  The migration
drivers are imported by the first migration: a command that does not migrate does not load them.
"""

from __future__ import annotations

from virtmig.client import _lazy_getattr
from virtmig.client.rpc import RpcConnection
from virtmig.client.values import Domain, DomainKey, HostInfo

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from virtmig.client.records import DomainInfo, Event, JobInfo
    from virtmig.client.sequence import Trace
    from virtmig.proto.flags import MigrateFlags
    from virtmig.proto.params import TypedParams

__all__ = [
    "AsyncConnection",
    "Domain",
    "DomainInfo",
    "DomainKey",
    "Event",
    "HostInfo",
    "JobInfo",
]


class AsyncConnection(RpcConnection):
    """A connection to one daemon.  Use ``await AsyncConnection.open(uri)``; close when done."""

    async def migrate3(self, key: DomainKey, dconn: AsyncConnection, params: TypedParams,
                       flags: int | MigrateFlags, *, trace: Trace | None = None) -> Domain:
        """libvirt's ``virDomainMigrate3``: the client drives the sequence of the newest
        protocol both daemons speak; ``trace`` gets the calls and that protocol."""
        from virtmig.client import migrate

        return await migrate.migrate3(self, key, dconn, params, int(flags), trace=trace)

    async def migrate_to_uri3(self, key: DomainKey, dconnuri: str | None, params: TypedParams,
                              flags: int | MigrateFlags, *, trace: Trace | None = None) -> None:
        """libvirt's ``virDomainMigrateToURI3`` (peer-to-peer or direct); ``trace.protocol``
        gets the protocol the source used with the destination, ``trace.migration_id`` the
        migration's id."""
        from virtmig.client import migrate

        await migrate.migrate_to_uri3(self, key, dconnuri, params, int(flags), trace=trace)


# The values of job and event replies, imported on first use (:mod:`virtmig.client.records`).
__getattr__ = _lazy_getattr(globals(), {name: "virtmig.client.records"
                                        for name in ("DomainInfo", "Event", "JobInfo")})
