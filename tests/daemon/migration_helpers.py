"""Shared by the v3 migration test modules (and test_p2p, test_failure_matrix_qemu): a running
guest, the rolled-back check, a client-coordinated migration, and the fake parties that fail one
step of libvirt's failure matrix.
"""

from __future__ import annotations

import pytest

from virtmig.client.migrate import RemoteDest, RemoteSource, migrate3
from virtmig.client.sequence import Trace
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import (
    NoDomain,
    OperationFailed,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    Host,
    domain_xml,
)

F = MigrateFlags


P = MigrateParam


async def running_guest(host: Host, name: str = "vm1", memory_mib: int = 64,
                        dirty_rate_mib: int = 0) -> str:
    await host.conn.define(domain_xml(name, memory_mib, dirty_rate_mib=dirty_rate_mib))
    await host.conn.start(name)
    return name


async def assert_rolled_back(src: Host, dst: Host, name: str = "vm1",
                             state: DomainState = DomainState.RUNNING) -> None:
    assert (await src.conn.state(name))[0] is state
    assert (await src.conn.job_info(name)).type is JobType.NONE
    with pytest.raises(NoDomain):
        await dst.conn.lookup(name)
    assert not [d for d in dst.daemon.registry if d.job is not None]
    assert not [d for d in src.daemon.registry if d.job is not None]
    assert not dst.daemon.ports._used


async def migrate(src: Host, dst: Host, flags: int = F.LIVE, params: TypedParams | None = None,
                  name: str = "vm1", trace: Trace | None = None) -> str:
    dom = await migrate3(src.conn, name, dst.conn, params or TypedParams(), flags, trace=trace)
    return dom.name


class NoUriDest(RemoteDest):
    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare(params, cookie, flags)
        return cookie, None


class FinishFailsDest(RemoteDest):
    """The incoming guest dies between Perform and Finish."""

    def __init__(self, conn: object, dst: Host) -> None:
        super().__init__(conn, True)  # type: ignore[arg-type]
        self.dst = dst

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        name = params.get_str(P.DEST_NAME) or ""
        uuid = (await self.dst.conn.lookup(name)).uuid
        await self.dst.daemon.backend.destroy(uuid)  # the guest crashes, the daemon lives
        return await super().finish(params, cookie, flags, cancelled)


class ConfirmFailsSource(RemoteSource):
    async def confirm(self, dom: str, params: TypedParams, cookie: bytes, flags: int,
                      cancelled: bool) -> None:
        raise OperationFailed("connection to source lost")


class LostReplyDest(RemoteDest):
    """Finish succeeds on the destination but its reply never arrives."""

    def __init__(self, conn: object, reachable: bool) -> None:
        super().__init__(conn, True)  # type: ignore[arg-type]
        self.reachable = reachable

    async def finish(self, params: TypedParams, cookie: bytes, flags: int,
                     cancelled: bool) -> tuple[str, bytes]:
        await super().finish(params, cookie, flags, cancelled)
        from virtmig.proto.errors import ConnectionFailed

        raise ConnectionFailed("unable to connect to the daemon: connection reset")

    async def finished(self, dname: str) -> bool:
        if not self.reachable:
            from virtmig.proto.errors import ConnectionFailed

            raise ConnectionFailed("unable to connect to the daemon: no route")
        return await super().finished(dname)


async def begun_xml_and_cookie(src: Host, name: str = "vm1") -> tuple[str, bytes]:
    """A real Prepare input (the domain XML and cookie of a Begin on ``src``), for tests that
    call Prepare by hand; the Begin's job is cancelled again, so ``src`` is left as it was."""
    conn = src.conn
    xml, cookie = await RemoteSource(conn, True).begin(name, TypedParams(), F.LIVE)
    await conn._call(conn.migration_stub.Confirm3Params, pb.Confirm3ParamsRequest(
        domain=pb.DomainRef(name=name), cookie_in=b"", flags=F.LIVE, cancelled=True))
    return xml, cookie
