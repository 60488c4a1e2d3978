"""A connection's session (``RpcConnection.open_session`` / ``start_session``): one session for
callers at the same time, a failed opening tried again, an opening on its way ended by close."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from virtmig.client.connection import AsyncConnection
from virtmig.proto.errors import ConnectionFailed
from virtmig.testing import Host, start_host, stop_host, wait_until


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    h = await start_host(tmp_path, "solo")
    yield h
    await stop_host(h)


async def test_callers_at_once_share_one_session(host: Host) -> None:
    conn = await AsyncConnection.open(host.uri)
    try:
        before = set(host.daemon.sessions)
        ids = await asyncio.gather(conn.open_session(), conn.open_session(), conn.open_session())
        assert len(set(ids)) == 1 and ids[0]
        assert set(host.daemon.sessions) - before == {ids[0]}
        started = conn.start_session()
        assert started.done() and conn.start_session() is started  # open: nothing to start
    finally:
        await conn.close()
    await wait_until(lambda: ids[0] not in host.daemon.sessions, timeout=10,
                     what="the session's end at the daemon")


async def test_a_failed_opening_is_tried_again(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await AsyncConnection.open(host.uri)
    real = type(conn)._open_session
    failures = [ConnectionFailed("the daemon closed the session at once")]

    async def flaky(self: AsyncConnection) -> None:
        if failures:
            raise failures.pop()
        await real(self)

    monkeypatch.setattr(type(conn), "_open_session", flaky)
    try:
        conn.start_session()  # fails in the background: nobody waits for it yet
        with pytest.raises(ConnectionFailed):
            await conn.open_session()
        assert await conn.open_session() in host.daemon.sessions
    finally:
        await conn.close()


async def test_close_ends_an_opening_on_its_way(host: Host,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    conn = await AsyncConnection.open(host.uri)
    entered, hold = asyncio.Event(), asyncio.Event()

    async def held(self: AsyncConnection) -> None:
        entered.set()
        await hold.wait()

    monkeypatch.setattr(type(conn), "_open_session", held)
    opening = conn.start_session()
    await entered.wait()  # (the opening is on its way)
    await conn.close()
    assert opening.cancelled()
