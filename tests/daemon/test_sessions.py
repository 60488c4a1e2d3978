"""A migration's caller dying mid-way: its session ends and the daemons clean up, as libvirt
does when the controlling connection closes.

The caller is a real process that drives the first phases and is then SIGKILLed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap

import grpc
import pytest

from virtmig.proto.errors import NoDomain
from virtmig.proto.flags import DomainState, JobType
from virtmig.testing import Host, domain_xml, wait_until

CALLER = textwrap.dedent("""
    import asyncio, sys
    from virtmig.client.connection import AsyncConnection
    from virtmig.client.migrate import RemoteDest, RemoteSource
    from virtmig.proto.flags import MigrateFlags as F
    from virtmig.proto.params import MigrateParam as P, TypedParams

    async def main(src_uri, dst_uri, upto):
        src = await AsyncConnection.open(src_uri)
        dst = await AsyncConnection.open(dst_uri)
        await src.open_session()
        await dst.open_session()
        s, d = RemoteSource(src, True), RemoteDest(dst, True)
        flags = F.LIVE | F.CHANGE_PROTECTION
        xml, cookie = await s.begin("vm1", TypedParams(), flags)
        if upto != "begin":
            params = TypedParams.of({P.DEST_XML: xml})
            cookie, uri = await d.prepare(params, cookie, F.LIVE)
            if upto == "perform":
                await s.perform("vm1", TypedParams.of({P.URI: uri}), cookie, flags)
        print("ready", flush=True)
        await asyncio.sleep(3600)  # the subject: a caller that holds on until it is killed

    asyncio.run(main(*sys.argv[1:]))
""")


async def run_caller_and_kill(src: Host, dst: Host, upto: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CALLER, src.uri, dst.uri, upto,
        stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line == b"ready\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def no_jobs(*hosts: Host) -> bool:
    return all(d.job is None for h in hosts for d in h.daemon.registry)


async def test_caller_killed_after_prepare(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    await src.conn.start("vm1")
    await run_caller_and_kill(src, dst, "prepare")

    async def dst_gone() -> bool:
        return dst.daemon.registry.find_name("vm1") is None

    await wait_until(dst_gone, timeout=30, what="the incoming guest to be destroyed")
    await wait_until(lambda: no_jobs(src, dst), timeout=30, what="both jobs to end")
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING  # never touched
    assert not dst.daemon.ports._used


async def test_caller_killed_after_begin_releases_source_job(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    await src.conn.start("vm1")
    await run_caller_and_kill(src, dst, "begin")
    await wait_until(lambda: no_jobs(src), timeout=30, what="the source job to end")
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
    await src.conn.undefine("vm1")  # a state change no longer waits for a job


async def test_caller_killed_after_perform_leaves_source_paused(pair: tuple[Host, Host]) -> None:
    """Outcome unknown: the source is not resumed, the unfinished destination is destroyed."""
    src, dst = pair
    await src.conn.define(domain_xml("vm1"))
    await src.conn.start("vm1")
    await run_caller_and_kill(src, dst, "perform")
    await wait_until(lambda: no_jobs(src, dst), timeout=30, what="both jobs to end")
    assert await src.conn.state("vm1") == (DomainState.PAUSED, 2, "migration")
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    done = await src.conn.job_info("vm1", completed=True)
    assert done.type is JobType.FAILED and "went away" in done.error


async def test_session_ending_without_jobs_is_harmless(pair: tuple[Host, Host]) -> None:
    src, _dst = pair
    await src.conn.open_session()
    assert len(src.daemon.sessions) == 1
    await src.conn.close()
    await wait_until(lambda: _empty(src), timeout=30, what="the session to end")


async def _empty(h: Host) -> bool:
    return not h.daemon.sessions


async def test_idle_connection_outlives_keepalive_pings(pair: tuple[Host, Host]) -> None:
    """A caller that says nothing for a while keeps its connection and its session.

    Clients ping every 5 s; a daemon that counted those pings as abuse (gRPC's default for a
    connection with no call in flight) sends GOAWAY "too_many_pings" at the fourth: the
    connection drops, and a call made just then fails ("Too many pings").
    """
    src, _dst = pair
    channel = src.conn._channel
    assert channel.get_state() is grpc.ChannelConnectivity.READY
    with contextlib.suppress(TimeoutError):  # four keepalive pings and then some
        await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 22)
    assert channel.get_state() is grpc.ChannelConnectivity.READY
    session = await src.conn.open_session()
    assert src.daemon.session_alive(session)
