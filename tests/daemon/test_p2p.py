"""Peer-to-peer migration: one call to the source daemon, which drives the destination itself.

The failure matrix holds in p2p mode too, with libvirt's one difference: the source always runs
its own Confirm, so a failed Perform is followed by Finish(cancelled) and Confirm(cancelled).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.migration_helpers import FinishFailsDest, NoUriDest
from virtmig.client import sequence
from virtmig.client.connection import AsyncConnection
from virtmig.client.sequence import Trace
from virtmig.daemon import p2p
from virtmig.proto.errors import (
    ArgumentUnsupported,
    InternalError,
    InvalidArgument,
    NoDomain,
    OperationAborted,
    OperationFailed,
    OperationInvalid,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    Host,
    domain_xml,
    free_port,
    start_host,
    stop_host,
    wait_for_job,
    wait_job_streaming,
    wait_until,
)
from virtmig.testing.pki import session_pki

F = MigrateFlags
P = MigrateParam


async def guest(host: Host, name: str = "vm1", **kw: Any) -> None:
    await host.conn.define(domain_xml(name, **kw))
    await host.conn.start(name)


def p2p_migrate(src: Host, dst: Host, flags: int = F.LIVE, params: TypedParams | None = None,
                name: str = "vm1") -> Any:
    return src.conn.migrate_to_uri3(name, dst.uri, params or TypedParams(),
                                    flags | F.PEER2PEER)


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Trace:
    """The calls the source daemon's driver makes."""
    t = Trace()
    real = sequence.run_v3

    async def traced(*args: Any, **kw: Any) -> str:
        kw["trace"] = t
        return await real(*args, **kw)

    monkeypatch.setattr(p2p, "run_v3", traced)
    return t


async def no_jobs(*hosts: Host) -> None:
    for h in hosts:
        assert not [d.name for d in h.daemon.registry if d.job is not None]


async def in_perform(host: Host, name: str = "vm1") -> None:
    """Until the source job of ``name`` reaches Perform (from its job watch)."""
    await wait_for_job(host.conn, name, lambda i: i.phase == "perform3", timeout=60,
                       what=f"the migration of {name} to reach perform3")


async def rolled_back(src: Host, dst: Host, name: str = "vm1") -> None:
    assert (await src.conn.state(name))[0] is DomainState.RUNNING
    with pytest.raises(NoDomain):
        await dst.conn.lookup(name)
    await no_jobs(src, dst)


# --- success ------------------------------------------------------------------------------------


async def test_p2p_live(pair: tuple[Host, Host], trace: Trace) -> None:
    src, dst = pair
    await guest(src, dirty_rate_mib=4)
    await p2p_migrate(src, dst)
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    await no_jobs(src, dst)
    assert (await src.conn.job_info("vm1", completed=True)).type is JobType.COMPLETED
    await wait_until(lambda: not dst.daemon.sessions, timeout=10,
                     what="the source's session on the destination to end")


async def test_p2p_offline(pair: tuple[Host, Host], trace: Trace) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    await p2p_migrate(src, dst, F.OFFLINE | F.PERSIST_DEST | F.UNDEFINE_SOURCE)
    assert trace.calls == ["begin", "prepare", "finish", "confirm"]
    assert (await dst.conn.lookup("vm1")).persistent
    with pytest.raises(NoDomain):
        await src.conn.lookup("vm1")


async def test_p2p_rename_persistent(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    await p2p_migrate(src, dst, F.LIVE | F.PERSIST_DEST,
                      TypedParams.of({P.DEST_NAME: "vm1-moved"}))
    dom = await dst.conn.lookup("vm1-moved")
    assert dom.persistent and dom.state is DomainState.RUNNING
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")


async def test_p2p_with_non_params_rpc(pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
                                       ) -> None:
    """A client whose source lacks MIGRATION_PARAMS uses the plain Perform3 with dconnuri."""
    src, dst = pair
    await guest(src)
    host = await src.conn.host()
    import dataclasses

    src.conn._host = dataclasses.replace(host, features=host.features - {"MIGRATION_PARAMS"})
    await p2p_migrate(src, dst, F.LIVE, TypedParams.of({P.DEST_NAME: "renamed"}))
    assert (await dst.conn.state("renamed"))[0] is DomainState.RUNNING


# --- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dconnuri", "flags", "error", "message"),
    [
        ("virtmig+tls://localhost:1", F.LIVE | F.PEER2PEER, InvalidArgument,
         "Attempt to migrate guest to the same host"),
        (None, F.LIVE | F.PEER2PEER, InvalidArgument, "must not be NULL"),
        ("x", F.LIVE | F.TUNNELLED, InvalidArgument, "without using peer2peer"),
        ("x", F.LIVE, ArgumentUnsupported, "direct migration is not supported"),
    ],
)
async def test_p2p_refused_up_front(pair: tuple[Host, Host], dconnuri: str | None, flags: int,
                                    error: type[Exception], message: str) -> None:
    src, dst = pair
    await guest(src)
    with pytest.raises(error, match=message):
        await src.conn.migrate_to_uri3("vm1", dconnuri, TypedParams(), flags)
    await rolled_back(src, dst)


