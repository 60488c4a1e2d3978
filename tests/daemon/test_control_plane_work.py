"""What a migration's control plane does per migration, counted (issue 17): the work a
repeated migration no longer repeats.

Real daemons in this process (``test`` backend), one migration there and back first (so that
the folders and caches a first migration makes exist), then counted over one more round trip.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import tempfile
import uuid as uuidlib
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from virtmig.daemon import audit, interceptor, registry, statusxml
from virtmig.daemon import state as files
from virtmig.daemon.authz import Policy
from virtmig.daemon.cookie import _canonical_uuid
from virtmig.daemon.history import Entry
from virtmig.daemon.registry import DomainObj, Registry
from virtmig.proto import compat
from virtmig.proto.errors import InvalidArgument
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


class _CountingEtree:
    """``lxml.etree`` as one module sees it, its ``fromstring`` calls counted."""

    def __init__(self) -> None:
        self.parses = 0

    def fromstring(self, *args: Any, **kwargs: Any) -> Any:
        self.parses += 1
        return etree.fromstring(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(etree, name)


async def test_status_writes_do_not_parse_the_live_definition_again(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """A migration writes the status file 7 times (4 on the source, 3 on the destination), each
    with the same live definition: parsed once per document, not once per write."""
    a, b = pair
    counting = _CountingEtree()
    monkeypatch.setattr(registry, "etree", counting)
    writes = collections.Counter[str]()
    real = Registry._status_data

    def status_data(self: Registry, dom: DomainObj) -> bytes | None:
        data = real(self, dom)
        if data is not None:
            writes[self._files.root.name] += 1
            assert dom.live is not None
            assert data == _reference_status(data, dom.live.xml)
        return data

    monkeypatch.setattr(Registry, "_status_data", status_data)
    await there_and_back(a, b)
    assert sum(writes.values()) == 14
    assert counting.parses == 0


def _reference_status(data: bytes, live_xml: str) -> bytes:
    """The status document as ``data``'s header with the live definition parsed and appended
    (how the status was written before the live definition's bytes were kept)."""
    root = etree.fromstring(data, etree.XMLParser(remove_blank_text=True))
    for child in root.findall("domain"):
        root.remove(child)
    root.append(etree.fromstring(live_xml.encode()))
    return bytes(etree.tostring(root, pretty_print=True))


@pytest.mark.parametrize("live", [
    "<domain type='test'><name>c</name><uuid>{u}</uuid><memory>4096</memory></domain>",
    "<domain type='test'>\n    <name>w</name><!-- a comment -->\n  <uuid>{u}</uuid>\n"
    "  <description>  text  &amp; more </description><memory>4096</memory>\n</domain>",
    "<domain xmlns:q='urn:x' type='test'><q:x a='&lt;virtmig-live-definition/&gt;'/>"
    "<name>n</name><uuid>{u}</uuid></domain>",
])
def test_live_section_is_the_parsed_definition(live: str) -> None:
    xml = live.format(u=uuidlib.uuid4())
    root = etree.Element("domstatus", state="running", reason="migrated", id="3",
                         persistent="yes")
    etree.SubElement(root, "job", {"async": "migration out", "phase": "perform3"})
    etree.SubElement(root, statusxml._LIVE_PLACEHOLDER)
    spliced = bytes(etree.tostring(root, pretty_print=True)).replace(
        statusxml._LIVE_PLACEHOLDER_BYTES, statusxml._live_section(xml), 1)
    root.remove(root[-1])
    root.append(etree.fromstring(xml.encode()))
    assert spliced == bytes(etree.tostring(root, pretty_print=True))


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


@pytest.mark.parametrize("spelling", [
    "{u}", "{U}", " {h} ", "{h}", "{spaced}", "{h}0", "{short}", "x{short}", "", "{h}\u0660",
])
def test_cookie_uuid_spellings_as_uuid_reads_them(spelling: str) -> None:
    u = uuidlib.uuid4()
    text = spelling.format(u=u, U=str(u).upper(), h=u.hex,
                           spaced=" ".join(u.hex[i:i + 2] for i in range(0, 32, 2)),
                           short=u.hex[:31])
    compact = text.strip().replace("-", "").replace(" ", "")
    try:
        want: str | None = str(uuidlib.UUID(hex=compact)) if len(compact) == 32 else None
    except ValueError:
        want = None
    assert _canonical_uuid(text) == want


async def test_audit_builds_no_log_record_when_info_is_off(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A daemon logging at WARNING (the benchmarks', or ``--log-level warning``) builds no
    audit record's fields per phase change and job end; the history still gets every entry."""
    a, b = pair
    caplog.set_level(logging.WARNING, logger=audit.log.name)
    logged = collections.Counter[str]()
    monkeypatch.setattr(audit.log, "info", lambda *args, **kwargs: logged.update(["info"]))
    await there_and_back(a, b)
    assert logged == {}
    history = a.state_dir / "history" / "migrations.jsonl"
    assert len(history.read_text().splitlines()) == 4


async def test_a_call_reuses_its_methods_wrapped_handler(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The interceptor wraps a method's handler once, not on every call; after a reload's new
    policy, each method is wrapped again, once, with it (its enforcement: tests/daemon/
    test_reload.py)."""
    a, b = pair
    wraps = collections.Counter[str]()
    real = interceptor.wrap_handler

    def wrap_handler(handler: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        wraps[method] += 1
        return real(handler, method, *args, **kwargs)

    monkeypatch.setattr(interceptor, "wrap_handler", wrap_handler)
    await there_and_back(a, b)
    assert wraps == {}
    gate = a.running.gate
    assert gate is not None
    gate.policy = Policy(readonly_dns=("CN=nobody",))  # what a reload does
    await there_and_back(a, b)
    assert wraps and all(n == 1 for n in wraps.values())


def test_flag_rules_are_looked_at_only_when_their_flags_are_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``check_rules`` for a plain live migration asks no rule whose flags are not all set."""
    asked: list[compat.Rule] = []
    real = compat.Rule.violated

    def violated(rule: compat.Rule, flags: MigrateFlags, params: TypedParams | None) -> bool:
        asked.append(rule)
        return real(rule, flags, params)

    monkeypatch.setattr(compat.Rule, "violated", violated)
    compat.check_rules(F.LIVE | F.PERSIST_DEST, TypedParams(), compat.Layer.CLIENT
                       | compat.Layer.DRIVER)
    assert all(r.when & (F.LIVE | F.PERSIST_DEST) == r.when for r in asked)
    assert len(asked) < len(compat.RULES)
    with pytest.raises(InvalidArgument):
        compat.check_rules(F.NON_SHARED_DISK | F.NON_SHARED_INC | F.LIVE, None,
                           compat.Layer.CLIENT)


async def test_calls_and_phases_count_in_children_looked_up_once(
        pair: list[Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """Every RPC and phase change counts in a labelled metric: the child of its labels is
    looked up once (``labels`` validates and locks), not per call."""
    a, b = pair
    looked = collections.Counter[str]()
    for host in (a, b):
        metrics = host.daemon.metrics
        assert metrics is not None
        for name in ("rpcs", "rpc_seconds", "phase_seconds"):
            family = getattr(metrics, name)
            real = family.labels

            def labels(*values: str, _real: Any = real, _name: str = name) -> Any:
                looked[_name] += 1
                return _real(*values)

            monkeypatch.setattr(family, "labels", labels)
    await there_and_back(a, b)
    assert looked == {}
    scraped = a.daemon.metrics.scrape().decode() if a.daemon.metrics else ""
    assert 'virtmig_rpc_total{code="OK",method="virtmig.v1.Migration/Begin3Params"} 2.0' \
        in scraped
