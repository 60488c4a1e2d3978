"""The source side of a QEMU migration: ``migrate``, follow it, and settle how it ended.

Concern: the QMP flow on the source (see :mod:`~virtmig.daemon.backend.qemu.migration` for the
whole story): set capabilities and parameters, issue ``migrate``, follow ``MIGRATION`` events and
``query-migrate`` until the stream completed, failed or was cancelled, or until QEMU switched to
post-copy (then a follower task waits for the last page).  After a failure or a cancel the source
runs again if it ran before; after the switch it is never resumed.

A cancel always ends, even when QEMU's main loop is blocked: in the completion phase QEMU writes
the last pages and the device state holding the big QEMU lock, and a destination that stopped
reading blocks that write -- and every ordinary QMP command, ``migrate_cancel`` included -- for
good.  So ``migrate_cancel`` gets CANCEL_ANSWER_TIMEOUT to be answered, and the migration
CANCEL_TIMEOUT to end; else the migration's sockets (multifd channels included: all of them are
the ``migration`` yank instance) are shut down with the out-of-band ``yank`` (QEMU >= 6.0), the
blocked write fails and the migration ends as ``failed`` (QEMU restarts the vCPUs it stopped).
If QEMU still does not end it within YANK_TIMEOUT, the flow gives up with a MigrationFailed and
leaves the guest as it is (paused; never stopped: a guest is never lost).

Every function runs on the source (``src_``) and is given the backend's QMP path as ``qmp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import replace
from typing import Any

from virtmig.daemon.backend.base import (
    BackendError,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    PostcopyFailed,
    StreamAddress,
)
from virtmig.daemon.backend.qemu.confine import RunAs
from virtmig.daemon.backend.qemu.guest import _Guest, _wait_guest
from virtmig.daemon.backend.qemu.migration import (
    _POSTCOPY_BROKEN,
    _STATUS_MAP,
    _TERMINAL,
    _bandwidth,
    _downtime,
    _int,
    _Outgoing,
    _src_settings,
    progress_from_query,
)
from virtmig.daemon.backend.qemu.monitor import (
    Exec,
    QmpCommandFailed,
    QmpNoAnswer,
    migration_with_status,
    refresh_status,
    together,
)
from virtmig.daemon.backend.qemu.tls import add_tls_creds, drop_tls_creds
from virtmig.proto import logsafe
from virtmig.proto.aio import within

log = logsafe.logger("virtmig.daemon.backend.qemu")

PROGRESS_INTERVAL = 0.25  # query-migrate while a migration runs
RECHECK_INTERVAL = 1.0  # the flow looks again even when no event came
FINAL_STATS_RETRIES = 50  # re-query a completed migration until total-time is filled in
CANCEL_ANSWER_TIMEOUT = 3.0  # migrate_cancel (and yank) must be answered within
CANCEL_TIMEOUT = 10.0  # from the cancel request to the migration's end, else yank
YANK_TIMEOUT = 10.0  # from the yank to the migration's end, else give up
STOP_TIMEOUT = CANCEL_TIMEOUT + YANK_TIMEOUT  # the longest a cancel takes to end the flow
FINALIZE_TIMEOUT = 10.0  # a failed migration leaves finish-migrate (QEMU restarts the vCPUs)
FINALIZE_POLL = 0.1  # query-status while QEMU finishes a failed migration


async def src_migrate(
    qmp: Exec, guest: _Guest, mig: _Outgoing, dest: StreamAddress, *, owner: RunAs | None = None
) -> MigrationProgress:
    """Run the migration ``mig`` of ``guest`` to ``dest``: the final progress, or the progress
    at the switch to post-copy; ``MigrationFailed``/``MigrationCancelled`` otherwise.

    ``owner``: whom QEMU runs as (it reads the TLS credentials of a ``tuning.tls`` migration).
    """
    try:
        return await _src_run(qmp, guest, mig, dest, owner)
    except asyncio.CancelledError:
        # Our caller gave up: stop the migration too, and put the source back -- unless
        # post-copy was asked for: QEMU may switch at any moment, and a cancel after the
        # switch would restart the source.  Then the migration goes on by itself.
        if mig.postcopy_requested and not mig.switched:
            await src_wait_switch_or_end(guest, mig, CANCEL_TIMEOUT)
        if mig.switched:
            _src_ensure_follower(qmp, guest, mig)
            raise
        if mig.postcopy_requested and guest.mig_status not in _TERMINAL:
            mig.final = replace(mig.last, status=MigrationStatus.FAILED,
                                error="migration no longer followed")
            raise
        if mig.issued:
            with contextlib.suppress(BackendError):
                await _src_cancel_and_wait(qmp, guest, mig)
        await _src_settle_failed(qmp, guest, mig, MigrationCancelled("migration cancelled"))
        raise
    finally:
        if mig.switched:
            _src_ensure_follower(qmp, guest, mig)  # it sets ``done`` at the very end
        else:
            mig.done.set()


async def _src_run(
    qmp: Exec, guest: _Guest, mig: _Outgoing, dest: StreamAddress, owner: RunAs | None
) -> MigrationProgress:
    try:
        await _src_issue(qmp, guest, mig, dest, owner)
    except BackendError as exc:
        if mig.switched:  # (a command failed after the switch: never roll back)
            return await _src_switched(qmp, guest, mig)
        raise await _src_settle_failed(qmp, guest, mig, MigrationFailed(str(exc))) from None
    if not mig.issued:  # cancelled before it started
        raise await _src_settle_failed(qmp, guest, mig,
                                       MigrationCancelled("migration cancelled"))
    guest.start_task(_src_poll_progress(qmp, guest, mig))
    try:
        while True:
            changed = guest.changed()
            if mig.switched:
                return await _src_switched(qmp, guest, mig)
            if guest.exited:
                quit_error = MigrationFailed(f"guest unexpectedly quit: {guest.exit_reason}")
                raise await _src_settle_failed(qmp, guest, mig, quit_error)
            if guest.mig_status in _TERMINAL:
                break
            if mig.cancel_at:  # cancelled: bounded, whatever QEMU does
                if not await _src_wait_cancelled(qmp, guest, mig):
                    raise _src_give_up(guest, mig)
                continue
            with contextlib.suppress(TimeoutError):  # (events wake it; the timer is a backstop)
                await within(changed.wait(), RECHECK_INTERVAL)
    finally:
        if not mig.switched:  # (after the switch it keeps progress() fresh until the end)
            _src_stop_polling(guest, mig)
    if guest.mig_status == "completed":
        return await _src_completed(qmp, guest, mig)
    raise await _src_settle_failed(qmp, guest, mig, await _src_ended_error(qmp, guest, mig))


async def _src_issue(qmp: Exec, guest: _Guest, mig: _Outgoing, dest: StreamAddress,
                     owner: RunAs | None) -> None:
    """Capabilities, TLS credentials, parameters, ``migrate`` (unless cancelled first), and a
    cancel or a switch to post-copy asked for while ``migrate`` was on its way."""
    caps, params = _src_settings(mig.tuning)
    set_caps = qmp(guest, "migrate-set-capabilities", {"capabilities": caps})
    if mig.tuning.tls is None:
        await together(set_caps, qmp(guest, "migrate-set-parameters", params))
    else:  # the parameters name the credentials object: it goes in first
        await set_caps
        await add_tls_creds(qmp, guest, mig.tuning.tls, server=False, owner=owner)
        await qmp(guest, "migrate-set-parameters", params)
    if not mig.cancel_requested:
        guest.mig_status = "setup"
        mig.issued = True
        mig.log_at = guest.log_size()
        await qmp(guest, "migrate", {"uri": str(dest)})
        if mig.cancel_requested:  # cancel() came while "migrate" was on its way
            await _src_request_cancel(qmp, guest, mig)
        elif mig.postcopy_requested:  # start_postcopy() came before "migrate"
            try:
                await qmp(guest, "migrate-start-postcopy")
            except QmpCommandFailed as exc:  # it goes on as pre-copy
                log.error("qemu backend: guest %s: cannot switch to post-copy: %s",
                          guest.uuid, exc)


async def _src_ended_error(
    qmp: Exec, guest: _Guest, mig: _Outgoing
) -> MigrationFailed | MigrationCancelled:
    """The stream ended without completing: the last statistics, and why it ended."""
    try:
        info = await qmp(guest, "query-migrate")
    except BackendError:
        info = {}
    mig.last = replace(progress_from_query(info), status=_STATUS_MAP[guest.mig_status])
    if mig.abort_reason:
        return MigrationFailed(mig.abort_reason)
    if guest.mig_status == "cancelled" or mig.cancel_requested:
        # A cancel that finds the stream blocked in a write ends as "failed" ("Unable to
        # write to socket: Broken pipe": the cancel shut the socket down); we asked for it.
        return MigrationCancelled("migration cancelled")
    # QEMU does not always say why in query-migrate (a TLS peer that hung up after the
    # handshake: "Cannot write to TLS channel"); its log does.
    return MigrationFailed(mig.last.error or guest.log_tail(since=mig.log_at)
                           or "migration failed")


async def _src_switched(qmp: Exec, guest: _Guest, mig: _Outgoing) -> MigrationProgress:
    """QEMU switched to post-copy: the source is stopped for good; the rest streams on."""
    with contextlib.suppress(BackendError):
        await refresh_status(qmp, guest)
    with contextlib.suppress(BackendError):
        info = await qmp(guest, "query-migrate")
        if mig.final is None:
            mig.last = progress_from_query(info)
    switched = replace(mig.last, status=MigrationStatus.POSTCOPY_ACTIVE)
    if mig.final is None and mig.last.status not in (MigrationStatus.COMPLETED,
                                                     MigrationStatus.FAILED):
        mig.last = switched
    _src_ensure_follower(qmp, guest, mig)
    return switched


def _src_ensure_follower(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    if mig.follower is None and not mig.done.is_set():
        mig.follower = guest.start_task(_src_follow_postcopy(qmp, guest, mig))


async def src_wait_switch_or_end(guest: _Guest, mig: _Outgoing, timeout: float) -> None:
    """Post-copy was asked for: wait (bounded) until QEMU switched or the migration ended."""
    await _wait_guest(guest, timeout, lambda: mig.switched or guest.mig_status in _TERMINAL
                      or guest.exited or guest.qmp is None)


async def _src_follow_postcopy(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """After the switch: wait for the last page, or for the stream to break.

    The source is never resumed here: past the switch the destination holds the newest state.
    A broken stream leaves QEMU in ``postcopy-paused`` (a recovery could follow, but virtmig
    does not attempt one) and the source paused.
    """
    try:
        while True:
            changed = guest.changed()
            if guest.mig_status == "completed" and not guest.exited:
                await _src_completed(qmp, guest, mig)
                return
            if guest.exited:
                error = f"guest unexpectedly quit: {guest.exit_reason}"
                break
            if guest.mig_status in _POSTCOPY_BROKEN:
                error = await _src_postcopy_broken(qmp, guest, mig)
                break
            await changed.wait()
        log.error("qemu backend: guest %s: %s", guest.uuid, error)
        mig.final = replace(mig.last, status=MigrationStatus.FAILED, error=error)
    finally:
        if mig.final is None:  # cancelled: the guest quit, or the backend closed
            error = (f"guest unexpectedly quit: {guest.exit_reason}" if guest.exited
                     else mig.abort_reason or "post-copy migration no longer followed")
            mig.final = replace(mig.last, status=MigrationStatus.FAILED, error=error)
        mig.done.set()


async def _src_postcopy_broken(qmp: Exec, guest: _Guest, mig: _Outgoing) -> str:
    """The post-copy stream broke: the last statistics, and the error with QEMU's words."""
    error = f"post-copy migration broke (QEMU: {guest.mig_status})"
    with contextlib.suppress(BackendError):
        info = await qmp(guest, "query-migrate")
        mig.last = progress_from_query(info)
        if info.get("error-desc"):
            error += f": {info['error-desc']}"
    if tail := guest.log_tail():
        error += f": {tail}"
    with contextlib.suppress(BackendError):
        await refresh_status(qmp, guest)
    return error


