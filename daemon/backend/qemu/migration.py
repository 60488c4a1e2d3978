"""QEMU's live migration as both sides see it: settings, statuses, progress, per-migration state.

Concern: the translation between virtmig's migration values (:class:`MigrationTuning`,
:class:`MigrationProgress`) and QEMU's (capabilities, parameters, ``query-migrate``), and the
records the flows keep while a migration runs (:class:`_Outgoing` on the source,
:class:`_Incoming` on the destination).  Pure values: the flows that send the commands are
:mod:`~virtmig.daemon.backend.qemu.outgoing` (source) and
:mod:`~virtmig.daemon.backend.qemu.incoming` (destination).

Migration follows QEMU 7.2's QMP flow: the destination starts with ``-incoming defer -S``, turns on
the ``events`` capability and listens with ``migrate-incoming`` (port 0: QEMU's choice, read back
from ``query-migrate``; a port in use gives ``OSError(EADDRINUSE)`` and that QEMU is stopped); the
source sets its capabilities (``events``, ``auto-converge``, ``return-path``: QEMU then reports
``completed`` only once the destination has loaded the whole stream, which matters when a tunnel
sits in between) and parameters (``max-bandwidth`` -- QEMU's 128 MiB/s default is raised to
libvirt's "unlimited" -- ``downtime-limit``, CPU throttling), issues ``migrate`` and follows
``MIGRATION`` events; it re-reads ``query-migrate`` every 250 ms and at every event
(``MIGRATION_PASS``: a new dirty-sync pass) for :meth:`QemuBackend.progress`, and re-reads a
completed migration's statistics until ``total-time`` is filled in.  :meth:`QemuBackend.set_tuning`
changes the limits mid-stream.  On completion the source is left in ``postmigrate`` (paused) and is
never resumed by the backend; on failure or cancel it runs again if it ran before (QEMU usually
restarts it itself; the backend sends ``cont`` only when it did not).  The progress says whether
QEMU stopped the source's vCPUs (a ``STOP`` event after ``migrate``: the switchover began): a
migration that failed before leaves the domain's state and reason as they were (libvirt's ``running
(booted)``).  A destination QEMU whose incoming migration fails exits by itself;
:meth:`QemuBackend.incoming_wait` then raises ``MigrationFailed`` with QEMU's own message from
``qemu.log``.  A cancel is bounded even when QEMU's main loop is blocked (a completion phase writing
to a destination that stopped reading): ``migrate_cancel``, then the out-of-band ``yank`` of the
migration's sockets, then the flow gives up and leaves the guest as it is (see
:mod:`~virtmig.daemon.backend.qemu.outgoing`).

TLS (``tuning.tls``, ``--tls``): before ``migrate-incoming`` / ``migrate`` each QEMU gets a
``tls-creds-x509`` object (:data:`TLS_OBJECT_ID`: server on the destination, client on the
source, both verifying their peer against the CA) and ``tls-creds`` names it; the source's
``tls-hostname`` is ``tls.hostname`` (the name the destination's certificate must carry).  Multifd
channels and post-copy's return path use the same credentials.  Without TLS both parameters are
set to "" (an earlier TLS migration's must not linger, as libvirt does).  The object is deleted
once the migration ended (see :mod:`~virtmig.daemon.backend.qemu.tls`).  A handshake that fails
fails the source's migration with QEMU's words ("Certificate does not match the hostname ...");
a destination that refused a source's certificate (or a connection that is not TLS) logs it and
keeps waiting for its source, while one whose source hung up after the handshake exits as after
any failed incoming migration.

Post-copy: every incoming QEMU gets the ``postcopy-ram`` capability before ``migrate-incoming``
(the destination cannot know whether the source will switch; a pre-copy stream does not use it;
without userfaultfd QEMU refuses it, which is logged and otherwise ignored); the source gets it,
and ``max-postcopy-bandwidth``, when ``tuning.postcopy``.  :meth:`QemuBackend.start_postcopy`
sends ``migrate-start-postcopy`` (QEMU switches at its next iteration, mid-pass, unless the
migration completes as pre-copy first).  At the source's ``MIGRATION postcopy-active`` event
``outgoing`` returns a progress with status ``POSTCOPY_ACTIVE`` (the source is stopped,
``finish-migrate``) and a follower task waits for ``completed``
(:meth:`QemuBackend.outgoing_wait`).  The destination's progress says ``POSTCOPY_ACTIVE`` from
its own ``postcopy-active`` event on, and ``resume`` works from then (a ``cont`` before QEMU ran
the device state just sets autostart).  A source that switched is never resumed.  Nothing is
cancelled once the switch was requested (``cancel`` refuses: a ``migrate_cancel`` that lands after
the switch would restart the source).  A broken stream leaves QEMU in ``postcopy-paused`` (no
recovery is attempted), the destination's vCPUs are stopped (KVM only: see
``incoming._dst_postcopy_failed``), ``outgoing_wait`` and ``incoming_wait`` raise
``PostcopyFailed``, and neither QEMU is stopped.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Any

from virtmig.daemon.backend.base import (
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    XbzrleStats,
)
from virtmig.proto.compat import Compression
from virtmig.proto.errors import ArgumentUnsupported
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, MAX_DOWNTIME_MS

#: libvirt's "unlimited" migration bandwidth (QEMU_DOMAIN_MIG_BANDWIDTH_MAX MiB/s, in bytes/s).
UNLIMITED_BANDWIDTH = MAX_BANDWIDTH_MIB * 1024 * 1024
TLS_OBJECT_ID = "virtmig-migrate-tls"  # the tls-creds-x509 object of a TLS migration

_TERMINAL = frozenset({"completed", "failed", "cancelled"})
# After the switch to post-copy: the stream broke (QEMU waits for a recovery that never comes).
_POSTCOPY_BROKEN = frozenset({"failed", "cancelled", "postcopy-paused", "postcopy-recover"})
_POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
_STATUS_MAP = {
    "none": MigrationStatus.NONE,
    "setup": MigrationStatus.SETUP,
    "active": MigrationStatus.ACTIVE,
    "cancelling": MigrationStatus.ACTIVE,
    "pre-switchover": MigrationStatus.ACTIVE,
    "device": MigrationStatus.ACTIVE,
    "wait-unplug": MigrationStatus.ACTIVE,
    "colo": MigrationStatus.ACTIVE,
    "postcopy-active": MigrationStatus.POSTCOPY_ACTIVE,
    "postcopy-paused": MigrationStatus.POSTCOPY_ACTIVE,
    "postcopy-recover": MigrationStatus.POSTCOPY_ACTIVE,
    "completed": MigrationStatus.COMPLETED,
    "failed": MigrationStatus.FAILED,
    "cancelled": MigrationStatus.CANCELLED,
}


def refuse_mt_compression(compression: Compression) -> None:
    """Multi-thread compression ("mt", QEMU's ``compress`` capability) is refused.

    With QEMU 7.2 on these machines the destination guest's kernel panicked right after the
    switchover in every run of the end-to-end test (TCG, a guest dirtying its memory),
    while QEMU reported the migration completed and the guest running: a silent corruption.
    QEMU itself deprecated the capability in 8.2 as unmaintained and buggy and removed it in 9.1.
    xbzrle on a single stream, and zlib or zstd on multifd channels, do the same job safely.
    """
    if "mt" in compression.methods:
        raise ArgumentUnsupported(
            "compression method 'mt' is not supported by the qemu backend: QEMU's multi-thread "
            "compression corrupts the guest (deprecated by QEMU); use 'xbzrle', or 'zlib' or "
            "'zstd' with parallel migration")


def _stream_settings(
    tuning: MigrationTuning, *, incoming: bool
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """QEMU capabilities and parameters for multifd channels and compression, on one side.

    Capabilities are set on both sides (the destination must expect channels and compressed
    pages before the stream starts); levels and compression threads are the source's,
    decompression threads the destination's.  Capabilities that are off are left out: QEMU's
    defaults are off, and a QEMU without one of them still runs plain migrations.
    """
    caps: list[dict[str, object]] = []
    params: dict[str, object] = {}
    comp = tuning.compression
    if tuning.parallel_connections:
        caps.append({"capability": "multifd", "state": True})
        params["multifd-channels"] = tuning.parallel_connections
        if comp.multifd_method:
            params["multifd-compression"] = comp.multifd_method
        if not incoming and comp.zlib_level is not None:
            params["multifd-zlib-level"] = comp.zlib_level
        if not incoming and comp.zstd_level is not None:
            params["multifd-zstd-level"] = comp.zstd_level
    if "xbzrle" in comp.methods:
        caps.append({"capability": "xbzrle", "state": True})
        if not incoming and comp.xbzrle_cache is not None:
            params["xbzrle-cache-size"] = comp.xbzrle_cache
    return caps, params


def _tls_params(tuning: MigrationTuning, *, incoming: bool) -> dict[str, object]:
    """``tls-creds`` and ``tls-hostname``: the credentials object of a TLS migration (and, on
    the source, the name the destination's certificate must carry; "": the URI's host), or
    both reset to "" (a plain stream, whatever an earlier migration set), as libvirt does."""
    if tuning.tls is None:
        return {"tls-creds": "", "tls-hostname": ""}
    return {"tls-creds": TLS_OBJECT_ID,
            "tls-hostname": "" if incoming else tuning.tls.hostname}


def _bandwidth(bytes_per_s: int) -> int:
    return UNLIMITED_BANDWIDTH if bytes_per_s <= 0 else min(bytes_per_s, UNLIMITED_BANDWIDTH)


def _downtime(ms: int) -> int:
    return min(MAX_DOWNTIME_MS, max(1, ms))  # (the daemon refuses others before)


def _src_settings(tuning: MigrationTuning) -> tuple[list[dict[str, object]], dict[str, object]]:
    """The source's capabilities and parameters, set before ``migrate``."""
    stream_caps, stream_params = _stream_settings(tuning, incoming=False)
    caps: list[dict[str, object]] = [
        *stream_caps,
        {"capability": "events", "state": True},
        {"capability": "auto-converge", "state": tuning.auto_converge},
        # Both sides need it before the stream starts (the destination always has it).
        {"capability": "postcopy-ram", "state": tuning.postcopy},
        # The destination reports back when it has loaded everything: "completed" then
        # means the stream arrived, not that it left (a tunnel may still hold data).
        {"capability": "return-path", "state": True},
    ]
    params: dict[str, object] = {
        "max-bandwidth": _bandwidth(tuning.bandwidth_bytes_per_s),
        "downtime-limit": _downtime(tuning.max_downtime_ms),
        **stream_params,
        **_tls_params(tuning, incoming=False),
    }
    if tuning.auto_converge:
        params["cpu-throttle-initial"] = min(99, max(1, tuning.auto_converge_initial))
        params["cpu-throttle-increment"] = min(99, max(1, tuning.auto_converge_increment))
    if tuning.postcopy:  # QEMU: 0 is unlimited, as ours
        params["max-postcopy-bandwidth"] = max(0, min(
            tuning.postcopy_bandwidth_bytes_per_s, UNLIMITED_BANDWIDTH))
    return caps, params


# --- per-migration state --------------------------------------------------------------------------


@dataclass(eq=False)
class _Outgoing:
    """A source's migration, from ``outgoing`` until it ended for good."""

    tuning: MigrationTuning
    was_running: bool
    started: float = field(default_factory=time.monotonic)
    last: MigrationProgress = field(
        default_factory=lambda: MigrationProgress(status=MigrationStatus.SETUP)
    )
    final: MigrationProgress | None = None
    issued: bool = False  # "migrate" was sent
    log_at: int = 0  # qemu.log's size when "migrate" was sent (QEMU's words since then)
    cancel_requested: bool = False
    cancel_at: float = 0.0  # when migrate_cancel was first sent (monotonic; 0: never)
    yanked_at: float = 0.0  # when the migration's sockets were yanked (0: never)
    abort_reason: str = ""  # the backend is closing: fail with this
    postcopy_requested: bool = False  # start_postcopy() was called
    switched: bool = False  # QEMU reported postcopy-active: no way back
    # QEMU stopped the vCPUs (a STOP event after ``migrate``: its switchover began).  A live
    # migration that fails or is cancelled before leaves the guest as it was (libvirt's
    # ``running (booted)``); one after is resumed as ``running (migration canceled)``.
    stopped: bool = False
    follower: asyncio.Task[None] | None = None  # _src_follow_postcopy, after the switch
    # The progress poller goes on (it stops by itself once this is false, after the command
    # it may have on its way: never cancelled in the middle of one).
    polling: bool = True
    # Set once the migration ended for good: completed, failed or cancelled (in post-copy, after
    # ``outgoing`` returned at the switch, when the last page arrived or the stream broke).
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self) -> MigrationProgress:
        return replace(self.final or self.last, source_stopped=self.stopped)


