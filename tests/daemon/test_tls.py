"""Mutual TLS on the control plane, with real daemons and certificates: who is refused (before
anything changes), what a read-only client may do, the client's check of the daemon's name
(DNS or IP SAN), what ``virtmig pki`` writes taken as it is (``pki_dir``, ``?pkipath=``), plain
TCP only when asked for, a bad PKI dir failing the start, and migrations (regular, peer-to-peer,
tunnelled) between daemons that admit only the certificates they list.

The decisions themselves (role table, DN lists): ``test_authz.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.conftest import Host, domain_xml, start_host, stop_host
from virtmig.client.cli import app as cli
from virtmig.client.connection import AsyncConnection
from virtmig.daemon import interceptor
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.core import DaemonConfig
from virtmig.daemon.main import start_daemon
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto import virtmig_pb2_grpc as pbg
from virtmig.proto.errors import (
    ConfigUnsupported,
    ConnectionFailed,
    InvalidArgument,
    OperationFailed,
    PermissionDenied,
)
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.proto.pki import PKI_DIR_ENV
from virtmig.testing.pki import session_pki

F = MigrateFlags
PKI = session_pki()
ADMIN = PKI.dn("admin")
# The guarded daemon admits the admin and one peer daemon; viewers read.
ALLOWED = (ADMIN, PKI.dn("src.test"))
READONLY = ("O=virtmig,CN=viewer-*",)

NOT_LISTED = ("access denied: client 'O=virtmig,CN={}' is not on the list of allowed clients "
              "(tls_allowed_dn_list)")
READ_ONLY = ("access denied: client 'O=virtmig,CN={}' has read-only access "
             "(tls_readonly_dn_list): {} is not a read call")


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Host]:
    """A daemon with DN lists, running ``vm1``."""
    host = await start_host(tmp_path, "guarded", tls_allowed_dn_list=ALLOWED,
                            tls_readonly_dn_list=READONLY)
    try:
        await host.conn.define(domain_xml("vm1"))
        await host.conn.start("vm1")
        yield host
    finally:
        await stop_host(host)


async def snapshot(host: Host) -> object:
    """What a refused call must not change: the domains, their states, and vm1's job."""
    doms = await host.conn.list_domains(active=True, inactive=True)
    job = await host.conn.job_info("vm1")
    return sorted((d.name, d.state, d.persistent) for d in doms), job.type


def credentials(pki_dir: Path, *, certificate: bool = True) -> grpc.ChannelCredentials:
    ca = (pki_dir / "cacert.pem").read_bytes()
    if not certificate:
        return grpc.ssl_channel_credentials(ca)
    return grpc.ssl_channel_credentials(ca, (pki_dir / "private/clientkey.pem").read_bytes(),
                                        (pki_dir / "clientcert.pem").read_bytes())


WRITES: dict[str, Callable[[Any, Any], Awaitable[Any]]] = {
    "Define": lambda d, m: d.Define(pb.DefineRequest(xml=domain_xml("vm2")), timeout=20),
    "Destroy": lambda d, m: d.Destroy(pb.DomainRequest(domain=pb.DomainRef(name="vm1")),
                                      timeout=20),
    "Prepare3": lambda d, m: m.Prepare3(pb.Prepare3Request(
        dom_xml=domain_xml("incoming"), flags=int(F.LIVE)), timeout=20),
}

CALLERS: dict[str, tuple[Callable[[], grpc.ChannelCredentials], str | None]] = {
    # refused by the TLS handshake: the daemon never sees a call
    "no certificate": (lambda: credentials(PKI.client(), certificate=False), None),
    "another CA": (lambda: credentials(PKI.foreign_client("admin")), None),
    # refused by the interceptor, naming the DN
    "DN not listed": (lambda: credentials(PKI.client("stranger")), "stranger"),
    "read-only DN": (lambda: credentials(PKI.client("viewer-1")), "viewer-1"),
}


