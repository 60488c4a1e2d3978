"""Connection URIs (``virtmig+unix:///path/to/sock``, ``virtmig+tls://host[:port][?pkipath=DIR]``,
``virtmig+tcp://host[:port]``) and daemon listen URIs (``unix:///path``, ``tls://host:port``,
``tcp://host:port``).

``virtmig:///`` (or no URI at all) means the local daemon's default socket.  The default URI comes
from ``VIRTMIG_DEFAULT_URI``, as libvirt's comes from ``LIBVIRT_DEFAULT_URI``.  ``virtmig+tls``
is mutual TLS with the certificates of a PKI dir (:mod:`virtmig.proto.pki`): ``?pkipath=``
names it, as in libvirt's URIs; without it the client takes ``$VIRTMIG_PKI_DIR`` or the default
dir.  ``virtmig+tcp`` is plain TCP, which a daemon serves only when told to in words.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, quote, urlsplit

from virtmig.proto.errors import InvalidArgument
from virtmig.proto.record import record

DEFAULT_TCP_PORT = 16609
# libvirt's are 16509 (tcp) and 16514 (tls): virtmig keeps their distance, 16609 and 16614.
DEFAULT_TLS_PORT = 16614
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


@record
class ConnectURI:
    """A parsed connection URI.  ``transport`` is ``unix``, ``tls`` or ``tcp``; ``pki_dir`` is
    a ``tls`` URI's ``?pkipath=`` ("": the client's default PKI dir)."""

    transport: str
    path: str = ""
    host: str = ""
    port: int = DEFAULT_TCP_PORT
    pki_dir: str = ""

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
        query = f"?pkipath={quote(self.pki_dir, safe='/')}" if self.pki_dir else ""
        return f"virtmig+{self.transport}://{host}:{self.port}{query}"

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
    parts = _split(uri, "connection")
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
    parts = _split(uri, "connection")
    scheme = parts.scheme
    if scheme in ("virtmig+unix", "unix"):
        if parts.netloc:
            raise InvalidArgument(f"unix connection URI '{uri}' must not name a host")
        _check_nothing_else(uri, parts, query=True)
        path = parts.path or str(default_socket_path())
        return ConnectURI("unix", path=path)
    transport = _NETWORK_SCHEMES.get(scheme)
    if transport is None:
        raise InvalidArgument(
            f"unsupported connection URI '{uri}': expected virtmig+unix:///path, "
            f"virtmig+tls://host[:port] or virtmig+tcp://host[:port]"
        )
    if not parts.hostname:
        raise InvalidArgument(f"missing host in connection URI '{uri}'")
    if parts.path not in ("", "/"):
        raise InvalidArgument(
            f"unsupported path '{parts.path}' in connection URI '{uri}': a virtmig URI names a "
            f"daemon (scheme://HOST[:PORT]), nothing after it")
    _check_nothing_else(uri, parts, query=transport != "tls")
    try:
        port = parts.port or _DEFAULT_PORTS[transport]
    except ValueError as exc:
        raise InvalidArgument(f"invalid port in connection URI '{uri}'") from exc
    pki_dir = _pkipath(uri, parts.query) if transport == "tls" else ""
    return ConnectURI(transport, host=parts.hostname, port=port, pki_dir=pki_dir)


def _split(uri: str, what: str) -> SplitResult:
    """``urlsplit``, whose ValueError (an unbalanced '[', an IPv4 address in brackets) is the
    caller's mistake."""
    try:
        return urlsplit(uri)
    except ValueError as exc:
        shown = uri if len(uri) <= 80 else uri[:80] + "..."
        raise InvalidArgument(f"cannot parse {what} URI '{shown}': {exc}") from None


def _check_nothing_else(uri: str, parts: SplitResult, *, query: bool) -> None:
    """Refuse what the client would not act on: a user name or password, a fragment, and (if
    ``query``) any parameter; a TLS URI's parameters are checked by :func:`_pkipath`."""
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(f"unsupported user name in connection URI '{uri}'")
    if parts.fragment:
        raise InvalidArgument(f"unsupported fragment '#{parts.fragment}' in connection URI "
                              f"'{uri}'")
    if query and parts.query:
        name = parse_qsl(parts.query, keep_blank_values=True)[0][0] if "=" in parts.query \
            else parts.query
        raise InvalidArgument(f"unsupported parameter '{name}' in connection URI '{uri}'")


_NETWORK_SCHEMES = {"virtmig+tls": "tls", "tls": "tls", "virtmig+tcp": "tcp", "tcp": "tcp"}
_DEFAULT_PORTS = {"tls": DEFAULT_TLS_PORT, "tcp": DEFAULT_TCP_PORT}


def _pkipath(uri: str, query: str) -> str:
    """A ``virtmig+tls`` URI's ``?pkipath=DIR`` (libvirt's name), the only parameter it takes:
    another one is refused rather than ignored (libvirt's ``no_verify``, say, would weaken the
    check it names)."""
    pki_dir = ""
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name != "pkipath":
            raise InvalidArgument(f"unsupported parameter '{name}' in connection URI '{uri}'")
        if not value:
            raise InvalidArgument(f"empty pkipath in connection URI '{uri}'")
        pki_dir = value
    return pki_dir


@record
class ListenURI:
    """A daemon listen address: ``unix:///path``, ``tls://host:port`` (mutual TLS; port 16614
    by default) or ``tcp://host:port`` (plain; 16609).  Port 0: any free one."""

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
    parts = _split(uri, "listen")
    if parts.scheme == "unix":
        if not parts.path:
            raise InvalidArgument(f"missing socket path in listen URI '{uri}'")
        return ListenURI("unix", path=parts.path)
    if parts.scheme in _DEFAULT_PORTS:
        if not parts.hostname:
            raise InvalidArgument(f"missing host in listen URI '{uri}'")
        try:
            port = parts.port if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
        except ValueError as exc:
            raise InvalidArgument(f"invalid port in listen URI '{uri}'") from exc
        return ListenURI(parts.scheme, host=parts.hostname, port=port)
    raise InvalidArgument(
        f"unsupported listen URI '{uri}': expected unix:///path, tls://host:port or "
        "tcp://host:port"
    )
