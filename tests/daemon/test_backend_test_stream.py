"""The embedded ``test`` backend: lifecycle, memory model, and the migration stream's format (what
a destination refuses).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import uuid as uuidlib
from typing import Any

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import LOOPBACK, make_spec, to, within
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    GuestSpec,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    StreamAddress,
)
from virtmig.daemon.backend.test import MAGIC, PAGE_SIZE, TestBackend, page_bytes
from virtmig.proto.errors import ConfigUnsupported
from virtmig.testing import wait_until

# The shared fixtures, bound here so that pytest finds them.
dst = backend_test_helpers.dst
src = backend_test_helpers.src


async def test_lifecycle_and_states(src: TestBackend) -> None:
    spec = make_spec(1)
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    assert src.progress(spec.uuid) == MigrationProgress()

    await src.start(spec, paused=False)
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    with pytest.raises(BackendError, match="already running"):
        await src.start(spec, paused=True)
    await src.pause(spec.uuid)
    assert src.state(spec.uuid) is GuestRunState.PAUSED
    await src.pause(spec.uuid)  # pausing a paused guest is harmless
    await src.resume(spec.uuid)
    assert src.state(spec.uuid) is GuestRunState.RUNNING

    await src.destroy(spec.uuid)
    assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    await src.destroy(spec.uuid)  # not running: no error
    await src.destroy("no-such-guest")
    for op in (src.pause, src.resume):
        with pytest.raises(BackendError, match="not running"):
            await op(spec.uuid)
    with pytest.raises(BackendError):
        src.memory_digest(spec.uuid)
    with pytest.raises(BackendError, match="not running"):
        await src.outgoing(spec.uuid, to(1), MigrationTuning())
    await src.cancel(spec.uuid)  # nothing to cancel: no-op

    await src.start(spec, paused=True)
    assert src.state(spec.uuid) is GuestRunState.PAUSED


async def test_bad_options_are_refused(src: TestBackend) -> None:
    bad = [
        make_spec(seed="banana"),
        make_spec(**{"dirty-rate-mib": "fast"}),
        make_spec(**{"dirty-rate-mib": "-1"}),
        make_spec(fault="explode"),
        GuestSpec(uuid=str(uuidlib.uuid4()), name="tiny", memory_bytes=100, vcpus=1),
    ]
    for spec in bad:
        with pytest.raises(ConfigUnsupported):
            src.validate(spec)
        with pytest.raises(BackendError):
            await src.start(spec, paused=False)
        assert src.state(spec.uuid) is GuestRunState.SHUTOFF
    src.validate(make_spec(seed="0x1234", **{"dirty-rate-mib": "2.5"}))


async def test_memory_model(src: TestBackend, dst: TestBackend) -> None:
    page = page_bytes(7, 3, 0)
    assert len(page) == PAGE_SIZE
    assert len({page, page_bytes(7, 3, 1), page_bytes(7, 4, 0), page_bytes(8, 3, 0)}) == 4
    assert page_bytes(7, 3, 0) == page

    # Same seed, idle: same memory on two backends; a different seed: different memory.
    a, b, c = make_spec(4, seed="42"), make_spec(4, seed="42"), make_spec(4, seed="43")
    await src.start(a, paused=False)
    await dst.start(b, paused=False)
    await dst.start(c, paused=False)
    assert src.memory_digest(a.uuid) == dst.memory_digest(b.uuid) != dst.memory_digest(c.uuid)
    await asyncio.sleep(0.05)  # the subject: idle guests, given time to run, dirty nothing
    assert src.memory_digest(a.uuid) == dst.memory_digest(b.uuid)

    # A running guest with a dirty rate changes its memory; a paused one does not.
    busy = make_spec(4, **{"dirty-rate-mib": "64"})
    await src.start(busy, paused=False)
    before = src.memory_digest(busy.uuid)
    await wait_until(lambda: src.memory_digest(busy.uuid) != before, timeout=10,
                     what="the running guest to write to its memory")
    await src.pause(busy.uuid)
    paused = src.memory_digest(busy.uuid)
    await asyncio.sleep(0.05)  # the subject: a paused guest, given time to run, writes nothing
    assert src.memory_digest(busy.uuid) == paused


async def test_corrupt_stream_is_refused(src: TestBackend, dst: TestBackend) -> None:
    spec = make_spec(8, fault="corrupt-stream")
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)

    with pytest.raises(MigrationFailed, match="memory digest mismatch at switchover"):
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    with pytest.raises(MigrationFailed, match="digest mismatch"):
        await within(dst.incoming_wait(spec.uuid))

    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF  # the destination guest quit
    assert src.progress(spec.uuid).status is MigrationStatus.FAILED
    assert "digest" in src.progress(spec.uuid).error
    assert dst.progress(spec.uuid).status is MigrationStatus.FAILED


async def test_stream_for_another_guest_is_refused(src: TestBackend, dst: TestBackend) -> None:
    mine, other = make_spec(4), make_spec(4)
    await src.start(mine, paused=True)
    port = await dst.incoming_start(other, LOOPBACK)
    with pytest.raises(MigrationFailed, match="for another guest"):
        await within(src.outgoing(mine.uuid, to(port), MigrationTuning()))
    with pytest.raises(MigrationFailed, match="for another guest"):
        await within(dst.incoming_wait(other.uuid))
    assert src.state(mine.uuid) is GuestRunState.PAUSED  # paused before, paused after
    assert dst.state(other.uuid) is GuestRunState.SHUTOFF


async def raw_stream(port: int, data: bytes) -> bytes:
    """Send hand-made stream bytes to a destination; return everything it answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    writer.write_eof()  # the source "dies" after these bytes
    try:
        return await within(reader.read())
    finally:
        writer.close()


