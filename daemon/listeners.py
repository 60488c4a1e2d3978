"""The daemon's listeners: which ones the settings allow, the run dir of the unix sockets, the
TLS credentials, and binding each listener with its credentials and file mode.

==========================  ===========================================================
``tls://host:port``         mutual TLS with the PKI dir's server certificate; a client
                            must present a certificate the CA signed
``unix:///path``            the main socket, 0600: the daemon's user only
``virtmigd-ro.sock``        with ``readonly_socket``: beside the main socket, 0666, read
                            calls only
``tcp://host:port``         plain TCP, no authentication: refused unless
                            ``listen_insecure_tcp`` (``--allow-insecure``) says so
==========================  ===========================================================

A unix socket's dir (its run dir) is made 0755 if missing, and must then belong to the daemon's
user and be writable by nobody else: a dir someone else controls could swap the socket for
theirs.  Sockets get their mode at creation, from the umask set around the bind (gRPC binds in
``add_insecure_port``), not from a chmod afterwards, which would leave a moment when the socket
is open to all.  The umask is process-wide: this runs at startup, before the daemon serves.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from virtmig.daemon.core import DaemonConfig
from virtmig.proto import logsafe
from virtmig.proto.errors import ConfigUnsupported, InvalidArgument, OperationFailed
from virtmig.proto.pki import PkiPaths, load_server_credentials
from virtmig.proto.uri import ListenURI, default_run_dir, parse_listen

log = logsafe.logger(__name__)

READONLY_SOCKET_NAME = "virtmigd-ro.sock"
RUN_DIR_MODE = 0o755
SOCKET_MODE = 0o600
READONLY_SOCKET_MODE = 0o666


@dataclass(frozen=True)
class Listener:
    """One address to listen on; ``read_only``: the read-only socket."""

    uri: str
    address: ListenURI
    read_only: bool = False

    @property
    def insecure(self) -> bool:
        """Plain TCP: no TLS, and so no authentication of the caller."""
        return self.address.transport == "tcp"


def check_insecure(listen: Iterable[str], allowed: bool) -> None:
    """Refuse a plain ``tcp://`` listen URI unless ``allowed`` (``listen_insecure_tcp``)."""
    if allowed:
        return
    for uri in listen:
        if parse_listen(uri).transport == "tcp":
            raise InvalidArgument(
                f"listen URI '{uri}' is plain TCP, without TLS or authentication: use "
                "tls://HOST:PORT, or allow it with listen_insecure_tcp = true in the config "
                "(virtmigd --allow-insecure)"
            )


def plan(config: DaemonConfig) -> list[Listener]:
    """The listeners ``config`` asks for, in its order, then the read-only socket if asked
    for (beside the first unix socket, else in the default run dir)."""
    check_insecure(config.listen, config.listen_insecure_tcp)
    listeners = [Listener(uri, parse_listen(uri)) for uri in config.listen]
    if config.readonly_socket:
        unix = [lst.address.path for lst in listeners if lst.address.transport == "unix"]
        run_dir = Path(unix[0]).parent if unix else default_run_dir()
        path = run_dir / READONLY_SOCKET_NAME
        listeners.append(Listener(f"unix://{path}", ListenURI("unix", path=str(path)), True))
    return listeners


def tls_force_default(backend: str, listeners: Sequence[Listener]) -> bool:
    """``migrate_tls_force`` when the config leaves it unset: true for the ``qemu`` backend when
    the network listeners are all TLS (at least one ``tls://``, no ``tcp://``), else false.

    A QEMU stream without TLS is plain and unauthenticated, so a daemon whose control plane
    admits only certificates should not carry guest memory in the clear by default; the test
    backend's plain stream is bound to its migration by the stream token.
    """
    transports = {lst.address.transport for lst in listeners}
    return backend == "qemu" and "tls" in transports and "tcp" not in transports