@pytest.mark.parametrize("caller", sorted(CALLERS))
async def test_a_refused_caller_changes_nothing(guarded: Host, caller: str,
                                                caplog: pytest.LogCaptureFixture) -> None:
    make_credentials, cn = CALLERS[caller]
    before = await snapshot(guarded)
    caplog.set_level(logging.INFO, logger=interceptor.__name__)
    target = guarded.uri.removeprefix("virtmig+tls://")
    async with grpc.aio.secure_channel(target, make_credentials()) as channel:
        domains, migration = pbg.DomainsStub(channel), pbg.MigrationStub(channel)
        for name, call in WRITES.items():
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call(domains, migration)
            if cn is None:
                assert err.value.code() is grpc.StatusCode.UNAVAILABLE, name
            else:
                expected = (NOT_LISTED.format(cn) if cn == "stranger"
                            else READ_ONLY.format(cn, name))
                assert (err.value.code(), err.value.details()) == (
                    grpc.StatusCode.PERMISSION_DENIED, expected), name
    assert await snapshot(guarded) == before
    refusals = [r for r in caplog.records if r.name == interceptor.__name__]
    if cn is not None:  # each refusal logged once, as a warning naming the call and the DN
        assert [(r.levelno, r.getMessage().split(" from ")[0]) for r in refusals] == [
            (logging.WARNING, f"refused {name}") for name in WRITES]
        assert all(f"'O=virtmig,CN={cn}'" in r.getMessage() for r in refusals)
    else:
        assert refusals == []
    # The same calls from the admin do change things (the checks above are not vacuous).
    await guarded.conn.destroy("vm1")
    assert await snapshot(guarded) != before


async def test_a_read_only_client_reads(guarded: Host) -> None:
    async with await AsyncConnection.open(guarded.uri, pki_dir=PKI.client("viewer-1")) as ro:
        assert [d.name for d in await ro.list_domains(active=True, inactive=True)] == ["vm1"]
        assert (await ro.info("vm1")).domain.state is DomainState.RUNNING
        assert (await ro.state("vm1"))[0] is DomainState.RUNNING
        assert "<name>vm1</name>" in await ro.xml_desc("vm1")
        assert (await ro.job_info("vm1")).type is JobType.NONE
        assert (await ro.host(refresh=True)).hostname == "guarded.test"
        for call in (ro.suspend("vm1"), ro.set_max_speed("vm1", 5), ro.open_session(),
                     ro.xml_desc("vm1", secure=True)):  # (--security-info: secrets)
            with pytest.raises(PermissionDenied, match="'O=virtmig,CN=viewer-1' has read-only"):
                await call
    assert (await guarded.conn.state("vm1"))[0] is DomainState.RUNNING
    assert await guarded.conn.get_max_speed("vm1") != 5


async def test_an_unlisted_client_cannot_connect(guarded: Host) -> None:
    with pytest.raises(PermissionDenied) as err:
        await AsyncConnection.open(guarded.uri, pki_dir=PKI.client("stranger"))
    assert str(err.value) == NOT_LISTED.format("stranger")


