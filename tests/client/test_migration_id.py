"""The client knows the migration id too: read from the daemons' cookies (regular mode) or the
peer-to-peer reply, logged at INFO on ``virtmig.client`` with every phase and the outcome, and
the same id as both daemons' job statistics."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import migrate, running_guest
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import Trace, run_v3
from virtmig.daemon.cookie import Cookie, build_cookie
from virtmig.proto.errors import VirtmigError
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.migid import MIGRATION_ID_STAT, is_migration_id, migration_id_in_cookie
from virtmig.proto.params import TypedParams
from virtmig.testing import ClosedPortDest, Host, hosts

F = MigrateFlags
UUID = "0a3c39f1-5d14-4cbb-b3d5-5bdbc60d1ac6"
HOST_UUID = "3f1e8a4b-2c2d-4e8e-9b1a-0c7d6e5f4a3b"
MID = "0123456789abcdef0123456789abcdef"
DECOY = "ffffffffffffffffffffffffffffffff"


def cookie(mid: str, persistent_xml: str | None = None) -> bytes:
    return build_cookie(Cookie(name="vm1", uuid=UUID, hostname="src.test", hostuuid=HOST_UUID,
                               migration_id=mid, persistent_xml=persistent_xml))


def test_migration_id_in_cookie() -> None:
    assert migration_id_in_cookie(cookie(MID)) == MID
    assert migration_id_in_cookie(cookie("")) == ""
    # An element of that name in an embedded domain definition is not the cookie's id.
    decoy = (f"<domain type='test'><name>vm1</name><uuid>{UUID}</uuid><memory>65536</memory>"
             f"<metadata><x xmlns='urn:x'><virtmig-migration-id>{DECOY}"
             "</virtmig-migration-id></x></metadata></domain>")
    assert migration_id_in_cookie(cookie("", decoy)) == ""
    assert migration_id_in_cookie(cookie(MID, decoy)) == MID
    assert migration_id_in_cookie(b"") == ""
    assert migration_id_in_cookie(b"<qemu-migration><virtmig-migration-id>XYZ"
                                  b"</virtmig-migration-id></qemu-migration>") == ""
    assert is_migration_id(MID) and not is_migration_id(MID.upper())


def client_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "virtmig.client" and r.levelno == logging.INFO]


async def job_id(host: Host, name: str = "vm1") -> str:
    mid = (await host.conn.job_info(name, completed=True)).stat(MIGRATION_ID_STAT)
    assert isinstance(mid, str) and is_migration_id(mid)
    return mid


async def test_regular_migration_logs_its_id_per_phase(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtmig.client")
    trace = Trace()
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src)
        await migrate(src, dst, F.LIVE, trace=trace)
        mid = await job_id(src)
        assert await job_id(dst) == mid
    assert trace.migration_id == mid
    assert client_lines(caplog) == [
        "migration (id not known yet) of vm1: begin",
        f"Migration id: {mid} (migration of vm1)",
        f"migration {mid} of vm1: prepare",
        f"migration {mid} of vm1: perform",
        f"migration {mid} of vm1: finish",
        f"migration {mid} of vm1: confirm",
        f"migration {mid} of vm1: succeeded (protocol v3+params)",
    ]


async def test_failed_migration_logs_its_id(tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtmig.client")
    trace = Trace(announce=True, domain="vm1")
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src)
        with pytest.raises(VirtmigError):
            await run_v3(RemoteSource(src.conn, True), ClosedPortDest(dst.conn, True), "vm1",
                         TypedParams(), F.LIVE, protection=True, trace=trace)
        mid = await job_id(src)
    assert trace.migration_id == mid
    assert f"migration {mid} of vm1: finish(cancelled)" in client_lines(caplog)


async def test_p2p_migration_gets_its_id_from_the_source(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="virtmig.client")
    trace = Trace()
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await running_guest(src)
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER,
                                       trace=trace)
        mid = await job_id(dst)
    assert trace.migration_id == mid
    lines = client_lines(caplog)
    assert lines[0].startswith("migration of vm1: peer-to-peer to ")
    assert lines[-1] == f"migration {mid} of vm1: succeeded (protocol v3+params)"
