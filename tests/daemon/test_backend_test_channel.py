"""The test backend's stream off asyncio (``virtmig.daemon.backend.test.channel``, issue 17):
each end's reader and writer threads run while the stream does and end with it, however it
ends; a hostile RUN length is refused with its typed reason before a byte of its body is read;
a ``--tls`` migration's bytes go through the channel's TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import struct
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import (
    LOOPBACK,
    MIB,
    make_spec,
    to,
    wait_for_progress,
    within,
)
from tests.daemon.test_backend_test_stream import header
from tests.daemon.test_stream_security import dst_tuning, src_tuning
from virtmig.daemon.backend.base import (
    GuestRunState,
    MigrationCancelled,
    MigrationFailed,
    MigrationTuning,
)
from virtmig.daemon.backend.test import TestBackend, sockio
from virtmig.daemon.backend.test.channel import THREAD_PREFIX, Channel, StreamSlots
from virtmig.daemon.backend.test.sockio import BlockingReader
from virtmig.daemon.backend.test.wire import Framing, read_record
from virtmig.testing import wait_until

dst = backend_test_helpers.dst
src = backend_test_helpers.src

OFFER = b"I" + struct.pack("<IB", 1, 2)  # the first ITER, offering format 2


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(THREAD_PREFIX)]


async def no_stream_threads(before: list[threading.Thread]) -> None:
    def ended() -> bool:
        return not [t for t in stream_threads() if t not in before]

    await wait_until(ended, timeout=15, what=lambda: f"the stream threads to end: "
                     f"{[t for t in stream_threads() if t not in before]}")


@pytest.mark.parametrize("how", ["cancel", "destroy-destination", "close-destination",
                                 "cancel-tls"])
async def test_an_aborted_migration_leaves_no_stream_thread(
    src: TestBackend, dst: TestBackend, how: str
) -> None:
    """Mid-transfer (paced, so that it is), both ends' reader and writer threads run; once the
    migration is cancelled on the source, or its guest destroyed on the destination, or the
    destination backend closed, none is left, and the source guest runs on."""
    before = stream_threads()
    spec = make_spec(256)
    await src.start(spec, paused=False)
    tls = how.endswith("-tls")
    port = await dst.incoming_start(spec, LOOPBACK, dst_tuning() if tls else None)
    tuning = src_tuning() if tls else MigrationTuning()
    tuning = dataclasses.replace(tuning, bandwidth_bytes_per_s=16 * MIB)
    out = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    try:
        await wait_for_progress(src, spec.uuid, 2 * MIB)
        await wait_until(lambda: len([t for t in stream_threads() if t not in before]) == 4,
                         timeout=15, what=lambda: f"two threads per end: {stream_threads()}")
        if how == "destroy-destination":
            await dst.destroy(spec.uuid)
            with pytest.raises(MigrationFailed, match="guest unexpectedly quit"):
                await within(out)
        elif how == "close-destination":  # (its daemon shuts down)
            await within(dst.close())
            with pytest.raises(MigrationFailed, match="destination daemon shutting down"):
                await within(out)
        else:
            await src.cancel(spec.uuid)
            with pytest.raises(MigrationCancelled):
                await within(out)
            with pytest.raises(MigrationFailed):
                await within(dst.incoming_wait(spec.uuid))
    finally:
        out.cancel()
    await no_stream_threads(before)
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.parametrize(("run", "message"), [
    (struct.pack("<II", 0, 0x10000), "run of 65536 pages"),
    (struct.pack("<II", 0, 0), "run of 0 pages"),
    (struct.pack("<II", 200, 256), "run of pages 200 to 455 of 256"),
], ids=["too-long", "empty", "beyond-the-guest"])
def test_the_reader_thread_refuses_a_hostile_run_before_its_body(run: bytes,
                                                                 message: str) -> None:
    """The reader thread frames records: a RUN whose count is out of bounds or beyond the guest
    is refused, typed, from its header alone -- what follows it is not read."""
    a, b = socket.socketpair()
    with a, b:
        a.sendall(b"G" + run + b"next")
        rd = BlockingReader(sockio.PlainIO(b))
        with pytest.raises(MigrationFailed, match=f"malformed migration stream: {message}"):
            read_record(rd, Framing(256, True, runs=True))
        assert rd.exact(4) == b"next"


async def test_a_hostile_run_is_refused_while_its_source_holds_the_stream_open(
    dst: TestBackend
) -> None:
    """End to end: a source that sends a RUN header of 2**32 - 1 pages and then nothing (no
    body, no EOF) gets its typed NAK at once, and the destination's threads end."""
    before = stream_threads()
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header(spec) + OFFER + b"G" + struct.pack("<II", 0, 0xFFFFFFFF))
        answer = await within(reader.read())  # until the destination closes
    finally:
        writer.close()
    assert answer.startswith(b"V\x02\x00A")  # format 2 answered (offered with the header), then:
    assert b"malformed migration stream: run of 4294967295 pages" in answer
    with pytest.raises(MigrationFailed, match="run of 4294967295 pages"):
        await within(dst.incoming_wait(spec.uuid))
    await no_stream_threads(before)