async def test_the_cli_prints_access_denied(guarded: Host, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    xml = tmp_path / "vm2.xml"
    xml.write_text(domain_xml("vm2"))
    monkeypatch.setenv(PKI_DIR_ENV, str(PKI.client("viewer-1")))
    code = await asyncio.to_thread(cli.main, ["-c", guarded.uri, "define", str(xml)])
    assert (code, capsys.readouterr().err) == (1, (
        f"error: Failed to define domain from {xml}\n"
        f"error: {READ_ONLY.format('viewer-1', 'Define')}\n"))


async def test_the_client_checks_the_daemons_name(tmp_path: Path) -> None:
    # The daemon's certificate names elsewhere.test and 127.0.0.2; it is reached as 127.0.0.1.
    running = await start_daemon(DaemonConfig(
        state_dir=str(tmp_path / "state"), listen=("tls://127.0.0.1:0",),
        pki_dir=str(PKI.host("elsewhere", ips=("127.0.0.2",)))))
    try:
        with pytest.raises(ConnectionFailed, match="unable to connect"):
            await AsyncConnection.open(f"virtmig+tls://127.0.0.1:{running.tcp_port}",
                                       connect_timeout=5)
    finally:
        await running.stop(grace=0)


async def test_what_virtmig_pki_writes_is_used_as_it_is(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CA and dirs made by ``virtmig pki``: the host dir is the daemon's ``pki_dir``, the
    client dir a URI's ``?pkipath=`` (``$VIRTMIG_PKI_DIR`` names the session PKI, another CA:
    only the URI's dir can work).  The daemon's certificate names ``localhost`` and no address:
    the client accepts it by that name and refuses it reached as ``127.0.0.1``."""
    ca, host, me = tmp_path / "ca", tmp_path / "host", tmp_path / "me"
    for argv in (["pki", "init", str(ca)],
                 ["pki", "issue", str(ca), "--host", "localhost", "--out", str(host)],
                 ["pki", "issue", str(ca), "--client", "me", "--out", str(me)]):
        assert await asyncio.to_thread(cli.main, ["-q", *argv]) == 0
    running = await start_daemon(DaemonConfig(
        state_dir=str(tmp_path / "state"), listen=("tls://127.0.0.1:0",), pki_dir=str(host)))
    try:
        port, xml = running.tcp_port, tmp_path / "vm1.xml"
        xml.write_text(domain_xml("vm1"))
        capsys.readouterr()
        uri = f"virtmig+tls://localhost:{port}?pkipath={me}"
        assert await asyncio.to_thread(cli.main, ["-c", uri, "define", str(xml)]) == 0
        assert await asyncio.to_thread(cli.main, ["-c", uri, "list", "--all", "--name"]) == 0
        assert capsys.readouterr().out == f"Domain 'vm1' defined from {xml}\n\nvm1\n\n"
        for refused in (f"virtmig+tls://localhost:{port}",  # the session's CA: not this one
                        f"virtmig+tls://127.0.0.1:{port}?pkipath={me}"):  # not a name it has
            with pytest.raises(ConnectionFailed, match="unable to connect"):
                await AsyncConnection.open(refused, connect_timeout=5)
    finally:
        await running.stop(grace=0)


# --- plain TCP only when asked for ---------------------------------------------------------------


async def test_plain_tcp_is_refused_unless_asked_for(tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state"
    with pytest.raises(InvalidArgument, match=r"listen URI 'tcp://127.0.0.1:0' is plain TCP.*"
                                              r"listen_insecure_tcp = true"):
        await start_daemon(DaemonConfig(state_dir=str(state), listen=("tcp://127.0.0.1:0",)))
    assert not state.exists()  # refused before anything was made

    caplog.set_level(logging.WARNING)
    running = await start_daemon(DaemonConfig(state_dir=str(state), listen=(
        "tls://127.0.0.1:0", "tcp://127.0.0.1:0"), pki_dir=str(PKI.host("open")),
        listen_insecure_tcp=True))
    try:
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
            "listening on tcp://127.0.0.1:0 without TLS: whoever reaches it has full access "
            "(listen_insecure_tcp)"]
        port = int(running.addresses[1].rsplit(":", 1)[1])
        async with await AsyncConnection.open(f"virtmig+tcp://127.0.0.1:{port}") as plain:
            await plain.define(domain_xml("vm1"))  # full access, as the warning says
    finally:
        await running.stop(grace=0)


def args(*argv: str) -> Any:
    return build_parser().parse_args(list(argv))


def test_config_allows_plain_tcp_only_in_words(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = ["tcp://0.0.0.0:16609"]\n')
    with pytest.raises(InvalidArgument, match="listen_insecure_tcp"):
        load_config(args("--config", str(cfg)))
    # --allow-insecure vouches for the --listen beside it, not for the file's
    with pytest.raises(InvalidArgument, match="listen_insecure_tcp"):
        load_config(args("--config", str(cfg), "--allow-insecure"))
    with pytest.raises(InvalidArgument, match="listen_insecure_tcp"):
        load_config(args("--listen", "tcp://127.0.0.1:1"))
    c = load_config(args("--listen", "tcp://127.0.0.1:1", "--allow-insecure"))
    assert (c.listen, c.listen_insecure_tcp) == (("tcp://127.0.0.1:1",), True)
    cfg.write_text('listen = ["tcp://0.0.0.0:16609"]\nlisten_insecure_tcp = true\n')
    assert load_config(args("--config", str(cfg))).listen_insecure_tcp
    cfg.write_text('listen_insecure_tcp = "yes"\n')
    with pytest.raises(InvalidArgument, match="invalid listen_insecure_tcp 'yes'"):
        load_config(args("--config", str(cfg)))


def test_config_tls_settings(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('listen = ["tls://0.0.0.0"]\npki_dir = "/p"\n'
                   'tls_allowed_dn_list = ["O=a,CN=*"]\ntls_readonly_dn_list = ["O=a,CN=ro"]\n'
                   'readonly_socket = true\n')
    c = load_config(args("--config", str(cfg)))
    assert (c.listen, c.pki_dir, c.tls_allowed_dn_list, c.tls_readonly_dn_list,
            c.readonly_socket, c.listen_insecure_tcp) == (
        ("tls://0.0.0.0",), "/p", ("O=a,CN=*",), ("O=a,CN=ro",), True, False)
    cfg.write_text("")
    assert not load_config(args("--config", str(cfg))).readonly_socket
    assert load_config(args("--config", str(cfg), "--readonly-socket")).readonly_socket
    cfg.write_text('tls_allowed_dn_list = "O=a,CN=*"\n')
    with pytest.raises(InvalidArgument, match=r"tls_allowed_dn_list .* a list of strings"):
        load_config(args("--config", str(cfg)))


# --- a bad PKI dir fails the start ----------------------------------------------------------------


async def test_a_bad_pki_dir_fails_the_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    config = DaemonConfig(state_dir=str(state), listen=("tls://127.0.0.1:0",),
                          pki_dir=str(tmp_path / "nothing"))
    with pytest.raises(ConfigUnsupported, match=r"CA certificate '.*/nothing/cacert.pem' does "
                                                r"not exist"):
        await start_daemon(config)
    # A client's dir has no server certificate.
    with pytest.raises(ConfigUnsupported, match=r"server certificate '.*' does not exist"):
        await start_daemon(DaemonConfig(state_dir=str(state), listen=("tls://127.0.0.1:0",),
                                        pki_dir=str(PKI.client())))
    assert not state.exists()


def test_virtmigd_reports_a_bad_pki_dir(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from virtmig.daemon.main import main

    cfg = PKI.config(tmp_path / "c.toml", "x", extra="")
    cfg.write_text(f'pki_dir = "{tmp_path}"\n')
    assert main(["--config", str(cfg), "--listen", "tls://127.0.0.1:0",
                 "--state-dir", str(tmp_path / "s")]) == 1
    assert capsys.readouterr().err == (
        f"virtmigd: error: unsupported configuration: CA certificate '{tmp_path}/cacert.pem' "
        "does not exist\n")


# --- migrations between daemons that admit only the certificates they list ------------------------


@pytest.fixture
async def strict_pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    """``src`` admits the admin; ``dst`` the admin and ``src``'s host certificate."""
    src = await start_host(tmp_path, "src", tls_allowed_dn_list=(ADMIN,))
    try:
        dst = await start_host(tmp_path, "dst", tls_allowed_dn_list=ALLOWED)
    except BaseException:
        await stop_host(src)
        raise
    try:
        await src.conn.define(domain_xml("vm1"))
        await src.conn.start("vm1")
        yield src, dst
    finally:
        await stop_host(src)
        await stop_host(dst)


@pytest.mark.parametrize("flags", [F.LIVE, F.LIVE | F.PEER2PEER,
                                   F.LIVE | F.PEER2PEER | F.TUNNELLED],
                         ids=["regular", "p2p", "tunnelled"])
async def test_migrations_over_tls(strict_pair: tuple[Host, Host], flags: F) -> None:
    src, dst = strict_pair
    if flags & F.PEER2PEER:
        # The source daemon presents its host certificate (O=virtmig,CN=src.test) to dst.
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), flags)
    else:
        await src.conn.migrate3("vm1", dst.conn, TypedParams(), flags)
    assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF


