"""The Prometheus endpoint: ``GET /metrics`` on ``metrics_listen`` (``HOST:PORT``; off by default).

Who may scrape it follows the control plane:

- when the daemon has a ``tls://`` listener, the endpoint is HTTPS with the daemon's server
  certificate, TLS 1.3 only, and requires a client certificate the CA signed whose DN has at
  least read access by ``tls_allowed_dn_list`` / ``tls_readonly_dn_list`` (as a read call has;
  read from the running config at each request, so a SIGHUP reload applies); a DN they refuse
  gets ``403``;
- otherwise it is plain HTTP and must bind a loopback address (``127.0.0.1``, ``::1``,
  ``localhost``): a daemon without TLS has no way to tell who scrapes it, so the metrics stay
  on the host.

The server is a minimal HTTP/1.0 responder on asyncio: one request per connection, a request
head of at most 8 KiB read within 10 s, ``GET /metrics`` (``/`` too) or ``404``/``405``; it
answers in Prometheus' text format from :meth:`Metrics.scrape`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from dataclasses import dataclass

from virtmig.daemon.authz import Access, tls_access
from virtmig.daemon.core import Daemon
from virtmig.daemon.eventloop import start_server
from virtmig.daemon.metrics import CONTENT_TYPE
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.errors import InvalidArgument
from virtmig.proto.pki import PkiPaths, load_server_credentials, subject_dn

log = logsafe.logger(__name__)

HEAD_LIMIT = 8192
READ_TIMEOUT = 10.0


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


def parse_endpoint(text: str) -> Endpoint:
    """``HOST:PORT`` (``[v6]:PORT``); :class:`InvalidArgument` naming ``metrics_listen``."""
    host, sep, port_s = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) < 65536:
        raise InvalidArgument(f"invalid metrics_listen '{text}': expected HOST:PORT")
    return Endpoint(host, int(port_s))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check(text: str, tls: bool) -> Endpoint:
    """``metrics_listen`` checked for a daemon with (``tls``) or without TLS listeners."""
    endpoint = parse_endpoint(text)
    if not tls and not is_loopback(endpoint.host):
        raise InvalidArgument(
            f"metrics_listen '{text}' is not a loopback address: without a tls:// listener the "
            "metrics endpoint has no authentication and binds loopback only")
    return endpoint


def server_context(pki_dir: str) -> ssl.SSLContext:
    """TLS 1.3 with the daemon's server certificate, requiring a client certificate."""
    paths = PkiPaths.resolve(pki_dir or None)
    load_server_credentials(paths)  # checked: a bad file is refused naming it
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(paths.servercert, paths.serverkey)
    ctx.load_verify_locations(cafile=str(paths.cacert))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsServer:
    """The endpoint of one daemon."""

    def __init__(self, daemon: Daemon, endpoint: Endpoint, tls: ssl.SSLContext | None) -> None:
        self.daemon, self.endpoint, self.tls = daemon, endpoint, tls
        self._server: asyncio.Server | None = None
        self.address = ""

    async def start(self) -> str:
        self._server, (host, port) = await start_server(
            self._serve, self.endpoint.host, self.endpoint.port, ssl=self.tls, limit=HEAD_LIMIT)
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        log.info("metrics on %s://%s/metrics", "https" if self.tls else "http", self.address)
        return self.address

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()

    def _allowed(self, writer: asyncio.StreamWriter) -> str:
        """"" if the client may scrape; else the reason it may not."""
        if self.tls is None:
            return ""
        sslobj = writer.get_extra_info("ssl_object")
        der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
        if not der:
            return "no client certificate"
        dn = subject_dn(ssl.DER_cert_to_PEM_cert(der).encode())
        config = self.daemon.config
        if tls_access(dn, config.tls_allowed_dn_list, config.tls_readonly_dn_list) is Access.NONE:
            return f"client '{dn}' is not on the list of allowed clients"
        return ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await within(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            status, body, ctype = self._answer(head, writer)
            writer.write(f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: "
                         f"{len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes, writer: asyncio.StreamWriter) -> tuple[str, bytes, str]:
        text = "text/plain; charset=utf-8"
        refused = self._allowed(writer)
        if refused:
            log.warning("refused a metrics scrape from %s: %s",
                        str(writer.get_extra_info("peername")), refused)
            return "403 Forbidden", f"access denied: {refused}\n".encode(), text
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] != b"GET":
            return "405 Method Not Allowed", b"", text
        if parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            return "404 Not Found", b"", text
        return "200 OK", self.daemon.metrics.scrape(), CONTENT_TYPE
