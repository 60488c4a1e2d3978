"""The ``qemu`` backend's job control parity: monitor logging, stream settings per side, progress
from QMP queries, tuning that reaches QEMU, incoming without post-copy support.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import Message

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import MIB, running_and_listening, to, wait_status, within
from virtmig.daemon.backend.base import (
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    XbzrleStats,
)
from virtmig.daemon.backend.qemu import (
    QemuBackend,
    QmpCommandFailed,
    progress_from_query,
)
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.daemon.backend.qemu.migration import _Outgoing, _stream_settings
from virtmig.daemon.backend.qemu.monitor import _Monitor
from virtmig.daemon.jobctl import job_stats
from virtmig.proto.compat import Compression
from virtmig.proto.errors import ArgumentUnsupported

# The shared fixtures, bound here so that pytest finds them.
backends = backend_qemu_helpers.backends
dst = backend_qemu_helpers.dst
src = backend_qemu_helpers.src


def test_monitor_logs_messages_lazily(caplog: pytest.LogCaptureFixture) -> None:
    """qemu.qmp pretty-prints every message for its debug log even when nobody listens."""
    formatted = []

    class Counted(Message):
        def __str__(self) -> str:
            formatted.append(1)
            return super().__str__()

    monitor = _Monitor("lazy")
    msg = Counted({"execute": "query-status"})
    caplog.set_level(logging.INFO, logger=monitor.logger.name)
    assert monitor._cb_outbound(msg) is msg and monitor._cb_inbound(msg) is msg
    assert not formatted
    caplog.set_level(logging.DEBUG, logger=monitor.logger.name)
    monitor._cb_outbound(msg)
    assert formatted and '"execute": "query-status"' in caplog.text


def test_stream_settings_per_side() -> None:
    """Multifd and compression: capabilities on both sides, each side's own parameters."""
    plain = _stream_settings(MigrationTuning(), incoming=False)
    assert plain == ([], {})
    multifd = MigrationTuning(parallel_connections=3, compression=Compression(
        methods=("zstd",), zstd_level=5))
    caps, params = _stream_settings(multifd, incoming=False)
    assert caps == [{"capability": "multifd", "state": True}]
    assert params == {"multifd-channels": 3, "multifd-compression": "zstd",
                      "multifd-zstd-level": 5}
    caps, params = _stream_settings(multifd, incoming=True)
    assert caps == [{"capability": "multifd", "state": True}]
    assert params == {"multifd-channels": 3, "multifd-compression": "zstd"}
    single = MigrationTuning(compression=Compression(methods=("xbzrle",), xbzrle_cache=1 << 26))
    caps, params = _stream_settings(single, incoming=False)
    assert [c["capability"] for c in caps] == ["xbzrle"]
    assert params == {"xbzrle-cache-size": 1 << 26}
    caps, params = _stream_settings(single, incoming=True)
    assert [c["capability"] for c in caps] == ["xbzrle"]
    assert params == {}


def test_multi_thread_compression_is_refused() -> None:
    """QEMU's multi-thread compression corrupted every guest it moved here: refused, with the
    alternatives named; other methods pass."""
    backend = QemuBackend()
    with pytest.raises(ArgumentUnsupported, match="use 'xbzrle', or 'zlib' or 'zstd'"):
        backend.check_compression(Compression(methods=("xbzrle", "mt"), mt_threads=4))
    backend.check_compression(Compression(methods=("xbzrle",)))
    backend.check_compression(Compression(methods=("zstd",)))


