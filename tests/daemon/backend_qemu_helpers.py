"""Shared by the ``qemu`` backend's test modules (and :mod:`tests.daemon.test_qemu_stall`): tiny
idle guests' XML and specs, bounded waits, and the backends ``src`` and ``dst`` (fixtures, two
state folders).
Guests here are tiny and idle (SeaBIOS only, ``-m 64``, TCG): they start in well under a second.
They run under TCG even where KVM is usable: this module is the suite's TCG coverage (the QEMU
tests elsewhere run the test guest under KVM when the machine has it), and the backend's
TCG-only paths are exercised here.
Migrations run between two backend instances (two state folders) on 127.0.0.1.  A migration that
must stay in flight long enough to be cancelled or broken is throttled to 32 KiB/s: even an idle
guest sends about 0.7 MB (a header per zero page), so it takes seconds.
"""

from __future__ import annotations

import asyncio
import os
import textwrap
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from virtmig.daemon.backend.base import (
    GuestSpec,
    MigrationStatus,
    MigrationTuning,
    StreamAddress,
)
from virtmig.daemon.backend.qemu import (
    QemuBackend,
    QemuSettings,
)
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.testing import (
    free_port,
    kill_leftover_qemus,
    qemu_binary_or_skip,
    qemu_settings,
    wait_until,
)

MIB = 1024 * 1024

#: Settings naming an emulator for tests that only parse and validate definitions: nothing is
#: run, so they pass where QEMU is not installed (the default settings find none on PATH then).
PARSE_ONLY = QemuSettings(emulators=("/usr/bin/qemu-system-x86_64",))


def parse_only() -> QemuBackend:
    """A backend for validating definitions (:data:`PARSE_ONLY`): never opened, runs nothing."""
    return QemuBackend(PARSE_ONLY)


SLOW = MigrationTuning(bandwidth_bytes_per_s=32 * 1024)


T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float = 20) -> T:
    """No test may hang: every wait on QEMU is bounded."""
    return await asyncio.wait_for(aw, seconds)


def guest_xml(name: str = "tiny", *, uuid: str | None = None, memory_mib: int = 64,
              domain_type: str = "qemu", machine: str = "pc", os_extra: str = "",
              devices: str = "") -> str:
    uuid = uuid or str(uuidlib.uuid4())
    return textwrap.dedent(f"""\
        <domain type='{domain_type}'>
          <name>{name}</name>
          <uuid>{uuid}</uuid>
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='{machine}'>hvm</type>{os_extra}</os>
          <devices>{devices}</devices>
        </domain>
        """)


def make_spec(xml: str | None = None, **kwargs: Any) -> GuestSpec:
    d = parse_domain_xml(xml or guest_xml(**kwargs))
    return GuestSpec(uuid=d.uuid, name=d.name, memory_bytes=d.memory_kib * 1024,
                     vcpus=d.vcpus, options=dict(d.options), xml=d.xml)


def to(port: int) -> StreamAddress:
    return StreamAddress("127.0.0.1", port)


async def running_and_listening(src: QemuBackend, dst: QemuBackend) -> tuple[GuestSpec, int]:
    """A guest started (running) on ``src`` and its incoming twin listening on ``dst``: the
    guest's spec and the port."""
    spec = make_spec()
    await within(src.start(spec, paused=False))
    return spec, await within(dst.incoming_start(spec, to(free_port())))


def process_gone(pid: int) -> bool:
    """Neither running nor a zombie: the process was reaped."""
    return not os.path.exists(f"/proc/{pid}")


async def wait_status(backend: QemuBackend, uuid: str, status: MigrationStatus) -> None:
    await wait_until(lambda: backend.progress(uuid).status is status, timeout=30,
                     what=lambda: f"migration status {status.value}: {backend.progress(uuid)}")


Factory = Callable[[str], Awaitable[QemuBackend]]


@pytest.fixture
async def backends(tmp_path: Path) -> AsyncIterator[Factory]:
    """Open backends on folders under tmp_path; afterwards every guest and QEMU is gone."""
    qemu_binary_or_skip()
    opened: list[QemuBackend] = []

    async def make(name: str) -> QemuBackend:
        backend = QemuBackend(qemu_settings(tmp_path))
        await within(backend.open(tmp_path / name))
        opened.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in opened:
            for uuid in list(backend._guests):
                await within(backend.destroy(uuid))
            await within(backend.close())
        assert not kill_leftover_qemus(tmp_path), "a test left QEMU processes running"


@pytest.fixture
async def src(backends: Factory) -> QemuBackend:
    return await backends("src")


@pytest.fixture
async def dst(backends: Factory) -> QemuBackend:
    return await backends("dst")
