"""The state dir is loaded consistently at start: files that contradict each other or themselves
are reported (WARNING) and moved aside as ``*.rejected``; the first definition (by file name)
wins, and a stray status file never hides the real domain.
"""

from __future__ import annotations

import logging
import textwrap
from pathlib import Path

import pytest

from virtmig.daemon import registry
from virtmig.proto.flags import DomainState
from virtmig.testing import domain_xml, start_host, stop_host

U1 = "aaaaaaaa-1111-4111-8111-11111111111b"
U2 = "22222222-2222-4222-8222-222222222222"
U3 = "33333333-3333-4333-8333-333333333333"
U4 = "44444444-4444-4444-8444-444444444444"
U5 = "55555555-5555-4555-8555-555555555555"


def define(state: Path, file: str, name: str, uuid: str) -> Path:
    path = state / "domains" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(domain_xml(name, uuid=uuid))
    return path


def status(state: Path, file: str, name: str, uuid: str, *, persistent: bool) -> Path:
    path = state / "status" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(f"""\
        <domstatus state="running" reason="booted" id="1" persistent="{'yes' if persistent
                                                                         else 'no'}">
        """) + domain_xml(name, uuid=uuid) + "</domstatus>\n")
    return path


async def listing(tmp_path: Path) -> list[tuple[str, str]]:
    host = await start_host(tmp_path, "h")
    try:
        return sorted((d.name, d.uuid) for d in await host.conn.list_domains(inactive=True))
    finally:
        await stop_host(host)


def rejected(path: Path) -> bool:
    return not path.exists() and path.with_name(path.name + ".rejected").exists()


def warned(caplog: pytest.LogCaptureFixture, path: Path) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and f"rejected {path}" in r.getMessage()]


async def test_two_definitions_with_one_name_keep_the_first(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "h"
    second = define(state, f"{U1}.xml", "vm1", U1)
    first = define(state, f"{U2}.xml", "vm1", U2)  # "2..." sorts before "a..."
    assert await listing(tmp_path) == [("vm1", U2)]
    assert first.exists() and rejected(second)
    [message] = warned(caplog, second)
    assert "name 'vm1' is already defined" in message
    # Moved aside for good: the next start neither reads nor warns about it.
    caplog.clear()
    assert await listing(tmp_path) == [("vm1", U2)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING
                and "rejected" in r.getMessage()]


async def test_a_definition_under_another_uuids_file_name_is_rejected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "h"
    good = define(state, f"{U1}.xml", "vm1", U1)
    copy = define(state, f"{U1.upper()}.xml", "vm1", U1)  # same uuid, sorts first
    stray = define(state, "vm2.xml", "vm2", U2)
    assert await listing(tmp_path) == [("vm1", U1)]
    assert good.exists() and rejected(copy) and rejected(stray)
    assert warned(caplog, copy) and warned(caplog, stray)


async def test_a_status_without_its_definition_is_rejected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "h"
    path = status(state, f"{U1}.xml", "ghost", U1, persistent=True)
    assert await listing(tmp_path) == []
    assert rejected(path) and "no definition" in warned(caplog, path)[0]


async def test_a_status_with_another_name_never_hides_the_domain(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "h"
    define(state, f"{U1}.xml", "vm1", U1)
    path = status(state, f"{U1}.xml", "impostor", U1, persistent=True)
    assert await listing(tmp_path) == [("vm1", U1)]
    assert rejected(path) and warned(caplog, path)


async def test_a_transient_status_taking_a_defined_name_is_rejected(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "h"
    define(state, f"{U1}.xml", "vm1", U1)
    clash = status(state, f"{U2}.xml", "vm1", U2, persistent=False)
    misfiled = status(state, f"{U3}.xml", "vm3", U2, persistent=False)
    host = await start_host(tmp_path, "h")
    try:
        [dom] = await host.conn.list_domains(inactive=True)
        assert (dom.name, dom.uuid, dom.state) == ("vm1", U1, DomainState.SHUTOFF)
    finally:
        await stop_host(host)
    assert rejected(clash) and rejected(misfiled)
    assert warned(caplog, clash) and warned(caplog, misfiled)


async def test_a_consistent_state_dir_is_loaded_without_warnings(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "h"
    define(state, f"{U1}.xml", "vm1", U1)
    status(state, f"{U1}.xml", "vm1", U1, persistent=True)
    status(state, f"{U2}.xml", "transient", U2, persistent=False)
    assert await listing(tmp_path) == [("vm1", U1)]  # the test backend's guests died with it
    assert not list(state.rglob("*.rejected"))
    assert not [r for r in caplog.records if "rejected" in r.getMessage()]


async def test_no_more_than_max_domains_are_loaded(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """However many files the state dir holds, a list of the domains loaded fits in one reply:
    beyond MAX_DOMAINS (3 here) definitions and transient statuses are moved aside."""
    monkeypatch.setattr(registry, "MAX_DOMAINS", 3)
    state = tmp_path / "h"
    kept = [define(state, f"{u}.xml", f"vm{i}", u) for i, u in enumerate((U2, U3, U4))]
    extra = define(state, f"{U1}.xml", "vm9", U1)  # "a..." is read after "2...", "3...", "4..."
    transient = status(state, f"{U5}.xml", "vm5", U5, persistent=False)
    assert await listing(tmp_path) == [("vm0", U2), ("vm1", U3), ("vm2", U4)]
    assert all(p.exists() for p in kept) and rejected(extra) and rejected(transient)
    assert "at most 3 domains" in warned(caplog, extra)[0]
    assert "at most 3 domains" in warned(caplog, transient)[0]
