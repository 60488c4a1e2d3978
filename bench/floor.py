"""The floor under issue 17's control-plane goal: what one migration costs before virtmig's code.

``python bench/floor.py [--runs 1000] [--concurrent 200]`` measures, on this machine, the three
things every regular migration of ``control_plane.py``'s 4 MiB ``test`` guest must do whatever
the code around them, each with nothing else in the way:

* ``grpc``: the 7 unary calls of one migration (libvirt's sequence as the client drives it:
  Lookup, Begin3Params, GetState to the source, Prepare3Params to the destination,
  Perform3Params, Finish3Params to the destination, Confirm3Params), one after another, from
  this process to two bare ``grpc.aio`` server processes (the two daemons) over mutual TLS on
  loopback (the throw-away PKI of :mod:`virtmig.testing.pki`), 1 KiB each way (a cookie's
  size), through a generic handler that returns its request: no interceptor, no handler code.
  Per migration: p50, p99, the CPU time of the three processes (``/proc``) and how many cores
  that keeps busy one at a time; then ``--concurrent`` migrations' calls at once (each over its
  own two connections, as ``control_plane.py``'s guests) against one at a time: what
  concurrency can buy on this machine's cores when the work is nothing but gRPC;
* ``durable_write``: the durable replacement of a 1.5 KiB file (write, ``fsync``, rename over the
  old one, ``fsync`` of the folder), as a status or placement file is written; a migration waits
  for ``DURABLE_WRITES_WAITED`` of them one after another (Perform's ``perform3_done``, Finish's
  placement record and its final status, Confirm's placement record: bench/README.md, "Control
  plane, session 9"), in a folder beside this process's temporary files;
* ``stream``: 4 MiB (the guest's memory) through a blocking loopback socket pair, a thread each
  side (sent from one buffer, received into another): no framing, no digest.

Their sum, medians, is ``floor_s``: the p50 a migration would take if virtmig's own work (the
cookies, the domain XML, the jobs, the status documents, the test backend's pages) cost
nothing, beside the goal (p50 ≤ 10 ms) and, when ``control_plane.py`` has run, the measured
p50.  Results go to ``bench/results/floor.json``.  Nothing here is asserted by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from control_plane import cpu_s, percentile

RESULTS = Path(__file__).resolve().parent / "results"
CALLS_PER_MIGRATION = 7
DURABLE_WRITES_WAITED = 4
GUEST_BYTES = 4 * 1024 * 1024
PAYLOAD = 1024
GOAL_P50_S = 0.010
WARMUP = 50


def summary(samples: list[float]) -> dict[str, Any]:
    return {"samples": len(samples), "p50_s": statistics.median(samples),
            "p99_s": percentile(samples, 0.99)}


# -- gRPC ----------------------------------------------------------------------------------------

def _read(path: Path) -> bytes:
    return path.read_bytes()


async def serve(port: int, pki: Path) -> None:
    """The bare server: one generic method that answers with its request."""
    import grpc

    async def echo(request: bytes, _context: object) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "floor.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    creds = grpc.ssl_server_credentials(
        [(_read(pki / "private" / "serverkey.pem"), _read(pki / "servercert.pem"))],
        root_certificates=_read(pki / "cacert.pem"), require_client_auth=True)
    server.add_secure_port(f"127.0.0.1:{port}", creds)
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


# Which daemon each call of a regular migration goes to: Lookup, Begin3Params, GetState (the
# source, A), Prepare3Params (the destination, B), Perform3Params (A), Finish3Params (B),
# Confirm3Params (A).
SEQUENCE = (0, 0, 0, 1, 0, 1, 0)


def _channel(port: int, client: Path, host_name: str) -> Any:
    import grpc

    creds = grpc.ssl_channel_credentials(
        _read(client / "cacert.pem"), _read(client / "private" / "clientkey.pem"),
        _read(client / "clientcert.pem"))
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.ssl_target_name_override", host_name)])


async def _calls(ports: list[int], client: Path, host_name: str, runs: int,
                 concurrent: int) -> dict[str, Any]:
    """``runs`` migrations' calls one at a time (per migration: its wall time), then
    ``concurrent`` at once, each over its own two connections (opened beforehand, as each
    guest of ``control_plane.py`` has its own)."""
    payload = os.urandom(PAYLOAD)

    async def migration(calls: list[Any]) -> None:
        for target in SEQUENCE:
            await calls[target](payload)

    channels = [_channel(port, client, host_name) for port in ports]
    calls = [ch.unary_unary("/floor.Echo/Echo") for ch in channels]
    for _ in range(WARMUP):
        await migration(calls)
    samples = []
    cpu0 = time.process_time()
    for _ in range(runs):
        t0 = time.perf_counter()
        await migration(calls)
        samples.append(time.perf_counter() - t0)
    client_cpu = time.process_time() - cpu0
    for ch in channels:
        await ch.close()
    out: dict[str, Any] = {**summary(samples), "client_cpu_s": client_cpu / runs,
                           "one_by_one_per_s": runs / sum(samples)}
    if concurrent:
        pairs = [[_channel(port, client, host_name) for port in ports] for _ in range(concurrent)]
        stubs = [[ch.unary_unary("/floor.Echo/Echo") for ch in pair] for pair in pairs]
        await asyncio.gather(*(stub[0](payload) for stub in stubs))  # the handshakes
        await asyncio.gather(*(stub[1](payload) for stub in stubs))
        t0 = time.perf_counter()
        await asyncio.gather(*(migration(stub) for stub in stubs))
        elapsed = time.perf_counter() - t0
        for pair in pairs:
            for ch in pair:
                await ch.close()
        out.update(concurrent=concurrent, together_per_s=concurrent / elapsed,
                   concurrency_ratio=concurrent / elapsed / out["one_by_one_per_s"])
    return out


def grpc_floor(runs: int, concurrent: int) -> dict[str, Any]:
    from virtmig.testing.pki import session_pki
    from virtmig.testing.ports import free_port

    pki = session_pki()
    servers: list[subprocess.Popen[str]] = []
    try:
        ports = []
        for _ in range(2):
            port = free_port()
            servers.append(subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), str(pki.host("floor"))],
                stdout=subprocess.PIPE, text=True))
            ports.append(port)
        for server in servers:
            assert server.stdout is not None
            if server.stdout.readline().strip() != "ready":
                raise SystemExit("floor: a bare gRPC server did not start")
        server_cpu0 = [cpu_s(server.pid) for server in servers]
        out = asyncio.run(_calls(ports, pki.client(), "floor.test", runs, 0))
        # (the servers' CPU includes the warm-up's calls: per migration, slightly over)
        sets = runs + WARMUP
        out["server_cpu_s"] = [(cpu_s(server.pid) - c0) / sets
                               for server, c0 in zip(servers, server_cpu0, strict=True)]
        if concurrent:
            out.update({k: v for k, v in asyncio.run(
                _calls(ports, pki.client(), "floor.test", runs, concurrent)).items()
                if k in ("concurrent", "together_per_s", "concurrency_ratio")})
    finally:
        for server in servers:
            server.terminate()
            server.wait()
        pki.release()
    cpu = out["client_cpu_s"] + sum(out["server_cpu_s"])
    out.update(calls=len(SEQUENCE), payload_bytes=PAYLOAD, cpu_per_migration_s=cpu,
               busy_cores_one_by_one=cpu / out["p50_s"])
    return out


# -- durable writes ------------------------------------------------------------------------------

def durable_write_floor(runs: int) -> dict[str, Any]:
    data = os.urandom(1536)
    samples = []
    with tempfile.TemporaryDirectory(prefix="virtmig-floor-") as tmp:
        folder = Path(tmp)
        for i in range(runs + WARMUP):
            final, staged = folder / f"status{i % 8}.xml", folder / f".status{i % 8}.tmp"
            t0 = time.perf_counter()
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(staged, final)
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if i >= WARMUP:
                samples.append(time.perf_counter() - t0)
    return {**summary(samples), "bytes": len(data), "waited_per_migration": DURABLE_WRITES_WAITED}


# -- the stream ----------------------------------------------------------------------------------

def stream_floor(runs: int) -> dict[str, Any]:
    send_buf = os.urandom(GUEST_BYTES)
    recv_buf = bytearray(GUEST_BYTES)
    a, b = socket.socketpair()
    samples = []
    try:
        for i in range(max(10, runs // 10) + 5):
            def receive() -> None:
                view, got = memoryview(recv_buf), 0
                while got < GUEST_BYTES:
                    n = b.recv_into(view[got:])
                    if not n:
                        raise ConnectionError("closed")
                    got += n

            reader = threading.Thread(target=receive)
            t0 = time.perf_counter()
            reader.start()
            a.sendall(send_buf)
            reader.join()
            if i >= 5:
                samples.append(time.perf_counter() - t0)
    finally:
        a.close()
        b.close()
    return {**summary(samples), "bytes": GUEST_BYTES}


# -- the whole -------------------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000,
                   help="migrations' calls one at a time; durable writes")
    p.add_argument("--concurrent", type=int, default=200,
                   help="migrations' calls at once (0: not measured)")
    p.add_argument("--serve", nargs=2, metavar=("PORT", "PKI_DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        asyncio.run(serve(int(a.serve[0]), Path(a.serve[1])))
        return 0
    if a.runs < 1 or a.concurrent < 0:
        p.error("--runs must be at least 1, --concurrent at least 0")
    rpc = grpc_floor(a.runs, a.concurrent)
    durable = durable_write_floor(a.runs)
    stream = stream_floor(a.runs)
    floor = rpc["p50_s"] + DURABLE_WRITES_WAITED * durable["p50_s"] + stream["p50_s"]
    result: dict[str, Any] = {
        "grpc": rpc, "durable_write": durable, "stream": stream, "floor_s": floor,
        "goal_p50_s": GOAL_P50_S, "loadavg": os.getloadavg(), "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    measured = RESULTS / "control-plane-procs.json"
    if measured.exists():
        result["control_plane_p50_s"] = json.loads(measured.read_text())["p50_s"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "floor.json").write_text(json.dumps(result, indent=2) + "\n")
    ms = 1000
    print(f"7 unary gRPC calls over mutual TLS   p50 {rpc['p50_s'] * ms:6.2f} ms  "
          f"p99 {rpc['p99_s'] * ms:6.2f} ms  (CPU {rpc['cpu_per_migration_s'] * ms:.2f} ms in "
          f"3 processes: {rpc['busy_cores_one_by_one']:.2f} cores busy one at a time)")
    if a.concurrent:
        print(f"  {a.concurrent} at once / one at a time        {rpc['together_per_s']:6.0f}/s "
              f"against {rpc['one_by_one_per_s']:.0f}/s: {rpc['concurrency_ratio']:.2f}x on "
              f"{os.cpu_count()} cores (goal of control_plane.py: 3x)")
    print(f"durable 1.5 KiB file write            p50 {durable['p50_s'] * ms:6.2f} ms  "
          f"p99 {durable['p99_s'] * ms:6.2f} ms  (x{DURABLE_WRITES_WAITED} per migration)")
    print(f"4 MiB through a loopback socket pair  p50 {stream['p50_s'] * ms:6.2f} ms  "
          f"p99 {stream['p99_s'] * ms:6.2f} ms")
    line = f"floor of one migration               {floor * ms:6.2f} ms  (goal p50 ≤ 10 ms"
    if "control_plane_p50_s" in result:
        line += f"; control_plane.py measured p50 {result['control_plane_p50_s'] * ms:.1f} ms"
    print(line + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
