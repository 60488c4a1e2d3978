"""``migrate_tls_force`` (libvirt's refusal at Begin and Prepare, protocol v2's Perform and
Prepare2, a tunnel over plain TCP; its default and the config key) and the stream token's place
in the migration cookie (cookie B, round trips, libvirt's cookies without it).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import assert_rolled_back, migrate, running_guest
from virtmig.client.migrate import RemoteDest, RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.daemon import main as daemon_main
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.cookie import (
    ACCEPT_CONFIRM,
    ACCEPT_FINISH,
    ACCEPT_PERFORM,
    ACCEPT_PREPARE,
    Cookie,
    build_cookie,
    parse_cookie,
)
from virtmig.daemon.core import DaemonConfig
from virtmig.daemon.listeners import plan, tls_force_default
from virtmig.daemon.main import start_daemon
from virtmig.proto.errors import InternalError, InvalidArgument, NoDomain, OperationInvalid
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, hosts
from virtmig.testing.pki import session_pki

F = MigrateFlags
FORCED = ("Requested operation is not valid: this libvirtd instance allows migration only with "
          "VIR_MIGRATE_TLS flag")


# --- migrate_tls_force ---------------------------------------------------------------------------


async def unchanged(src: Host, dst: Host) -> None:
    """A refused Begin or Prepare left both sides as they were."""
    await assert_rolled_back(src, dst)
    assert (await src.conn.job_info("vm1")).type is JobType.NONE
    assert not [d for d in dst.daemon.registry]


@pytest.mark.parametrize("forced", ["src", "dst"])
async def test_forced_tls_refuses_a_plain_migration(tmp_path: Path, forced: str) -> None:
    """The source refuses at Begin, the destination at Prepare, with libvirt's message; a TLS
    migration, and a tunnelled one (the control channel's TLS), go through."""
    settings: list[tuple[str, dict[str, object]]] = [
        (name, {"migrate_tls_force": name == forced}) for name in ("src", "dst")]
    async with hosts(tmp_path, "test", *settings) as (src, dst):
        assert src.daemon.config.migrate_tls_force is (forced == "src")
        await running_guest(src)
        with pytest.raises(OperationInvalid) as info:
            await migrate(src, dst, F.LIVE)
        assert str(info.value) == FORCED
        await unchanged(src, dst)
        with pytest.raises(OperationInvalid, match="only with VIR_MIGRATE_TLS"):
            await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER)
        await unchanged(src, dst)

        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(),
                                       F.LIVE | F.PEER2PEER | F.TUNNELLED | F.TLS)
        assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
        await migrate(dst, src, F.LIVE | F.TLS)  # and back, over TLS
        assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(),
                                       F.LIVE | F.PEER2PEER | F.TUNNELLED)
        assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING


@pytest.mark.parametrize("forced", ["src", "dst"])
async def test_forced_tls_refuses_a_plain_v2_migration(tmp_path: Path, forced: str) -> None:
    """Protocol v2 has no Begin: the source refuses at Perform, the destination at Prepare2;
    either way nothing is left behind, and a TLS migration goes through."""
    settings: list[tuple[str, dict[str, object]]] = [
        (name, {"migrate_tls_force": name == forced, "migration_protocols": (2,)})
        for name in ("src", "dst")]
    async with hosts(tmp_path, "test", *settings) as (src, dst):
        await running_guest(src)
        for p2p in (F(0), F.PEER2PEER):
            with pytest.raises(OperationInvalid) as info:
                if p2p:
                    await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | p2p)
                else:
                    await migrate(src, dst, F.LIVE)
            assert str(info.value) == FORCED
            await unchanged(src, dst)
        await migrate(src, dst, F.LIVE | F.TLS)
        assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
        assert dst.daemon.registry.by_name("vm1").job is None


PLAIN_TUNNEL = ": a tunnelled migration is protected by {}, and {} plain TCP"


