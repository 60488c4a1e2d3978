"""A guest runs in one place, on the ``qemu`` backend: a source daemon restarted while its
migration's outcome is unknown (Finish's reply lost, the destination unreachable) takes its
paused QEMU guest back, never resumes it, says what it waits for, and settles the outcome with
the destination once that answers.  Skipped without QEMU or the test guest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.migration_helpers import F, P
from tests.daemon.placement_helpers import FAST, Gate, LostFinishDest
from tests.daemon.test_failure_matrix_qemu import guest, qemu_status
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.proto.errors import GuestElsewhere, OperationFailed
from virtmig.proto.flags import DomainState
from virtmig.proto.params import TypedParams
from virtmig.testing import (
    Host,
    guest_or_skip,
    hosts,
    qemu_binary_or_skip,
    start_host,
    stop_host,
    wait_until,
)

pytestmark = pytest.mark.qemu


async def test_restart_in_perform3_done_settles_with_the_destination_on_qemu(
    tmp_path: Path
) -> None:
    qemu_binary_or_skip()
    guest_or_skip()
    async with hosts(tmp_path, "qemu", ("src", dict(FAST)), ("dst", dict(FAST))) as (src, dst):
        gate = Gate(dst)  # shut: the source daemon cannot ask the destination
        again: Host | None = None
        try:
            uuid = await guest(src)
            with pytest.raises(OperationFailed, match="left paused here"):
                await run_v3(RemoteSource(src.conn, True), LostFinishDest(dst.conn, True),
                             "vm1", TypedParams.of({P.DEST_URI: gate.uri}), F.LIVE,
                             protection=True)
            assert (await src.conn.job_info("vm1")).phase == "perform3_done"
            await stop_host(src)  # its QEMU guest outlives it
            again = await start_host(tmp_path, "src", backend="qemu",
                                     **FAST)  # type: ignore[arg-type]

            async def waiting() -> str | None:
                assert again is not None
                state, _r, _n, detail = await again.conn.state_detail("vm1")
                assert state is DomainState.PAUSED  # taken back, never resumed
                return detail if "waiting for its daemon" in detail else None

            await wait_until(waiting, timeout=60, what="the source to say what it waits for")
            with pytest.raises(GuestElsewhere, match="migrate-resolve"):
                await again.conn.resume("vm1")
            await gate.open()

            async def settled() -> bool:
                assert again is not None
                return await again.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")

            await wait_until(settled, timeout=60, what="the outcome to be settled")
            assert await qemu_status(again, uuid) == "gone"
            assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
            assert await qemu_status(dst, uuid) == "running"
        finally:
            await gate.shut()
            if again is not None:
                await stop_host(again)
