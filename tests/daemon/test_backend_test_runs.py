"""The ``test`` backend's stream format 2: RUN records (pages by runs, checked a run at a time),
the versions switchover, how the two ends agree on it, and what a destination refuses in it.
"""

from __future__ import annotations

import asyncio
import random
import struct
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import LOOPBACK, make_spec, migrate, to, within
from tests.daemon.test_backend_test_postcopy import switch_to_postcopy
from tests.daemon.test_backend_test_stream import header, raw_stream
from virtmig.daemon.backend.base import GuestRunState, MigrationFailed, MigrationTuning
from virtmig.daemon.backend.test import (
    PAGE_SIZE,
    TestBackend,
    digest_of,
    incoming,
    memory,
    outgoing,
    page_bytes,
    page_hash,
)
from virtmig.daemon.backend.test.buffers import BufferPool
from virtmig.daemon.backend.test.memory import run_bytes, versions_digest
from virtmig.daemon.backend.test.sparse import CHUNK_PAGES, PageSet, Versions

dst = backend_test_helpers.dst
src = backend_test_helpers.src

SEED = 42
OFFER = b"I" + struct.pack("<IB", 1, 2)  # ITER 1 offering format 2
VERSION_REPLY = b"V" + struct.pack("<H", 2)


def counting(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count the calls of ``module.name`` (one entry per call)."""
    calls: list[int] = []
    real: Callable[..., Any] = getattr(module, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def as_before(monkeypatch: pytest.MonkeyPatch, old: str, *, source: str,
              destination: str) -> None:
    """Turn off the ``old`` end's switch: ``outgoing.<source>`` or ``incoming.<destination>``."""
    if old == "source":
        monkeypatch.setattr(outgoing, source, False)
    else:
        monkeypatch.setattr(incoming, destination, False)


def counting_async(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Awaitable[Any]] = getattr(module, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


async def test_both_new_ends_move_pages_in_runs(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two format 2 ends: the source offers format 2 with the HEADER, the destination answers
    before the ACK, and every page goes as RUN records, which the destination checks without
    hashing a page; the memory arrives (digest of the memory, both ends)."""
    runs = counting(monkeypatch, incoming, "_receive_run")
    hashed = counting(monkeypatch, incoming, "received_page")
    spec = make_spec(64, **{"dirty-rate-mib": "8"})
    await src.start(spec, paused=False)
    out, _ = await migrate(src, dst, spec)
    assert out.processed_bytes >= 64 * 1024 * 1024
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    npages = 64 * 1024 * 1024 // PAGE_SIZE
    assert len(runs) * memory.RUN_TEMPLATE_PAGES >= npages
    assert hashed == []


async def test_a_small_guest_moves_in_runs_from_its_first_page(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 MiB guest (the control-plane benchmark's): its whole first pass fits in the socket
    buffers, so with the offer made only in the first pass's ITER every page of it went as
    PAGES (hashed twice at each end) before the VERSION reply was read; offered with the
    HEADER, no page is sent in format 1 and the switchover is the versions digest."""
    hashed = counting(monkeypatch, incoming, "received_page")
    built = counting(monkeypatch, outgoing, "page_records")
    switches: list[bytes] = []
    real_switch = outgoing._switch_record

    def switch(mig: Any) -> bytes:
        record: bytes = real_switch(mig)
        switches.append(record[:1])
        return record

    monkeypatch.setattr(outgoing, "_switch_record", switch)
    spec = make_spec(4)
    await src.start(spec, paused=False)
    await migrate(src, dst, spec)
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    assert hashed == [] and built == [] and switches == [b"W"]


@pytest.mark.parametrize("old", ["source", "destination"])
async def test_an_offer_answered_after_the_ack_still_agrees(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch, old: str
) -> None:
    """Either end as before the offer with the HEADER (a source that offers in the first
    pass's ITER only, a destination that answers once it reads the offer as a record): format 2
    is agreed a socket's worth of pages later, and the memory arrives."""
    as_before(monkeypatch, old, source="OFFER_WITH_HEADER", destination="EARLY_VERSION_REPLY")
    runs = counting(monkeypatch, incoming, "_receive_run")
    hashed = counting(monkeypatch, incoming, "received_page")
    spec = make_spec(32)
    await src.start(spec, paused=False)
    await migrate(src, dst, spec)
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    assert runs != [] and hashed != []  # format 1 until the reply was read, then runs


async def test_destination_does_not_wait_for_an_offer_behind_the_header(dst: TestBackend) -> None:
    """A source that sends nothing after the HEADER until the ACK (as before the offer with the
    HEADER): the destination ACKs at once, and answers the offer in the first ITER after it."""
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(header(spec))
        assert await within(reader.readexactly(1)) == b"A"
        writer.write(OFFER)
        assert await within(reader.readexactly(len(VERSION_REPLY))) == VERSION_REPLY
    finally:
        writer.close()
    with pytest.raises(MigrationFailed):
        await within(dst.incoming_wait(spec.uuid))


@pytest.mark.parametrize("old", ["source", "destination"])
async def test_a_format_1_end_still_migrates(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch, old: str
) -> None:
    """A source that does not offer format 2, or a destination that does not answer the offer
    (and would refuse a RUN record as unknown): format 1 throughout, the migration completes."""
    as_before(monkeypatch, old, source="OFFER_RUNS", destination="READS_RUNS")
    runs = counting(monkeypatch, incoming, "_receive_run")
    switches = counting(monkeypatch, outgoing, "_switch_record")
    spec = make_spec(16, **{"dirty-rate-mib": "8"})
    await src.start(spec, paused=False)
    await migrate(src, dst, spec)
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    assert runs == [] and switches == [1]


@pytest.mark.parametrize("old", [None, "destination"])
async def test_postcopy_in_runs_and_not(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch, old: str | None
) -> None:
    """Post-copy over format 2 (the received versions are kept apart from the guest's own writes
    for the switchover check) and over format 1: the memory as of the switch arrives."""
    if old:
        monkeypatch.setattr(incoming, "READS_RUNS", False)
    runs = counting(monkeypatch, incoming, "_receive_run")
    spec = make_spec(32, **{"dirty-rate-mib": "16"})
    await src.start(spec, paused=False)
    await switch_to_postcopy(src, dst, spec, MigrationTuning(postcopy=True),
                                        after_bytes=4 * 1024 * 1024)
    await within(dst.incoming_wait(spec.uuid))
    await within(src.outgoing_wait(spec.uuid))
    assert (runs != []) is (old is None)
    assert dst.state(spec.uuid) is GuestRunState.PAUSED  # (not resumed: no writes of its own)
    assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)


def run(first: int, versions: list[int], *, corrupt: int | None = None) -> bytes:
    """A RUN record of pages ``first``.. at ``versions``; page ``corrupt`` (index) gets a bad
    byte."""
    pages = run_bytes(SEED, first, array("I", versions))
    if corrupt is not None:
        pages[(corrupt - first) * PAGE_SIZE + 7] ^= 1
    return (b"G" + struct.pack("<II", first, len(versions)) + struct.pack(
        f"<{len(versions)}I", *versions) + bytes(pages))


def vdigest(npages: int, final: dict[int, int]) -> bytes:
    versions = Versions(npages)
    for i, v in final.items():
        versions[i] = v
    return versions_digest(SEED, npages, versions.written_chunks())


def test_run_bytes_are_the_pages() -> None:
    versions = [0, 3, 0xFFFFFFFF, 1]
    assert bytes(run_bytes(SEED, 250, array("I", versions))) == b"".join(
        page_bytes(SEED, 250 + k, v) for k, v in enumerate(versions))
    with pytest.raises(ValueError, match="a run is 1 to 256 pages"):
        run_bytes(SEED, 0, array("I", [0] * 257))


async def test_destination_accepts_runs_out_of_order_resent_and_discarded(
    dst: TestBackend,
) -> None:
    """Runs backwards, a discard, resends at new versions (one page first sent corrupt): the
    destination ACKs the versions digest and then holds exactly that memory."""
    spec = make_spec(1)  # 256 pages
    port = await dst.incoming_start(spec, LOOPBACK)
    final = {i: (i % 3) for i in range(256)}
    stream = header(spec) + OFFER
    for first in reversed(range(0, 256, 64)):
        stream += run(first, [0] * 64, corrupt=first + 5 if first == 64 else None)
    stream += b"D" + struct.pack("<III", 2, 5, 9)
    stream += b"".join(run(i, [v]) for i, v in final.items() if v)
    stream += run(5, [final[5]]) + run(9, [final[9]]) + run(69, [final[69]])
    answer = await raw_stream(port, stream + b"W" + vdigest(256, final))
    assert answer == VERSION_REPLY + b"A" + b"A"  # (the offer came with the HEADER)
    await within(dst.incoming_wait(spec.uuid))
    assert list(dst._guests[spec.uuid].versions) == list(final.values())
    dense = digest_of(b"".join(page_hash(page_bytes(SEED, i, v)) for i, v in final.items()))
    assert dst.memory_digest(spec.uuid) == dense  # (the format 1 sum, computed afresh)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (run(0, [0] * 256, corrupt=17) + b"W" + vdigest(256, {}),
         "1 pages hold bytes that are not their version's content"),
        (run(0, [0] * 256) + b"W" + vdigest(256, {3: 1}), "from the received page versions"),
        (run(0, [0] * 255) + b"W" + vdigest(256, {}), "1 of 256 pages never received"),
        (run(0, [0] * 256) + b"S" + bytes(32), "a format 1 switchover after page runs"),
    ],
    ids=["odd-page", "versions-differ", "page-missing", "format-1-switch"],
)
async def test_destination_refuses_a_wrong_switchover(
    dst: TestBackend, body: bytes, message: str
) -> None:
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    answer = await raw_stream(port, header(spec) + OFFER + body)
    assert answer.startswith(VERSION_REPLY + b"A" + b"N")  # (the offer came with the HEADER)
    assert message.encode() in answer
    with pytest.raises(MigrationFailed, match=r"digest mismatch at switchover|malformed"):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"G" + struct.pack("<II", 0, 0), "run of 0 pages"),
        (b"G" + struct.pack("<II", 0, 257), "run of 257 pages"),
        (b"G" + struct.pack("<II", 200, 57), "run of pages 200 to 256 of 256"),
        (b"G" + struct.pack("<II", 0xFFFFFFFF, 1), "run of pages 4294967295 to 4294967295"),
        (b"G" + struct.pack("<II", 0, 2) + bytes(8 + PAGE_SIZE), "ended early"),
    ],
    ids=["empty", "too-long", "beyond-the-guest", "index-overflow", "truncated"],
)
async def test_destination_refuses_malformed_runs(
    dst: TestBackend, body: bytes, message: str
) -> None:
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    await raw_stream(port, header(spec) + OFFER + body)
    with pytest.raises(MigrationFailed, match=message):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.parametrize("record", [b"G", b"W"])
