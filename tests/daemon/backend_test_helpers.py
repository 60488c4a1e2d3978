"""Shared by the ``test`` backend's test modules: bounded waits, guest specs, the two backends
``src`` and ``dst`` (fixtures) and a migration between them.
"""

from __future__ import annotations

import asyncio
import uuid as uuidlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from virtmig.daemon.backend.base import (
    GuestSpec,
    MigrationProgress,
    MigrationTuning,
    StreamAddress,
)
from virtmig.daemon.backend.test import TestBackend
from virtmig.testing import wait_until

MIB = 1024 * 1024


LOOPBACK = StreamAddress("127.0.0.1", 0)


T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float = 15) -> T:
    """No test may hang: every wait on a migration is bounded."""
    return await asyncio.wait_for(aw, seconds)


def make_spec(mib: int = 64, /, **options: str) -> GuestSpec:
    uuid = str(uuidlib.uuid4())
    return GuestSpec(
        uuid=uuid, name=f"g-{uuid[:8]}", memory_bytes=mib * MIB, vcpus=1, options=options
    )


def to(port: int) -> StreamAddress:
    return StreamAddress("127.0.0.1", port)


@pytest.fixture
async def src() -> AsyncIterator[TestBackend]:
    backend = TestBackend()
    yield backend
    await within(backend.close())


@pytest.fixture
async def dst() -> AsyncIterator[TestBackend]:
    backend = TestBackend()
    yield backend
    await within(backend.close())


async def migrate(
    src: TestBackend, dst: TestBackend, spec: GuestSpec, tuning: MigrationTuning | None = None
) -> tuple[MigrationProgress, MigrationProgress]:
    port = await dst.incoming_start(spec, LOOPBACK)
    assert port > 0
    out = await within(src.outgoing(spec.uuid, to(port), tuning or MigrationTuning()))
    inc = await within(dst.incoming_wait(spec.uuid))
    return out, inc


async def progress_reaches(
    backend: TestBackend, uuid: str, ok: Callable[[MigrationProgress], bool], what: str,
    timeout: float = 30,
) -> MigrationProgress:
    """The backend's progress of ``uuid``, once ``ok`` holds for it."""

    def reached() -> MigrationProgress | None:
        p = backend.progress(uuid)
        return p if ok(p) else None

    return await wait_until(
        reached, timeout=timeout,
        what=lambda: f"migration of {uuid} to reach {what}: {backend.progress(uuid)}")


async def wait_for_progress(backend: TestBackend, uuid: str, min_bytes: int) -> MigrationProgress:
    return await progress_reaches(backend, uuid, lambda p: p.processed_bytes >= min_bytes,
                                  f"{min_bytes} bytes sent", timeout=10)
