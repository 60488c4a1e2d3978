"""Bounded waits: poll a condition until it holds, or fail naming what never happened.

A test that sleeps "long enough" for something to happen is slow on an idle machine and wrong on
a busy one.  Wait on the condition instead: :func:`wait_until` (async; the condition may be a
plain or an async function) and :func:`wait_until_sync` check it at once, then every
``interval`` seconds, and return its first truthy value.  When ``timeout`` seconds pass without
it, they raise :class:`WaitTimeout` with ``what`` in the message: a wait never falls through.

Where the daemon pushes what you wait for, wait on that stream: :func:`wait_for_job` reads the
job watch (``WatchJob``) until the migration job's info satisfies a condition;
:func:`wait_job_streaming` until a migration is under way.

Timeouts are bounds, not timings: make them generous (they cost nothing when the condition
holds), so that a loaded machine does not fail a correct test.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar, overload

from virtmig.client.connection import AsyncConnection, DomainKey, JobInfo

T = TypeVar("T")
What = str | Callable[[], str]


class WaitTimeout(AssertionError, TimeoutError):
    """A bounded wait ran out.  An ``AssertionError``, so a test fails (not errors) with it; a
    ``TimeoutError``, for code that handles timeouts."""


def _timed_out(what: What, timeout: float) -> WaitTimeout:
    text = what() if callable(what) else what
    return WaitTimeout(f"timed out after {timeout:g} s waiting for {text}")


@overload
async def wait_until(cond: Callable[[], Awaitable[T | None]], *, timeout: float, what: What,
                     interval: float = ...) -> T: ...


@overload
async def wait_until(cond: Callable[[], T | None], *, timeout: float, what: What,
                     interval: float = ...) -> T: ...


async def wait_until(cond: Callable[[], object], *, timeout: float, what: What,
                     interval: float = 0.01) -> object:
    """Call ``cond`` (plain or async) until it returns a truthy value; return that value.

    ``what`` names the awaited condition in the :class:`WaitTimeout` message; a callable is
    asked only then (to show the state that was reached).  An exception from ``cond``
    propagates at once.  ``interval=0`` only yields to the event loop between checks.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = cond()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise _timed_out(what, timeout)
        await asyncio.sleep(interval)


def wait_until_sync(cond: Callable[[], T | None], *, timeout: float, what: What,
                    interval: float = 0.01) -> T:
    """:func:`wait_until` for code without an event loop (blocks the thread between checks)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout)
        time.sleep(interval)


async def wait_for_job(conn: AsyncConnection, dom: DomainKey, cond: Callable[[JobInfo], bool],
                       *, timeout: float, what: What, interval: float = 0.01) -> JobInfo:
    """Read the job watch of ``dom`` until an info satisfies ``cond``; return that info.

    The watch ends at once when the domain has no job (the migration may not have started
    yet) and when the job ends: it is then opened again, until ``timeout``.
    """

    async def watched() -> JobInfo | None:
        async for info in conn.watch_job(dom):
            if cond(info):
                return info
        return None

    try:
        async with asyncio.timeout(timeout):
            found = await wait_until(watched, timeout=timeout, what=what, interval=interval)
    except TimeoutError as exc:
        if isinstance(exc, WaitTimeout):
            raise
        raise _timed_out(what, timeout) from None
    return found


async def wait_job_streaming(conn: AsyncConnection, dom: DomainKey, *,
                             timeout: float = 60) -> JobInfo:
    """Until the migration of ``dom`` streams: its job on the source (``conn``) is in Perform
    (``perform3``, or protocol v2's ``perform2``) and has sent data.  Returns that job info."""
    return await wait_for_job(
        conn, dom, lambda i: i.phase in ("perform3", "perform2") and i.data_processed > 0,
        timeout=timeout,
        what=f"the migration of {dom} to stream")