@pytest.mark.parametrize("tunnelled", [False, True], ids=["p2p", "tunnelled"])
async def test_a_destination_that_does_not_list_the_source_refuses_it(
    tmp_path: Path, tunnelled: bool
) -> None:
    src = await start_host(tmp_path, "src")
    dst = await start_host(tmp_path, "dst", tls_allowed_dn_list=(ADMIN,))
    try:
        await src.conn.define(domain_xml("vm1"))
        await src.conn.start("vm1")
        flags = F.LIVE | F.PEER2PEER | (F.TUNNELLED if tunnelled else 0)
        with pytest.raises(OperationFailed) as err:
            await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), flags)
        assert str(err.value) == (
            f"operation failed: Failed to connect to remote virtmig URI {dst.uri}: "
            f"{NOT_LISTED.format('src.test')}")
        assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
        assert await dst.conn.list_domains(active=True, inactive=True) == []
    finally:
        await stop_host(src)
        await stop_host(dst)


async def test_a_p2p_destination_uri_may_not_name_a_pki_dir(
    strict_pair: tuple[Host, Host], tmp_path: Path
) -> None:
    src, dst = strict_pair
    with pytest.raises(InvalidArgument, match="must not name a pkipath"):
        await src.conn.migrate_to_uri3("vm1", f"{dst.uri}?pkipath={PKI.client()}",
                                       TypedParams(), F.LIVE | F.PEER2PEER)
    assert await src.conn.state("vm1") == (DomainState.RUNNING, 1, "booted")
