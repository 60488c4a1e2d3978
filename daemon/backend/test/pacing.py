"""Rates and limits of a test-backend migration: pacing, expected downtime, auto-converge.

Pacing: ``bandwidth_bytes_per_s`` is paced by sleeping between batches (smaller batches when
throttled); every batch is one ``write`` + ``drain`` followed by a yield, so the daemon's other
RPCs on the same event loop stay responsive.  A new rate (``set_tuning``) applies to the next
batch and cuts a pacing sleep in progress short.

Convergence: after each pre-copy pass the expected downtime is (dirty pages * 4096) / the
transfer rate of that pass; the source stops the guest for the last pass once it is within
``max_downtime_ms``.

Auto-converge (``tuning.auto_converge``): QEMU's heuristic: after a pass that did not converge, if
the bytes the guest dirtied since the previous dirty-log sync are at least half the bytes sent in
that pass (the dirty rate is at least half the transfer rate), the guest is throttled --
``auto_converge_initial`` % the first time, ``+ auto_converge_increment`` each further time, at
most 99 % (both settings are clamped to 1..99).  Unlike QEMU there is no "two periods in a row"
delay.
"""

from __future__ import annotations

import asyncio
import time

from virtmig.daemon.backend.base import MigrationTuning
from virtmig.daemon.backend.test.memory import PAGE_SIZE

BATCH_PAGES = 256  # 1 MiB of page data per write when unthrottled
MAX_THROTTLE = 99
NEVER_MS = float(1 << 31)  # the expected downtime when nothing can be sent


def expected_downtime_ms(remaining_bytes: int, rate: float) -> float:
    """Milliseconds to send ``remaining_bytes`` at ``rate`` bytes/s."""
    if remaining_bytes == 0:
        return 0.0
    if rate > 0:
        return remaining_bytes / rate * 1000
    return NEVER_MS


def wants_throttle(dirtied_bytes: int, pass_bytes: int) -> bool:
    """Auto-converge: the guest dirtied at least half as much as the pass sent."""
    return dirtied_bytes * 2 >= pass_bytes


def next_throttle(current: int, tuning: MigrationTuning) -> int:
    """Auto-converge: the throttle percentage after ``current`` (0: not throttled yet)."""
    if current:
        step = min(MAX_THROTTLE, max(1, tuning.auto_converge_increment))
        return min(MAX_THROTTLE, current + step)
    return min(MAX_THROTTLE, max(1, tuning.auto_converge_initial))


class Pacer:
    """Sleep-based pacing to an average of ``rate`` bytes/s (0: unlimited, just yield).

    ``set_rate`` applies to the next batch; it and ``poke`` cut a pacing sleep short.
    """

    def __init__(self, rate: int) -> None:
        self._wake = asyncio.Event()
        self.set_rate(rate)

    def set_rate(self, rate: int) -> None:
        self.rate = max(0, rate)
        self.batch_pages = (
            max(1, min(BATCH_PAGES, self.rate // PAGE_SIZE // 20)) if self.rate else BATCH_PAGES
        )
        self._next = time.monotonic()
        self._wake.set()

    def poke(self) -> None:
        self._wake.set()

    def delay(self) -> float:
        """Seconds until the next batch is due."""
        return max(0.0, self._next - time.monotonic()) if self.rate else 0.0

    def consume(self, nbytes: int) -> None:
        if self.rate:
            self._next = max(self._next, time.monotonic()) + nbytes / self.rate

    async def wait(self) -> None:
        """Sleep until the next batch is due or a poke; always yields."""
        delay = self.delay()
        if delay <= 0:
            await asyncio.sleep(0)
            return
        self._wake.clear()
        try:
            async with asyncio.timeout(delay):
                await self._wake.wait()
        except TimeoutError:
            pass

    async def pace(self, nbytes: int) -> None:
        self.consume(nbytes)
        await self.wait()
