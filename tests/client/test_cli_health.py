"""``virtmig health``: the daemon's gRPC health service from the command line, over each
transport (mutual TLS, the unix socket, the read-only socket), while serving and while shutting
down, for an unknown service, an unreachable daemon, and a certificate the DN lists refuse.

The daemons run in this process (:func:`virtmig.testing.start_host`); the CLI runs as a real
``virtmig`` process in a thread, so that the daemon's event loop keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from tests.client.cli_helpers import virtmig
from virtmig.client.health import UNKNOWN, _status, check_health
from virtmig.proto.errors import InvalidArgument, PermissionDenied
from virtmig.testing import Host, free_port, start_host, stop_host
from virtmig.testing.pki import session_pki


def tls_uri(host: Host, client: str = "admin") -> str:
    return f"{host.uri}?pkipath={session_pki().client(client)}"


async def health(uri: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(virtmig, uri, "health", *args)


async def test_serving_over_tls_and_both_unix_sockets(tmp_path: Path) -> None:
    run = tmp_path / "run"
    h = await start_host(tmp_path, "h", readonly_socket=True,
                         listen=("tls://127.0.0.1:0", f"unix://{run}/virtmigd.sock"))
    try:
        for uri in (tls_uri(h), f"virtmig+unix://{run}/virtmigd.sock",
                    f"virtmig+unix://{run}/virtmigd-ro.sock"):  # health is a read call
            res = await health(uri)
            assert (res.returncode, res.stdout, res.stderr) == (0, "SERVING\n", ""), uri
        res = await health(tls_uri(h), "--service", "virtmig.v1.Migration", "--json")
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == {"service": "virtmig.v1.Migration",
                                          "status": "SERVING", "status_code": 1}
    finally:
        await stop_host(h)


async def test_not_serving_and_unknown_service_exit_1(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h")
    try:
        res = await health(tls_uri(h), "--service", "no.such.Service")
        assert (res.returncode, res.stdout, res.stderr) == (1, "SERVICE_UNKNOWN\n", "")
        # What the daemon reports from the moment it begins to shut down (RunningDaemon.stop).
        h.daemon.health.set_serving(False)
        res = await health(tls_uri(h))
        assert (res.returncode, res.stdout, res.stderr) == (1, "NOT_SERVING\n", "")
        res = await health(tls_uri(h), "--json")
        assert res.returncode == 1
        assert json.loads(res.stdout) == {"service": "", "status": "NOT_SERVING",
                                          "status_code": 2}
        h.daemon.health.set_serving(True)
        assert (await health(tls_uri(h))).returncode == 0
    finally:
        await stop_host(h)


async def test_the_dn_lists_decide_who_may_ask(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h", tls_allowed_dn_list=("O=virtmig,CN=admin",),
                         tls_readonly_dn_list=("O=virtmig,CN=viewer",))
    try:
        res = await health(tls_uri(h, "viewer"))
        assert (res.returncode, res.stdout) == (0, "SERVING\n"), res.stderr
        res = await health(tls_uri(h, "stranger"))
        assert (res.returncode, res.stdout) == (1, "")
        assert res.stderr.startswith("error: failed to connect to the hypervisor\n"
                                     "error: access denied: ")
        assert "'O=virtmig,CN=stranger' is not on the list" in res.stderr
        with pytest.raises(PermissionDenied):
            await check_health(h.uri, pki_dir=session_pki().client("stranger"))
        assert (await check_health(h.uri, "virtmig.v1.Host",
                                   pki_dir=session_pki().client("viewer"))).serving
    finally:
        await stop_host(h)


@pytest.mark.parametrize("where", ["tcp", "tls", "unix"])
def test_an_unreachable_daemon_is_a_connection_error(where: str, tmp_path: Path) -> None:
    port = free_port()
    uri, reason = {
        "tcp": (f"virtmig+tcp://127.0.0.1:{port}",
                f"unable to connect to server at '127.0.0.1:{port}': Connection refused"),
        "tls": (f"virtmig+tls://127.0.0.1:{port}?pkipath={session_pki().client()}",
                f"unable to connect to server at '127.0.0.1:{port}': Connection refused"),
        "unix": (f"virtmig+unix://{tmp_path}/none.sock",
                 f"Failed to connect socket to '{tmp_path}/none.sock': No such file or "
                 "directory"),
    }[where]
    res = virtmig(uri, "health")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr == f"error: failed to connect to the hypervisor\nerror: {reason}\n"


def test_a_service_name_that_cannot_be_one_is_refused_before_connecting() -> None:
    # A closed port: had it connected, the error would be "Connection refused".
    uri = f"virtmig+tcp://127.0.0.1:{free_port()}"
    for name in ("a\nb", "x" * 201):
        res = virtmig(uri, "health", "--service", name)
        assert (res.returncode, res.stdout) == (1, "")
        assert res.stderr.startswith("error: invalid argument: health: service name must be "
                                     "printable and at most 200 characters"), res.stderr
    with pytest.raises(InvalidArgument):
        asyncio.run(check_health(uri, "\x00"))


def test_a_status_number_grpc_health_does_not_name_is_unknown() -> None:
    assert [_status(n) for n in (0, 1, 2, 3, 99)] == [
        UNKNOWN, "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", UNKNOWN]