@dataclass(eq=False)
class _Incoming:
    """A destination's migration, from ``incoming_start`` until it completed or failed."""

    started: float = field(default_factory=time.monotonic)
    status: MigrationStatus = MigrationStatus.SETUP
    active_at: float = 0.0
    error: str = ""
    final: MigrationProgress | None = None
    postcopy: bool = False  # the postcopy-ram capability is on
    switched: bool = False  # QEMU reported postcopy-active: the guest may run here
    tls: bool = False  # the stream is TLS: the credentials object goes once it completed
    # query-migrate's answer (or its error) read as soon as QEMU reported the stream completed,
    # and when (monotonic): what Finish, a call later, then need not ask.
    end_answer: object = None
    ended_at: float = 0.0

    def snapshot(self) -> MigrationProgress:
        if self.final is not None:
            return self.final
        now = time.monotonic()
        return MigrationProgress(
            status=self.status,
            setup_time_ms=_ms((self.active_at or now) - self.started),
            total_time_ms=_ms(now - self.started),
            error=self.error,
        )

    def fail(self, error: str) -> None:
        """The migration failed for good with ``error``."""
        self.error = error
        self.status = MigrationStatus.FAILED
        self.final = replace(self.snapshot(), status=MigrationStatus.FAILED, error=error)


