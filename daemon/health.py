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
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

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


class GenericOnly:
    """What the generated ``add_*Servicer_to_server`` functions see of a server: they give it
    each service twice, as a generic handler and as "registered methods"; this keeps the
    generic one only.  grpc.aio's server keeps a pending request for every registered method
    and waits on all of them (``asyncio.wait``) for every call it receives: with virtmig's
    forty-odd methods that wait cost a daemon more than the call's own dispatch (issue 17).  A
    generic handler serves the same methods from one pending request, found by a dictionary
    look-up."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Not registered: the generic handler given with them serves these methods."""


def add_observability(server: grpc.aio.Server, health: Health) -> None:
    """Add the health service (``health``) and server reflection to ``server`` (as generic
    handlers: :class:`GenericOnly`)."""
    generic: Any = GenericOnly(server)
    health_pb2_grpc.add_HealthServicer_to_server(health, generic)
    names = (*SERVICES[1:], HEALTH_SERVICE, reflection.SERVICE_NAME)
    # enable_server_reflection picks its asyncio servicer by the server's type: named here
    # (reflection.aio is public, in its __all__; its stubs do not say so)
    servicer = reflection.aio.ReflectionServicer(names)  # type: ignore[attr-defined]
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, generic)
