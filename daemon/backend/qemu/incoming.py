"""The destination side of a QEMU migration: listen, then wait for the stream to end.

Concern: the QMP flow on the destination (see :mod:`~virtmig.daemon.backend.qemu.migration` for
the whole story).  The destination QEMU runs with ``-incoming defer -S``; :func:`dst_listen`
sets its capabilities and parameters and issues ``migrate-incoming``; :func:`dst_wait` follows
the ``MIGRATION`` events until the stream completed, QEMU exited after a failure (its own
message, from ``qemu.log``, becomes the error), or a post-copy stream broke.

Every function runs on the destination (``dst_``) and is given the backend's QMP path as
``qmp``.
"""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import replace

from virtmig.daemon.backend.base import (
    BackendError,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    PostcopyFailed,
    StreamAddress,
)
from virtmig.daemon.backend.qemu.confine import RunAs
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.daemon.backend.qemu.migration import (
    _POSTCOPY_BROKEN,
    _Incoming,
    _ms,
    _stream_settings,
    _tls_params,
    progress_from_query,
)
from virtmig.daemon.backend.qemu.monitor import (
    Exec,
    QmpCommandFailed,
    migration_with_status,
    refresh_status,
    together,
)
from virtmig.daemon.backend.qemu.tls import add_tls_creds, drop_tls_creds
from virtmig.proto import logsafe
from virtmig.proto.aio import within

log = logsafe.logger("virtmig.daemon.backend.qemu")

POSTCOPY_STOP_TIMEOUT = 5.0  # "stop" on a destination whose post-copy stream broke
EXIT_REASON_WAIT = 3.0  # a failed incoming QEMU exits by itself: wait that long for its message


async def dst_listen(
    qmp: Exec, guest: _Guest, inc: _Incoming, listen: StreamAddress, tuning: MigrationTuning,
    *, owner: RunAs | None = None,
) -> int:
    """Prepare the incoming QEMU and listen on ``listen``: the port it listens on.

    With ``tuning.tls`` QEMU gets the server credentials first (``owner``: whom QEMU runs as)
    and takes only a TLS stream from a source whose certificate the CA signed.  A port in use
    raises ``OSError(EADDRINUSE)``.
    """
    caps, params = _stream_settings(tuning, incoming=True)
    set_caps = qmp(guest, "migrate-set-capabilities", {"capabilities": [
        {"capability": "events", "state": True}, *caps]})
    params = {**params, **_tls_params(tuning, incoming=True)}
    if tuning.tls is None:
        await together(set_caps, qmp(guest, "migrate-set-parameters", params))
    else:  # the parameters name the credentials object: it goes in first
        await set_caps
        await add_tls_creds(qmp, guest, tuning.tls, server=True, owner=owner)
        inc.tls = True
        await qmp(guest, "migrate-set-parameters", params)
    # A plain stream may switch to post-copy (QEMU needs the capability on this side
    # before it starts; unused, it costs nothing): allow it unless the stream has
    # channels or compression and post-copy was not asked for.  Without userfaultfd
    # QEMU refuses: go on, unless post-copy was asked for (the source would send it).
    if tuning.postcopy or not caps:
        try:
            await qmp(guest, "migrate-set-capabilities", {"capabilities": [
                {"capability": "postcopy-ram", "state": True}]})
            inc.postcopy = True
        except QmpCommandFailed as exc:
            if tuning.postcopy:
                raise BackendError(
                    f"post-copy is not available on this host: {exc.desc} (QEMU needs "
                    "userfaultfd: for an unprivileged QEMU, vm.unprivileged_userfaultfd=1)"
                ) from None
            log.warning("qemu backend: guest %s: incoming post-copy unavailable: %s",
                        guest.uuid, exc.desc)
    try:
        await qmp(guest, "migrate-incoming", {"uri": str(listen)})
    except QmpCommandFailed as exc:
        if "Address already in use" in exc.desc:
            raise OSError(errno.EADDRINUSE, f"{exc.desc} ({listen})") from None
        raise
    port = listen.port or await _dst_port(qmp, guest)
    guest.start_task(_dst_read_end(qmp, guest, inc))
    return port


async def _dst_read_end(qmp: Exec, guest: _Guest, inc: _Incoming) -> None:
    """The final statistics and the run status, read as soon as QEMU reports the stream
    completed: the source's Perform ends then, and Finish (a call through the client later)
    finds them read instead of waiting for two more answers."""
    while inc.final is None and not guest.exited:
        changed = guest.changed()
        if guest.mig_status == "completed":
            inc.end_answer = await migration_with_status(qmp, guest)
            inc.ended_at = time.monotonic()
            return
        if guest.mig_status in ("failed", "cancelled"):
            return
        await changed.wait()