# --- progress -------------------------------------------------------------------------------------


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key, 0)
    return int(v) if isinstance(v, int | float) else 0


def progress_from_query(info: dict[str, Any]) -> MigrationProgress:
    """``query-migrate``'s answer as a MigrationProgress."""
    ram = info.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    mbps = ram.get("mbps", 0)
    downtime, total_time = _int(info, "downtime"), _int(info, "total-time")
    if downtime > total_time:
        # Seen after post-copy with QEMU 7.2 (about 1 run in 40): the host's uptime in ms, as if
        # the stop had happened at boot.  Unknown, then.
        downtime = 0
    return MigrationProgress(
        status=_STATUS_MAP.get(str(info.get("status", "none")), MigrationStatus.ACTIVE),
        total_bytes=_int(ram, "total"),
        processed_bytes=_int(ram, "transferred"),
        remaining_bytes=_int(ram, "remaining"),
        iteration=_int(ram, "dirty-sync-count"),
        dirty_rate_pages_per_s=_int(ram, "dirty-pages-rate"),
        bandwidth_bytes_per_s=round(float(mbps) * 1e6 / 8) if isinstance(mbps, int | float)
        else 0,
        expected_downtime_ms=_int(info, "expected-downtime"),
        downtime_ms=downtime,
        setup_time_ms=_int(info, "setup-time"),
        total_time_ms=total_time,
        page_size=_int(ram, "page-size") or 4096,
        normal_pages=_int(ram, "normal"),
        postcopy_requests=_int(ram, "postcopy-requests"),
        throttle_percent=_int(info, "cpu-throttle-percentage"),
        xbzrle=_xbzrle(info.get("xbzrle-cache")),
        error=str(info.get("error-desc", "")),
    )


def _xbzrle(cache: object) -> XbzrleStats | None:
    """``query-migrate``'s ``xbzrle-cache`` (present only with the xbzrle capability)."""
    if not isinstance(cache, dict):
        return None
    return XbzrleStats(cache_bytes=_int(cache, "cache-size"), compressed_bytes=_int(cache, "bytes"),
                       pages=_int(cache, "pages"), cache_misses=_int(cache, "cache-miss"),
                       overflows=_int(cache, "overflow"))


