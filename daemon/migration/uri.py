"""Migration URIs (where the stream goes), libvirt's rules: the one a caller gives Prepare, the one
Prepare returns, and the one Perform streams to; and what Prepare may bind.

A caller chooses what the destination binds for the incoming stream (``uri_in``'s port, the
``listen_address`` param), so both are bounded (:func:`dst_check_port`,
:func:`dst_check_listen`): a port inside the configured ``migration_ports`` range, and an address
that is this host's own (one an interface has, the configured ``migration_address``, or a
wildcard; a host name must resolve to such addresses only).  ``uri_in``'s host is not bound: it is
only handed back to the source in Prepare's URI, which the caller chooses anyway.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

import psutil

from virtmig.daemon.backend.base import StreamAddress
from virtmig.daemon.core import DaemonConfig
from virtmig.proto.errors import ArgumentUnsupported, InvalidArgument

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
WILDCARDS = frozenset({ipaddress.ip_address("0.0.0.0"), ipaddress.ip_address("::")})
_SHOWN = 80  # at most this much of a caller's string goes into a message


def dst_parse_uri_in(uri: str) -> tuple[str, int | None]:
    """libvirt's rules for a caller-given migration URI on the destination."""
    if uri.startswith("tcp:") and not uri.startswith("tcp://"):
        uri = "tcp://" + uri[len("tcp:"):]
    shown = _shown(uri)
    try:
        parts = urlsplit(uri)
    except ValueError:  # an unbalanced '[' (IPv6 literal) and the like
        raise InvalidArgument(f"Unable to parse migration URI {shown}") from None
    if not parts.scheme:
        raise InvalidArgument(f"missing scheme in migration URI: {shown}")
    if parts.scheme != "tcp":
        raise ArgumentUnsupported(
            f"unsupported scheme {_shown(parts.scheme)} in migration URI {shown}")
    if not parts.hostname:
        raise InvalidArgument(f"missing host in migration URI: {shown}")
    try:
        return parts.hostname, parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad port in migration URI: {shown}") from exc


def _shown(text: str) -> str:
    """A caller's string as it goes into a message: at most :data:`_SHOWN` characters."""
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "..."


def dst_uri_out(host: str, port: int, *, given: bool) -> str:
    """Prepare's URI: ``tcp://host:port`` when the caller gave one, else ``tcp:host:port``."""
    shown = f"[{host}]" if ":" in host else host
    return f"tcp://{shown}:{port}" if given else f"tcp:{shown}:{port}"


async def dst_check_bind(config: DaemonConfig, listen: str, port: int | None) -> None:
    """What Prepare is asked to bind: ``port`` (None or 0: one of the range) on ``listen``."""
    if port:
        dst_check_port(port, config.migration_port_min, config.migration_port_max)
    await dst_check_listen(listen, config.migration_address)


def dst_check_port(port: int, lo: int, hi: int) -> None:
    """A port a caller asks Prepare to bind must lie in the migration port range."""
    if not lo <= port <= hi:
        raise InvalidArgument(f"migration port {port} is outside the migration port range "
                              f"{lo}-{hi} (migration_ports)")


def host_addresses() -> frozenset[IPAddress]:
    """The addresses this host's network interfaces have now (link-local ones with their
    scope, ``fe80::1%eth0``)."""
    out: set[IPAddress] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family in (socket.AF_INET, socket.AF_INET6):
                try:
                    out.add(ipaddress.ip_address(a.address))
                except ValueError:
                    continue
    return frozenset(out)


async def dst_check_listen(address: str, migration_address: str) -> None:
    """A listen address a caller gives Prepare must be this host's own: a wildcard, the
    configured ``migration_address``, or an address of one of its interfaces (every address a
    host name resolves to must be one)."""
    if address == migration_address:
        return
    shown = _shown(address)
    for ip in await _resolve(address, shown):
        if ip not in WILDCARDS and ip not in host_addresses():
            raise InvalidArgument(
                f"listen address '{shown}' is not an address of this host (one of its "
                "interfaces, the configured migration_address, or a wildcard)")


async def _resolve(address: str, shown: str) -> set[IPAddress]:
    try:
        return {ipaddress.ip_address(address)}
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(
            address, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError) as exc:
        raise InvalidArgument(f"cannot resolve listen address '{shown}': {exc}") from exc
    # (a link-local IPv6 address comes back with its scope: 'fe80::1%eth0')
    return {ipaddress.ip_address(str(info[4][0])) for info in infos}


def src_parse_uri(uri: str | None) -> StreamAddress:
    if not uri:
        raise InvalidArgument("migration URI is required")
    host, port = dst_parse_uri_in(uri)
    if port is None:
        raise InvalidArgument(f"missing port in migration URI: {_shown(uri)}")
    return StreamAddress(host, port)
