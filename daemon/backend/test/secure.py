"""The test backend's stream protection: TLS from ``MigrationTuning.tls`` and the stream-token
proof, both before the stream's HEADER (the wire format is in :mod:`.wire`'s docstring).

TLS (``VIR_MIGRATE_TLS``): TLS 1.3 or later, both sides authenticated by the CA in
``tls.ca_cert``.  The destination serves ``tls.cert`` and requires a client certificate; the
source presents its own and requires the destination's to name ``tls.hostname``.

The stream token: both ends prove they know it without revealing it, the destination first, so
that a listener that is not the prepared destination learns nothing but the source's random
nonce, and the destination takes the stream of the source that got cookie B only::

    source                                              destination
    Ns (32 random bytes)                        ──►
                                                ◄──     Nd (32 random bytes)
                                                        HMAC-SHA256(token, "dst" Ns Nd)
    checks it (else: the migration fails)
    HMAC-SHA256(token, "src" Nd Ns)             ──►     checks it (else: drops the connection)

The destination admits connections concurrently, each with :data:`ADMIT_TIMEOUT` for its TLS
handshake and its proof; one that fails (no certificate the CA signed, a wrong token, garbage,
silence) is dropped and logged, and the destination keeps waiting for the real source.  The
first connection that passes carries the migration; the listener then closes.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import ssl

from virtmig.daemon.backend.base import BackendError, MigrationFailed, StreamAddress, StreamTls
from virtmig.daemon.backend.test.channel import ByteReader, ByteWriter, Channel
from virtmig.daemon.backend.test.wire import HANDSHAKE_TIMEOUT, hostport

NONCE_LEN = 32
MAC_LEN = hashlib.sha256().digest_size
ADMIT_TIMEOUT = 10.0  # seconds a connection to the destination has for TLS and its proof
NOT_PREPARED = "the destination did not prove it is the one prepared for this migration"


class StreamRefused(Exception):
    """A connection to the destination failed its proof: it is dropped, the migration goes on."""


# --- TLS -----------------------------------------------------------------------------------------


def server_context(tls: StreamTls) -> ssl.SSLContext:
    """The destination's side: its server certificate; clients must present one the CA signed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, tls)
    return ctx


def client_context(tls: StreamTls) -> ssl.SSLContext:
    """The source's side: its client certificate; the destination's must name the host."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    _load(ctx, tls)
    return ctx


def _load(ctx: ssl.SSLContext, tls: StreamTls) -> None:
    try:
        ctx.load_verify_locations(cafile=str(tls.ca_cert))
        ctx.load_cert_chain(str(tls.cert), str(tls.key))
    except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
        raise BackendError(f"cannot load the migration stream's TLS credentials: {e}") from None


def tls_reason(exc: BaseException) -> str:
    """What went wrong in a TLS exchange, in words (OpenSSL's, without the errno noise)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc) or type(exc).__name__


# --- the stream-token proof ----------------------------------------------------------------------


def _mac(token: str, who: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(token.encode("ascii"), who + first + second, hashlib.sha256).digest()


async def src_prove(reader: ByteReader, writer: ByteWriter, dest: StreamAddress,
                    token: str) -> None:
    """The source's part: MigrationFailed unless the destination proves it knows ``token``."""
    ns = secrets.token_bytes(NONCE_LEN)
    try:
        writer.write(ns)
        await writer.drain()
        async with asyncio.timeout(HANDSHAKE_TIMEOUT):
            reply = await reader.readexactly(NONCE_LEN + MAC_LEN)
    except TimeoutError:
        raise MigrationFailed(
            f"{NOT_PREPARED}: no answer from '{hostport(dest)}'") from None
    except (asyncio.IncompleteReadError, ConnectionResetError):
        # (a reset too: a destination that refuses this host's certificate closes the
        # connection, and whether this end's first bytes got there first decides between the
        # two -- in a thread that sends them, either comes)
        hint = ""
        if writer.get_extra_info("ssl_object") is not None:
            hint = " (over TLS: it may have refused this host's certificate)"
        raise MigrationFailed(
            f"{NOT_PREPARED}: '{hostport(dest)}' closed the connection{hint}") from None
    except ssl.SSLError as e:
        raise MigrationFailed(
            f"TLS error on the migration stream to '{hostport(dest)}': {tls_reason(e)}") from None
    except OSError as e:
        raise MigrationFailed(f"Unable to read from socket: {tls_reason(e)}") from None
    nd, mac = reply[:NONCE_LEN], reply[NONCE_LEN:]
    if not hmac.compare_digest(mac, _mac(token, b"dst", ns, nd)):
        raise MigrationFailed(f"{NOT_PREPARED}: '{hostport(dest)}' answered with a wrong proof")
    writer.write(_mac(token, b"src", nd, ns))


async def dst_prove(reader: ByteReader, writer: ByteWriter, token: str) -> None:
    """The destination's part: StreamRefused unless the source proves it knows ``token``.
    (The caller bounds the time.)"""
    try:
        ns = await reader.readexactly(NONCE_LEN)
        nd = secrets.token_bytes(NONCE_LEN)
        writer.write(nd + _mac(token, b"dst", ns, nd))
        await writer.drain()
        mac = await reader.readexactly(MAC_LEN)
    except asyncio.IncompleteReadError:
        raise StreamRefused("the connection closed before the stream-token proof") from None
    if not hmac.compare_digest(mac, _mac(token, b"src", nd, ns)):
        raise StreamRefused("wrong stream-token proof")


async def dst_admit(chan: Channel, ctx: ssl.SSLContext | None, token: str) -> None:
    """One connection to the destination: TLS (with ``ctx``; no byte was read from it before),
    then the proof (with ``token``), within :data:`ADMIT_TIMEOUT`.  StreamRefused when it
    fails (the caller aborts the connection)."""
    try:
        async with asyncio.timeout(ADMIT_TIMEOUT):
            await chan.admit()  # (a slot for its threads: the wait counts in the time)
            if ctx is not None:
                await chan.start_tls(ctx, server_side=True)
            if token:
                await dst_prove(chan, chan, token)
    except TimeoutError:
        raise StreamRefused("no TLS handshake or stream-token proof in time") from None
    except ssl.SSLError as e:
        raise StreamRefused(f"TLS: {tls_reason(e)}") from None
    except OSError as e:
        raise StreamRefused(tls_reason(e)) from None
    except asyncio.IncompleteReadError:
        raise StreamRefused("the connection closed before the stream-token proof") from None
