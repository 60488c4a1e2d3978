"""The backend's settings for one migration (:class:`MigrationTuning`), from the flags, the params
and the domain's and daemon's defaults: the source's whole set, and what the destination must set
up before the stream starts.

The stream's protection (``VIR_MIGRATE_TLS``, the stream token):

* With TLS and without TUNNELLED, the stream is TLS with the daemon's PKI dir (``pki_dir``): the
  destination serves its server certificate, the source presents its client certificate and
  requires the destination's to name ``tls.destination`` (the param), else the host of the
  migration URI it streams to.  :func:`check_stream_pki` loads the files with the checked
  loaders when a phase starts, so a missing or bad file is a ``ConfigUnsupported`` naming it
  before anything changes.
* With TLS and TUNNELLED the stream rides inside the daemons' gRPC connection, which is mutual
  TLS already: the backend's own stream stays plain (``tuning.tls`` is None).
* The stream token is the destination's per-migration secret (:func:`new_stream_token`, made by
  Prepare and carried to the source in cookie B); a backend that can binds its stream to it.
"""

from __future__ import annotations

import secrets

from virtmig.daemon.backend.base import MigrationTuning, StreamAddress, StreamTls
from virtmig.daemon.core import Daemon
from virtmig.daemon.registry import DomainObj
from virtmig.proto.compat import compression_settings
from virtmig.proto.errors import ArgumentUnsupported
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, Party, TypedParams
from virtmig.proto.pki import PkiPaths, load_client_credentials, load_server_credentials

F = MigrateFlags
P = MigrateParam
DEFAULT_PARALLEL = 2  # multifd channels when PARALLEL comes without parallel.connections (QEMU's)


def src_tuning(daemon: Daemon, dom: DomainObj, f: MigrateFlags, params: TypedParams,
               dest: StreamAddress, stream_token: str = "") -> MigrationTuning:
    """The backend's settings for this run: params first, then the domain's, then defaults.
    ``dest``: where the stream goes; ``stream_token``: cookie B's ("" when the peer sent none).
    """
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
        tls=_src_tls(daemon, f, params, dest),
        stream_token=stream_token,
    )


def dst_tuning(daemon: Daemon, f: MigrateFlags, params: TypedParams,
               stream_token: str = "") -> MigrationTuning:
    """What the destination must set up before the stream starts: the same channels and
    compression as the source (both get the same flags and params), its side of TLS, and the
    stream token it chose."""
    tls = None
    if stream_tls(f):
        paths = _pki(daemon)
        tls = StreamTls(ca_cert=paths.cacert, cert=paths.servercert, key=paths.serverkey)
    return MigrationTuning(postcopy=bool(f & F.POSTCOPY),
                           parallel_connections=parallel_connections(f, params),
                           compression=compression_settings(params, f),
                           tls=tls, stream_token=stream_token)


def parallel_connections(f: MigrateFlags, params: TypedParams) -> int:
    return params.get_int(P.PARALLEL_CONNECTIONS, DEFAULT_PARALLEL) if f & F.PARALLEL else 0


def check_tunnel_streams(daemon: Daemon, f: MigrateFlags, params: TypedParams) -> None:
    """A tunnelled migration holds, on the source daemon's connection to this one, its session
    and one Tunnel call per connection the backend opens (the main one and each parallel one):
    they must fit in this daemon's ``max_calls_per_client``, or a connection would be refused
    in the middle of the stream.  Checked at Prepare, before anything starts."""
    if not f & F.TUNNELLED:
        return
    parallel = parallel_connections(f, params)
    needed = 2 + parallel
    allowed = daemon.calls.max_calls_per_client
    if needed > allowed:
        raise ArgumentUnsupported(
            f"a tunnelled migration with {parallel} parallel connections needs {needed} calls "
            f"at once on the source daemon's connection; this daemon allows {allowed} "
            "(max_calls_per_client)")


def stream_tls(f: MigrateFlags) -> bool:
    """Whether the backend's stream itself is TLS: TLS asked for, and not tunnelled."""
    return bool(f & F.TLS) and not f & F.TUNNELLED


def check_stream_pki(daemon: Daemon, f: MigrateFlags, party: Party) -> None:
    """When the stream will be TLS, the PKI files ``party`` will use, loaded and checked now:
    ``ConfigUnsupported`` naming the file when one is missing, unreadable or not valid."""
    if not stream_tls(f):
        return
    if party is Party.DST:
        load_server_credentials(_pki(daemon))
    else:
        load_client_credentials(_pki(daemon))


def new_stream_token() -> str:
    """A fresh per-migration stream secret (128 bits, hex)."""
    return secrets.token_hex(16)


def _src_tls(daemon: Daemon, f: MigrateFlags, params: TypedParams,
             dest: StreamAddress) -> StreamTls | None:
    if not stream_tls(f):
        return None
    paths = _pki(daemon)
    return StreamTls(ca_cert=paths.cacert, cert=paths.clientcert, key=paths.clientkey,
                     hostname=params.get_str(P.TLS_DESTINATION) or dest.host)


def _pki(daemon: Daemon) -> PkiPaths:
    return PkiPaths.resolve(daemon.config.pki_dir or None)