def test_progress_from_query() -> None:
    """query-migrate's fields (QEMU 7.2) land where libvirt reads them."""
    info = {
        "status": "active", "setup-time": 5, "total-time": 2101, "expected-downtime": 412,
        "cpu-throttle-percentage": 30,
        "ram": {"transferred": 70_000_000, "remaining": 40_000_000, "total": 268_500_992,
                "duplicate": 47_000, "normal": 17_000, "normal-bytes": 69_632_000,
                "dirty-sync-count": 4, "page-size": 4096, "mbps": 268.4,
                "dirty-pages-rate": 5120, "postcopy-requests": 17, "multifd-bytes": 0,
                "pages-per-second": 8000, "precopy-bytes": 70_000_000, "downtime-bytes": 0,
                "postcopy-bytes": 0},
    }
    p = progress_from_query(info)
    assert p.status is MigrationStatus.ACTIVE
    assert (p.total_bytes, p.processed_bytes, p.remaining_bytes) == (268_500_992, 70_000_000,
                                                                   40_000_000)
    assert p.iteration == 4 and p.page_size == 4096 and p.normal_pages == 17_000
    assert p.dirty_rate_pages_per_s == 5120
    assert p.bandwidth_bytes_per_s == round(268.4e6 / 8)
    assert p.expected_downtime_ms == 412 and p.downtime_ms == 0
    assert p.setup_time_ms == 5 and p.total_time_ms == 2101
    assert p.throttle_percent == 30
    assert p.postcopy_requests == 17
    assert p.error == ""
    switched = progress_from_query({**info, "status": "postcopy-active"})
    assert switched.status is MigrationStatus.POSTCOPY_ACTIVE
    failed = progress_from_query({"status": "failed", "error-desc": "Broken pipe"})
    assert failed.status is MigrationStatus.FAILED and failed.error == "Broken pipe"
    assert progress_from_query({}) == MigrationProgress()
    # QEMU 7.2 sometimes reports a post-copy downtime counted from the host's boot: unknown.
    bogus = progress_from_query({"status": "completed", "total-time": 1846,
                                 "downtime": 6_974_756})
    assert bogus.downtime_ms == 0 and bogus.total_time_ms == 1846
    assert progress_from_query({"status": "completed", "total-time": 846,
                                "downtime": 46}).downtime_ms == 46
    assert p.xbzrle is None  # no xbzrle-cache: no compression stats
    x = progress_from_query({"status": "active", "xbzrle-cache": {
        "cache-size": 64 << 20, "bytes": 5000, "pages": 7, "cache-miss": 3,
        "cache-miss-rate": 0.5, "encoding-rate": 2.0, "overflow": 1}})
    assert x.xbzrle == XbzrleStats(cache_bytes=64 << 20, compressed_bytes=5000, pages=7,
                                   cache_misses=3, overflows=1)
    stats = {s.name: s.value for s in job_stats(x, 10, completed=False)}
    assert (stats["compression_cache"], stats["compression_bytes"], stats["compression_pages"],
            stats["compression_cache_misses"], stats["compression_overflow"]) == (
        64 << 20, 5000, 7, 3, 1)
    assert "compression_cache" not in {s.name for s in job_stats(p, 10, completed=False)}


def test_source_stopped_follows_qemu_stop_event(tmp_path: Path) -> None:
    """The progress says the source was stopped only after a STOP event while its migration
    ran: a live migration that ends before QEMU stopped the vCPUs leaves libvirt's state alone."""
    guest = _Guest("u1", tmp_path, 1, status="running")
    mig = _Outgoing(tuning=MigrationTuning(), was_running=True)
    guest.outgoing = mig
    guest.on_event({"event": "STOP"})  # before "migrate": not the migration's doing
    assert mig.snapshot().source_stopped is False
    mig.issued = True
    guest.on_event({"event": "RESUME"})
    guest.on_event({"event": "MIGRATION", "data": {"status": "active"}})
    assert mig.snapshot().source_stopped is False
    guest.on_event({"event": "STOP"})  # the switchover
    assert mig.snapshot().source_stopped is True
    mig.final = MigrationProgress(status=MigrationStatus.FAILED)
    assert mig.snapshot() == MigrationProgress(status=MigrationStatus.FAILED, source_stopped=True)
    later = _Outgoing(tuning=MigrationTuning(), was_running=True, issued=True)
    guest.outgoing = later
    later.done.set()
    guest.on_event({"event": "STOP"})  # after the migration ended: a suspend, not a switchover
    assert later.snapshot().source_stopped is False


