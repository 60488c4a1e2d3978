"""A test daemon that does not stop fails its teardown within ``STOP_TIMEOUT``, naming what its
event loop waits on (every task's stack), instead of hanging until pytest-timeout, whose dump
shows only the threads (a full run once hung 180 s there, in
``test_confirm_cancelled_after_the_stream_asks_the_destination[lost...]``, with nothing to go
on)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest

from virtmig.testing import Host
from virtmig.testing.hosts import stop_host


async def test_a_daemon_that_does_not_stop_fails_with_the_tasks_stacks() -> None:
    closed = asyncio.Event()

    async def close() -> None:
        closed.set()

    async def never_stops(grace: float) -> None:
        await asyncio.Event().wait()  # (what a stuck shutdown looks like)

    host = SimpleNamespace(uri="virtmig+tls://127.0.0.1:1", conn=SimpleNamespace(close=close),
                           running=SimpleNamespace(stop=never_stops))
    with pytest.raises(AssertionError) as info:
        await stop_host(cast(Host, cast(Any, host)), timeout=0.2)
    assert closed.is_set()
    assert "did not stop within 0.2 s" in str(info.value)
    assert "never_stops" in str(info.value)  # the stack of what it waits on


async def test_a_daemon_that_stops_is_stopped() -> None:
    stopped: list[float] = []

    async def close() -> None:
        pass

    async def stop(grace: float) -> None:
        stopped.append(grace)

    host = SimpleNamespace(uri="u", conn=SimpleNamespace(close=close),
                           running=SimpleNamespace(stop=stop))
    await stop_host(cast(Host, cast(Any, host)))
    assert stopped == [0.5]
