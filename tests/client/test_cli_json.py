"""The ``--json`` output of every read command, parsed, against two real daemons, with exactly the
keys README's "Scriptable output" table documents; and ``list``'s virsh filters (``--name``,
``--uuid``, ``--state-*``, ``--persistent``, ``--transient``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tests.client import cli_helpers
from tests.client.cli_helpers import (
    Daemon,
    background,
    ok,
    start_guest,
    stop_process,
    virtmig,
)
from virtmig.testing import wait_until_sync

daemons = cli_helpers.daemons
README = Path(__file__).resolve().parents[2] / "README.md"


def documented(command: str, depth: int = 1) -> set[str]:
    """The keys README's "Scriptable output" table documents for ``COMMAND --json`` at ``depth``
    (1: the top-level object's): quoted names that are not a value (``"type": "none|..."``);
    ``a `list` entry plus`` adds ``list``'s."""
    head = f"| `{command} --json` |"
    [row] = [line for line in README.read_text().splitlines() if line.startswith(head)]
    text = row[len(head):]
    keys: set[str] = set()
    level = 0
    for m in re.finditer(r'[{}]|(: )?"([a-z_]+)"', text):
        if m.group(0) in "{}":
            level += 1 if m.group(0) == "{" else -1
        elif m.group(1) is None and max(level, 1) == depth:
            keys.add(m.group(2))
    if "a `list` entry plus" in text:
        keys |= documented("list", depth)
    assert keys, row
    return keys


def as_json(uri: str, *args: str) -> Any:
    return json.loads(ok(uri, *args))


def check_list_filters(dst: Daemon, sleeps_uuid: str) -> None:
    """virsh's ``list`` filters and formats, over the guests of the test below."""
    def names(*opts: str) -> list[str]:
        return sorted(ok(dst.uri, "list", "--name", *opts).split())

    assert names() == ["moved", "runs", "sleeps"]
    assert names("--all") == ["moved", "off", "runs", "sleeps"]
    assert names("--state-running") == ["moved", "runs"]
    assert names("--state-paused") == ["sleeps"]
    assert names("--state-shutoff") == ["off"]  # alone, it lists the inactive ones
    assert names("--all", "--state-running", "--state-shutoff") == ["moved", "off", "runs"]
    assert names("--transient") == ["moved"]
    assert names("--all", "--persistent") == ["off", "runs", "sleeps"]
    assert names("--persistent", "--state-paused") == ["sleeps"]
    assert names("--persistent", "--transient") == ["moved", "runs", "sleeps"]
    uuids = ok(dst.uri, "list", "--uuid", "--state-paused")
    assert uuids == f"{sleeps_uuid}\n"
    both = ok(dst.uri, "list", "--uuid", "--name", "--state-paused")
    assert both == f"{sleeps_uuid} sleeps\n"
    res = virtmig(dst.uri, "list", "--table", "--name")
    assert res.returncode == 1
    assert "Options --table and --name are mutually exclusive" in res.stderr


def test_json_shapes_and_list_filters(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "moved")
    start_guest(tmp_path, dst.uri, "runs")
    start_guest(tmp_path, dst.uri, "sleeps")
    ok(dst.uri, "suspend", "sleeps")
    start_guest(tmp_path, dst.uri, "off")
    ok(dst.uri, "destroy", "off")
    # Migrated without --persistent: transient on the destination, as in libvirt.
    ok(src.uri, "migrate", "--live", "moved", dst.uri)

    listed = as_json(dst.uri, "list", "--all", "--json")
    by_name = {d["name"]: d for d in listed}
    assert all(set(d) == documented("list") for d in listed), listed
    assert [d["name"] for d in listed][-1] == "off"  # virsh's order: inactive ones last
    assert set(by_name) == {"moved", "runs", "sleeps", "off"}
    assert by_name["off"] == {"id": None, "name": "off", "uuid": by_name["off"]["uuid"],
                              "state": "shut off", "state_code": 5, "reason": "destroyed",
                              "reason_code": 2, "persistent": True}
    assert (by_name["moved"]["state"], by_name["moved"]["reason"],
            by_name["moved"]["persistent"]) == ("running", "migrated", False)
    assert by_name["sleeps"]["state"] == "paused" and by_name["sleeps"]["reason"] == "user"
    assert isinstance(by_name["runs"]["id"], int)

    check_list_filters(dst, by_name["sleeps"]["uuid"])

    info = as_json(dst.uri, "dominfo", "runs", "--json")
    assert set(info) == documented("dominfo")
    assert info["name"] == "runs" and info["os_type"] == "hvm" and info["vcpus"] == 1
    assert info["max_memory_kib"] == 64 * 1024 and info["persistent"] is True
    assert info["state"] == "running" and info["reason"] == "booted"
    assert isinstance(info["cpu_time_ns"], int)

    assert set(as_json(dst.uri, "domstate", "runs", "--json")) == documented("domstate")
    assert as_json(dst.uri, "domstate", "sleeps", "--json") == {
        "state": "paused", "state_code": 3, "reason": "user", "reason_code": 1, "detail": ""}

    job = as_json(src.uri, "domjobinfo", "moved", "--completed", "--json")
    assert set(job) == documented("domjobinfo")
    assert set(job["data"]) == set(job["memory"]) == {"total", "processed", "remaining"} <= (
        documented("domjobinfo", 2))
    assert job["type"] == "completed" and job["operation"] == "migration-out"
    assert job["memory"]["total"] == 64 * 1024 * 1024
    assert isinstance(job["stats"]["downtime"], int) and job["time_elapsed_ms"] >= 0
    assert as_json(dst.uri, "domjobinfo", "runs", "--json")["type"] == "none"

    node = as_json(dst.uri, "nodeinfo", "--json")
    assert set(node) == documented("nodeinfo")
    assert node["hostname"] == "dst.test" and node["backend"] == "test"
    assert node["active_domains"] == 3 and node["inactive_domains"] == 1
    assert "v3" in " ".join(node["migration_protocols"])

    caps = as_json(dst.uri, "capabilities", "--json")
    assert set(caps) == documented("capabilities")
    assert set(caps["host"]) | set(caps["guests"][0]) == documented("capabilities", 2)
    assert set(caps["host"]["migration"]) == documented("capabilities", 3)
    assert caps["host"]["uuid"] == node["host_uuid"]
    assert "virtmig+tls" in caps["host"]["migration"]["uri_transports"]
    assert caps["guests"] == [{"os_type": "hvm", "arch": node["cpu_model"],
                               "domain_type": "test"}]
    xml = ok(dst.uri, "capabilities")
    assert xml.startswith("<capabilities>") and f"<uuid>{node['host_uuid']}</uuid>" in xml


def test_event_json_lines(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, _dst = daemons
    start_guest(tmp_path, src.uri, "vm")
    once = background(src.uri, "event", "--event", "lifecycle", "--domain", "vm", "--json")
    try:
        def answered() -> bool:  # suspend/resume until it has subscribed
            ok(src.uri, "suspend", "vm")
            ok(src.uri, "resume", "vm")
            return once.poll() is not None

        wait_until_sync(answered, timeout=30, interval=0.1, what="a one-shot event")
        out, err = once.communicate(timeout=10)
    finally:
        stop_process(once)
    assert (once.returncode, err) == (0, b"")
    lines = out.decode().splitlines()
    assert len(lines) == 1  # the event's JSON line only: no "events received" text
    event = json.loads(lines[0])
    assert set(event) == documented("event")
    assert set(event["domain"]) == documented("event", 2)
    assert event["event"] == "lifecycle"
    assert event["domain"]["name"] == "vm"
    assert event["description"] in ("Suspended Paused", "Resumed Unpaused")
    assert event["job"] is None and event["timestamp_ms"] > 0
