"""No hard limit on domains (issue 17): ``ListStream`` sends a list of any length in chunks, the
client library and ``virtmig list`` read it (and fall back to ``List`` against a daemon without
it), the one-reply ``List`` refuses a list it cannot hold rather than truncate it, and a state
dir with 20,000 definitions loads whole at start.
"""

from __future__ import annotations

import asyncio
import io
import uuid as uuidlib
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from virtmig.client.cli.app import main
from virtmig.daemon import wire
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.daemon.registry import DomainObj
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ResourceExhausted
from virtmig.proto.flags import DomainState, reason_name
from virtmig.testing import domain_xml, session_pki, start_host, stop_host

MANY = 20_000


def write_definitions(state: Path, count: int) -> list[str]:
    """``count`` definitions written straight into a state dir (as the daemon writes them)."""
    folder = state / "domains"
    folder.mkdir(parents=True)
    names = []
    for i in range(count):
        uuid = str(uuidlib.UUID(int=i + 1, version=4))
        (folder / f"{uuid}.xml").write_text(domain_xml(f"vm{i:05d}", uuid=uuid))
        names.append(f"vm{i:05d}")
    return names


async def test_a_state_dir_of_20000_definitions_lists_whole_and_loads_whole_again(
        tmp_path: Path) -> None:
    names = write_definitions(tmp_path / "h", MANY)
    host = await start_host(tmp_path, "h")
    try:
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == names
        with pytest.raises(ResourceExhausted, match=(
                rf"^resource busy: {MANY} domains do not fit in one List reply "
                rf"\(at most {wire.LIST_REPLY_MAX}\): use ListStream$")):
            await host.conn._call(host.conn.domains_stub.List,
                                  pb.ListRequest(active=True, inactive=True))
        await host.conn.undefine(names[0])
    finally:
        await stop_host(host)
    host = await start_host(tmp_path, "h")  # the restart loads every definition left
    try:
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == names[1:]
        assert not list((tmp_path / "h").rglob("*.rejected"))
    finally:
        await stop_host(host)


async def test_list_stream_sends_chunks_in_virsh_order(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "LIST_CHUNK", 2)
    host = await start_host(tmp_path, "h")
    try:
        for name in ("e", "d", "c", "b", "a"):
            await host.conn.define(domain_xml(name))
        await host.conn.start("d")
        await host.conn.start("b")
        call = host.conn.domains_stub.ListStream(pb.ListRequest(active=True, inactive=True))
        chunks = [[d.name for d in m.domains] async for m in call]
        assert chunks == [["d", "b"], ["a", "c"], ["e"]]  # active by id, then by name
        running = host.conn.domains_stub.ListStream(pb.ListRequest(active=True))
        assert [[d.name for d in m.domains] async for m in running] == [["d", "b"]]
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == \
            ["d", "b", "a", "c", "e"]
        monkeypatch.setenv("VIRTMIG_PKI_DIR", str(session_pki().client()))
        out = io.StringIO()
        with redirect_stdout(out):
            assert await asyncio.to_thread(main, ["-c", host.uri, "list", "--all", "--name"]) == 0
        assert out.getvalue().split() == ["d", "b", "a", "c", "e"]
    finally:
        await stop_host(host)


async def test_list_refuses_more_than_one_reply_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "LIST_REPLY_MAX", 2)
    host = await start_host(tmp_path, "h")
    try:
        for name in ("a", "b"):
            await host.conn.define(domain_xml(name))
        request = pb.ListRequest(inactive=True)
        reply = await host.conn._call(host.conn.domains_stub.List, request)
        assert [d.name for d in reply.domains] == ["a", "b"]
        await host.conn.define(domain_xml("c"))
        with pytest.raises(ResourceExhausted, match=r"3 domains do not fit .* use ListStream"):
            await host.conn._call(host.conn.domains_stub.List, request)
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == ["a", "b", "c"]
    finally:
        await stop_host(host)


async def test_the_client_falls_back_to_list_against_a_daemon_without_list_stream(
        tmp_path: Path) -> None:
    """A daemon from before ListStream does not know the method (gRPC answers UNIMPLEMENTED,
    as this one does for a method it has not): the client reads one List reply instead."""
    host = await start_host(tmp_path, "h")
    try:
        for name in ("b", "a"):
            await host.conn.define(domain_xml(name))
        host.conn.domains_stub.ListStream = host.conn._channel.unary_stream(
            "/virtmig.v1.Domains/ListStreamOfAFutureVersion",
            request_serializer=pb.ListRequest.SerializeToString,
            response_deserializer=pb.ListReply.FromString)
        assert [d.name for d in await host.conn.list_domains(inactive=True)] == ["a", "b"]
    finally:
        await stop_host(host)


def test_list_entries_are_the_domains_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    """The chunks (entries added in place, for speed) carry exactly ``domain_msg``'s fields,
    for active, paused, inactive and transient domains alike; and so does ``List``'s reply."""
    monkeypatch.setattr(wire, "LIST_CHUNK", 3)
    doms = [DomainObj(f"u{i}", f"vm{i}", config=None if i % 2 else
                      parse_domain_xml(domain_xml(f"vm{i}")),
                      state=state, reason=reason, id=id_)
            for i, (state, reason, id_) in enumerate([
                (DomainState.RUNNING, 1, 4), (DomainState.PAUSED, 2, 7),
                (DomainState.SHUTOFF, 3, -1), (DomainState.SHUTOFF, 0, -1),
                (DomainState.CRASHED, 1, 9)])]
    chunks = list(wire.domain_list_chunks(doms))
    assert [len(c.domains) for c in chunks] == [3, 2]
    want = [wire.domain_msg(d) for d in doms]
    assert [m for c in chunks for m in c.domains] == want
    assert list(wire.domain_list_msg(doms).domains) == want
    assert want[1].persistent is False and want[1].reason_name == reason_name(
        DomainState.PAUSED, 2)
