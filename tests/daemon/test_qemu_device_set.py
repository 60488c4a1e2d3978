""":func:`virtmig.testing.qemu.device_set` without QEMU: what it reads from each QMP answer, and
that a difference in any part (a slot, a medium, a peripheral's type, a vCPU, the machine)
makes two sets differ, so the corpus test's equality can fail."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from virtmig.testing.qemu import device_set

ANSWERS: dict[str, Any] = {
    "query-pci": [{"bus": 0, "devices": [
        {"bus": 0, "slot": 0, "function": 0, "id": {"vendor": 0x8086, "device": 0x1237}},
        {"bus": 0, "slot": 5, "function": 0, "id": {"vendor": 0x1AF4, "device": 0x1002},
         "qdev_id": "balloon0"}]}],
    "query-block": [{"device": "", "qdev": "/machine/peripheral/sata-sdc/device[0]"},
                    {"device": "", "qdev": "virtio-vda",
                     "inserted": {"drv": "raw", "ro": False}}],
    "qom-list /machine/peripheral": [{"name": "type", "type": "string"},
                                     {"name": "balloon0", "type": "child<virtio-balloon-pci>"}],
    "qom-list /machine/peripheral-anon": [{"name": "device[0]", "type": "child<isa-serial>"}],
    "query-cpus-fast": [{"cpu-index": 0, "qom-path": "/machine/unattached/device[0]",
                         "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}}],
    "qom-get type": "Nehalem-x86_64-cpu",
    "qom-get /machine": "pc-q35-7.2-machine",
}


def _query(answers: dict[str, Any]) -> Any:
    async def query(command: str, args: dict[str, object] | None) -> Any:
        if command == "qom-list":
            assert args is not None
            return answers[f"qom-list {args['path']}"]
        if command == "qom-get":
            assert args is not None
            return answers["qom-get /machine" if args["path"] == "/machine" else "qom-get type"]
        return answers[command]
    return query


async def test_what_is_read() -> None:
    got = await device_set(_query(ANSWERS))
    assert got == {
        "pci": [(0, 0, 0, 0x8086, 0x1237, ""), (0, 5, 0, 0x1AF4, 0x1002, "balloon0")],
        "block": [("", "/machine/peripheral/sata-sdc/device[0]", False, "", False),
                  ("", "virtio-vda", True, "raw", False)],
        "peripheral": [("balloon0", "child<virtio-balloon-pci>")],
        "peripheral-anon": ["child<isa-serial>"],
        "cpus": [(0, 0, None, 0, 0)],
        "cpu-type": "Nehalem-x86_64-cpu",
        "machine": "pc-q35-7.2-machine",
    }


@pytest.mark.parametrize(("key", "path", "value"), [
    ("query-pci", (0, "devices", 1, "slot"), 6),
    ("query-block", (1, "inserted", "ro"), True),
    ("qom-list /machine/peripheral", (1, "type"), "child<virtio-balloon-pci-transitional>"),
    ("qom-list /machine/peripheral-anon", (0, "type"), "child<pci-serial>"),
    ("query-cpus-fast", (0, "props", "core-id"), 1),
    ("qom-get type", (), "Westmere-x86_64-cpu"),
    ("qom-get /machine", (), "pc-i440fx-7.2-machine"),
])
async def test_each_part_counts(key: str, path: tuple[Any, ...], value: Any) -> None:
    other = copy.deepcopy(ANSWERS)
    if path:
        node = other[key]
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value
    else:
        other[key] = value
    assert await device_set(_query(other)) != await device_set(_query(ANSWERS))