def header(spec: GuestSpec, *, magic: bytes = MAGIC) -> bytes:
    uuid = spec.uuid.encode()
    npages = spec.memory_bytes // PAGE_SIZE
    return struct.pack("<8sHIQQH", magic, 1, PAGE_SIZE, npages, 42, len(uuid)) + uuid


async def test_destination_refuses_incomplete_stream(dst: TestBackend) -> None:
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    # One page of 256, then straight to switchover with the source's "digest".
    page = struct.pack("<II", 0, 0) + page_bytes(42, 0, 0)
    stream = header(spec) + b"I" + struct.pack("<IB", 1, 1) + b"P" + struct.pack("<I", 1) + page
    answer = await raw_stream(port, stream + b"S" + bytes(32))
    assert answer.startswith(b"AN")  # header accepted, switchover refused
    assert b"255 of 256 pages never received" in answer
    with pytest.raises(MigrationFailed, match="digest mismatch at switchover"):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.parametrize(
    ("after_header", "message"),
    [
        (None, "not a test backend stream"),
        (b"X", "unknown record"),
        (b"P" + struct.pack("<III", 1, 7, 0) + bytes(100), "ended early"),
        (b"P" + struct.pack("<III", 1, 99999, 0) + bytes(PAGE_SIZE), "page 99999 of 256"),
    ],
    ids=["bad-magic", "unknown-record", "truncated", "page-out-of-range"],
)
async def test_destination_refuses_malformed_stream(
    dst: TestBackend, after_header: bytes | None, message: str
) -> None:
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    if after_header is None:
        await raw_stream(port, header(spec, magic=b"NOTVMTST"))
    else:
        await raw_stream(port, header(spec) + after_header)
    with pytest.raises(MigrationFailed, match=message):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_source_resolves_only_a_name_off_the_loop(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    """An address literal (what a Prepare's URI names by default) is connected to without a trip
    through the resolver's worker thread; a name is still resolved (off the loop) and each of
    its addresses tried."""
    on_loop: list[bool] = []
    real = socket.getaddrinfo

    def getaddrinfo(name: Any, *args: Any, **kwargs: Any) -> Any:
        if name == host:
            on_loop.append(threading.current_thread() is threading.main_thread())
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    spec = make_spec(1)
    await src.start(spec, paused=False)
    port = await dst.incoming_start(spec, LOOPBACK)
    await within(src.outgoing(spec.uuid, StreamAddress(host, port), MigrationTuning()))
    await within(dst.incoming_wait(spec.uuid))
    if host == "127.0.0.1":
        assert on_loop == [True]
