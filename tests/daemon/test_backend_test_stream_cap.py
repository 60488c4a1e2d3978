"""The bound on the test backend's stream threads (``test_stream_threads``, issue 17): two
threads per stream, half of the bound for outgoing streams and half for incoming ones.  More
concurrent migrations than that all succeed, a stream beyond the bound waiting for a slot; the
threads a backend runs never exceed it (counted by name, each time one starts); a migration
waiting for a slot is cancelled on the source, or aborted on the destination, without touching
the ones that run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.daemon.backend_test_helpers import (
    LOOPBACK,
    MIB,
    make_spec,
    to,
    wait_for_progress,
    within,
)
from tests.daemon.test_stream_security import dst_tuning, src_tuning
from virtmig.daemon.backend.base import (
    GuestRunState,
    MigrationCancelled,
    MigrationFailed,
    MigrationTuning,
)
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.backend.test.channel import THREAD_PREFIX, Channel, StreamSlots
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.main import make_backend
from virtmig.proto.errors import InvalidArgument
from virtmig.testing import wait_until

CAP = 8  # threads per backend: 2 outgoing and 2 incoming streams


def kind(name: str) -> str | None:
    """``out`` or ``in`` for a stream thread's name (else None)."""
    if not name.startswith(THREAD_PREFIX + "-"):
        return None
    return name[len(THREAD_PREFIX) + 1:].split("-")[0]


def live() -> Counter[str | None]:
    return Counter(kind(t.name) for t in threading.enumerate())