async def test_a_tls_migration_goes_through_the_channel(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--tls: the guest's pages are encrypted and decrypted by the channel's TLS (its writer
    and reader threads), and the guest arrives whole."""
    sent: list[int] = []
    received: list[int] = []
    real_send, real_recv = sockio.TlsIO.send, sockio.TlsIO.recv_into

    def send(self: Any, items: list[Any]) -> None:
        sent.append(sum(len(i) for i in items))
        real_send(self, items)

    def recv_into(self: Any, view: memoryview, waitall: bool) -> int:
        n = real_recv(self, view, waitall)
        received.append(n)
        return n

    monkeypatch.setattr(sockio.TlsIO, "send", send)
    monkeypatch.setattr(sockio.TlsIO, "recv_into", recv_into)
    spec = make_spec(32)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK, dst_tuning())
    await within(src.outgoing(spec.uuid, to(port), src_tuning()))
    await within(dst.incoming_wait(spec.uuid))
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    assert sum(sent) >= 32 * MIB  # every page, sent as TLS by the writer thread
    assert sum(received) >= 32 * MIB  # and decrypted by the reader thread


# --- the loop phase: the opening exchange on the event loop, then the threads ---------------------


@contextlib.asynccontextmanager
async def channel_pair() -> AsyncIterator[tuple[Channel, Channel]]:
    """Two channels on either end of a loopback TCP connection (no slots: threads may start);
    both aborted and closed at the end."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        a_sock = socket.create_connection(listener.getsockname())
        b_sock, _ = listener.accept()
    a, b = Channel(a_sock), Channel(b_sock)
    try:
        yield a, b
    finally:
        for chan in (a, b):
            chan.abort()
            await within(chan.wait_closed())


async def test_the_opening_exchange_runs_on_the_loop_without_a_thread() -> None:
    """Small writes and exact reads (the proof, the HEADER and its reply) go through the
    socket from the event loop: no stream thread starts for them; the first operation that
    needs the threads starts them, and the bytes the loop read ahead are the reader thread's
    first (nothing lost, nothing read twice)."""
    before = stream_threads()
    async with channel_pair() as (a, b):
        a.write(b"ping" + b"ahead")
        await a.drain()
        assert await within(b.readexactly(4)) == b"ping"  # "ahead" came in the same recv
        b.write(b"pong")
        await b.drain()
        assert await within(a.readexactly(4)) == b"pong"
        assert not [t for t in stream_threads() if t not in before]
        a.write(b"more")
        assert await within(b.call(lambda r: bytes(r.exact(9)))) == b"aheadmore"
        assert {t.name for t in stream_threads() if t not in before} == {
            f"{THREAD_PREFIX}-any-recv", f"{THREAD_PREFIX}-any-send"}
        assert await within(b.readexactly(0)) == b""


async def test_a_read_waiting_on_the_loop_goes_on_in_the_reader_thread() -> None:
    """The source's reply watcher waits on the loop when its first page's write (a ``sent``
    callback: the writer thread's) ends the loop phase: its read is served by the reader thread,
    with what the loop had read of it."""
    async with channel_pair() as (a, b):
        waiting = asyncio.create_task(b.readexactly(6))
        a.write(b"re")
        await wait_until(lambda: b._lwait is not None and bytes(b._lbuf) == b"re", timeout=15,
                         what="the read to take 're' and wait on the loop for the rest")
        assert not waiting.done()
        sent: list[object] = []
        b.write(b"x" * 1024, sent.append)  # leaves the loop
        a.write(b"ply!")
        assert await within(waiting) == b"reply!"
        assert bytes(await within(a.readexactly(1024))) == b"x" * 1024
        await wait_until(lambda: bool(sent), timeout=15, what="the writer thread's callback")


async def test_a_write_the_socket_cannot_take_at_once_goes_to_the_writer_thread() -> None:
    """A peer that does not read fills the socket: the loop never blocks on it; what the socket
    did not take is sent by the writer thread, in order, once the peer reads."""
    before = stream_threads()
    async with channel_pair() as (a, b):
        chunk = bytes(range(256)) * 200  # 51,200 bytes: a loop write each (<= LOOP_WRITE_MAX)
        for _ in range(200):  # ~10 MiB: far beyond what the socket buffers
            a.write(chunk)
        assert [t for t in stream_threads() if t not in before and t.name.endswith("-send")]
        got = await within(b.call(lambda r: bytes(r.exact(200 * len(chunk)))))
        assert got == chunk * 200


async def test_an_abort_ends_a_read_waiting_on_the_loop() -> None:
    """``abort`` (domjobabort, a destroyed guest) while a read waits on the loop: the read
    ends at once, as one in the reader thread does (its socket shut down: the stream ended
    early), and the channel closes its socket (no thread ever ran); a read after it is
    refused."""
    async with channel_pair() as (a, b):
        a.write(b"ab")
        waiting = asyncio.create_task(b.readexactly(4))
        await wait_until(lambda: b._lwait is not None and bytes(b._lbuf) == b"ab", timeout=15,
                         what="the read to take 'ab' and wait on the loop")
        b.abort()
        with pytest.raises(asyncio.IncompleteReadError) as caught:
            await within(waiting)
        assert caught.value.partial == b"ab"
        await within(b.wait_closed())
        assert b.sock.fileno() == -1
        with pytest.raises(ConnectionAbortedError):
            await within(b.readexactly(1))


async def test_the_peer_closing_in_the_opening_exchange_ends_a_read_as_incomplete() -> None:
    """The other end goes away mid-HEADER: IncompleteReadError with what came, as the reader
    thread's reads (and a ``StreamReader``'s) raise it."""
    async with channel_pair() as (a, b):
        a.write(b"par")
        a.close()
        with pytest.raises(asyncio.IncompleteReadError) as caught:
            await within(b.readexactly(8))
        assert caught.value.partial == b"par"
        assert caught.value.expected == 8


async def test_a_cancelled_read_on_the_loop_leaves_the_channel_usable() -> None:
    """A read waiting on the loop, cancelled (a handshake timeout): the socket is no longer
    watched for it, and the next read gets the bytes that come later."""
    async with channel_pair() as (a, b):
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await b.readexactly(4)
        a.write(b"late")
        assert await within(b.readexactly(4)) == b"late"


async def test_a_channel_not_admitted_neither_reads_nor_sends_on_the_loop() -> None:
    """Slots bound the threads a stream may start, and the loop phase does not get around
    them: a read before :meth:`Channel.admit` is refused as before, and a write waits for the
    writer thread the slot allows."""
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        a_sock = socket.create_connection(listener.getsockname())
        b_sock, _ = listener.accept()
    slots = StreamSlots(1, "in")
    a, b = Channel(a_sock), Channel(b_sock, slots=slots)
    try:
        with pytest.raises(RuntimeError, match="not admitted"):
            await b.readexactly(1)
        b.write(b"early")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await a.readexactly(5)
        await within(b.admit())
        b.write(b"")  # (any write wakes the writer thread the slot now allows)
        assert await within(a.readexactly(5)) == b"early"
    finally:
        for chan in (a, b):
            chan.abort()
            await within(chan.wait_closed())