async def test_format_2_records_need_the_offer(dst: TestBackend, record: bytes) -> None:
    """Without the source's offer (a format 1 stream) RUN and VERSIONS SWITCH are unknown
    records, and no VERSION reply is sent."""
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    body = run(0, [0]) if record == b"G" else b"W" + vdigest(256, {})
    try:
        answer = await raw_stream(port, header(spec) + b"I" + struct.pack("<IB", 1, 0) + body)
    except ConnectionResetError:  # (it closed with the record's body unread)
        answer = b""
    assert VERSION_REPLY not in answer
    with pytest.raises(MigrationFailed, match="unknown record"):
        await within(dst.incoming_wait(spec.uuid))


@pytest.mark.parametrize(
    ("reply", "message"),
    [(b"V" + struct.pack("<H", 1), "stream format 1 offered"),
     # (closing with the source's bytes unread resets the connection: the source's reader
     # thread may see the reset before the EOF)
     (b"V", r"closed by the destination|Unable to (write to|read from) socket")],
    ids=["older-version", "truncated"],
)
async def test_source_refuses_a_bad_version_reply(
    src: TestBackend, reply: bytes, message: str
) -> None:
    """A destination that answers the offer with garbage: the migration fails at once and the
    source guest runs on."""
    heard = asyncio.Event()

    async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(struct.calcsize("<8sHIQQH"))
        await reader.readexactly(36)  # the uuid
        writer.write(b"A")
        await reader.readexactly(1 + 5)  # the first ITER
        writer.write(reply)
        await writer.drain()
        if reply == b"V":
            writer.close()
        heard.set()
        await reader.read()  # until the source gives up
        writer.close()

    server = await asyncio.start_server(fake, "127.0.0.1", 0)
    try:
        spec = make_spec(64)
        await src.start(spec, paused=False)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(MigrationFailed, match=message):
            await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
        assert heard.is_set()
        assert src.state(spec.uuid) is GuestRunState.RUNNING
    finally:
        server.close()


