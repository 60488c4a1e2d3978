"""What a migration's control plane does per migration, counted (issue 17): the work a
repeated migration no longer repeats.

Real daemons in this process (``test`` backend), one migration there and back first (so that
the folders and caches a first migration makes exist), then counted over one more round trip.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from virtmig.daemon import state as files
from virtmig.daemon.history import Entry
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, domain_xml, hosts

F = MigrateFlags


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[list[Host]]:
    async with hosts(tmp_path, "test", ("a", {}), ("b", {})) as started:
        a, b = started
        await a.conn.define(domain_xml("vm", 4))
        await a.conn.start("vm")
        await there_and_back(a, b)
        yield started


async def there_and_back(a: Host, b: Host) -> None:
    await a.conn.migrate3("vm", b.conn, TypedParams(), F.LIVE)
    await b.conn.migrate3("vm", a.conn, TypedParams(), F.LIVE)


async def test_state_writes_make_no_folder_and_draw_no_random_name(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The status, placement and history files' folders exist after the first migration: a
    write makes none (a ``mkdir`` failing with EEXIST each time) and draws no random name
    (``tempfile.mkstemp``)."""
    a, b = pair
    calls = collections.Counter[str]()
    real_mkdir, real_mkstemp = os.mkdir, tempfile.mkstemp

    def mkdir(*args: Any, **kwargs: Any) -> None:
        calls["mkdir"] += 1
        real_mkdir(*args, **kwargs)

    def mkstemp(*args: Any, **kwargs: Any) -> tuple[int, str]:
        calls["mkstemp"] += 1
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    await there_and_back(a, b)
    assert calls == {}
    history = a.state_dir / "history" / "migrations.jsonl"
    assert len(history.read_text().splitlines()) == 4  # 2 round trips, both roles each
    assert not [p for p in (a.state_dir / "status").iterdir() if p.name.startswith(".")]


def test_a_write_into_a_missing_folder_makes_it(tmp_path: Path) -> None:
    path = tmp_path / "new" / "deeper" / "f.xml"
    files.atomic_write(path, b"<x/>", sync_dir=False, fsync=False)
    files.atomic_write(path, b"<y/>", sync_dir=False, fsync=False)
    assert path.read_bytes() == b"<y/>"
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.xml"]
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_a_temporary_name_left_by_a_killed_daemon_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "f.xml"
    serial = next(files._serial)
    for n in range(serial + 1, serial + 4):  # the next names, as a crash of this pid left them
        (tmp_path / f".f.xml.{os.getpid()}.{n}").write_bytes(b"left")
    files.atomic_write(path, b"<x/>", sync_dir=False, fsync=False)
    assert path.read_bytes() == b"<x/>"
    assert len(list(tmp_path.iterdir())) == 4


def test_history_line_is_the_entry_as_a_dict() -> None:
    entry = Entry("2026-12-02T00:00:00Z", "ab" * 16, "vm", str(uuidlib.uuid4()), "source",
                  "a", "b", "live", "direct", "v3+params", "failed", 'x "y"\n', 12, 3, 4096)
    assert entry.to_json() == json.dumps(asdict(entry), separators=(",", ":"))
    assert Entry.from_json(entry.to_json()) == entry
