"""The standard gRPC health service and server reflection on a daemon's listeners, called with
real gRPC clients (``grpc_health.v1``'s stub, ``grpc_reflection``'s descriptor database), under
the same TLS and DN lists as virtmig's own calls; NOT_SERVING while starting and stopping;
systemd's readiness notification and ``virtmigd --version`` from a real ``virtmigd`` process."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from virtmig.client.transport import open_channel, with_pki_dir
from virtmig.daemon.core import VERSION, DaemonConfig
from virtmig.daemon.health import Health
from virtmig.daemon.main import start_daemon
from virtmig.daemon.metrics_http import MetricsServer
from virtmig.proto.pki import PkiPaths, load_client_credentials
from virtmig.proto.uri import parse_uri
from virtmig.testing import Host, start_host, stop_host, wait_until
from virtmig.testing.pki import session_pki

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def tls_channel(host: Host, client: str = "admin") -> grpc.aio.Channel:
    return open_channel(with_pki_dir(parse_uri(host.uri), session_pki().client(client)), [])


async def check(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return int(reply.status)


def reflected_services(host: Host, client: str = "admin") -> tuple[list[str], list[str]]:
    """The services reflection lists, and Migration's methods from its served descriptor
    (a blocking client: run it in a thread, the daemon serves in this process's loop)."""
    tls = load_client_credentials(PkiPaths.resolve(str(session_pki().client(client))))
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem, private_key=tls.key_pem,
                                         certificate_chain=tls.cert_chain_pem)
    with grpc.secure_channel(parse_uri(host.uri).grpc_target, creds) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = list(db.get_services())
        migration = DescriptorPool(db).FindServiceByName("virtmig.v1.Migration")
        return services, [m.name for m in migration.methods]


async def test_health_check_over_mutual_tls(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h")
    try:
        async with tls_channel(h) as channel:
            for service in ("", "virtmig.v1.Host", "virtmig.v1.Domains", "virtmig.v1.Migration"):
                assert await check(channel, service) == SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(channel, "no.such.Service")
            assert err.value.code() is grpc.StatusCode.NOT_FOUND
            listed = await health_pb2_grpc.HealthStub(channel).List(
                health_pb2.HealthListRequest(), timeout=10)
            assert {k: v.status for k, v in listed.statuses.items()} == {
                s: SERVING for s in ("", "virtmig.v1.Host", "virtmig.v1.Domains",
                                     "virtmig.v1.Migration")}
    finally:
        await stop_host(h)


async def test_reflection_lists_and_describes_the_services(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h")
    try:
        services, methods = await asyncio.to_thread(reflected_services, h)
        assert {"virtmig.v1.Host", "virtmig.v1.Domains", "virtmig.v1.Migration",
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
        assert {"Begin3", "Prepare3Params", "Confirm3", "GetJobInfo"} <= set(methods)
    finally:
        await stop_host(h)


async def test_health_and_reflection_obey_the_dn_lists(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h", tls_allowed_dn_list=("O=virtmig,CN=admin",),
                         tls_readonly_dn_list=("O=virtmig,CN=viewer",))
    try:
        async with tls_channel(h, "viewer") as channel:  # read calls: a read-only client may
            assert await check(channel) == SERVING
        async with tls_channel(h, "stranger") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await check(channel)
            assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "'O=virtmig,CN=stranger' is not on the list" in str(err.value.details())
        with pytest.raises(grpc.RpcError) as rerr:
            await asyncio.to_thread(reflected_services, h, "stranger")
        assert rerr.value.code() is grpc.StatusCode.PERMISSION_DENIED
    finally:
        await stop_host(h)


async def test_health_on_the_unix_and_read_only_sockets(tmp_path: Path) -> None:
    run = tmp_path / "run"
    h = await start_host(tmp_path, "h", listen=(f"unix://{run}/virtmigd.sock",),
                         readonly_socket=True)
    try:
        for sock in ("virtmigd.sock", "virtmigd-ro.sock"):
            async with grpc.aio.insecure_channel(f"unix:{run / sock}") as channel:
                assert await check(channel) == SERVING
    finally:
        await stop_host(h)


async def test_watch_turns_not_serving_when_the_daemon_stops(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h")
    stopped = False
    try:
        async with tls_channel(h) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="virtmig.v1.Migration"), timeout=30)
            assert (await watch.read()).status == SERVING
            stopping = asyncio.ensure_future(h.running.stop(grace=5))
            assert (await watch.read()).status == NOT_SERVING
            await stopping
            stopped = True
    finally:
        if not stopped:
            await stop_host(h)
        else:
            await h.conn.close()


async def test_a_daemon_whose_start_is_not_done_is_not_serving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its listeners already answer while the rest of the start (here the metrics endpoint,
    held back) is not done: health says NOT_SERVING until the start is over."""
    go = asyncio.Event()
    start = MetricsServer.start

    async def held_start(self: MetricsServer) -> str:
        await go.wait()
        return await start(self)

    monkeypatch.setattr(MetricsServer, "start", held_start)
    sock = tmp_path / "run" / "virtmigd.sock"
    starting = asyncio.ensure_future(start_daemon(DaemonConfig(
        state_dir=str(tmp_path / "s"), listen=(f"unix://{sock}",),
        metrics_listen="127.0.0.1:0")))
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as channel:
            async def answer() -> int | None:
                try:
                    return await check(channel, "virtmig.v1.Migration")
                except grpc.aio.AioRpcError:
                    return None  # not listening yet

            assert await wait_until(answer, timeout=30, what="the listener to answer") == (
                NOT_SERVING)
            assert await check(channel) == NOT_SERVING and not starting.done()
            go.set()
            running = await starting
            try:
                assert await check(channel) == SERVING
            finally:
                await running.stop(grace=0)
    finally:
        go.set()
        if not starting.done():
            starting.cancel()


def test_a_new_daemon_is_not_serving_until_started() -> None:
    health = Health()
    assert health.status("") == NOT_SERVING
    health.set_serving(True)
    assert (health.status(""), health.status("virtmig.v1.Host")) == (SERVING, SERVING)
    assert health.status("other") == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
    health.set_serving(False)
    assert health.status("virtmig.v1.Migration") == NOT_SERVING


def test_virtmigd_version() -> None:
    done = subprocess.run([sys.executable, "-m", "virtmig.daemon.main", "--version"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"virtmigd {VERSION}")


def test_virtmigd_notifies_systemd_when_ready_and_when_stopping(tmp_path: Path) -> None:
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)  # a bound wait: the datagram comes once the daemon serves
        proc = subprocess.Popen(
            [sys.executable, "-m", "virtmig.daemon.main", "--state-dir", str(tmp_path / "s"),
             "--listen", f"unix://{tmp_path}/run/virtmigd.sock"],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            ready = notify.recv(4096).decode().splitlines()
            assert "READY=1" in ready and f"MAINPID={proc.pid}" in ready
            assert (tmp_path / "run" / "virtmigd.sock").exists()
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in notify.recv(4096).decode().splitlines()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
            assert proc.stderr is not None
            proc.stderr.close()