async def test_destination_bounds_odd_pages_in_runs(dst: TestBackend) -> None:
    """Runs of pages that are not their versions' bytes: the stream fails once more than
    MAX_ODD_PAGES are held, not at switchover."""
    spec = make_spec(8)  # 2048 pages
    port = await dst.incoming_start(spec, LOOPBACK)
    stream = header(spec) + OFFER
    for first in range(0, incoming.MAX_ODD_PAGES + 256, 256):
        stream += b"G" + struct.pack("<II", first, 256) + bytes(4 * 256) + bytes(256 * PAGE_SIZE)
    try:
        answer = await raw_stream(port, stream)
    except ConnectionResetError:  # (refused with bytes of the stream unread)
        answer = b""
    assert b"N" not in answer or f"more than {incoming.MAX_ODD_PAGES}".encode() in answer
    with pytest.raises(MigrationFailed, match=f"more than {incoming.MAX_ODD_PAGES} pages hold"):
        await within(dst.incoming_wait(spec.uuid))


def test_run_matches_only_the_exact_bytes() -> None:
    """The in-place check of a run finds a difference anywhere in any page: prefix, seed,
    index or version word, and a run of the wrong length."""
    versions = array("I", [0, 3, 1])
    good = bytes(run_bytes(SEED, 10, versions))
    assert memory.run_matches(SEED, 10, versions, good)
    for offset in (0, PAGE_SIZE + 100, 2 * PAGE_SIZE + 4071, PAGE_SIZE - 24, PAGE_SIZE - 16,
                   3 * PAGE_SIZE - 8, 3 * PAGE_SIZE - 1):
        bad = bytearray(good)
        bad[offset] ^= 1
        assert not memory.run_matches(SEED, 10, versions, bytes(bad)), offset
    assert not memory.run_matches(SEED, 11, versions, good)
    assert not memory.run_matches(SEED + 1, 10, versions, good)
    assert not memory.run_matches(SEED, 10, array("I", [0, 3, 2]), good)
    assert not memory.run_matches(SEED, 10, versions, good[:-PAGE_SIZE])


