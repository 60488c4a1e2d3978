"""The CLI in a mixed fleet: ``nodeinfo`` (and ``capabilities --json``) shows what a daemon
speaks (``migration_protocols``, ``migration_params`` in its config), ``migrate --verbose`` says
which protocol it used, the completed job records it, and what v2 cannot carry is refused with
libvirt's message."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.cli_helpers import (
    Daemon,
    fails,
    migration_id,
    ok,
    start_daemon,
    start_guest,
    stop_process,
    virtmig,
)
from virtmig.daemon.config import build_parser, load_config
from virtmig.proto.errors import InvalidArgument


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon, Daemon]]:
    """A current daemon, one without the extensible-parameter RPCs, and one that speaks only
    protocol v2."""
    started: list[Daemon] = []
    try:
        started.append(start_daemon(tmp_path, "new"))
        started.append(start_daemon(tmp_path, "mid", "migration_params = false\n"))
        started.append(start_daemon(tmp_path, "old", "migration_protocols = [2]\n"))
        yield started[0], started[1], started[2]
    finally:
        for d in started:
            stop_process(d.proc)


def node(uri: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1)
                                      for line in ok(uri, "nodeinfo").splitlines())}


def test_nodeinfo_verbose_and_completed_stats(fleet: tuple[Daemon, Daemon, Daemon],
                                              tmp_path: Path) -> None:
    new, mid, old = fleet
    assert node(new.uri)["Migration protocols"] == "v3+params v3 v2"
    assert node(mid.uri)["Migration protocols"] == "v3 v2"
    assert node(old.uri)["Migration protocols"] == "v2"
    assert node(old.uri)["Features"].split() == ["P2P", "V2"]
    # The same in --json, and in capabilities (README: nodeinfo --json, capabilities --json).
    for daemon, spoken in ((new, ["v3+params", "v3", "v2"]), (mid, ["v3", "v2"]),
                           (old, ["v2"])):
        assert json.loads(ok(daemon.uri, "nodeinfo", "--json"))["migration_protocols"] == spoken
        caps = json.loads(ok(daemon.uri, "capabilities", "--json"))
        assert caps["host"]["migration"]["protocols"] == spoken
    assert json.loads(ok(old.uri, "capabilities", "--json"))["host"]["features"] == ["P2P", "V2"]

    start_guest(tmp_path, new.uri, "vm")
    res = virtmig(new.uri, "migrate", "--live", "--verbose", "vm", mid.uri)
    assert res.returncode == 0, res.stderr
    assert res.stdout == f"Migration id: {migration_id(mid.uri, 'vm')}\nMigration protocol: v3\n"
    assert res.stderr.endswith("\rMigration: [100.00 %]\n")

    res = virtmig(mid.uri, "migrate", "--live", "--verbose", "vm", old.uri)
    assert res.returncode == 0, res.stderr
    # v2: the destination made the id at Prepare2; its cookie told the client.
    assert res.stdout == f"Migration id: {migration_id(old.uri, 'vm')}\nMigration protocol: v2\n"
    assert "Migration protocol: v2\n" in ok(old.uri, "domjobinfo", "--completed", "vm")
    assert "virtmig.protocol: v2" in ok(old.uri, "domjobinfo", "--completed", "--rawstats",
                                        "vm").splitlines()

    res = virtmig(old.uri, "migrate", "--live", "--p2p", "--verbose", "vm", new.uri)
    assert res.returncode == 0, res.stderr
    # The old source speaks only v2; its Perform reply gives the id.
    assert res.stdout == f"Migration id: {migration_id(new.uri, 'vm')}\nMigration protocol: v2\n"
    assert ok(new.uri, "domstate", "vm") == "running\n"
    # Without --verbose nothing is printed.
    assert ok(new.uri, "migrate", "--live", "--p2p", "vm", mid.uri) == ""
    assert ok(mid.uri, "domstate", "vm") == "running\n"


def test_what_v2_cannot_carry_is_refused(fleet: tuple[Daemon, Daemon, Daemon],
                                         tmp_path: Path) -> None:
    new, _mid, old = fleet
    start_guest(tmp_path, new.uri, "vm")
    xml = tmp_path / "dest.xml"
    xml.write_text(ok(new.uri, "dumpxml", "--migratable", "vm"))
    assert fails(new.uri, "migrate", "--live", "--xml", str(xml), "vm", old.uri) == (
        "error: argument unsupported: Unable to change target guest XML during migration\n")
    assert "extensible parameters" in fails(new.uri, "migrate", "--live", "--listen-address",
                                            "127.0.0.1", "vm", old.uri)
    assert fails(new.uri, "migrate", "--live", "--postcopy", "vm", old.uri) == (
        "error: invalid argument: unsupported flags (0x8000) in function "
        "virDomainMigratePrepare2\n")
    assert ok(new.uri, "domstate", "vm") == "running\n"
    assert ok(old.uri, "list", "--all") == " Id   Name   State\n--------------------\n"


@pytest.mark.parametrize(("toml", "message"), [
    ("migration_protocols = []", "invalid migration_protocols"),
    ("migration_protocols = [1, 2]", "invalid migration_protocols"),
    ("migration_protocols = 3", "invalid migration_protocols"),
    ("migration_protocols = [true]", "invalid migration_protocols"),
    ("migration_params = 1", "invalid migration_params"),
])
def test_bad_protocol_settings_are_refused(tmp_path: Path, toml: str, message: str) -> None:
    cfg = tmp_path / "virtmigd.toml"
    cfg.write_text(f"{toml}\n")
    with pytest.raises(InvalidArgument, match=message):
        load_config(build_parser().parse_args(["--config", str(cfg)]))


def test_protocol_settings_are_read(tmp_path: Path) -> None:
    cfg = tmp_path / "virtmigd.toml"
    cfg.write_text("migration_protocols = [3, 2, 3]\nmigration_params = false\n")
    config = load_config(build_parser().parse_args(["--config", str(cfg)]))
    assert config.migration_protocols == (2, 3) and config.migration_params is False
    default = load_config(build_parser().parse_args([]))
    assert default.migration_protocols == (2, 3) and default.migration_params is True