@pytest.mark.parametrize("case", ["tls-flag", "src-forced", "dst-forced"])
async def test_a_tunnel_over_plain_tcp_is_not_protected(tmp_path: Path, case: str) -> None:
    """A tunnelled stream is only as safe as the connection to the destination: to a plain
    ``virtmig+tcp://`` one (a peer with ``listen_insecure_tcp``), ``--tls`` and the source's
    ``migrate_tls_force`` refuse it at the source, the destination's at its Prepare, before
    anything changes; over ``virtmig+tls`` it goes."""
    async with hosts(tmp_path, "test", ("src", {"migrate_tls_force": case == "src-forced"}), (
            "dst", {"listen": ("tcp://127.0.0.1:0", "tls://127.0.0.1:0"),
                    "listen_insecure_tcp": True, "migrate_tls_force": case == "dst-forced"})
    ) as (src, dst):
        assert dst.uri.startswith("virtmig+tcp://")
        await running_guest(src)
        flags = F.LIVE | F.PEER2PEER | F.TUNNELLED | (F.TLS if case == "tls-flag" else F(0))
        with pytest.raises(OperationInvalid) as info:
            await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), flags)
        assert str(info.value) == {
            "tls-flag": "Requested operation is not valid: VIR_MIGRATE_TLS" + PLAIN_TUNNEL.format(
                "its destination URI's TLS", f"'{dst.uri}' is") + " (use virtmig+tls://)",
            "src-forced": FORCED + PLAIN_TUNNEL.format(
                "its destination URI's TLS", f"'{dst.uri}' is") + " (use virtmig+tls://)",
            "dst-forced": FORCED + PLAIN_TUNNEL.format(
                "the TLS of the connection it rides", "this one is"),
        }[case]
        await unchanged(src, dst)
        tls_port = int(dst.running.addresses[1].rsplit(":", 1)[1])
        await src.conn.migrate_to_uri3("vm1", f"virtmig+tls://127.0.0.1:{tls_port}",
                                       TypedParams(), flags)
        assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING


class NamedQemu(TestBackend):
    """A backend that calls itself qemu (the default depends on the backend's name only)."""

    name = "qemu"


@pytest.mark.parametrize(
    ("backend", "listen", "explicit", "expected"),
    [
        ("qemu", ("tls://127.0.0.1:0",), None, True),
        ("qemu", ("tls://127.0.0.1:0",), False, False),
        ("test", ("tls://127.0.0.1:0",), None, False),
        ("test", ("tls://127.0.0.1:0",), True, True),
    ],
)
async def test_default_is_resolved_at_start_and_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, backend: str, listen: tuple[str, ...],
    explicit: bool | None, expected: bool,
) -> None:
    caplog.set_level(logging.INFO, logger=daemon_main.log.name)
    config = DaemonConfig(state_dir=str(tmp_path / "s"), listen=listen,
                          pki_dir=str(session_pki().host("one")), migrate_tls_force=explicit)
    running = await start_daemon(config, NamedQemu() if backend == "qemu" else TestBackend())
    try:
        assert running.daemon.config.migrate_tls_force is expected
    finally:
        await running.stop(grace=0)
    origin = "config" if explicit is not None else f"default for the {backend} backend"
    assert f"migrate_tls_force = {str(expected).lower()} ({origin}" in caplog.text


@pytest.mark.parametrize(
    ("backend", "listen", "expected"),
    [
        ("qemu", ("unix:///r/s.sock", "tls://0.0.0.0:16614"), True),
        ("qemu", ("tls://0.0.0.0:16614", "tcp://127.0.0.1:1"), False),  # a plain listener
        ("qemu", ("unix:///r/s.sock",), False),  # no network listener
        ("test", ("tls://0.0.0.0:16614",), False),  # its stream is bound by the token
    ],
)
def test_tls_force_default(backend: str, listen: tuple[str, ...], expected: bool) -> None:
    config = DaemonConfig(state_dir="/s", listen=listen, listen_insecure_tcp=True)
    assert tls_force_default(backend, plan(config)) is expected


def load(tmp_path: Path, text: str) -> DaemonConfig:
    cfg = tmp_path / "virtmigd.toml"
    cfg.write_text(text)
    args: argparse.Namespace = build_parser().parse_args(["--config", str(cfg)])
    return load_config(args)


def test_config_key(tmp_path: Path) -> None:
    assert load(tmp_path, "").migrate_tls_force is None
    assert load(tmp_path, "migrate_tls_force = true\n").migrate_tls_force is True
    assert load(tmp_path, "migrate_tls_force = false\n").migrate_tls_force is False
    with pytest.raises(InvalidArgument,
                       match=r"invalid migrate_tls_force 'yes' .*: expected true or false"):
        load(tmp_path, 'migrate_tls_force = "yes"\n')