def server_credentials(config: DaemonConfig,
                       listeners: Sequence[Listener]) -> grpc.ServerCredentials | None:
    """The TLS listeners' credentials from the PKI dir, every file checked now (so a bad dir
    fails the start, naming the file); ``None`` without a TLS listener."""
    if not any(lst.address.transport == "tls" for lst in listeners):
        return None
    tls = load_server_credentials(PkiPaths.resolve(config.pki_dir or None))
    log.info("TLS server certificate: %s", tls.subject)
    return grpc.ssl_server_credentials([(tls.key_pem, tls.cert_chain_pem)],
                                       root_certificates=tls.ca_pem, require_client_auth=True)


def prepare_run_dirs(listeners: Iterable[Listener]) -> None:
    for lst in listeners:
        if lst.address.transport == "unix":
            prepare_run_dir(Path(lst.address.path).parent)


def prepare_run_dir(path: Path) -> None:
    """Make ``path`` (0755, and its missing parents) if it is missing; then refuse it
    (:class:`ConfigUnsupported`) unless it is a dir of the daemon's user that nobody else may
    write to."""
    _make_dirs(path)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigUnsupported(f"run dir '{path}' is not a directory")
    if st.st_uid != os.geteuid():
        raise ConfigUnsupported(
            f"run dir '{path}' belongs to uid {st.st_uid}, not to the daemon's user "
            f"(uid {os.geteuid()})"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigUnsupported(
            f"run dir '{path}' may be written by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "it must be writable by its owner only"
        )


def _make_dirs(path: Path) -> None:
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        os.mkdir(d, RUN_DIR_MODE)
        os.chmod(d, RUN_DIR_MODE)  # exactly: the umask neither opens nor closes it


@contextlib.contextmanager
def _umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def bind(server: grpc.aio.Server, listener: Listener,
         tls: grpc.ServerCredentials | None) -> str:
    """Add ``listener`` to ``server``; the bound address (``unix:/path`` or ``host:port``).
    An address that cannot be bound (a port in use) is :class:`OperationFailed` naming it and
    the reason."""
    address = listener.address
    try:
        if address.transport == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(address.path)
            mode = READONLY_SOCKET_MODE if listener.read_only else SOCKET_MODE
            with _umask(0o777 & ~mode):
                server.add_insecure_port(address.grpc_address)
            return address.grpc_address
        if address.transport == "tls":
            assert tls is not None
            port = server.add_secure_port(address.grpc_address, tls)
        else:
            port = server.add_insecure_port(address.grpc_address)
    except RuntimeError as exc:  # gRPC's "Failed to bind to address ...", without the reason
        reason = _why(address) or "gRPC could not bind it"
        raise OperationFailed(f"cannot listen on {listener.uri}: {reason}") from exc
    if port == 0:
        raise OperationFailed(f"cannot listen on {listener.uri}: "
                              f"{_why(address) or 'gRPC could not bind it'}")
    return f"{address.host}:{port}"


def check_free(listeners: Iterable[Listener]) -> None:
    """Refuse (:class:`OperationFailed`, the OS's reason) a TCP listener whose port cannot be
    bound now, e.g. one another process listens on: checked before the daemon touches its
    state, and before gRPC, which would log a line of its own."""
    for lst in listeners:
        if lst.address.transport != "unix" and lst.address.port:
            reason = _why(lst.address)
            if reason:
                raise OperationFailed(f"cannot listen on {lst.uri}: {reason}")


def _why(address: ListenURI) -> str:
    """Why binding ``address`` fails, found by binding it with a plain socket (gRPC does not
    say); the OS's words, e.g. "Address already in use"; "" if it can be bound."""
    try:
        if address.transport == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.bind(address.path)
            os.unlink(address.path)
        else:
            for family, kind, proto, _name, sockaddr in socket.getaddrinfo(
                    address.host, address.port, type=socket.SOCK_STREAM):
                with socket.socket(family, kind, proto) as probe:
                    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    probe.bind(sockaddr)
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""