def capabilities(reply: list[dict[str, Any]]) -> dict[str, bool]:
    return {c["capability"]: c["state"] for c in reply}


@pytest.mark.qemu
@pytest.mark.postcopy
async def test_tuning_reaches_qemu(src: QemuBackend, dst: QemuBackend) -> None:
    spec, port = await running_and_listening(src, dst)
    assert capabilities(await dst.query(spec.uuid, "query-migrate-capabilities"))[
        "postcopy-ram"]
    tuning = MigrationTuning(bandwidth_bytes_per_s=32 * 1024, max_downtime_ms=70,
                             postcopy=True, postcopy_bandwidth_bytes_per_s=MIB,
                             auto_converge=True, auto_converge_initial=30,
                             auto_converge_increment=15)
    out = asyncio.create_task(src.outgoing(spec.uuid, to(port), tuning))
    await wait_status(src, spec.uuid, MigrationStatus.ACTIVE)
    caps = capabilities(await src.query(spec.uuid, "query-migrate-capabilities"))
    assert caps["events"] and caps["auto-converge"] and caps["postcopy-ram"]
    assert caps["return-path"]
    params = await src.query(spec.uuid, "query-migrate-parameters")
    assert params["max-bandwidth"] == 32 * 1024 and params["downtime-limit"] == 70
    assert params["cpu-throttle-initial"] == 30 and params["cpu-throttle-increment"] == 15
    assert params["max-postcopy-bandwidth"] == MIB
    live = src.progress(spec.uuid)
    assert live.status is MigrationStatus.ACTIVE and live.total_bytes >= 64 * MIB
    assert live.expected_downtime_ms > 0  # QEMU's estimate (the limit until it knows better)

    await within(src.set_tuning(spec.uuid, max_downtime_ms=400))
    assert (await src.query(spec.uuid, "query-migrate-parameters"))["downtime-limit"] == 400
    await within(src.set_tuning(spec.uuid, bandwidth_bytes_per_s=0))
    assert (await within(out)).status is MigrationStatus.COMPLETED  # as pre-copy
    await within(dst.incoming_wait(spec.uuid))
    await within(dst.resume(spec.uuid))

    # The next migration (back) without post-copy or auto-converge turns them off again.
    await within(src.destroy(spec.uuid))
    port = await within(src.incoming_start(spec, to(0)))
    await within(dst.outgoing(spec.uuid, to(port), MigrationTuning()))
    caps = capabilities(await dst.query(spec.uuid, "query-migrate-capabilities"))
    assert not caps["auto-converge"] and not caps["postcopy-ram"]
    await within(src.incoming_wait(spec.uuid))


@pytest.mark.qemu
async def test_incoming_without_postcopy_support(
    src: QemuBackend, dst: QemuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A QEMU that refuses postcopy-ram (no userfaultfd) still takes pre-copy migrations."""
    real = QemuBackend._exec_any

    async def refusing(self: QemuBackend, guest: Any, command: str,
                       args: dict[str, object] | None = None, timeout: float = 30, *,
                       oob: bool = False) -> object:
        caps = args.get("capabilities") if args else None
        if command == "migrate-set-capabilities" and isinstance(caps, list) and any(
            c.get("capability") == "postcopy-ram" and c.get("state") for c in caps
        ) and self is dst:
            raise QmpCommandFailed(command, "Postcopy is not supported", "GenericError")
        return await real(self, guest, command, args, timeout, oob=oob)

    monkeypatch.setattr(QemuBackend, "_exec_any", refusing)
    spec, port = await running_and_listening(src, dst)
    assert not capabilities(await dst.query(spec.uuid, "query-migrate-capabilities"))[
        "postcopy-ram"]
    out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert out.status is MigrationStatus.COMPLETED
    assert (await within(dst.incoming_wait(spec.uuid))).status is MigrationStatus.COMPLETED