def _src_stop_polling(guest: _Guest, mig: _Outgoing) -> None:
    """End :func:`_src_poll_progress` without cancelling it: a query on its way when the stream
    ended (the end's own event wakes the poller too) is answered and read, where a cancel left
    its answer to come after its waiter was gone (qemu.qmp: "Unknown ID ..., message dropped",
    a warning in the daemon's log)."""
    mig.polling = False
    guest.notify()  # (a poller between queries wakes and ends)


async def _src_poll_progress(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """Keep ``mig.last`` fresh: every PROGRESS_INTERVAL and at every QMP event, until
    :func:`_src_stop_polling`.

    A query QEMU did not answer (its main loop is blocked) is not sent again before the next
    event: unanswered commands stay queued in QEMU, and a full queue would keep out the ``yank``
    too.  Meanwhile the progress stands still, which is what the stall watchdog looks for.
    """
    while not mig.done.is_set() and mig.polling:
        changed = guest.changed()
        try:
            info = await qmp(guest, "query-migrate")
        except BackendError:
            if guest.exited or guest.qmp is None:
                return
            await changed.wait()
            continue
        if mig.final is None:
            mig.last = progress_from_query(info)
        if not mig.polling:
            return
        with contextlib.suppress(TimeoutError):
            await within(changed.wait(), PROGRESS_INTERVAL)


async def _src_completed(qmp: Exec, guest: _Guest, mig: _Outgoing) -> MigrationProgress:
    """The stream completed: final statistics and the run status, asked together; the source
    stays paused (postmigrate)."""
    answer = await migration_with_status(qmp, guest)
    info: dict[str, Any] = answer if isinstance(answer, dict) else {}
    for _ in range(FINAL_STATS_RETRIES - 1):
        if isinstance(answer, BackendError) or _int(info, "total-time") > 0:
            break
        await asyncio.sleep(0.01)
        try:
            info = await qmp(guest, "query-migrate")
        except BackendError:
            break
    if guest.status == "running":  # never expected: QEMU leaves it in postmigrate
        log.error("qemu backend: guest %s still runs after its migration completed",
                  guest.uuid)
    final = replace(progress_from_query(info), status=MigrationStatus.COMPLETED,
                    remaining_bytes=0, error="")
    mig.final = final
    return final


async def _src_settle_failed(
    qmp: Exec, guest: _Guest, mig: _Outgoing, error: MigrationFailed | MigrationCancelled
) -> MigrationFailed | MigrationCancelled:
    """The migration failed or was cancelled: the source runs again if it ran before."""
    if not guest.exited:
        try:
            status = await _src_finalized_status(qmp, guest)
            if mig.was_running and status != "running":
                # QEMU restarts a guest it stopped itself; this covers the rest (never a
                # completed migration: that path does not come here).
                await qmp(guest, "cont")
                await refresh_status(qmp, guest)
        except BackendError as exc:
            log.error("qemu backend: cannot restore guest %s after a failed migration: %s",
                      guest.uuid, exc)
    outcome = (MigrationStatus.CANCELLED if isinstance(error, MigrationCancelled)
               else MigrationStatus.FAILED)
    mig.final = replace(mig.last, status=outcome, error=str(error))
    return error


async def _src_finalized_status(qmp: Exec, guest: _Guest) -> str:
    """The source's run state once QEMU has finished with the failed migration.

    A migration that failed in its completion phase (the vCPUs stopped, the last pages being
    written) leaves QEMU in ``finish-migrate`` until its migration thread has wound down; it then
    restarts the vCPUs itself, and a ``cont`` before that is refused ("Migration is not
    finalized yet").  So wait, bounded, for another state before deciding anything.
    """
    deadline = time.monotonic() + FINALIZE_TIMEOUT
    status = await refresh_status(qmp, guest)
    while status == "finish-migrate" and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            await within(guest.changed().wait(), FINALIZE_POLL)
        status = await refresh_status(qmp, guest)
    return status


async def _src_cancel_and_wait(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    await _src_request_cancel(qmp, guest, mig)
    if not await _src_wait_cancelled(qmp, guest, mig):
        log.error("qemu backend: guest %s: %s", guest.uuid, _no_end(guest, mig))


# --- cancelling, bounded --------------------------------------------------------------------------


async def _src_request_cancel(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """``migrate_cancel``; yank at once when QEMU does not answer it (its main loop is blocked).
    Raises only QEMU's refusal or a lost monitor."""
    mig.cancel_requested = True
    if not mig.cancel_at:
        mig.cancel_at = time.monotonic()
        guest.notify()  # the flow starts counting
    try:
        await qmp(guest, "migrate_cancel", timeout=CANCEL_ANSWER_TIMEOUT)
    except QmpNoAnswer:
        log.warning("qemu backend: guest %s: QEMU did not answer migrate_cancel in %s s",
                    guest.uuid, CANCEL_ANSWER_TIMEOUT)
        await _src_yank(qmp, guest, mig)


async def _src_wait_cancelled(qmp: Exec, guest: _Guest, mig: _Outgoing) -> bool:
    """After a cancel request: wait until the migration ended (True), yanking its sockets when
    it did not within CANCEL_TIMEOUT; False when it did not end within YANK_TIMEOUT after."""
    def ended() -> bool:
        return guest.mig_status in _TERMINAL or guest.exited or mig.switched

    await _wait_guest(guest, mig.cancel_at + CANCEL_TIMEOUT - time.monotonic(), ended)
    if ended():
        return True
    await _src_yank(qmp, guest, mig)
    await _wait_guest(guest, mig.yanked_at + YANK_TIMEOUT - time.monotonic(), ended)
    return ended()


async def _src_yank(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """Shut the migration's sockets down, out of band (once); never raises."""
    if mig.yanked_at:
        return
    mig.yanked_at = time.monotonic()
    log.warning("qemu backend: guest %s: the migration does not end: yanking its sockets",
                guest.uuid)
    try:
        await qmp(guest, "yank", {"instances": [{"type": "migration"}]},
                  timeout=CANCEL_ANSWER_TIMEOUT, oob=True)
    except QmpCommandFailed as exc:  # (no such instance: the migration was already over)
        log.info("qemu backend: guest %s: yank: %s", guest.uuid, exc)
    except BackendError as exc:
        log.error("qemu backend: guest %s: cannot yank the migration: %s", guest.uuid, exc)


def _no_end(guest: _Guest, mig: _Outgoing) -> str:
    return (f"QEMU did not end the migration after cancel and yank: still {guest.mig_status!r} "
            f"{time.monotonic() - mig.cancel_at:.0f} s after the cancel request")


def _src_give_up(guest: _Guest, mig: _Outgoing) -> MigrationFailed:
    """QEMU did not end a cancelled migration, even yanked: fail, and leave the guest as it is
    (QEMU does not answer; the daemon decides what to do with a guest that may be stuck)."""
    error = _no_end(guest, mig)
    log.error("qemu backend: guest %s: %s", guest.uuid, error)
    mig.final = replace(mig.last, status=MigrationStatus.FAILED, error=error)
    return MigrationFailed(error)


# --- requests while the migration runs ------------------------------------------------------------


async def src_cancel(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """Cancel a running migration (refused once post-copy was asked for)."""
    if mig.switched:
        raise BackendError("cannot cancel migration in post-copy mode")
    if mig.postcopy_requested:
        # QEMU may switch at any moment, and a cancel after the switch restarts the source
        # while the destination holds the newest state.
        raise BackendError("cannot cancel migration: the switch to post-copy was requested")
    mig.cancel_requested = True
    if mig.issued:
        await _src_request_cancel(qmp, guest, mig)


async def src_set_tuning(
    qmp: Exec, guest: _Guest, bandwidth_bytes_per_s: int | None, max_downtime_ms: int | None
) -> None:
    """Change the bandwidth cap and the downtime limit of a running migration."""
    params: dict[str, object] = {}
    if bandwidth_bytes_per_s is not None:
        params["max-bandwidth"] = _bandwidth(bandwidth_bytes_per_s)
    if max_downtime_ms is not None:
        params["downtime-limit"] = _downtime(max_downtime_ms)
    if params:
        await qmp(guest, "migrate-set-parameters", params)


async def src_drop_tls(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """Once a TLS migration ended for good (after the last page, in post-copy): drop QEMU's
    credentials object (a guest task: it ends with QEMU)."""
    await mig.done.wait()
    await drop_tls_creds(qmp, guest)


async def src_start_postcopy(qmp: Exec, guest: _Guest, mig: _Outgoing) -> None:
    """``migrate-start-postcopy`` for a running migration (once; after ``migrate`` if that is
    still on its way)."""
    if not mig.tuning.postcopy:
        raise BackendError("migration was not started with post-copy enabled")
    if mig.cancel_requested:
        raise BackendError("the migration is being cancelled")
    if mig.switched or mig.postcopy_requested:
        return
    mig.postcopy_requested = True
    if mig.issued:  # else _src_issue asks right after "migrate"
        await qmp(guest, "migrate-start-postcopy")


async def src_wait(mig: _Outgoing) -> MigrationProgress:
    """After a switch to post-copy: wait until the last page was sent (else: the progress)."""
    if not mig.switched:
        return mig.snapshot()
    await mig.done.wait()
    final = mig.snapshot()
    if final.status is MigrationStatus.COMPLETED:
        return final
    raise PostcopyFailed(final.error or "post-copy migration failed")
