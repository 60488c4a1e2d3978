"""Encrypted and bound migration streams between daemons (test backend, control channel over
mutual TLS): what ``--tls`` hands each backend (regular, peer-to-peer, tunnelled), the stream
token carried from Prepare to Perform in cookie B, ``tls.destination``, a bad PKI refused when a
phase starts, a listener that is not the prepared destination, intruders on the prepared port.

``migrate_tls_force`` and the cookie's token element: ``test_stream_policy.py``; the backend's
stream itself: ``test_stream_security.py``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import shutil
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import assert_rolled_back, migrate, running_guest
from tests.daemon.stream_security_helpers import (
    PKI,
    Tunings,
    client_tls,
    foreign_host_dir,
    recorder,
    server_tls,
    spy_tunings,
)
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon.backend.test.secure import NONCE_LEN, NOT_PREPARED
from virtmig.proto.errors import ArgumentUnsupported, ConfigUnsupported, OperationFailed
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import Host, hosts

F = MigrateFlags
P = MigrateParam


def same_token(seen: Tunings) -> str:
    """The one stream token both backends got (a fresh 32-hex-digit secret).  Prepare may have
    started the incoming side more than once (a migration port some other process held: it tries
    the next), always with the same token."""
    assert len(seen.outgoing) == 1 and seen.incoming
    assert len({t.stream_token for t in seen.incoming}) == 1
    token = seen.incoming[0].stream_token
    assert len(token) == 32 and int(token, 16) >= 0
    assert seen.outgoing[0].stream_token == token
    return token


async def test_tls_migration_hands_each_backend_its_side(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = pair
    await running_guest(src)
    seen = spy_tunings(monkeypatch, src, dst)
    await migrate(src, dst, F.LIVE | F.TLS)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert seen.incoming[0].tls == server_tls(PKI.host("dst"))
    # The name the destination's certificate must carry: the migration URI's host.
    assert seen.outgoing[0].tls == client_tls(PKI.host("src"), "127.0.0.1")
    same_token(seen)


async def test_without_tls_the_stream_is_still_bound(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dst = pair
    await running_guest(src)
    seen = spy_tunings(monkeypatch, src, dst)
    await migrate(src, dst)
    assert seen.incoming[0].tls is None and seen.outgoing[0].tls is None
    token = same_token(seen)
    assert token not in repr(seen)  # never in a log line that shows the tuning


async def test_tls_peer_to_peer(pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = pair
    await running_guest(src)
    seen = spy_tunings(monkeypatch, src, dst)
    await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER | F.TLS)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert seen.outgoing[0].tls == client_tls(PKI.host("src"), "127.0.0.1")
    assert seen.incoming[0].tls == server_tls(PKI.host("dst"))
    same_token(seen)


async def test_tls_tunnelled_rides_the_control_channel(
    pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS + TUNNELLED: the stream is inside the daemons' mutual-TLS gRPC connection, the
    backends' own stream stays plain; the token's proof passes through the relay."""
    src, dst = pair
    await running_guest(src)
    await src.conn.suspend("vm1")
    uuid = (await src.conn.lookup("vm1")).uuid
    before = src.digest(uuid)
    seen = spy_tunings(monkeypatch, src, dst)
    await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(),
                                   F.LIVE | F.PEER2PEER | F.TUNNELLED | F.TLS)
    assert dst.digest(uuid) == before
    assert seen.incoming[0].tls is None and seen.outgoing[0].tls is None
    same_token(seen)


