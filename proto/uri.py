"""Connection URIs: ``virtmig+unix:///path/to/sock`` and ``virtmig+tcp://host[:port]``.

``virtmig:///`` (or no URI at all) means the local daemon's default socket.  The default URI comes
from ``VIRTMIG_DEFAULT_URI``, as libvirt's comes from ``LIBVIRT_DEFAULT_URI``.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from virtmig.proto.errors import InvalidArgument

DEFAULT_TCP_PORT = 16609
DEFAULT_URI_ENV = "VIRTMIG_DEFAULT_URI"
RUN_DIR_ENV = "VIRTMIG_RUN_DIR"
SOCKET_NAME = "virtmigd.sock"


def default_run_dir() -> Path:
    env = os.environ.get(RUN_DIR_ENV)
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/virtmig")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg, "virtmig") if xdg else Path(f"/tmp/virtmig-{os.geteuid()}")


def default_socket_path() -> Path:
    return default_run_dir() / SOCKET_NAME


@dataclass(frozen=True)
class ConnectURI:
    """A parsed connection URI.  ``transport`` is ``unix`` or ``tcp``."""

    transport: str
    path: str = ""
    host: str = ""
    port: int = DEFAULT_TCP_PORT

    @property
    def grpc_target(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.transport == "unix":
            return f"virtmig+unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"virtmig+tcp://{host}:{self.port}"

    def is_loopback(self) -> bool:
        """Whether this names the local machine (unix socket, localhost, a loopback address)."""
        if self.transport == "unix" or self.host.startswith("localhost"):
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def check_not_local(uri: str) -> None:
    """libvirt's ``virDomainMigrateCheckNotLocal`` for a peer-to-peer destination URI.

    A host starting with ``localhost``, or a host-less URI that is not an explicit unix-socket
    URI, names the source host itself.  (Addresses are not resolved: the cookie's host UUID
    check catches the rest.)
    """
    parts = urlsplit(uri)
    host = parts.hostname
    if host:
        local = host.startswith("localhost")
    else:
        local = parts.scheme not in ("virtmig+unix", "unix") or not parts.path
    if local:
        raise InvalidArgument("Attempt to migrate guest to the same host")


def parse_uri(uri: str | None) -> ConnectURI:
    """Parse a connection URI; ``None`` or ``""`` takes ``VIRTMIG_DEFAULT_URI`` or the default."""
    if not uri:
        uri = os.environ.get(DEFAULT_URI_ENV) or ""
    if not uri or uri in ("virtmig:///", "virtmig:///system"):
        return ConnectURI("unix", path=str(default_socket_path()))
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme in ("virtmig+unix", "unix"):
        if parts.netloc:
            raise InvalidArgument(f"unix connection URI '{uri}' must not name a host")
        path = parts.path or str(default_socket_path())
        return ConnectURI("unix", path=path)
    if scheme in ("virtmig+tcp", "tcp"):
        if not parts.hostname:
            raise InvalidArgument(f"missing host in connection URI '{uri}'")
        try:
            port = parts.port or DEFAULT_TCP_PORT
        except ValueError as exc:
            raise InvalidArgument(f"invalid port in connection URI '{uri}'") from exc
        return ConnectURI("tcp", host=parts.hostname, port=port)
    raise InvalidArgument(
        f"unsupported connection URI '{uri}': expected virtmig+unix:///path or "
        f"virtmig+tcp://host[:port]"
    )


@dataclass(frozen=True)
class ListenURI:
    """A daemon listen address: ``unix:///path`` or ``tcp://host:port`` (port 0: any free)."""

    transport: str
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def grpc_address(self) -> str:
        if self.transport == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_listen(uri: str) -> ListenURI:
    parts = urlsplit(uri)
    if parts.scheme == "unix":
        if not parts.path:
            raise InvalidArgument(f"missing socket path in listen URI '{uri}'")
        return ListenURI("unix", path=parts.path)
    if parts.scheme == "tcp":
        if not parts.hostname:
            raise InvalidArgument(f"missing host in listen URI '{uri}'")
        try:
            port = parts.port if parts.port is not None else DEFAULT_TCP_PORT
        except ValueError as exc:
            raise InvalidArgument(f"invalid port in listen URI '{uri}'") from exc
        return ListenURI("tcp", host=parts.hostname, port=port)
    raise InvalidArgument(f"unsupported listen URI '{uri}': expected unix:///path or tcp://host:port")
