"""The ``test`` backend's bounds: what a huge declared guest costs the daemon, how much work one
dirtying tick does, the ranges of its options, and what a destination holds for a stream.
"""

from __future__ import annotations

import inspect
import random
import struct
import tracemalloc
from pathlib import Path

import pytest

from tests.daemon import backend_test_helpers
from tests.daemon.backend_test_helpers import LOOPBACK, make_spec, within
from tests.daemon.test_backend_test_postcopy import switch_to_postcopy
from tests.daemon.test_backend_test_stream import header, raw_stream
from virtmig.daemon.backend.base import GuestRunState, MigrationFailed, MigrationTuning
from virtmig.daemon.backend.test import (
    PAGE_SIZE,
    TestBackend,
    digest_of,
    memory,
    page_bytes,
    page_hash,
)
from virtmig.daemon.backend.test.guest import MAX_DIRTY_RATE_MIB, MAX_TICK_PAGES, Guest
from virtmig.daemon.backend.test.incoming import MAX_ODD_PAGES
from virtmig.daemon.backend.test.sparse import PageSet, Versions
from virtmig.proto.errors import ConfigUnsupported

dst = backend_test_helpers.dst
src = backend_test_helpers.src

GIB = 1024**3
HUGE_MIB = 64 * 1024  # a 64 GiB guest: 16 Mi pages (dense per-page state: ~330 MB)
BOUND = 16 * 1024 * 1024  # what such a guest may cost, whatever it does below
# Where the source's migration code allocates (not the stream's buffers: sockio, wire, channel).
SOURCE_SIDE = ("outgoing", "guest", "pacing", "memory", "sparse")


def _run_buffer(frame: tracemalloc.Frame) -> bool:
    """Allocated by :func:`.memory.run_template`: a buffer of the stream's run pool, or the
    seed's run template it copies (the stream's, as sockio's, wire's and channel's buffers, not
    the migration's bookkeeping)."""
    if Path(frame.filename) != Path(memory.__file__):
        return False
    for fn in (memory.run_template, memory._run_template.__wrapped__):
        lines, start = inspect.getsourcelines(fn)
        if start <= frame.lineno < start + len(lines):
            return True
    return False


def guest_of(backend: TestBackend, uuid: str) -> Guest:
    return backend._guests[uuid]


async def test_huge_guest_costs_what_it_touches(src: TestBackend, dst: TestBackend) -> None:
    """A 64 GiB guest that runs and dirties memory, and an incoming one, cost the daemon a few
    MiB (measured with tracemalloc), not a fixed amount per declared page."""
    running = make_spec(HUGE_MIB, **{"dirty-rate-mib": "1024"})
    incoming = make_spec(HUGE_MIB)
    tracemalloc.start()
    try:
        await src.start(running, paused=False)
        guest = guest_of(src, running.uuid)
        guest.dirty = set()  # as a migration tracks it
        for _ in range(4):
            guest._last_tick -= 1.0  # a second of running between ticks
            guest.tick()
        guest.hash_pages(4096)  # the digest's sum, one slice
        port = await dst.incoming_start(incoming, LOOPBACK)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert port > 0
    assert 0 < guest.nbytes < BOUND
    assert peak < BOUND, f"a 64 GiB guest cost {peak} bytes"
    assert len(guest.dirty) > MAX_TICK_PAGES  # (it did write: the bound is not for idleness)


async def test_one_tick_does_bounded_work_at_any_rate(src: TestBackend) -> None:
    spec = make_spec(HUGE_MIB, **{"dirty-rate-mib": str(MAX_DIRTY_RATE_MIB)})
    await src.start(spec, paused=False)
    guest = guest_of(src, spec.uuid)
    guest._last_tick -= 3600.0  # an hour at 1 TiB/s since the last tick
    assert guest.tick() == MAX_TICK_PAGES
    guest._last_tick -= 1e300  # absurd elapsed time: no overflow either
    assert guest.tick() == MAX_TICK_PAGES
    small = make_spec(1, **{"dirty-rate-mib": str(MAX_DIRTY_RATE_MIB)})
    await src.start(small, paused=False)
    guest_of(src, small.uuid)._last_tick -= 10.0
    assert guest_of(src, small.uuid).tick() == 256  # at most every page of a small guest


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dirty-rate-mib": "1e308"}, r"dirty-rate-mib='1e308' is out of range: expected "
                                      rf"0\.\.{MAX_DIRTY_RATE_MIB} \(MiB/s\)"),
        ({"dirty-rate-mib": "inf"}, "dirty-rate-mib='inf' is out of range"),
        ({"dirty-rate-mib": "nan"}, "dirty-rate-mib='nan' is out of range"),
        ({"dirty-rate-mib": "-0.5"}, "dirty-rate-mib='-0.5' is out of range"),
        ({"dirty-rate-mib": str(MAX_DIRTY_RATE_MIB + 1)}, "is out of range"),
        ({"seed": "-1"}, r"seed='-1' is out of range: expected 0\.\.18446744073709551615"),
        ({"seed": str(2**64)}, "seed='18446744073709551616' is out of range"),
        ({"seed": "9" * 5000}, "seed='9999999999.* is out of range"),
        ({"seed": "0x"}, "seed='0x' is not an integer"),
    ],
)
async def test_option_ranges(src: TestBackend, options: dict[str, str], message: str) -> None:
    spec = make_spec(1, **options)
    with pytest.raises(ConfigUnsupported, match=message):
        src.validate(spec)


