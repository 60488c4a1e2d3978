"""Asking a daemon's standard gRPC health service (``grpc.health.v1.Health/Check``).

:func:`check_health` opens a channel to a connection URI exactly as a connection does
(:mod:`virtmig.client.transport`: the unix socket, plain TCP, or mutual TLS from a PKI dir),
makes the one ``Check`` call and closes the channel.  Unlike :class:`AsyncConnection.open
<virtmig.client.rpc.RpcConnection.open>` it makes no ``GetHost`` call first: it asks only what
a load balancer or a container's health check asks, and is answered while the daemon is still
starting or already shutting down (``NOT_SERVING``).  The daemon authorizes it as a read call
(:mod:`virtmig.daemon.authz`): the read-only socket and a read-only certificate may ask.

The answer is the status's name in ``grpc.health.v1`` (``SERVING``, ``NOT_SERVING``,
``UNKNOWN``, ``SERVICE_UNKNOWN``); a service the daemon does not know (its ``NOT_FOUND``) is
``SERVICE_UNKNOWN``.  A daemon that cannot be reached, or that refuses the call, raises the
virtmig error a connection would (``Failed to connect socket to 'PATH': ...``,
``PermissionDenied``...).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from virtmig.client.transport import connect_error, open_channel, with_pki_dir
from virtmig.proto.errors import InvalidArgument
from virtmig.proto.uri import parse_uri

_Status = health_pb2.HealthCheckResponse
SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"
UNKNOWN = "UNKNOWN"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"
# Longer than any service name a daemon serves, far shorter than a message limit.
MAX_SERVICE_NAME = 200


@dataclass(frozen=True)
class HealthStatus:
    """A daemon's answer about ``service`` (``""``: the server as a whole)."""

    service: str
    status: str  # SERVING, NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN
    code: int  # grpc.health.v1's number for it

    @property
    def serving(self) -> bool:
        return self.status == SERVING


def _status(code: int) -> str:
    try:
        return str(_Status.ServingStatus.Name(code))
    except ValueError:  # a number this grpc.health.v1 does not name
        return UNKNOWN


def check_service_name(service: str) -> str:
    """``service`` if it can name a gRPC service: printable (so valid UTF-8 too), at most 200
    characters."""
    if len(service) > MAX_SERVICE_NAME or not service.isprintable():
        raise InvalidArgument(f"health: service name must be printable and at most "
                              f"{MAX_SERVICE_NAME} characters: {service[:MAX_SERVICE_NAME]!r}")
    return service


async def check_health(uri: str | None, service: str = "", *, timeout: float = 10.0,
                       pki_dir: str | os.PathLike[str] | None = None) -> HealthStatus:
    """The status of ``service`` on the daemon at ``uri``, waiting ``timeout`` seconds for its
    answer.  ``pki_dir``: the PKI dir of a ``virtmig+tls`` URI that names none."""
    check_service_name(service)
    parsed = with_pki_dir(parse_uri(uri), pki_dir)
    channel = open_channel(parsed, [])
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return HealthStatus(service, SERVICE_UNKNOWN, int(_Status.SERVICE_UNKNOWN))
        raise connect_error(parsed, exc, timeout) from None
    finally:
        await channel.close(None)
    return HealthStatus(service, _status(reply.status), int(reply.status))
