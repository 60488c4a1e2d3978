"""virtmig's client library: connect to daemons, manage domains, migrate them.

``AsyncConnection`` is the asyncio core; ``Connection`` is a synchronous facade over it for scripts
(it runs its own event loop on a background thread), the way libvirt-python is used.  This module
only re-exports the public names (``__all__``, pinned by ``tests/client/test_public_api.py``).

The library's layers, each module importing only those listed above it::

    values.py      the typed values: Domain, HostInfo, DomainInfo, JobInfo, Event
    transport.py   a connection URI's gRPC channel: plain, or mutual TLS from a PKI dir
    rpc.py         RpcConnection: one daemon's channel, session and RPCs
    sequence.py    the v3 sequence driver (also run by the daemon in peer-to-peer mode)
    migrate.py     migrate3 / migrate_to_uri3 over RpcConnections
    connection.py  AsyncConnection: RpcConnection plus the migrate3 / migrate_to_uri3 methods
    sync.py        Connection, the synchronous facade, and open()
    cli.py         the virsh-like command line, on AsyncConnection
"""

from __future__ import annotations

from virtmig.client.connection import AsyncConnection
from virtmig.client.sync import Connection, open
from virtmig.client.values import Domain, DomainInfo, DomainKey, Event, HostInfo, JobInfo
from virtmig.proto.errors import VirtmigError
from virtmig.proto.flags import DomainState, JobOperation, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParam, TypedParams

__all__ = [
    "AsyncConnection",
    "Connection",
    "Domain",
    "DomainInfo",
    "DomainKey",
    "DomainState",
    "Event",
    "HostInfo",
    "JobInfo",
    "JobOperation",
    "JobType",
    "MigrateFlags",
    "MigrateParam",
    "TypedParam",
    "TypedParams",
    "VirtmigError",
    "open",
]
