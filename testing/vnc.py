"""A VNC (RFB 3.8) client handshake, enough to see how a QEMU guest's VNC server lets one in.

:func:`vnc_handshake` connects (a loopback TCP port or a unix socket), reads the server's
``RFB 003.00x`` banner, offers version 3.8 and reads the security types the server offers
(``1``: none, ``2``: VNC authentication); with a ``password`` it then authenticates (type 2:
the server's 16-byte challenge DES-encrypted with the password, its bits mirrored per byte as
VNC does) and reads the security result.  Every read is bounded (:data:`TIMEOUT`).
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, modes

from virtmig.proto.aio import within

try:  # cryptography >= 43 keeps DES among its decrepit algorithms
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.algorithms import TripleDES

__all__ = ["NONE", "TIMEOUT", "VNC_AUTH", "Handshake", "vnc_handshake", "vnc_response"]

NONE = 1  # RFB security type: no authentication
VNC_AUTH = 2  # RFB security type: VNC authentication (DES challenge-response)
TIMEOUT = 10.0


@dataclass(frozen=True)
class Handshake:
    """What the server said: its banner, the security types it offers, and (after an
    authentication) whether it accepted (None: no authentication was tried)."""

    banner: bytes
    types: tuple[int, ...]
    accepted: bool | None = None


def vnc_response(challenge: bytes, password: str) -> bytes:
    """The answer to VNC authentication's ``challenge``: DES (ECB) with the password's first 8
    bytes, zero-padded, each byte's bits mirrored."""
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in password.encode()[:8].ljust(8, b"\0"))
    encryptor = Cipher(TripleDES(key * 3), modes.ECB()).encryptor()  # K1=K2=K3: single DES
    return encryptor.update(challenge) + encryptor.finalize()


async def vnc_handshake(*, port: int = 0, socket: Path | None = None,
                        password: str | None = None) -> Handshake:
    """Shake hands with the VNC server on ``127.0.0.1:port`` or the unix ``socket``."""
    if socket is not None:
        reader, writer = await within(asyncio.open_unix_connection(socket), TIMEOUT)
    else:
        reader, writer = await within(asyncio.open_connection("127.0.0.1", port),
                                                TIMEOUT)
    try:
        return await within(_talk(reader, writer, password), TIMEOUT)
    finally:
        writer.close()
        await writer.wait_closed()


async def _talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                password: str | None) -> Handshake:
    banner = await reader.readexactly(12)
    writer.write(b"RFB 003.008\n")
    await writer.drain()
    count = (await reader.readexactly(1))[0]
    types = tuple(await reader.readexactly(count))
    if password is None or VNC_AUTH not in types:
        return Handshake(banner, types)
    writer.write(bytes([VNC_AUTH]))
    writer.write(vnc_response(await reader.readexactly(16), password))
    await writer.drain()
    (result,) = struct.unpack(">I", await reader.readexactly(4))
    return Handshake(banner, types, accepted=result == 0)
