"""virtmig.proto.aio.within: asyncio.wait_for's contract, without dropping a cancellation that
arrives in the step the awaited work finishes (what Python 3.11's wait_for does)."""

from __future__ import annotations

import asyncio

import pytest

from virtmig.proto.aio import within


async def test_within_returns_the_result_or_times_out() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    assert await within(answer(), 5) == 42
    assert await within(answer(), None) == 42
    with pytest.raises(TimeoutError):
        await within(asyncio.Event().wait(), 0.01)


async def test_a_cancel_that_meets_the_result_still_cancels() -> None:
    """The awaited work cancels its own caller and returns at once: the caller ends cancelled
    at its next step, never carrying on with the result."""
    carried_on: list[int] = []

    async def caller() -> None:
        async def cancels_the_caller() -> int:
            me.cancel()
            return 1

        carried_on.append(await within(asyncio.ensure_future(cancels_the_caller()), 5))
        await asyncio.sleep(0)  # the cancel lands here at the latest
        carried_on.append(2)

    me = asyncio.ensure_future(caller())
    with pytest.raises(asyncio.CancelledError):
        await me
    assert 2 not in carried_on