async def _dst_port(qmp: Exec, guest: _Guest) -> int:
    info = await qmp(guest, "query-migrate")
    for addr in info.get("socket-address") or ():
        if isinstance(addr, dict) and addr.get("port"):
            return int(addr["port"])
    raise BackendError("QEMU did not report the port it listens on")


async def dst_wait(qmp: Exec, guest: _Guest, inc: _Incoming) -> MigrationProgress:
    """Wait until the incoming stream completed (the final progress) or failed for good
    (``MigrationFailed``; ``PostcopyFailed`` after the switch to post-copy)."""
    failed_at = 0.0
    while True:
        changed = guest.changed()
        if inc.final is not None:
            if inc.final.status is MigrationStatus.COMPLETED:
                return inc.final
            if inc.switched:
                raise PostcopyFailed(inc.final.error or "post-copy migration failed")
            raise MigrationFailed(inc.final.error or "incoming migration failed")
        if guest.mig_status == "completed":
            return await _dst_completed(qmp, guest, inc)
        if inc.switched and guest.mig_status in _POSTCOPY_BROKEN:
            await _dst_postcopy_failed(qmp, guest, inc)
            continue
        timeout: float | None = None
        if guest.mig_status in ("failed", "cancelled"):
            # QEMU exits by itself after a failed incoming migration: wait for its message.
            failed_at = failed_at or time.monotonic()
            timeout = failed_at + EXIT_REASON_WAIT - time.monotonic()
            if timeout <= 0:
                inc.fail(inc.error or f"incoming migration {guest.mig_status}")
                continue
        with contextlib.suppress(TimeoutError):
            await within(changed.wait(), timeout)


async def _dst_postcopy_failed(qmp: Exec, guest: _Guest, inc: _Incoming) -> None:
    """The stream broke after the switch: keep the guest, never resumed, and its memory.

    QEMU waits in ``postcopy-paused`` for a recovery.  Under KVM the vCPUs are stopped, as
    libvirt does, so that the guest does not hang on a page that will never come.  Under TCG
    they are left as they are: a vCPU blocked on a missing page cannot leave its fault, and
    ``stop`` would wait for it forever with the monitor wedged (measured with QEMU 7.2), so
    QEMU still says ``running`` while the guest is frozen at its first missing page.
    """
    status = guest.mig_status
    error = f"post-copy migration broke (QEMU: {status})"
    with contextlib.suppress(BackendError):  # (a QEMU in this state may answer slowly)
        info = await qmp(guest, "query-migrate", timeout=POSTCOPY_STOP_TIMEOUT)
        if info.get("error-desc"):
            error += f": {info['error-desc']}"
    if tail := guest.log_tail():
        error += f": {tail}"
    if not guest.exited:
        try:
            kvm = await qmp(guest, "query-kvm", timeout=POSTCOPY_STOP_TIMEOUT)
            if kvm.get("enabled") and await refresh_status(qmp, guest) == "running":
                await qmp(guest, "stop", timeout=POSTCOPY_STOP_TIMEOUT)
                await refresh_status(qmp, guest)
        except BackendError as exc:
            log.error("qemu backend: cannot pause guest %s after its post-copy migration "
                      "failed: %s", guest.uuid, exc)
    if inc.final is None:  # (the guest may have exited meanwhile)
        log.error("qemu backend: guest %s: %s", guest.uuid, error)
        inc.fail(error)


async def _dst_completed(qmp: Exec, guest: _Guest, inc: _Incoming) -> MigrationProgress:
    answer, now = inc.end_answer, inc.ended_at
    if not now:  # (not read yet: Finish came first, or the reading is on its way)
        now = time.monotonic()
        answer = await migration_with_status(qmp, guest)
    base = progress_from_query(answer if isinstance(answer, dict) else {})
    if inc.tls:
        await drop_tls_creds(qmp, guest)
    inc.status = MigrationStatus.COMPLETED
    inc.final = replace(
        base,
        status=MigrationStatus.COMPLETED,
        remaining_bytes=0,
        setup_time_ms=base.setup_time_ms or _ms((inc.active_at or now) - inc.started),
        total_time_ms=base.total_time_ms or _ms(now - inc.started),
        error="",
    )
    return inc.final
