"""What a migration leaves for operators: a log line per phase change and one INFO line per
finished migration, all carrying the migration id that the cookie, both daemons' job stats and
both histories carry; the history file's bounds and rotation; JSON log lines."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import migrate, running_guest
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon import logs, wire
from virtmig.daemon.history import MAX_REPLY_BYTES, Entry, History
from virtmig.proto.errors import VirtmigError
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.migid import MIGRATION_ID_STAT, is_migration_id
from virtmig.proto.params import TypedParams
from virtmig.testing import ClosedPortDest, hosts, start_host, stop_host

F = MigrateFlags


def stat(info: object, name: str) -> object:
    for p in info.stats:  # type: ignore[attr-defined]
        if p.name == name:
            return p.value
    return None


def audit_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "virtmig.daemon.audit"]


async def test_a_migration_is_logged_and_kept_with_one_id_everywhere(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtmig.daemon.audit")
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src, dirty_rate_mib=1)
        await migrate(src, dst, F.LIVE)
        src_info = await src.conn.job_info("vm1", completed=True)
        dst_info = await dst.conn.job_info("vm1", completed=True)
        [src_entry] = await src.conn.migration_history("vm1")
        [dst_entry] = await dst.conn.migration_history()
    mid = stat(src_info, MIGRATION_ID_STAT)
    assert isinstance(mid, str) and is_migration_id(mid)
    assert stat(dst_info, MIGRATION_ID_STAT) == mid
    assert (src_entry.migration_id, dst_entry.migration_id) == (mid, mid)
    assert (src_entry.role, dst_entry.role) == ("source", "destination")
    for e in (src_entry, dst_entry):
        assert (e.domain, e.source, e.destination) == ("vm1", "src.test", "dst.test")
        assert (e.mode, e.transport, e.protocol, e.outcome, e.error) == (
            "live", "direct", "v3+params", "completed", "")
        assert e.bytes >= 64 << 20 and e.duration_ms > 0
    assert src_entry.downtime_ms > 0
    records = audit_records(caplog)
    fields = [r.fields for r in records]  # type: ignore[attr-defined]
    phases = [f for f in fields if f["event"] == "migration_phase"]
    assert {p["migration_id"] for p in phases} == {mid}
    assert [(p["role"], p["phase"]) for p in phases if p["role"] == "source"] == [
        ("source", "begin3"), ("source", "perform3"), ("source", "perform3_done"),
        ("source", "confirm3")]
    assert [p["phase"] for p in phases if p["role"] == "destination"] == ["prepare", "finish3"]
    ends = [r for r, f in zip(records, fields, strict=True) if f["event"] == "migration_end"]
    assert len(ends) == 2 and all(r.levelno == logging.INFO for r in ends)
    assert ends[0].getMessage().startswith(
        f"migration {mid} of vm1 completed: source src.test, destination dst.test, mode live, "
        "transport direct, protocol v3+params, duration ")


async def test_a_failed_migration_is_kept_with_its_error(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src)
        with pytest.raises(VirtmigError):
            await run_v3(RemoteSource(src.conn, True), ClosedPortDest(dst.conn, True), "vm1",
                         TypedParams(), F.LIVE, protection=True)
        [entry] = await src.conn.migration_history()
        assert (entry.role, entry.outcome, entry.destination) == ("source", "failed", "dst.test")
        assert entry.error
        # the destination's side was cancelled (Finish3 with cancelled: the source failed)
        assert [e.outcome for e in await dst.conn.migration_history()] == ["cancelled"]


async def test_a_p2p_migration_names_its_transport_and_destination(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src)
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER)
        [entry] = await src.conn.migration_history("vm1")
        assert (entry.transport, entry.outcome, entry.destination) == (
            "p2p", "completed", "dst.test")


def entry(i: int, domain: str = "vm1") -> Entry:
    return Entry(time=f"2026-01-01T00:00:{i:02d}.000+00:00", migration_id=f"{i:032x}",
                 domain=domain, uuid=f"uuid-{domain}", role="source", source="a",
                 destination="b", mode="live", transport="direct", protocol="v3",
                 outcome="completed", error="", duration_ms=i, downtime_ms=1, bytes=100)


def test_history_is_newest_first_filtered_bounded_and_rotated(tmp_path: Path) -> None:
    h = History(tmp_path / "history", max_bytes=4096)
    for i in range(40):
        h.append(entry(i, "vm1" if i % 2 else "vm2"))
    size = len(entry(0).to_json()) + 1
    assert h.rotated.exists() and h.path.stat().st_size < 4096
    kept = h.read()
    assert [e.duration_ms for e in kept] == list(range(39, 39 - len(kept), -1))
    assert 4096 // size <= len(kept) < 40  # one rotated file and the current one, oldest gone
    assert all(e.domain == "vm1" for e in h.read("vm1"))
    assert h.read("uuid-vm2")[0].duration_ms == 38
    assert [e.duration_ms for e in h.read(limit=2)] == [39, 38]
    # a torn or foreign line is skipped, the rest is read
    with h.path.open("a") as f:
        f.write('{"time": "x"\n[1, 2]\n')
    h.append(entry(40))
    assert h.read(limit=1)[0].duration_ms == 40


async def test_a_history_reply_fits_in_one_message_however_big_the_history(
        tmp_path: Path) -> None:
    """A history of more than gRPC's 4 MiB (history_max_bytes allows it; 2000 entries with the
    longest error an entry keeps): GetHistory answers with the newest entries that fit."""
    host = await start_host(tmp_path, "h", history_max_bytes=2**30)
    try:
        error = "\u20ac" * 1000  # 1000 characters, 3000 bytes of UTF-8
        for i in range(2000):
            host.daemon.history.append(dataclasses.replace(entry(i), error=error))
        got = await host.conn.migration_history()
        assert 500 < len(got) < 2000
        assert [e.duration_ms for e in got] == list(range(1999, 1999 - len(got), -1))
        assert got[0].error == error
        reply = wire.history_reply(host.daemon.history.read())
        assert len(reply.entries) == len(got) and reply.ByteSize() <= MAX_REPLY_BYTES
        assert MAX_REPLY_BYTES < 4 * 1024 * 1024  # gRPC's default limit
        assert [e.duration_ms for e in await host.conn.migration_history(limit=2)] == [1999, 1998]
    finally:
        await stop_host(host)


def test_history_lines_are_json_with_the_documented_fields(tmp_path: Path) -> None:
    h = History(tmp_path / "history")
    h.append(entry(1))
    [line] = h.path.read_text().splitlines()
    assert set(json.loads(line)) == {
        "time", "migration_id", "domain", "uuid", "role", "source", "destination", "mode",
        "transport", "protocol", "outcome", "error", "duration_ms", "downtime_ms", "bytes"}
    assert oct(h.path.stat().st_mode & 0o777) == oct(0o600)


async def test_json_log_lines_carry_the_migration_fields(tmp_path: Path) -> None:
    out = tmp_path / "virtmigd.log"
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    logs.configure("info", "json", [f"file:{out}"])
    try:
        async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
            await running_guest(src)
            await migrate(src, dst, F.LIVE)
    finally:
        logs.configure("warning", "plain", [])
        root.setLevel(saved[0])
        for handler in [x for x in root.handlers if x not in saved[1]]:
            root.removeHandler(handler)
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(d) for d in lines)
    ends = [d for d in lines if d.get("event") == "migration_end"]
    assert len(ends) == 2 and {d["outcome"] for d in ends} == {"completed"}
    assert ends[0]["migration_id"] == ends[1]["migration_id"]
    assert ends[0]["level"] == "INFO" and ends[0]["message"].startswith("migration ")


def test_a_json_log_line_is_one_line_with_bounded_fields() -> None:
    record = logging.LogRecord("virtmig.daemon.audit", logging.INFO, __file__, 1,
                               "migration %s of %s", ("m", "x\ny"), None)
    record.fields = {"domain": "x\ny", "error": "e" * 5000, "bytes": 7}
    line = logs.JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert (data["domain"], data["bytes"], data["message"]) == ("x\ny", 7, "migration m of x\ny")
    assert data["error"] == "e" * 1000 + "...[+4000 chars]"