def test_runs_of_versions_and_pages_behave_as_their_models() -> None:
    """``Versions.get_run``/``set_run``/``copy``/``written_chunks`` and ``PageSet.add_range``
    against plain dicts and sets, runs crossing chunk edges and the prefix's end."""
    rng = random.Random(11)
    n = 2000
    versions, model = Versions(n), [0] * n
    pages, members = PageSet(), set[int]()
    for _ in range(3000):
        first = rng.randrange(n)
        count = rng.randrange(1, min(300, n - first) + 1)
        values = array("I", [rng.choice((0, 0, 1, 7, 0xFFFFFFFF)) for _ in range(count)])
        versions.set_run(first, values)
        model[first : first + count] = values.tolist()
        assert versions.get_run(first, count) == values
        start = rng.choice((len(pages), pages.upto, first))
        start = min(start, n - 1)
        if rng.random() < 0.6:
            span = min(count, n - start)
            pages.add_range(start, span)
            members.update(range(start, start + span))
        else:
            for i in rng.sample(range(n), 5):
                assert pages.discard(i) is (i in members)
                members.discard(i)
    assert list(versions) == model
    assert list(versions.copy()) == model
    chunks = dict(versions.written_chunks())
    for key in range(n // CHUNK_PAGES + 1):
        part = model[key * CHUNK_PAGES : (key + 1) * CHUNK_PAGES]
        assert (key in chunks) is any(part)
    assert len(pages) == len(members)
    assert all((i in pages) is (i in members) for i in range(n + 1))


def counting_new(monkeypatch: pytest.MonkeyPatch, pool: BufferPool) -> list[int]:
    """Count the new buffers ``pool`` makes."""
    made: list[int] = []
    real = pool._new

    def new() -> bytearray:
        made.append(1)
        return real()

    monkeypatch.setattr(pool, "_new", new)
    return made


async def test_run_buffers_are_kept_from_one_migration_to_the_next(
    src: TestBackend, dst: TestBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each end keeps its 1 MiB run buffers once a stream ended (a source's per seed): three
    round trips of a 4 MiB guest (4 runs each way, 12 from each end) make no more buffers than
    one migration holds at once (each made 4 per migration, every time, before)."""
    spec = make_spec(4, seed="7")
    sent = counting_new(monkeypatch, src.run_pools.pool(7))
    received = counting_new(monkeypatch, dst.receive_pool)
    await src.start(spec, paused=False)
    for _ in range(3):
        await migrate(src, dst, spec)
        await src.destroy(spec.uuid)
        await migrate(dst, src, spec)
        await dst.destroy(spec.uuid)
    assert 0 < len(sent) <= 4 and 0 < len(received) <= 4


async def test_a_corrupted_run_never_returns_to_the_kept_buffers(
    src: TestBackend, dst: TestBackend
) -> None:
    """A guest whose stream is corrupted (fault; not live, so page 0 goes in a full run built in
    a kept buffer) fails its migration; another guest of the same seed, sent next from the same
    buffers, arrives whole: the damaged run was a copy that no pool took back."""
    bad = make_spec(4, seed="9", fault="corrupt-stream")
    await src.start(bad, paused=False)
    with pytest.raises(MigrationFailed, match="digest mismatch"):
        await migrate(src, dst, bad, MigrationTuning(live=False))
    good = make_spec(4, seed="9")
    await src.start(good, paused=False)
    await migrate(src, dst, good, MigrationTuning(live=False))
    assert dst.memory_digest(good.uuid) == src.memory_digest(good.uuid)
    kept = src.run_pools.pool(9)._free
    prefix = memory.page_prefix(9)
    assert kept and all(buf.startswith(prefix, off)
                        for buf in kept for off in range(0, len(buf), PAGE_SIZE))
