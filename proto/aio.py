"""Asyncio helpers shared by the daemon, the client and the test harness.

:func:`within` replaces ``asyncio.wait_for`` everywhere in virtmig (ruff bans the latter): on
Python 3.11, ``wait_for`` drops a cancellation that arrives in the step its awaitable finishes
(it returns the result instead), so a task cancelled at that moment goes on as if nothing had
happened; a daemon stopping then waits for a loop that was told to end and did not (it hung a
settling task for its whole backoff).  ``asyncio.timeout`` has no such window.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw`` for at most ``timeout`` seconds (``None``: no bound); :class:`TimeoutError`
    when the time runs out, and a cancellation of the caller always propagates."""
    async with asyncio.timeout(timeout):
        return await aw
