"""The event loop ``virtmigd`` runs on (the ``event_loop`` setting).

``asyncio`` (the default) is the standard library's loop.  ``uvloop`` is libuv's implementation
of the same API, its scheduling, timers and sockets in C: a daemon's work is many short loop
callbacks (each gRPC call and each migration step is a few dozen): on it a call costs a
daemon about 9 % less CPU, a control-plane migration its two daemons about 6 % less
(bench/README.md, session 14).

The loops differ in their servers: uvloop closes a listening server for good when its accept
callback gets an error (the standard library's goes on accepting), and its ``Server.sockets``
then lists ``None``.  The daemon's servers listen on a socket :func:`listening_socket` made
(bound and listening, or ``OSError``) and read their port from it, whatever the loop
(:func:`start_server`).

uvloop starts processes (QEMU, its probes) with a real ``fork``, where the standard library
uses ``vfork``: gRPC's fork handlers then run while other threads use gRPC and break its TLS
connections.  The daemon's package turns them off before gRPC is imported
(:data:`virtmig.daemon.GRPC_FORK_HANDLERS_OFF`); :func:`check` refuses uvloop in a process where
that did not happen (gRPC imported first, or ``GRPC_ENABLE_FORK_SUPPORT`` set to true).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from typing import Any, Final

import virtmig.daemon
from virtmig.proto.errors import InvalidArgument

LOOPS: Final = ("asyncio", "uvloop")


def check(name: str) -> None:
    """Raise :class:`InvalidArgument` if this process cannot run the loop ``name``."""
    if name == "uvloop" and not virtmig.daemon.GRPC_FORK_HANDLERS_OFF:
        raise InvalidArgument(
            "invalid event_loop 'uvloop': gRPC's fork handlers are on in this process (gRPC "
            "was imported before virtmig.daemon, or GRPC_ENABLE_FORK_SUPPORT is set to true); "
            "uvloop's fork would break the daemon's TLS connections")


def factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The loop factory of :class:`asyncio.Runner` for the loop ``name`` (one of
    :data:`LOOPS`; None: the standard library's)."""
    if name == "asyncio":
        return None
    if name != "uvloop":
        raise ValueError(f"unknown event loop {name!r}")
    check(name)
    import uvloop

    return uvloop.new_event_loop


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host`` (an address, or a name: its first address; ``""``: every
    address) and ``port`` (0: any), listening, for ``asyncio.start_server(sock=...)``; OSError
    (``EADDRINUSE``...) whatever the loop."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name, or "": resolved as the standard library's start_server does
        family, *_rest, address = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        host = str(address[0])
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:  # worded as the standard library's start_server words it
            raise OSError(err.errno, f"error while attempting to bind on address "
                                     f"{(host, port)!r}: {(err.strerror or '').lower()}") from None
        sock.listen()
    except BaseException:
        sock.close()
        raise
    return sock


async def start_server(client_connected: Callable[..., Any], host: str, port: int,
                       **kwargs: Any) -> tuple[asyncio.Server, tuple[str, int]]:
    """``asyncio.start_server`` on a :func:`listening_socket`: the server and the address it
    listens on (read from that socket, not from ``Server.sockets``)."""
    sock = listening_socket(host, port)
    address: tuple[str, int] = sock.getsockname()[:2]
    return await asyncio.start_server(client_connected, sock=sock, **kwargs), address