@pytest.fixture
def peaks(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """The most stream threads of each kind alive at once: counted as each one starts (the
    count only grows then, so no peak is missed)."""
    most: Counter[str] = Counter()
    lock = threading.Lock()
    start = threading.Thread.start

    def counting(self: threading.Thread) -> None:
        start(self)
        what = kind(self.name)
        if what is not None:
            with lock:
                most[what] = max(most[what], live()[what])

    monkeypatch.setattr(threading.Thread, "start", counting)
    return most


@pytest.fixture
async def capped() -> AsyncIterator[tuple[TestBackend, TestBackend]]:
    src, dst = TestBackend(stream_threads=CAP), TestBackend(stream_threads=CAP)
    yield src, dst
    await within(src.close())
    await within(dst.close())


async def no_stream_threads() -> None:
    await wait_until(lambda: not (live() - Counter({None: 10**9})), timeout=15,
                     what=lambda: f"the stream threads to end: {live()}")


async def slots_free(slots: StreamSlots) -> None:
    """Every slot given back (a channel gives its slot through the loop as its threads end)."""
    await wait_until(lambda: slots.free == slots.streams, timeout=15,
                     what=lambda: f"{slots.streams} free {slots.kind} slots: {slots.free}")


@pytest.mark.parametrize(("extra", "protected"), [(1, False), (4, False), (3, True)],
                         ids=["plain-1", "plain-4", "tls-token-3"])
async def test_more_migrations_than_the_bound_all_succeed_within_it(
    capped: tuple[TestBackend, TestBackend], peaks: Counter[str], extra: int, protected: bool
) -> None:
    """CAP // 4 + ``extra`` migrations at once (paced, so that they overlap; over TLS with a
    stream token too, whose connections prove themselves in the destination's threads): each
    arrives whole; the source ran CAP // 2 outgoing stream threads at most and at times, the
    destination never more than CAP // 2 incoming ones."""
    src, dst = capped
    await no_stream_threads()
    n = CAP // 4 + extra
    specs = [make_spec(8) for _ in range(n)]
    tuning = dataclasses.replace(src_tuning() if protected else MigrationTuning(),
                                 bandwidth_bytes_per_s=64 * MIB)

    async def one(spec_index: int) -> None:
        spec = specs[spec_index]
        await src.start(spec, paused=False)
        port = await dst.incoming_start(spec, LOOPBACK, dst_tuning() if protected else None)
        await within(src.outgoing(spec.uuid, to(port), tuning), 60)
        await within(dst.incoming_wait(spec.uuid), 60)

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        await within(asyncio.gather(*tasks), 90)
    finally:
        for t in tasks:
            t.cancel()
    for spec in specs:
        assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
    # The bound was reached, never passed (so some of the n streams waited for a slot).
    assert peaks["out"] == CAP // 2
    assert peaks["in"] <= CAP // 2
    await no_stream_threads()
    await slots_free(src.out_slots)
    await slots_free(dst.in_slots)


@pytest.mark.parametrize("where", ["source", "destination"])
async def test_a_migration_waiting_for_a_slot_can_be_aborted(peaks: Counter[str],
                                                             where: str) -> None:
    """One stream each way at most (``stream_threads`` 4 on the side under test): a second
    migration waits for the first's slot; cancelling it on the source (``domjobabort``), or
    destroying its guest on the destination, ends it at once, while the first runs on and then
    completes; every slot is free again afterwards."""
    src = TestBackend(stream_threads=4 if where == "source" else CAP)
    dst = TestBackend(stream_threads=4 if where == "destination" else CAP)
    slots = src.out_slots if where == "source" else dst.in_slots
    try:
        await no_stream_threads()
        first, second = make_spec(64), make_spec(8)
        slow = dataclasses.replace(MigrationTuning(), bandwidth_bytes_per_s=8 * MIB)
        for spec in (first, second):
            await src.start(spec, paused=False)
        port1 = await dst.incoming_start(first, LOOPBACK)
        out1 = asyncio.create_task(src.outgoing(first.uuid, to(port1), slow))
        await wait_for_progress(src, first.uuid, 1 * MIB)
        port2 = await dst.incoming_start(second, LOOPBACK)
        out2 = asyncio.create_task(src.outgoing(second.uuid, to(port2), MigrationTuning()))
        try:
            await wait_until(lambda: slots.waiting == 1, timeout=15,
                             what=lambda: f"the second migration to wait for a slot: "
                             f"{src.progress(second.uuid)}")
            if where == "source":
                await src.cancel(second.uuid)
                with pytest.raises(MigrationCancelled):
                    await within(out2)
                await dst.destroy(second.uuid)
            else:
                await dst.destroy(second.uuid)
                with pytest.raises(MigrationFailed):
                    await within(out2)
            with pytest.raises(MigrationFailed):
                await within(dst.incoming_wait(second.uuid))
            assert src.state(second.uuid) is GuestRunState.RUNNING
            assert slots.waiting == 0
            assert not out1.done()  # the first one ran on
            await src.set_tuning(first.uuid, bandwidth_bytes_per_s=0)
            await within(out1, 60)
            await within(dst.incoming_wait(first.uuid), 60)
            assert dst.memory_digest(first.uuid) == src.memory_digest(first.uuid)
        finally:
            out1.cancel()
            out2.cancel()
        await no_stream_threads()
        await slots_free(slots)
        assert peaks[slots.kind] == 2  # one stream's two threads, never more
    finally:
        await within(src.close())
        await within(dst.close())


async def test_a_flood_of_connections_to_a_protected_port_stays_within_the_bound(
    peaks: Counter[str]
) -> None:
    """Connections to a TLS port that never say a word each wait for a slot before a thread
    proves them (one incoming stream at most here: two threads); once they close, the
    source's own connection gets its turn and the migration completes."""
    src, dst = TestBackend(), TestBackend(stream_threads=4)
    floods: list[asyncio.StreamWriter] = []
    try:
        await no_stream_threads()
        spec = make_spec(8)
        await src.start(spec, paused=False)
        port = await dst.incoming_start(spec, LOOPBACK, dst_tuning())
        for _ in range(6):
            floods.append((await asyncio.open_connection("127.0.0.1", port))[1])
        await wait_until(lambda: dst.in_slots.waiting == 5, timeout=15,
                         what=lambda: f"five connections waiting: {dst.in_slots.waiting}")
        assert live()["in"] <= 2
        for w in floods:
            w.close()
        await within(src.outgoing(spec.uuid, to(port), src_tuning()), 30)
        await within(dst.incoming_wait(spec.uuid), 30)
        assert dst.memory_digest(spec.uuid) == src.memory_digest(spec.uuid)
        await no_stream_threads()
        assert peaks["in"] <= 2
        await slots_free(dst.in_slots)
    finally:
        for w in floods:
            w.close()
        await within(src.close())
        await within(dst.close())


def test_the_setting_is_typed_and_bounded_and_reaches_the_backend(tmp_path: Path) -> None:
    """``test_stream_threads``: a whole number of at least 4; the daemon's test backend gets a
    quarter of it as outgoing streams and a quarter as incoming ones."""
    cfg = tmp_path / "virtmigd.toml"
    for bad, reason in (("3", "expected an integer in 4..65536"), ('"8"', "a whole number")):
        cfg.write_text(f"test_stream_threads = {bad}\n")
        with pytest.raises(InvalidArgument, match=reason):
            load_config(build_parser().parse_args(["--config", str(cfg)]))
    cfg.write_text("test_stream_threads = 12\n")
    config = load_config(build_parser().parse_args(["--config", str(cfg)]))
    assert config.test_stream_threads == 12
    backend = make_backend("test", config)
    assert isinstance(backend, TestBackend)
    assert (backend.out_slots.streams, backend.in_slots.streams) == (3, 3)
    assert TestBackend().out_slots.streams == 64  # the default, 256 threads


async def test_a_slot_goes_back_only_once_its_threads_have_exited(
    capped: tuple[TestBackend, TestBackend], peaks: Counter[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream's threads linger a moment after their work (the last one ends the channel as it
    returns): with that moment made long, the bound still holds, since the slot goes back
    only once they are gone (given back as the work ended, a new stream's threads started
    beside the old ones: 5 outgoing threads against a bound of 4, seen on a loaded machine)."""
    run = Channel._run

    def lingering(self: Channel, target: Callable[[], None]) -> None:
        run(self, target)
        time.sleep(0.05)

    monkeypatch.setattr(Channel, "_run", lingering)
    await test_more_migrations_than_the_bound_all_succeed_within_it(capped, peaks, 4, False)
