"""The backend's settings for one migration (:class:`MigrationTuning`), from the flags, the params
and the domain's and daemon's defaults: the source's whole set, and what the destination must set
up before the stream starts.
"""

from __future__ import annotations

from virtmig.daemon.backend.base import MigrationTuning
from virtmig.daemon.core import Daemon
from virtmig.daemon.registry import DomainObj
from virtmig.proto.compat import compression_settings
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams

F = MigrateFlags
P = MigrateParam
DEFAULT_PARALLEL = 2  # multifd channels when PARALLEL comes without parallel.connections (QEMU's)


def src_tuning(daemon: Daemon, dom: DomainObj, f: MigrateFlags,
               params: TypedParams) -> MigrationTuning:
    """The backend's settings for this run: params first, then the domain's, then defaults."""
    mib = 1024 * 1024
    return MigrationTuning(
        bandwidth_bytes_per_s=(params.get_int(P.BANDWIDTH) or dom.max_speed_mib) * mib,
        max_downtime_ms=dom.max_downtime_ms or daemon.config.default_max_downtime_ms,
        live=bool(f & F.LIVE),
        postcopy=bool(f & F.POSTCOPY),
        postcopy_bandwidth_bytes_per_s=(params.get_int(P.BANDWIDTH_POSTCOPY)
                                        or dom.max_speed_postcopy_mib) * mib,
        auto_converge=bool(f & F.AUTO_CONVERGE),
        auto_converge_initial=params.get_int(P.AUTO_CONVERGE_INITIAL, 20),
        auto_converge_increment=params.get_int(P.AUTO_CONVERGE_INCREMENT, 10),
        parallel_connections=parallel_connections(f, params),
        compression=compression_settings(params, f),
    )


def dst_tuning(f: MigrateFlags, params: TypedParams) -> MigrationTuning:
    """What the destination must set up before the stream starts: the same channels and
    compression as the source (both get the same flags and params)."""
    return MigrationTuning(postcopy=bool(f & F.POSTCOPY),
                           parallel_connections=parallel_connections(f, params),
                           compression=compression_settings(params, f))


def parallel_connections(f: MigrateFlags, params: TypedParams) -> int:
    return params.get_int(P.PARALLEL_CONNECTIONS, DEFAULT_PARALLEL) if f & F.PARALLEL else 0
