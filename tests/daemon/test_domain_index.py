"""The definition index (issue 17): a start takes each definition's name from
``STATE/domains.index`` while its entry matches the file, and parses the definition on first
use; a missing, stale, damaged or foreign index falls back to parsing (and is rewritten), a
definition edited behind the daemon's back is seen, an invalid one behaves as without the index,
a crash between a definition's write and its record leaves a consistent daemon, and define and
undefine append one record each, whatever the number of domains.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from virtmig.daemon import domindex
from virtmig.daemon.domobj import DomainObj
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.daemon.registry import Registry
from virtmig.daemon.state import StateDir
from virtmig.proto.errors import NoDomain, XMLError
from virtmig.testing import domain_xml, start_host, stop_host

UUIDS = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(1, 13)]


def write(state: Path, count: int = len(UUIDS)) -> list[str]:
    folder = state / "domains"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        (folder / f"{UUIDS[i]}.xml").write_text(domain_xml(f"vm{i:02d}", uuid=UUIDS[i]))
    return [f"vm{i:02d}" for i in range(count)]


def loaded(state: Path) -> Registry:
    registry = Registry(StateDir(state))
    registry.load()
    return registry


def names(registry: Registry) -> list[str]:
    return [d.name for d in registry.listing(active=True, inactive=True)]


def definition(state: Path, i: int) -> Path:
    return state / "domains" / f"{UUIDS[i]}.xml"


def test_a_start_with_a_matching_index_parses_no_definition(tmp_path: Path) -> None:
    want = write(tmp_path)
    first = loaded(tmp_path)
    assert first.parsed == len(want) and names(first) == want
    assert (tmp_path / "domains.index").exists()
    again = loaded(tmp_path)
    assert again.parsed == 0
    assert names(again) == want
    assert all(d.persistent and not d.active for d in again)
    # Parsed on first use, with the file's content.
    dom = again.by_name("vm03")
    assert again.parsed == 1
    assert dom.config == parse_domain_xml(definition(tmp_path, 3).read_bytes())
    assert again.by_uuid(UUIDS[3]) is dom and again.parsed == 1


def test_a_missing_index_is_rebuilt(tmp_path: Path) -> None:
    want = write(tmp_path)
    loaded(tmp_path)
    (tmp_path / "domains.index").unlink()
    rebuilt = loaded(tmp_path)
    assert rebuilt.parsed == len(want) and rebuilt.index.compactions == 1
    assert names(rebuilt) == want
    assert loaded(tmp_path).parsed == 0


@pytest.mark.parametrize("damage", ["flip", "torn", "header", "garbage"])
def test_a_damaged_index_falls_back_to_parsing_and_is_rewritten(
        tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture) -> None:
    want = write(tmp_path)
    loaded(tmp_path)
    index = tmp_path / "domains.index"
    lines = index.read_text().splitlines(keepends=True)
    if damage == "flip":  # one record's name changed: its CRC no longer matches
        lines[4] = lines[4].replace("vm03", "vm99")
    elif damage == "torn":  # the last record cut short
        lines[-1] = lines[-1][:30]
    elif damage == "header":  # another version's index
        lines[0] = "virtmig-domain-index 1 0.0.0-other\n"
    else:
        lines.insert(2, "\x00\xff not a record at all\n")
    index.write_text("".join(lines), errors="surrogateescape")
    again = loaded(tmp_path)
    assert names(again) == want
    assert again.parsed == {"flip": 1, "torn": 1, "header": len(want), "garbage": 0}[damage]
    assert again.index.compactions == 1
    assert "vm99" not in index.read_text()
    assert loaded(tmp_path).parsed == 0


def test_a_definition_edited_behind_the_daemons_back_is_seen(tmp_path: Path) -> None:
    write(tmp_path)
    loaded(tmp_path)
    # Rewritten in place (same inode), its name changed; another one replaced by a new file.
    with open(definition(tmp_path, 2), "r+") as f:
        f.write(domain_xml("renamed", uuid=UUIDS[2]))
        f.truncate()
    new = definition(tmp_path, 5).with_name("new.tmp")
    new.write_text(domain_xml("vm05", memory_mib=96, uuid=UUIDS[5]))
    os.replace(new, definition(tmp_path, 5))
    again = loaded(tmp_path)
    assert again.parsed == 2
    assert "renamed" in names(again) and "vm02" not in names(again)
    config = again.by_name("vm05").config
    assert config is not None and config.memory_kib == 96 * 1024
    assert loaded(tmp_path).parsed == 0  # their new records were appended


def test_an_invalid_definition_is_ignored_as_without_an_index(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path)
    loaded(tmp_path)
    definition(tmp_path, 4).write_text("<domain>")
    again = loaded(tmp_path)
    assert "vm04" not in names(again)
    assert definition(tmp_path, 4).exists()  # left where it is, as before the index
    assert any(r.levelno == logging.ERROR and "ignoring unreadable definition" in r.getMessage()
               for r in caplog.records)


def test_a_definition_found_invalid_on_first_use_is_dropped_as_at_load(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(tmp_path)
    loaded(tmp_path)
    registry = loaded(tmp_path)
    assert registry.parsed == 0
    definition(tmp_path, 4).write_text("<domain>")  # broken while the daemon runs
    definition(tmp_path, 6).write_text(domain_xml("other", uuid=UUIDS[6]))  # renamed
    with pytest.raises(NoDomain, match="no domain with matching name 'vm04'"):
        registry.by_name("vm04")
    assert registry.find_uuid(UUIDS[6]) is None
    assert "vm04" not in names(registry) and "vm06" not in names(registry)
    assert len(registry) == len(UUIDS) - 2
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR][-2:] == [
        f"ignoring unreadable definition {definition(tmp_path, i)}: {why}" for i, why in (
            (4, parse_error("<domain>")),
            (6, f"XML error: it names domain 'other' ({UUIDS[6]}), indexed as 'vm06' "
                f"({UUIDS[6]}): changed since the daemon started"))]
    # The next start parses them again and applies the load's rules.
    again = loaded(tmp_path)
    assert again.parsed == 2
    assert "other" in names(again) and "vm04" not in names(again)


def parse_error(xml: str) -> str:
    with pytest.raises(XMLError) as caught:
        parse_domain_xml(xml)
    return str(caught.value)


def test_define_and_undefine_append_one_record_each(tmp_path: Path) -> None:
    write(tmp_path)
    loaded(tmp_path)
    registry = loaded(tmp_path)
    index = tmp_path / "domains.index"
    before = index.read_text()
    d = parse_domain_xml(domain_xml("extra"))
    assert registry.check_define(d) is None
    dom = registry.add(DomainObj(uuid=d.uuid, name=d.name, config=d))
    registry.save_config(dom)
    dom.config = None
    registry.save_config(dom)
    registry.remove(dom)
    after = index.read_text()
    assert after.startswith(before)  # appended, never rewritten
    assert len(after.splitlines()) == len(before.splitlines()) + 2
    assert registry.index.appends == 2 and registry.index.compactions == 0


def test_the_journal_is_compacted_while_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(domindex, "COMPACT_SLACK", 10)
    write(tmp_path)
    registry = loaded(tmp_path)
    dom = registry.by_name("vm00")
    for _ in range(40):  # redefined again and again: the journal stays bounded
        registry.save_config(dom)
    lines = (tmp_path / "domains.index").read_text().splitlines()
    assert registry.index.compactions >= 2
    assert len(lines) <= 1 + 2 * len(UUIDS) + 10 + 1
    assert loaded(tmp_path).parsed == 0


def test_a_crash_between_the_definition_and_its_record_leaves_a_consistent_daemon(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path)
    registry = loaded(tmp_path)

    def crash(self: domindex.DomainIndex, body: str) -> None:
        raise SystemExit("killed")

    # A redefinition (its name unchanged, its memory changed) and an undefine, each killed
    # between the file and the index record.
    dom = registry.by_name("vm01")
    config = parse_domain_xml(domain_xml("vm01", memory_mib=200, uuid=UUIDS[1]))
    monkeypatch.setattr(domindex.DomainIndex, "_append", crash)
    dom.config = config
    with pytest.raises(SystemExit):
        registry.save_config(dom)
    gone = registry.by_name("vm02")
    gone.config = None
    with pytest.raises(SystemExit):
        registry.save_config(gone)
    monkeypatch.undo()
    again = loaded(tmp_path)
    assert "vm02" not in names(again) and len(again) == len(UUIDS) - 1
    assert again.parsed == 1  # the rewritten file, whose entry no longer matches
    new = again.by_name("vm01").config
    assert new is not None and new.memory_kib == 200 * 1024


async def test_the_daemon_starts_from_the_index_and_parses_on_first_use(
        tmp_path: Path) -> None:
    want = write(tmp_path / "h")
    host = await start_host(tmp_path, "h")
    try:
        assert host.daemon.registry.parsed == len(want)
    finally:
        await stop_host(host)
    host = await start_host(tmp_path, "h")
    try:
        registry = host.daemon.registry
        assert registry.parsed == 0
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == want
        assert registry.parsed == 0  # a list parses nothing
        assert "<name>vm07</name>" in await host.conn.xml_desc("vm07")
        await host.conn.start("vm08")
        await host.conn.define(domain_xml("vm09", memory_mib=80, uuid=UUIDS[9]))
        await host.conn.undefine("vm10")
        assert registry.parsed == 4  # each looked up (vm09: by the define's clash check)
    finally:
        await stop_host(host)
    host = await start_host(tmp_path, "h")  # vm08 ran: the daemon's restart ended it
    try:
        assert host.daemon.registry.parsed == 1  # vm08, whose status file it read
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == \
            [n for n in want if n != "vm10"]
        info = await host.conn.info("vm09")
        assert info.max_memory_kib == 80 * 1024
    finally:
        await stop_host(host)


def test_an_index_made_by_an_append_has_its_header_and_is_private(tmp_path: Path) -> None:
    write(tmp_path)
    registry = loaded(tmp_path)
    index = tmp_path / "domains.index"
    index.unlink()  # deleted while the daemon runs
    dom = registry.by_name("vm00")
    registry.save_config(dom)
    assert stat.S_IMODE(index.stat().st_mode) == 0o600
    assert index.read_text().startswith(registry.index.header)
    again = loaded(tmp_path)
    assert again.parsed == len(UUIDS) - 1  # all but vm00, whose record the append wrote
