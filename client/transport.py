"""How a connection URI becomes a gRPC channel: plain for ``unix`` and ``tcp``, mutual TLS for
``tls``; and what a failure to reach the daemon reads like (:func:`connect_error`: libvirt's
words, not gRPC's).

A ``virtmig+tls`` channel presents ``clientcert.pem`` of the PKI dir (the URI's ``?pkipath=``,
else ``default_pki_dir`` when the caller gives one, else ``$VIRTMIG_PKI_DIR``, else the user's
default dir) and trusts the daemons its ``cacert.pem`` signed.  gRPC checks the daemon's
certificate against the host the URI names, as libvirt's client does: a DNS name must match a
DNS SAN, an address an IP SAN.  That check is never switched off here.

A channel reads the PKI dir's files with the checks that need no X.509 code
(:func:`~virtmig.proto.pkifiles.read_client_files`: present, readable, the key readable by its
owner only) and leaves the certificates to gRPC's TLS, which verifies the daemon's chain and name
and presents the client's.  The full checks of :mod:`virtmig.proto.pki` (dates, chain, CA-ness,
key usage, key match and type), with ``cryptography``, which costs a ``virtmig`` command more
than all its other imports but gRPC's (issue 17), run only to say why a first call got no answer
(:func:`connect_error`) -- or before connecting if a file holds no PEM block of its kind, which
gRPC would refuse with its own log lines: the dir's fault is reported as it was when they ran
up front (:class:`~virtmig.proto.errors.ConfigUnsupported` naming the file).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import re
import time
from collections.abc import Sequence
from typing import Any

import grpc

from virtmig.proto.errors import (
    ConfigUnsupported,
    ConnectionFailed,
    OperationTimeout,
    VirtmigError,
    from_status,
)
from virtmig.proto.pkifiles import PkiPaths, pem_blocks_look_right, read_client_files
from virtmig.proto.uri import ConnectURI, parse_uri

# Keepalive pings find a daemon that vanished without closing the connection (a partition):
# the session then ends, and a peer-to-peer source fails the migration (libvirt's keepalive,
# 5 s interval).  The daemon accepts pings this often (see virtmig.daemon.main).
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 5_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]


def with_pki_dir(uri: ConnectURI, default_pki_dir: str | os.PathLike[str] | None) -> ConnectURI:
    """``uri`` with ``default_pki_dir`` as its ``pkipath`` if it is a TLS URI naming none."""
    if uri.transport != "tls" or uri.pki_dir or not default_pki_dir:
        return uri
    return dataclasses.replace(uri, pki_dir=os.fspath(default_pki_dir))


def open_channel(uri: ConnectURI, options: Sequence[tuple[str, Any]]) -> grpc.aio.Channel:
    """A channel to ``uri``; for TLS, with the PKI dir's client credentials, read with the checks
    that need no X.509 code (:class:`~virtmig.proto.errors.ConfigUnsupported` naming the file
    that is wrong; :func:`connect_error` checks the rest if the daemon does not answer)."""
    if uri.transport != "tls":
        return grpc.aio.insecure_channel(uri.grpc_target, options=list(options))
    paths = PkiPaths.resolve(uri.pki_dir or None)
    tls = read_client_files(paths)
    if not pem_blocks_look_right(tls):
        _check_client_pki(uri)  # raises, naming the file
    credentials = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem,
                                               private_key=tls.key_pem,
                                               certificate_chain=tls.cert_chain_pem)
    return grpc.aio.secure_channel(uri.grpc_target, credentials, options=list(options))


class Dialing:
    """A connection's channel on its way to the daemon: made by :func:`dial`, which asked gRPC to
    connect at once (TCP, then for TLS the handshake, on gRPC's own threads), at ``started``
    (``time.monotonic()``); :meth:`RpcConnection.open_dialed
    <virtmig.client.rpc.RpcConnection.open_dialed>` makes the first call on it."""

    __slots__ = ("channel", "started", "uri")

    def __init__(self, uri: ConnectURI, channel: grpc.aio.Channel, started: float) -> None:
        self.uri = uri
        self.channel = channel
        self.started = started

    def remaining(self, timeout: float) -> float:
        """What is left of ``timeout`` seconds counted from the dial (0 when none)."""
        return max(0.0, timeout - (time.monotonic() - self.started))


def dial(uri: str | None, *, pki_dir: str | os.PathLike[str] | None = None,
         options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS) -> Dialing:
    """``uri``'s channel (:func:`open_channel`; ``pki_dir`` as :func:`with_pki_dir`), connecting
    from now on: whatever the caller does next (its imports, in ``virtmig``) overlaps the TCP
    connection and the TLS handshake, which gRPC verifies as always.  Must run in the event loop
    the channel will be used in.  Raises what :func:`~virtmig.proto.uri.parse_uri` and
    :func:`open_channel` raise (a bad URI, a client PKI dir that cannot work); a daemon that
    cannot be reached is found by the first call."""
    started = time.monotonic()
    parsed = with_pki_dir(parse_uri(uri), pki_dir)
    channel = open_channel(parsed, options)
    channel.get_state(try_to_connect=True)
    return Dialing(parsed, channel, started)


def _check_client_pki(uri: ConnectURI) -> None:
    """The full checks of ``uri``'s client PKI dir (:mod:`virtmig.proto.pki`, with
    ``cryptography``): ``ConfigUnsupported`` naming what is wrong, if anything is."""
    from virtmig.proto.pki import load_client_credentials

    load_client_credentials(PkiPaths.resolve(uri.pki_dir or None))


def _pki_fault(uri: ConnectURI) -> ConfigUnsupported | None:
    """Why ``uri``'s client PKI dir cannot work, if it cannot: a TLS URI only."""
    if uri.transport != "tls":
        return None
    try:
        _check_client_pki(uri)
    except ConfigUnsupported as exc:
        return exc
    return None


