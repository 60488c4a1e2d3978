"""virtmig's client library: connect to daemons, manage domains, migrate them.

``AsyncConnection`` is the asyncio core; ``Connection`` is a synchronous facade over it for scripts
(it runs its own event loop on a background thread), the way libvirt-python is used.  This module
only re-exports the public names (``__all__``, pinned by ``tests/client/test_public_api.py``),
each imported on first use.

The library's layers, each module importing only those listed above it::

    values.py      the typed values: Domain, HostInfo (and records' names, re-exported lazily)
    records.py     the values of job, event, location and history replies: DomainInfo, JobInfo,
                   Event, GuestLocation, HistoryEntry (loaded by the commands that build them)
    transport.py   a connection URI's gRPC channel: plain, or mutual TLS from a PKI dir
    health.py      check_health: one grpc.health.v1 Check over a URI's channel
    rpc.py         RpcConnection: one daemon's channel, session and RPCs
    sequence.py    the v3 sequence driver (also run by the daemon in peer-to-peer mode)
    migrate.py     migrate3 / migrate_to_uri3 over RpcConnections
    connection.py  AsyncConnection: RpcConnection plus the migrate3 / migrate_to_uri3 methods
    sync.py        Connection, the synchronous facade, and open()
    cli/           the virsh-like command line, on AsyncConnection
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # typing's, without importing typing (``virtmig --help`` comes here)
if TYPE_CHECKING:
    from collections.abc import Callable

    from virtmig.client.connection import AsyncConnection
    from virtmig.client.sync import Connection, open
    from virtmig.client.values import Domain, DomainInfo, DomainKey, Event, HostInfo, JobInfo
    from virtmig.proto.errors import VirtmigError
    from virtmig.proto.flags import DomainState, JobOperation, JobType, MigrateFlags
    from virtmig.proto.params import MigrateParam, TypedParam, TypedParams
del TYPE_CHECKING  # not a public name of the package

# Where each public name lives: imported on first use (PEP 562), so that importing a submodule
# (the CLI's parser, ``virtmig --help``) does not load gRPC through this package.
_LAZY = {
    "AsyncConnection": "virtmig.client.connection",
    "Connection": "virtmig.client.sync",
    "open": "virtmig.client.sync",
    "Domain": "virtmig.client.values",
    "DomainInfo": "virtmig.client.values",
    "DomainKey": "virtmig.client.values",
    "Event": "virtmig.client.values",
    "HostInfo": "virtmig.client.values",
    "JobInfo": "virtmig.client.values",
    "VirtmigError": "virtmig.proto.errors",
    "DomainState": "virtmig.proto.flags",
    "JobOperation": "virtmig.proto.flags",
    "JobType": "virtmig.proto.flags",
    "MigrateFlags": "virtmig.proto.flags",
    "MigrateParam": "virtmig.proto.params",
    "TypedParam": "virtmig.proto.params",
    "TypedParams": "virtmig.proto.params",
}


def _lazy_getattr(namespace: dict[str, object],
                  where: dict[str, str]) -> Callable[[str], object]:
    """A package's PEP 562 ``__getattr__``: the name from its module in ``where`` (name ->
    module), kept in the package's ``namespace`` once imported (also used by ``cli``)."""
    package = namespace["__name__"]

    def __getattr__(name: str) -> object:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    return __getattr__


__getattr__ = _lazy_getattr(globals(), _LAZY)


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
