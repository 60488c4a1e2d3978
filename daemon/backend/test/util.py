"""Small asyncio and time helpers shared by both ends of a test-backend migration."""

from __future__ import annotations

import asyncio
from typing import Any

from virtmig.daemon.backend.base import MigrationProgress


def ms(seconds: float) -> int:
    """``seconds`` as whole milliseconds, never negative."""
    return max(0, round(seconds * 1000))


def future() -> asyncio.Future[Any]:
    """A new future of the running loop (a dataclass field default)."""
    return asyncio.get_running_loop().create_future()


def retrieve(fut: asyncio.Future[MigrationProgress]) -> None:
    """Mark a future's exception as retrieved: nobody may ever wait for it."""
    if not fut.cancelled():
        fut.exception()