def test_option_range_ends_are_accepted(src: TestBackend) -> None:
    src.validate(make_spec(1, seed="0", **{"dirty-rate-mib": "0"}))
    src.validate(make_spec(1, seed=str(2**64 - 1), **{"dirty-rate-mib": str(MAX_DIRTY_RATE_MIB)}))
    src.validate(make_spec(1, seed="0xFFFFFFFFFFFFFFFF"))


def test_versions_and_page_set_behave_as_their_models() -> None:
    rng = random.Random(7)
    versions, model = Versions(10_000), dict[int, int]()
    pages, members = PageSet(), set[int]()
    for _ in range(20_000):
        i = rng.randrange(10_000)
        assert versions.bump(i) == model.get(i, 0)
        model[i] = model.get(i, 0) + 1
        j = rng.choice((rng.randrange(10_000), len(pages)))  # in order now and then
        if rng.random() < 0.7:
            assert pages.add(j) is (j not in members)
            members.add(j)
        else:
            assert pages.discard(j) is (j in members)
            members.discard(j)
    assert list(versions) == [model.get(i, 0) for i in range(10_000)]
    assert len(pages) == len(members)
    assert all((i in pages) is (i in members) for i in range(10_001))
    versions[3] = 0xFFFFFFFF
    assert versions.bump(3) == 0xFFFFFFFF and versions[3] == 0  # u32, wrapping


async def test_destination_digest_is_the_dense_definition(dst: TestBackend) -> None:
    """A stream that sends pages out of order, resends and discards some: the destination's
    running sum ends equal to the digest of every page hash in page order."""
    spec = make_spec(1)  # 256 pages
    port = await dst.incoming_start(spec, LOOPBACK)
    seed, final = 42, {i: (i % 3) for i in range(256)}

    def pages(items: list[tuple[int, int]]) -> bytes:
        body = b"".join(struct.pack("<II", i, v) + page_bytes(seed, i, v) for i, v in items)
        return b"P" + struct.pack("<I", len(items)) + body

    stream = header(spec) + b"I" + struct.pack("<IB", 1, 0)
    stream += pages([(i, 0) for i in reversed(range(256))])  # all, backwards, at version 0
    stream += b"D" + struct.pack("<I", 2) + struct.pack("<II", 5, 9)  # stale on the source
    stream += pages([(i, v) for i, v in final.items() if v])  # resends at new versions
    stream += pages([(5, final[5]), (9, final[9])])
    digest = digest_of(b"".join(page_hash(page_bytes(seed, i, v)) for i, v in final.items()))
    answer = await raw_stream(port, stream + b"S" + digest)
    assert answer == b"AA"
    await within(dst.incoming_wait(spec.uuid))
    assert dst.memory_digest(spec.uuid) == digest
    assert list(guest_of(dst, spec.uuid).versions) == list(final.values())


async def test_destination_refuses_pages_it_cannot_hold(dst: TestBackend) -> None:
    """Bytes that are not a page's content at its version are refused at switchover even under a
    matching digest (a guest holds (seed, version) pages only)."""
    spec = make_spec(1)
    port = await dst.incoming_start(spec, LOOPBACK)
    odd = bytes(PAGE_SIZE)
    items = [struct.pack("<II", i, 0) + (odd if i == 0 else page_bytes(42, i, 0))
             for i in range(256)]
    hashes = page_hash(odd) + b"".join(page_hash(page_bytes(42, i, 0)) for i in range(1, 256))
    stream = header(spec) + b"P" + struct.pack("<I", 256) + b"".join(items)
    answer = await raw_stream(port, stream + b"S" + digest_of(hashes))
    assert b"1 pages hold bytes that are not their version's content" in answer
    with pytest.raises(MigrationFailed, match="digest mismatch at switchover"):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF


async def test_destination_bounds_what_it_keeps_of_odd_pages(dst: TestBackend) -> None:
    spec = make_spec(8)  # 2048 pages
    port = await dst.incoming_start(spec, LOOPBACK)
    count = MAX_ODD_PAGES + 1
    body = b"".join(struct.pack("<II", i, 0) + bytes(PAGE_SIZE) for i in range(count))
    answer = await raw_stream(port, header(spec) + b"P" + struct.pack("<I", count) + body)
    assert f"more than {MAX_ODD_PAGES} pages hold bytes".encode() in answer
    with pytest.raises(MigrationFailed, match="malformed migration stream"):
        await within(dst.incoming_wait(spec.uuid))


async def test_postcopy_switch_in_pass_one_of_a_big_guest(src: TestBackend,
                                                          dst: TestBackend) -> None:
    """The source's post-copy bookkeeping is about the pages dirtied, not the guest's size: a
    switch at the very start of pass 1 of a 1 GiB guest costs little, and the memory arrives.

    The bookkeeping lives as long as post-copy does (what the source's code allocated, still
    held once the switch is done: a set of the guest's pages would be ~20 MB); the process's
    peak also counts both ends' stream buffers, which hold more the longer a busy machine
    keeps the threads from sending what is queued (up to their high-water marks)."""
    spec = make_spec(1024)
    await src.start(spec, paused=False)
    expected = src.memory_digest(spec.uuid)
    tracemalloc.start()
    try:
        await switch_to_postcopy(src, dst, spec, MigrationTuning(postcopy=True), after_bytes=0)
        held = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, f"*/backend/test/{name}.py") for name in SOURCE_SIDE])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    await within(dst.incoming_wait(spec.uuid), 120)
    assert dst.memory_digest(spec.uuid) == expected
    bookkeeping = sum(stat.size for stat in held.statistics("lineno")
                      if not _run_buffer(stat.traceback[0]))
    assert bookkeeping < BOUND // 16, f"the switch's bookkeeping holds {bookkeeping} bytes"
    assert peak < BOUND, f"the switch cost {peak} bytes"