# The system's words for why a connection failed, as gRPC's details carry them.
_REASONS = tuple(os.strerror(e) for e in (
    errno.ECONNREFUSED, errno.ENOENT, errno.EACCES, errno.ETIMEDOUT, errno.EHOSTUNREACH,
    errno.ENETUNREACH, errno.ECONNRESET, errno.ENOTSOCK))
# "... last error: UNKNOWN: ipv4:127.0.0.1:1: <why>": what follows the address.
_AFTER_ADDRESS = re.compile(r"last error: [A-Z_]+: (?:ipv4:|ipv6:|unix:)?\S+?: (.*)$", re.S)


def _reason(details: str) -> str:
    for reason in _REASONS:
        if reason in details:
            return reason
    m = _AFTER_ADDRESS.search(details)
    return m.group(1) if m else details


def connect_error(uri: ConnectURI, exc: grpc.aio.AioRpcError, timeout: float | None
                  ) -> VirtmigError:
    """The error for a first call to the daemon at ``uri`` that failed: libvirt's wording when
    the daemon could not be reached (``unable to connect to server at 'HOST:PORT': Connection
    refused``, ``Failed to connect socket to 'PATH': ...``), what was waited for when the
    deadline passed, and the daemon's own error when it answered."""
    code, details = exc.code(), exc.details() or ""
    metadata = exc.trailing_metadata()
    answered = any(isinstance(item, tuple) and item[0] == "virtmig-error"
                   for item in metadata or ())
    fault = None if answered else _pki_fault(uri)
    if fault is not None:  # what the client's own PKI dir gets wrong comes first, as before
        return fault
    where = f"socket '{uri.path}'" if uri.transport == "unix" else f"'{uri.grpc_target}'"
    if not answered and code is grpc.StatusCode.UNAVAILABLE:
        if uri.transport == "unix":
            return ConnectionFailed(f"Failed to connect socket to '{uri.path}': "
                                    f"{_reason(details)}")
        return ConnectionFailed(f"unable to connect to server at '{uri.grpc_target}': "
                                f"{_reason(details)}")
    if not answered and code is grpc.StatusCode.DEADLINE_EXCEEDED:
        waited = f"{timeout:g} s" if timeout is not None else "the deadline"
        return OperationTimeout(
            f"no answer from the daemon at {where} within {waited} (the connect timeout: "
            f"--connect-timeout or VIRTMIG_CONNECT_TIMEOUT)")
    return from_status(code, details, metadata)