async def test_tls_destination_names_the_certificate_to_expect(pair: tuple[Host, Host]) -> None:
    """The destination's certificate names dst.test and 127.0.0.1: ``tls.destination`` with its
    DNS name passes, another name fails the migration, the source running on."""
    src, dst = pair
    await running_guest(src)
    with pytest.raises(OperationFailed, match=re.escape(
            "certificate verify failed: Hostname mismatch, certificate is not valid for "
            "'elsewhere.test'")):
        await migrate(src, dst, F.LIVE | F.TLS,
                      TypedParams.of({P.TLS_DESTINATION: "elsewhere.test"}))
    await assert_rolled_back(src, dst)
    await migrate(src, dst, F.LIVE | F.TLS, TypedParams.of({P.TLS_DESTINATION: "dst.test"}))
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_tls_destination_needs_tls(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    with pytest.raises(ArgumentUnsupported,
                       match=r"parameter 'tls\.destination' requires flag VIR_MIGRATE_TLS"):
        await migrate(src, dst, F.LIVE, TypedParams.of({P.TLS_DESTINATION: "dst.test"}))
    await assert_rolled_back(src, dst)


async def test_a_source_whose_certificate_another_ca_signed_is_refused_at_begin(
    tmp_path: Path
) -> None:
    """The source's client certificate is checked when Begin starts: a clear error naming the
    file, nothing changed."""
    bad = foreign_host_dir(tmp_path, "src")
    async with hosts(tmp_path, "test", ("src", {"pki_dir": str(bad)}), ("dst", {})) as (src, dst):
        await running_guest(src)
        with pytest.raises(ConfigUnsupported, match=f"{bad / 'clientcert.pem'}"):
            await migrate(src, dst, F.LIVE | F.TLS)
        await assert_rolled_back(src, dst)
        await migrate(src, dst, F.LIVE)  # without TLS that certificate is not used


async def test_a_destination_without_its_server_key_refuses_prepare(
    pair: tuple[Host, Host], tmp_path: Path
) -> None:
    src, dst = pair
    await running_guest(src)
    broken = tmp_path / "dst-broken"
    shutil.copytree(PKI.host("dst"), broken)
    (broken / "private/serverkey.pem").unlink()
    dst.daemon.config = dataclasses.replace(dst.daemon.config, pki_dir=str(broken))
    with pytest.raises(ConfigUnsupported, match=f"{broken / 'private/serverkey.pem'}"):
        await migrate(src, dst, F.LIVE | F.TLS)
    await assert_rolled_back(src, dst)


class ElsewhereDest(RemoteDest):
    """A destination whose Prepare answers with another listener's port."""

    def __init__(self, dst: Host, port: int) -> None:
        super().__init__(dst.conn, True)
        self.port = port

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, _uri = await super().prepare(params, cookie, flags)
        return cookie, f"tcp:127.0.0.1:{self.port}"


async def test_a_listener_that_is_not_the_prepared_destination_gets_nothing(
    pair: tuple[Host, Host]
) -> None:
    """The source streams to a fake listener (it answers with a wrong proof): it receives only
    the source's nonce, never guest memory, and the migration fails cleanly."""
    src, dst = pair
    await running_guest(src)
    async with recorder() as fake:
        with pytest.raises(OperationFailed, match=NOT_PREPARED):
            await run_v3(RemoteSource(src.conn, True), ElsewhereDest(dst, fake.port), "vm1",
                         TypedParams(), F.LIVE, protection=True)
    assert [len(r) for r in fake.received] == [NONCE_LEN]
    await assert_rolled_back(src, dst)


class IntrudedDest(RemoteDest):
    """Before Perform, intruders connect to the prepared port: garbage, then a silent one."""

    def __init__(self, dst: Host) -> None:
        super().__init__(dst.conn, True)
        self.writers: list[asyncio.StreamWriter] = []

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        cookie, uri = await super().prepare(params, cookie, flags)
        assert uri is not None
        port = int(uri.rsplit(":", 1)[1])
        for payload in (b"\x16\x03\x01" + b"\xff" * 200, b""):
            _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(payload)
            await writer.drain()
            self.writers.append(writer)
        return cookie, uri


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
async def test_intruders_on_the_prepared_port_do_not_stop_the_migration(
    pair: tuple[Host, Host], tls: bool
) -> None:
    src, dst = pair
    await running_guest(src)
    intruded = IntrudedDest(dst)
    try:
        await run_v3(RemoteSource(src.conn, True), intruded, "vm1", TypedParams(),
                     F.LIVE | (F.TLS if tls else 0), protection=True)
    finally:
        for w in intruded.writers:
            w.close()
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF
