"""A migration stream's socket in blocking mode, as :class:`~.channel.Channel`'s threads use it:
plain (:class:`PlainIO`: ``recv_into``, ``sendmsg`` of several buffers), TLS through the ``ssl``
module's memory BIOs (:class:`TlsIO`: the SSL object's calls under one lock, the socket I/O
outside it, so a blocked read never holds up a write), and exact-length reads with a buffer for
the short ones (:class:`BlockingReader`, the reader thread's; a read ending early raises
``asyncio.IncompleteReadError``, as a ``StreamReader``'s does).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from typing import Any, cast

READ_BUF = 256 * 1024  # the reader's buffer: reads longer than half of it go straight through
TLS_CHUNK = 256 * 1024  # ciphertext read per recv
MAX_IOV = 512  # buffers per sendmsg (IOV_MAX is 1024 on Linux)


class PlainIO:
    """Blocking I/O on the socket itself."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def recv_into(self, view: memoryview, waitall: bool) -> int:
        return self.sock.recv_into(view, len(view), socket.MSG_WAITALL if waitall else 0)

    def send(self, items: list[Any]) -> None:
        views = [memoryview(b) for b in items]
        while views:
            sent = self.sock.sendmsg(views[:MAX_IOV])
            while views and sent >= len(views[0]):
                sent -= len(views.pop(0))
            if sent:
                views[0] = views[0][sent:]

    def goodbye(self) -> None:
        pass


class TlsIO:
    """TLS over the blocking socket through memory BIOs; the SSL object's calls under a lock."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None) -> None:
        self.sock = sock
        self.inb, self.outb = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inb, self.outb, server_side=server_side,
                                server_hostname=server_hostname)
        self.lock = threading.Lock()  # the SSL object
        self.send_lock = threading.Lock()  # ciphertext goes out in the order it was made

    def _flush(self) -> None:
        with self.send_lock:
            with self.lock:
                out = self.outb.read()
            if out:
                self.sock.sendall(out)

    def _feed(self) -> None:
        data = self.sock.recv(TLS_CHUNK)
        with self.lock:
            if data:
                self.inb.write(data)
            else:
                self.inb.write_eof()

    def handshake(self) -> None:
        while True:
            with self.lock:
                try:
                    self.obj.do_handshake()
                    done = True
                except ssl.SSLWantReadError:
                    done = False
            self._flush()
            if done:
                return
            self._feed()

    def recv_into(self, view: memoryview, waitall: bool) -> int:
        while True:
            with self.lock:
                try:
                    n: int = cast(Any, self.obj).read(len(view), view)  # (into view: a count)
                except ssl.SSLWantReadError:
                    n = -1
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    n = 0  # close_notify, or the peer just closed: both end the stream
                pending = self.outb.pending
            if pending:  # (a failed send is the writer's to tell)
                with contextlib.suppress(OSError):
                    self._flush()
            if n >= 0:
                return n
            self._feed()

    def send(self, items: list[Any]) -> None:
        with self.send_lock:
            for item in items:
                view, done = memoryview(item), 0
                with self.lock:
                    while done < len(view):
                        done += self.obj.write(view[done:])
                    out = self.outb.read()
                self.sock.sendall(out)

    def goodbye(self) -> None:
        with self.lock, contextlib.suppress(ssl.SSLError):
            self.obj.unwrap()
        self._flush()


class BlockingReader:
    """Reads in the reader thread: exact lengths, a buffer for the short ones."""

    def __init__(self, io: PlainIO | TlsIO) -> None:
        self.io = io
        self._buf = bytearray(READ_BUF)
        self._start = self._end = 0

    def prime(self, data: bytes | bytearray) -> None:
        """Take ``data`` (read before this reader's first read) as the first bytes to read."""
        if len(data) > len(self._buf):
            self._buf = bytearray(len(data))
        self._buf[: len(data)] = data
        self._start, self._end = 0, len(data)

    def exact(self, n: int) -> bytes | bytearray:
        """Exactly ``n`` bytes; IncompleteReadError when the stream ends first."""
        if n > READ_BUF // 2:
            out = bytearray(n)
            self.exact_into(memoryview(out))
            return out
        if self._end - self._start < n:
            self._fill(n)
        start = self._start
        self._start = start + n
        return bytes(self._buf[start : start + n])

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes already received (and kept for the next read), without waiting."""
        return bytes(self._buf[self._start : min(self._end, self._start + n)])

    def exact_into(self, view: memoryview) -> None:
        """Fill ``view``: what is buffered, then straight from the socket."""
        total = len(view)
        pos = min(self._end - self._start, total)
        if pos:
            view[:pos] = self._buf[self._start : self._start + pos]
            self._start += pos
        while pos < total:
            got = self.io.recv_into(view[pos:], True)
            if not got:
                raise asyncio.IncompleteReadError(bytes(view[:pos]), total)
            pos += got

    def _fill(self, n: int) -> None:
        have = self._end - self._start
        if self._start:
            self._buf[:have] = self._buf[self._start : self._end]
            self._start, self._end = 0, have
        view = memoryview(self._buf)
        while self._end < n:
            got = self.io.recv_into(view[self._end :], False)
            if not got:
                partial = bytes(view[: self._end])
                self._end = 0
                raise asyncio.IncompleteReadError(partial, n)
            self._end += got
