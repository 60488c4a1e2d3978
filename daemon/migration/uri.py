"""Migration URIs (where the stream goes), libvirt's rules: the one a caller gives Prepare, the one
Prepare returns, and the one Perform streams to.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from virtmig.daemon.backend.base import StreamAddress
from virtmig.proto.errors import ArgumentUnsupported, InvalidArgument


def dst_parse_uri_in(uri: str) -> tuple[str, int | None]:
    """libvirt's rules for a caller-given migration URI on the destination."""
    if uri.startswith("tcp:") and not uri.startswith("tcp://"):
        uri = "tcp://" + uri[len("tcp:"):]
    parts = urlsplit(uri)
    if not parts.scheme:
        raise InvalidArgument(f"missing scheme in migration URI: {uri}")
    if parts.scheme != "tcp":
        raise ArgumentUnsupported(f"unsupported scheme {parts.scheme} in migration URI {uri}")
    if not parts.hostname:
        raise InvalidArgument(f"missing host in migration URI: {uri}")
    try:
        return parts.hostname, parts.port
    except ValueError as exc:
        raise InvalidArgument(f"bad port in migration URI: {uri}") from exc


def dst_uri_out(host: str, port: int, *, given: bool) -> str:
    """Prepare's URI: ``tcp://host:port`` when the caller gave one, else ``tcp:host:port``."""
    shown = f"[{host}]" if ":" in host else host
    return f"tcp://{shown}:{port}" if given else f"tcp:{shown}:{port}"


def src_parse_uri(uri: str | None) -> StreamAddress:
    if not uri:
        raise InvalidArgument("migration URI is required")
    host, port = dst_parse_uri_in(uri)
    if port is None:
        raise InvalidArgument(f"missing port in migration URI: {uri}")
    return StreamAddress(host, port)
