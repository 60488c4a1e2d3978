"""The Prometheus endpoint, scraped over HTTPS with client certificates during and after regular,
peer-to-peer and failed migrations (test backend); who may scrape (the DN lists, as a SIGHUP reload
leaves them); plain HTTP on loopback only; no endpoint without ``metrics_listen``."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import ssl
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon.migration_helpers import running_guest
from virtmig.client.migrate import RemoteSource, migrate3
from virtmig.client.sequence import run_v3
from virtmig.daemon import logs, reload
from virtmig.daemon.core import DaemonConfig
from virtmig.daemon.main import start_daemon
from virtmig.proto.errors import InvalidArgument, NoDomain, VirtmigError
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.migid import MIGRATION_ID_STAT
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.pki import PkiPaths
from virtmig.testing import ClosedPortDest, Host, hosts, start_host, stop_host, wait_until
from virtmig.testing.pki import session_pki

F = MigrateFlags
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def get(address: str, client: str | None = "admin", path: str = "/metrics",
              method: str = "GET") -> tuple[int, str]:
    """An HTTP/1.0 request to ``address``; over TLS with ``client``'s certificate unless
    ``client`` is None and the address is plain (``http:`` prefix)."""
    plain = address.startswith("http:")
    host, port = address.removeprefix("http:").rsplit(":", 1)
    ctx = None
    if not plain:
        pki = PkiPaths.of(session_pki().client(client or "admin"))
        ctx = ssl.create_default_context(cafile=str(pki.cacert))
        if client is not None:
            ctx.load_cert_chain(pki.clientcert, pki.clientkey)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
    try:
        writer.write(f"{method} {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(all_samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in all_samples.items() if n == name and want <= ls)


async def scrape(host: Host) -> Samples:
    status, body = await get(host.running.metrics_address)
    assert status == 200, body
    return samples(body)


M: dict[str, object] = {"metrics_listen": "127.0.0.1:0"}


async def test_metrics_during_and_after_a_regular_migration(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", M), ("dst", M)) as (src, dst):
        await running_guest(src, memory_mib=64, dirty_rate_mib=1)
        before = await scrape(src)
        assert value(before, "virtmig_domains", state="running") == 1
        assert value(before, "virtmig_migrations_in_flight") == 0
        # 64 MiB at 16 MiB/s: seconds to watch it
        params = TypedParams.of({MigrateParam.BANDWIDTH: 16})
        migration = asyncio.ensure_future(_migrate(src, dst, params))
        during = await wait_until(
            lambda: _in_flight(src), timeout=60, what="the source's job in perform3")
        assert value(during, "virtmig_migrations_started_total", role="source", mode="live",
                     transport="direct") == 1
        await migration
        after, dst_after = await scrape(src), await scrape(dst)
        info = await src.conn.job_info("vm1", completed=True)
    mid = next(p.value for p in info.stats if p.name == MIGRATION_ID_STAT)
    for s, role in ((after, "source"), (dst_after, "destination")):
        assert value(s, "virtmig_migrations_succeeded_total", role=role, mode="live",
                     transport="direct", protocol="v3+params") == 1
        assert value(s, "virtmig_migrations_in_flight") == 0
        assert value(s, "virtmig_last_migration_info", migration_id=str(mid), domain="vm1",
                     role=role, outcome="completed") == 1
        assert value(s, "virtmig_migration_bytes_total", role=role) >= 64 << 20
        assert value(s, "virtmig_migration_duration_seconds_count", role=role) == 1
    assert value(after, "virtmig_migration_downtime_seconds_count", role="source") == 1
    assert value(after, "virtmig_last_migration_downtime_seconds") > 0
    for phase in ("begin3", "perform3", "perform3_done", "confirm3"):
        assert value(after, "virtmig_migration_phase_duration_seconds_count", role="source",
                     phase=phase) == 1, phase
    assert value(after, "virtmig_domains", state="running") == 0
    assert value(dst_after, "virtmig_domains", state="running") == 1
    assert value(after, "virtmig_rpc_total", method="virtmig.v1.Migration/Begin3Params",
                 code="OK") == 1
    assert value(dst_after, "virtmig_rpc_duration_seconds_count",
                 method="virtmig.v1.Migration/Prepare3Params") == 1


async def _migrate(src: Host, dst: Host, params: TypedParams) -> None:
    await migrate3(src.conn, "vm1", dst.conn, params, F.LIVE)


async def _in_flight(host: Host) -> Samples | None:
    s = await scrape(host)
    if value(s, "virtmig_migrations_in_flight", role="source", phase="perform3") == 1:
        return s
    return None


async def test_metrics_of_p2p_and_failed_migrations_and_rpc_errors(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", M), ("dst", M)) as (src, dst):
        await running_guest(src)
        with pytest.raises(VirtmigError):
            await run_v3(RemoteSource(src.conn, True), ClosedPortDest(dst.conn, True), "vm1",
                         TypedParams(), F.LIVE, protection=True)
        await src.conn.migrate_to_uri3("vm1", dst.uri, TypedParams(), F.LIVE | F.PEER2PEER)
        with pytest.raises(NoDomain):
            await src.conn.lookup("no-such-domain")
        s, d = await scrape(src), await scrape(dst)
    assert value(s, "virtmig_migrations_failed_total", role="source", reason="connection") == 1
    assert value(d, "virtmig_migrations_failed_total", role="destination",
                 reason="cancelled") == 1
    assert value(s, "virtmig_migrations_succeeded_total", role="source", transport="p2p") == 1
    assert value(d, "virtmig_migrations_succeeded_total", role="destination",
                 transport="p2p") == 1
    assert value(s, "virtmig_migrations_started_total", role="source") == 2
    assert value(s, "virtmig_last_migration_info", outcome="completed") == 1
    assert value(s, "virtmig_rpc_total", method="virtmig.v1.Domains/Lookup",
                 code="NOT_FOUND") >= 1


async def test_who_may_scrape_over_tls(tmp_path: Path) -> None:
    allowed: dict[str, object] = {**M, "tls_allowed_dn_list": ("O=virtmig,CN=admin",),
               "tls_readonly_dn_list": ("O=virtmig,CN=prometheus",)}
    async with hosts(tmp_path, "test", ("h", allowed)) as (h,):
        address = h.running.metrics_address
        assert (await get(address, "prometheus"))[0] == 200
        status, body = await get(address, "stranger")
        assert (status, body) == (403, "access denied: client 'O=virtmig,CN=stranger' is not on "
                                       "the list of allowed clients\n")
        # A SIGHUP reload's DN lists decide the next scrape (read at each request).
        level = logging.root.level
        try:
            reload.apply(h.running, dataclasses.replace(
                h.daemon.config, tls_readonly_dn_list=("O=virtmig,CN=prometheus",
                                                       "O=virtmig,CN=stranger")))
        finally:
            logs.reset()
            logging.root.setLevel(level)
        assert (await get(address, "stranger"))[0] == 200
        assert (await get(address, path="/other"))[0] == 404
        assert (await get(address, method="POST"))[0] == 405
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError,
                            ValueError, IndexError)):
            await get(address, None)  # no client certificate: the handshake fails
        with pytest.raises((ssl.SSLError, ConnectionError, ValueError, IndexError)):
            await get("http:" + address)  # plain HTTP to the TLS endpoint


async def test_without_tls_the_endpoint_is_plain_http_on_loopback_only(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"metrics_listen '0\.0\.0\.0:0' is not a loopback"):
        await start_daemon(DaemonConfig(state_dir=str(tmp_path / "a"),
                                        listen=(f"unix://{tmp_path}/a.sock",),
                                        metrics_listen="0.0.0.0:0"))
    assert not (tmp_path / "a").exists()
    running = await start_daemon(DaemonConfig(state_dir=str(tmp_path / "b"),
                                              listen=(f"unix://{tmp_path}/b.sock",),
                                              metrics_listen="127.0.0.1:0"))
    try:
        status, body = await get("http:" + running.metrics_address)
        assert status == 200 and "virtmig_migrations_in_flight" in body
    finally:
        await running.stop(grace=0)


async def test_without_metrics_listen_there_is_no_endpoint(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h")  # TLS listeners, no metrics_listen: off by default
    try:
        assert h.daemon.config.metrics_listen == ""
        assert (h.running.metrics, h.running.metrics_address) == (None, "")
    finally:
        await stop_host(h)