# --- the stream token in the cookie --------------------------------------------------------------

HOSTUUID_SRC = "11111111-2222-3333-4444-555555555555"
HOSTUUID_DST = "66666666-7777-8888-9999-aaaaaaaaaaaa"
VM_UUID = "c7a5fdbd-cdaf-9455-926a-d65c16db1809"
TOKEN = "0123456789abcdef0123456789abcdef"


def cookie_b(token: str = TOKEN) -> Cookie:
    return Cookie(name="vm1", uuid=VM_UUID, hostname="dst.test", hostuuid=HOSTUUID_DST,
                  capabilities=(), stream_token=token)


def parsed(data: bytes, accept: object = ACCEPT_PERFORM) -> Cookie:
    return parse_cookie(data, expected_name="vm1", expected_uuid=VM_UUID,
                        local_hostuuid=HOSTUUID_SRC, accept=accept)  # type: ignore[arg-type]


def test_the_token_survives_a_round_trip_and_is_never_shown() -> None:
    data = build_cookie(cookie_b())
    assert f"<virtmig-stream-token>{TOKEN}</virtmig-stream-token>".encode() in data
    assert b"<feature" not in data  # never a mandatory feature
    for accept in (ACCEPT_PREPARE, ACCEPT_PERFORM, ACCEPT_FINISH, ACCEPT_CONFIRM):
        assert parsed(data, accept).stream_token == TOKEN
    assert parsed(data) == cookie_b()
    assert TOKEN not in repr(parsed(data))


def test_a_cookie_without_the_token_parses_as_none() -> None:
    """libvirt's cookies (and ours before Prepare) carry no token: ``""``."""
    data = build_cookie(cookie_b(""))
    assert b"virtmig-stream-token" not in data
    assert parsed(data).stream_token == ""
    libvirt = (f"<qemu-migration>\n  <name>vm1</name>\n  <uuid>{VM_UUID}</uuid>\n"
               f"  <hostname>dst</hostname>\n  <hostuuid>{HOSTUUID_DST}</hostuuid>\n"
               "  <graphics type='vnc' port='5900' listen='0.0.0.0'/>\n"
               "  <capabilities>\n    <cap name='xbzrle' auto='no'/>\n  </capabilities>\n"
               "</qemu-migration>\n").encode() + b"\0"
    assert parsed(libvirt).stream_token == ""


@pytest.mark.parametrize("bad", ["xyz", TOKEN.upper(), TOKEN + "00", "<b/>"])
def test_a_malformed_token_is_refused(bad: str) -> None:
    data = build_cookie(cookie_b()).replace(TOKEN.encode(), bad.encode())
    with pytest.raises(InternalError) as info:
        parsed(data)
    assert str(info.value) == (
        "internal error: Malformed virtmig-stream-token element in migration cookie")
    assert bad not in str(info.value)
    with pytest.raises(InternalError, match="malformed stream token"):
        build_cookie(cookie_b("not-a-token"))


class CookieBDest(RemoteDest):
    """Keeps cookie B as Prepare returned it."""

    cookie: bytes = b""

    async def prepare(self, params: TypedParams, cookie: bytes,
                      flags: int) -> tuple[bytes, str | None]:
        self.cookie, uri = await super().prepare(params, cookie, flags)
        return self.cookie, uri


async def test_prepare_puts_a_fresh_token_in_cookie_b(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    tokens = []
    await running_guest(src)
    for a, b in ((src, dst), (dst, src)):  # there and back: a fresh token each time
        dest = CookieBDest(b.conn, True)
        await run_v3(RemoteSource(a.conn, True), dest, "vm1", TypedParams(), F.LIVE,
                     protection=True)
        cookie = parse_cookie(dest.cookie, expected_name="vm1",
                              expected_uuid=(await b.conn.lookup("vm1")).uuid,
                              local_hostuuid=a.daemon.host_uuid, accept=ACCEPT_PERFORM)
        tokens.append(cookie.stream_token)
    assert len(set(tokens)) == 2 and all(len(t) == 32 for t in tokens)
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
