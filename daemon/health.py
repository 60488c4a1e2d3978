"""The standard gRPC health service and server reflection, on every listener of a daemon.

:class:`Health` answers ``grpc.health.v1.Health`` (``Check``, ``List`` and ``Watch``; the
protocol and messages are ``grpcio-health-checking``'s): the overall status (service ``""``)
and each virtmig service's (``virtmig.v1.Host``, ``virtmig.v1.Domains``,
``virtmig.v1.Migration``) are NOT_SERVING while the daemon starts (until its state is recovered
and every listener serves) and again once it begins to shut down, SERVING in between; any other
name is NOT_FOUND (``Check``) or
SERVICE_UNKNOWN (``Watch``).  One instance is shared by all the daemon's gRPC servers.  It is
our own servicer rather than the package's asyncio one because every handler behind the server
interceptor must be an async generator when it streams (``Watch``), and the status changes are
synchronous here.

:func:`add_observability` adds both services to a server.  Server reflection
(``grpcio-reflection``, ``grpc.reflection.v1alpha``) lists the virtmig services, health and
reflection and serves their descriptors, so ``grpcurl`` works without the ``.proto`` files.
Both are read calls in the authorization table (:mod:`virtmig.daemon.authz`): they pass the
same TLS, DN lists and call limits as every other call.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from virtmig.proto import virtmig_pb2 as pb

HEALTH_SERVICE = "grpc.health.v1.Health"
# The services whose health is reported ("" is the server as a whole).
SERVICES: tuple[str, ...] = ("", *(s.full_name for s in pb.DESCRIPTOR.services_by_name.values()))

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # (the stub is untyped)
    """Health of the daemon's services: NOT_SERVING until :meth:`set_serving` (True)."""

    def __init__(self) -> None:
        self._serving = False
        self._changed: set[asyncio.Event] = set()

    @property
    def serving(self) -> bool:
        return self._serving

    def set_serving(self, serving: bool) -> None:
        """Every service SERVING (True) or NOT_SERVING; open ``Watch`` streams are told."""
        self._serving = serving
        for event in self._changed:
            event.set()

    def status(self, service: str) -> int:
        if service not in SERVICES:
            return int(SERVICE_UNKNOWN)
        return int(SERVING if self._serving else NOT_SERVING)

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: Any) -> health_pb2.HealthCheckResponse:
        if request.service not in SERVICES:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"unknown service '{request.service[:200]}'")
        return health_pb2.HealthCheckResponse(status=self.status(request.service))

    async def List(self, request: health_pb2.HealthListRequest,
                   context: Any) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=self.status(name))
            for name in SERVICES})

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: Any) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        changed = asyncio.Event()
        self._changed.add(changed)
        try:
            last = None
            while True:
                changed.clear()
                status = self.status(request.service)
                if status != last:
                    last = status
                    yield health_pb2.HealthCheckResponse(status=status)
                await changed.wait()
        finally:
            self._changed.discard(changed)


def add_observability(server: grpc.aio.Server, health: Health) -> None:
    """Add the health service (``health``) and server reflection to ``server``."""
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*SERVICES[1:], HEALTH_SERVICE, reflection.SERVICE_NAME),
                                        server)