async def test_p2p_to_itself_is_caught_by_the_host_uuid(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    await guest(src)
    with pytest.raises(InternalError, match="Attempt to migrate guest to the same host"):
        await src.conn.migrate_to_uri3("vm1", src.uri, TypedParams(), F.LIVE | F.PEER2PEER)
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    await no_jobs(src)


async def test_p2p_unreachable_destination(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    port = free_port()
    with pytest.raises(OperationFailed, match="Failed to connect to remote virtmig URI"):
        await src.conn.migrate_to_uri3("vm1", f"virtmig+tls://127.0.0.1:{port}",
                                       TypedParams(), F.LIVE | F.PEER2PEER)
    await rolled_back(src, dst)


async def test_p2p_cookie_from_client_is_refused(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    from virtmig.proto import virtmig_pb2 as pb

    with pytest.raises(OperationInvalid,
                       match=r"^Requested operation is not valid: received unexpected cookie "
                             r"with P2P migration$"):
        await src.conn._call(src.conn.migration_stub.Perform3Params, pb.Perform3ParamsRequest(
            domain=pb.DomainRef(name="vm1"), dconnuri=dst.uri, cookie_in=b"x",
            flags=int(F.LIVE | F.PEER2PEER)))
    await rolled_back(src, dst)


# --- the failure matrix -------------------------------------------------------------------------


async def test_p2p_row_begin_fails(pair: tuple[Host, Host], trace: Trace) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    with pytest.raises(OperationInvalid, match="domain is not running"):
        await p2p_migrate(src, dst)
    assert trace.calls == ["begin"]
    await no_jobs(src, dst)


async def test_p2p_row_prepare_fails(pair: tuple[Host, Host], trace: Trace) -> None:
    src, dst = pair
    await guest(src)
    await dst.conn.define(domain_xml("vm1"))
    with pytest.raises(OperationFailed, match="already exists with uuid"):
        await p2p_migrate(src, dst)
    assert trace.calls == ["begin", "prepare", "confirm(cancelled)"]
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
    await no_jobs(src, dst)


async def test_p2p_row_no_uri_out(pair: tuple[Host, Host], trace: Trace,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    await guest(src)
    monkeypatch.setattr(p2p, "RemoteDest", NoUriDest)
    with pytest.raises(InternalError, match="did not set uri"):
        await p2p_migrate(src, dst)
    assert trace.calls == ["begin", "prepare", "finish(cancelled)", "confirm(cancelled)"]
    await rolled_back(src, dst)


async def test_p2p_row_perform_fails(pair: tuple[Host, Host], trace: Trace) -> None:
    src, dst = pair
    await guest(src, extra_options='fault="corrupt-stream"')
    with pytest.raises(OperationFailed, match="digest"):
        await p2p_migrate(src, dst)
    assert trace.calls == ["begin", "prepare", "perform", "finish(cancelled)",
                           "confirm(cancelled)"]
    await rolled_back(src, dst)
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 6, "migration-canceled")


async def test_p2p_row_finish_fails(pair: tuple[Host, Host], trace: Trace,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    await guest(src)

    class Dest(FinishFailsDest):
        def __init__(self, conn: AsyncConnection, use_params: bool) -> None:
            super().__init__(conn, dst)

    monkeypatch.setattr(p2p, "RemoteDest", Dest)
    with pytest.raises(OperationFailed, match="guest unexpectedly quit"):
        await p2p_migrate(src, dst)
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm(cancelled)"]
    await rolled_back(src, dst)


async def test_p2p_row_confirm_fails(pair: tuple[Host, Host],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    await guest(src)

    async def broken(self: Any, *args: Any) -> None:
        raise OperationFailed("confirm broke")

    monkeypatch.setattr(p2p.LocalSource, "confirm", broken)
    await p2p_migrate(src, dst)  # the result is Finish's
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    # The source never resumes its copy: it stays paused until the source daemon has asked the
    # destination about this migration (its run ended without a Confirm), then it is shut off
    # as migrated, the guest running over there.
    state = await src.conn.state("vm1")
    assert state == (DomainState.PAUSED, 2, "migration") or state[0] is DomainState.SHUTOFF

    async def settled() -> bool:
        state, _code, reason = await src.conn.state("vm1")
        assert state is not DomainState.RUNNING
        return state is DomainState.SHUTOFF and reason == "migrated"

    await wait_until(settled, timeout=30, what="the source's copy shut off as migrated")
    await no_jobs(src, dst)


async def test_p2p_abort_during_perform(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    params = TypedParams.of({P.BANDWIDTH: 8})
    task = asyncio.ensure_future(p2p_migrate(src, dst, F.LIVE, params))
    await wait_job_streaming(src.conn, "vm1")
    await src.conn.abort_job("vm1")
    with pytest.raises(OperationAborted, match="canceled by client"):
        await task
    await rolled_back(src, dst)


async def test_p2p_goes_on_when_the_client_disconnects(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    client = await AsyncConnection.open(src.uri)
    task = asyncio.ensure_future(client.migrate_to_uri3(
        "vm1", dst.uri, TypedParams.of({P.BANDWIDTH: 64}), F.LIVE | F.PEER2PEER))
    await in_perform(src)
    task.cancel()
    await client.close()
    # The job goes on to its end: the watch ends with its record.
    await wait_for_job(src.conn, "vm1", lambda i: i.type is not JobType.UNBOUNDED, timeout=60,
                       what="the migration to end without its client")
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF


# --- the destination daemon dies ---------------------------------------------------------------


@pytest.fixture
async def dst_process(tmp_path: Path) -> AsyncIterator[tuple[subprocess.Popen[bytes], str]]:
    ready = tmp_path / "dst.ready"
    config = session_pki().config(tmp_path / "dstproc.toml", "dstproc")
    proc = subprocess.Popen([  # noqa: ASYNC220 - started once, reaped in the finalizer
        sys.executable, "-m", "virtmig.daemon.main", "--config", str(config),
        "--listen", "tls://127.0.0.1:0",
        "--state-dir", str(tmp_path / "dstproc"), "--hostname", "dstproc.test",
        "--migration-address", "127.0.0.1", "--migration-host", "127.0.0.1",
        "--ready-file", str(ready), "--log-level", "warning",
    ], env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        await wait_until(lambda: ready.exists() or proc.poll() is not None, timeout=60,
                         interval=0.05, what="the destination daemon to be ready")
        assert proc.poll() is None, f"the destination daemon exited with {proc.returncode}"
        port = json.loads(ready.read_text())["addresses"][0].rsplit(":", 1)[1]
        yield proc, f"virtmig+tls://127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("tunnelled", [False, True], ids=["p2p", "tunnelled"])
async def test_destination_daemon_killed_during_perform(
    pair: tuple[Host, Host], dst_process: tuple[subprocess.Popen[bytes], str], tunnelled: bool
) -> None:
    src, _dst = pair
    proc, dst_uri = dst_process
    await guest(src)
    flags = F.LIVE | F.PEER2PEER | (F.TUNNELLED if tunnelled else 0)
    task = asyncio.ensure_future(src.conn.migrate_to_uri3(
        "vm1", dst_uri, TypedParams.of({P.BANDWIDTH: 8}), flags))
    await wait_job_streaming(src.conn, "vm1")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with pytest.raises(OperationFailed, match="Lost connection to destination host"):
        await task
    # Never stopped by the migration: as it was (libvirt).
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
    await no_jobs(src)
    assert (await src.conn.job_info("vm1", completed=True)).type is JobType.FAILED


# --- tunnelled -----------------------------------------------------------------------------------


@pytest.fixture
async def walled_dst(tmp_path: Path) -> AsyncIterator[Host]:
    """A destination whose migration port cannot be reached directly: Prepare's URI names
    127.0.0.3, where nothing listens.  Only a tunnelled stream can get to its guests."""
    host = await start_host(tmp_path, "walled", migration_host="127.0.0.3")
    try:
        yield host
    finally:
        await stop_host(host)


async def test_tunnelled_migration_uses_the_daemons_connection(
    pair: tuple[Host, Host], walled_dst: Host, trace: Trace
) -> None:
    src, _dst = pair
    await guest(src, dirty_rate_mib=4)
    with pytest.raises(OperationFailed):  # the direct stream cannot reach it
        await p2p_migrate(src, walled_dst)
    await rolled_back(src, walled_dst)
    trace.calls.clear()
    await p2p_migrate(src, walled_dst, F.LIVE | F.TUNNELLED)
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    assert await walled_dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert await src.conn.state("vm1") == (DomainState.SHUTOFF, 4, "migrated")
    done = await src.conn.job_info("vm1", completed=True)
    assert done.type is JobType.COMPLETED and done.data_total == 64 << 20
    await no_jobs(src, walled_dst)


async def test_tunnelled_memory_arrives_intact(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    await src.conn.suspend("vm1")
    uuid = (await src.conn.lookup("vm1")).uuid
    before = src.digest(uuid)
    await p2p_migrate(src, dst, F.LIVE | F.TUNNELLED)
    assert dst.digest(uuid) == before


@pytest.mark.parametrize(
    ("flags", "params", "error", "message"),
    [
        (F.LIVE | F.TUNNELLED | F.PEER2PEER, {P.URI: "tcp://h:1"}, ArgumentUnsupported,
         "migration URI is not supported by tunnelled migration"),
        (F.LIVE | F.TUNNELLED | F.PEER2PEER, {P.LISTEN_ADDRESS: "127.0.0.1"},
         ArgumentUnsupported, "listen address is not supported by tunnelled migration"),
        (F.LIVE | F.TUNNELLED | F.PEER2PEER | F.POSTCOPY, {}, ArgumentUnsupported,
         "post-copy is not supported with tunnelled migration"),
    ],
)
async def test_tunnelled_refusals(pair: tuple[Host, Host], flags: int, params: dict[str, str],
                                  error: type[Exception], message: str) -> None:
    src, dst = pair
    await guest(src)
    with pytest.raises(error, match=message):
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams.of(params), flags)
    await rolled_back(src, dst)


async def test_tunnelled_without_p2p_is_refused(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    with pytest.raises(InvalidArgument, match="without using peer2peer"):
        await src.conn.migrate3("vm1", dst.conn, TypedParams(), F.LIVE | F.TUNNELLED)
    await rolled_back(src, dst)


async def test_p2p_job_control_completion_timeout(pair: tuple[Host, Host]) -> None:
    """The jobs issue's controls act on a p2p migration the same way: it is the source's job."""
    src, dst = pair
    await guest(src)
    params = TypedParams.of({P.BANDWIDTH: 4, P.COMPLETION_TIMEOUT: 2})
    from virtmig.proto.errors import OperationTimeout

    with pytest.raises(OperationTimeout, match="did not complete within"):
        await p2p_migrate(src, dst, F.LIVE, params)
    await rolled_back(src, dst)
    assert (await src.conn.job_info("vm1", completed=True)).type is JobType.FAILED


async def test_p2p_progress_is_watched_on_the_source(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await guest(src)
    task = asyncio.ensure_future(p2p_migrate(src, dst, F.LIVE, TypedParams.of({P.BANDWIDTH: 32})))
    await in_perform(src)
    seen = [info async for info in src.conn.watch_job("vm1")]
    await task
    assert seen[-1].type is JobType.COMPLETED
    assert any(i.type is JobType.UNBOUNDED and 0 < i.data_processed < i.data_total
               for i in seen)


async def test_p2p_migrate_uri_is_the_data_stream(pair: tuple[Host, Host], trace: Trace) -> None:
    """dconnuri names the destination daemon; the URI param names where the data goes: a host
    without a port makes the destination pick one from its range."""
    src, dst = pair
    await guest(src)
    await p2p_migrate(src, dst, F.LIVE, TypedParams.of({P.URI: "tcp://127.0.0.1"}))
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    await no_jobs(src, dst)
