"""The test backend's stream off asyncio (``virtmig.daemon.backend.test.channel``, issue 17):
each end's reader and writer threads run while the stream does and end with it, however it
ends; a hostile RUN length is refused with its typed reason before a byte of its body is read;
a ``--tls`` migration's bytes go through the channel's TLS.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import threading
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
from virtmig.daemon.backend.test.channel import THREAD_PREFIX
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
