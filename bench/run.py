"""``make bench``: timings of test-backend migrations between two in-process daemons.

Writes ``bench/results/<name>.json`` and prints a summary.  Nothing here is asserted by tests.

* ``migrate-idle-256m``: a 256 MiB idle guest, regular v3 migration, loopback (median of N);
* ``migrate-dirty-256m``: the same guest dirtying 32 MiB/s;
* ``control-plane``: a 4 MiB guest, so the time is mostly the five RPCs and their bookkeeping
  (``--control-plane-runs``, 200 by default: its distribution is drawn by ``bench/figures.py``);
* ``throughput``: idle guests of 16 MiB to 1 GiB (``--throughput-runs`` each), MiB/s by size;
  before each of these migrations (alternating: after it), the same number of bytes through a
  plain asyncio loopback connection in the same process (``raw_samples_s``): 1 MiB writes, each
  drained, ``readexactly`` of 1 MiB, the migration stream's reader limit and write high-water
  mark.  Both are plain TCP (the migrations use no ``--tls``); ``ratio`` is the migration's
  throughput over the raw socket's (medians), the figure issue 17 asks to be at least 0.6;
  ``ratio_cpu`` the same from the CPU time this process spent (``cpu_samples_s``,
  ``raw_cpu_samples_s``; both daemons and the socket's two ends run in it), which a loaded
  machine disturbs far less than the wall clock.  Beside those, in the same rounds, the same
  bytes through a *blocking* Python loopback socket pair (``blocking_samples_s``): two threads,
  ``sendall`` of 1 MiB and ``recv_into`` a preallocated 1 MiB buffer -- what issue 17 measured
  as "a raw loopback socket" (~3,500 MiB/s); ``ratio_blocking`` (and ``ratio_blocking_cpu``)
  is the migration against it.

Every case keeps its samples (``samples_s``, in the order they ran), the date, the number of
cores and the load average when it started (``machine``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

from virtmig.daemon.backend.test.wire import STREAM_LIMIT
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import domain_xml, start_host, stop_host

RESULTS = Path(__file__).resolve().parent / "results"
THROUGHPUT_SIZES_MIB = (16, 64, 256, 1024)
MIB = 1 << 20


async def raw_socket(nbytes: int) -> tuple[float, float]:
    """Seconds (wall clock, and CPU of this process) to move ``nbytes`` through a plain asyncio
    loopback connection, set up as the test backend's stream is (reader limit, write high-water
    mark), in 1 MiB writes."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[None] = loop.create_future()

    async def receive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        left = nbytes
        while left:
            left -= len(await reader.readexactly(min(MIB, left)))
        got.set_result(None)
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0, limit=STREAM_LIMIT)
    try:
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port, limit=STREAM_LIMIT)
        writer.transport.set_write_buffer_limits(high=STREAM_LIMIT)
        chunk = bytes(MIB)
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(nbytes // MIB):
            writer.write(chunk)
            await writer.drain()
        await got
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
        writer.close()
        return elapsed, cpu
    finally:
        server.close()


def blocking_socket(nbytes: int) -> tuple[float, float]:
    """Seconds (wall clock, and CPU of this process) to move ``nbytes`` through a blocking
    loopback socket pair: this thread ``sendall``s 1 MiB at a time, another ``recv_into``s a
    preallocated 1 MiB buffer."""
    with socket.create_server(("127.0.0.1", 0)) as srv:
        out = socket.create_connection(srv.getsockname())
        into, _ = srv.accept()
    buf = memoryview(bytearray(MIB))
    got = [0]

    def receive() -> None:
        while got[0] < nbytes:
            n = into.recv_into(buf, min(MIB, nbytes - got[0]))
            if not n:
                break
            got[0] += n

    with out, into:
        chunk = bytes(MIB)
        receiver = threading.Thread(target=receive)
        t0, c0 = time.perf_counter(), time.process_time()
        receiver.start()
        for _ in range(nbytes // MIB):
            out.sendall(chunk)
        receiver.join()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    if got[0] != nbytes:
        raise RuntimeError(f"blocking socket: {got[0]} of {nbytes} bytes arrived")
    return elapsed, cpu


async def case(name: str, memory_mib: int, dirty_mib: int, runs: int,
               raw: bool = False) -> dict[str, object]:
    machine = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        a = await start_host(Path(tmp), "a")
        b = await start_host(Path(tmp), "b")
        try:
            await a.conn.define(domain_xml("vm", memory_mib, dirty_rate_mib=dirty_mib))
            await a.conn.start("vm")
            times: list[float] = []
            cpu: list[float] = []
            raw_times: list[float] = []
            raw_cpu: list[float] = []
            blk_times: list[float] = []
            blk_cpu: list[float] = []

            async def sockets(i: int) -> None:
                """Both raw sockets, in turns first."""
                for kind in ("asyncio", "blocking")[:: 1 if i % 4 < 2 else -1]:
                    if kind == "asyncio":
                        wall, used = await raw_socket(memory_mib * MIB)
                        raw_times.append(wall)
                        raw_cpu.append(used)
                    else:
                        wall, used = await asyncio.to_thread(blocking_socket, memory_mib * MIB)
                        blk_times.append(wall)
                        blk_cpu.append(used)

            hosts = (a, b)
            for i in range(runs):
                src, dst = hosts[i % 2], hosts[(i + 1) % 2]
                if raw and i % 2 == 0:
                    await sockets(i)
                t0, c0 = time.perf_counter(), time.process_time()
                await src.conn.migrate3("vm", dst.conn, TypedParams(), MigrateFlags.LIVE)
                times.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                if raw and i % 2 == 1:
                    await sockets(i)
        finally:
            await stop_host(a)
            await stop_host(b)
    extra: dict[str, object] = {}
    if raw_times:
        raw_mib_s = memory_mib / statistics.median(raw_times)
        blk_mib_s = memory_mib / statistics.median(blk_times)
        extra = {"raw_samples_s": raw_times, "raw_cpu_samples_s": raw_cpu, "raw_mib_s": raw_mib_s,
                 "ratio": memory_mib / statistics.median(times) / raw_mib_s,
                 "ratio_cpu": statistics.median(raw_cpu) / statistics.median(cpu),
                 "blocking_samples_s": blk_times, "blocking_cpu_samples_s": blk_cpu,
                 "blocking_mib_s": blk_mib_s,
                 "ratio_blocking": memory_mib / statistics.median(times) / blk_mib_s,
                 "ratio_blocking_cpu": statistics.median(blk_cpu) / statistics.median(cpu)}
    return {
        "name": name,
        "machine": machine,
        "samples_s": times,
        "cpu_samples_s": cpu,
        "memory_mib": memory_mib,
        "dirty_rate_mib": dirty_mib,
        "runs": runs,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "throughput_mib_s": memory_mib / statistics.median(times),
        **extra,
    }


def show(result: dict[str, object]) -> None:
    ms = {k: float(result[k]) * 1000 for k in ("median_s", "min_s", "max_s")}  # type: ignore[arg-type]
    raw = (f"; {result['throughput_mib_s']:.0f} MiB/s, asyncio socket {result['raw_mib_s']:.0f} "
           f"MiB/s, ratio {result['ratio']:.2f} (CPU time: {result['ratio_cpu']:.2f}); blocking "
           f"socket {result['blocking_mib_s']:.0f} MiB/s, ratio {result['ratio_blocking']:.2f} "
           f"(CPU time: {result['ratio_blocking_cpu']:.2f})"
           if "ratio" in result else "")
    print(f"{result['name']!s:22} median {ms['median_s']:8.1f} ms "
          f"(min {ms['min_s']:.1f}, max {ms['max_s']:.1f}){raw}", flush=True)


async def main(runs: int, control_plane_runs: int, throughput_runs: int,
               only_throughput: bool, sizes_mib: tuple[int, ...]) -> None:
    RESULTS.mkdir(exist_ok=True)
    for name, mem, dirty, n in (("migrate-idle-256m", 256, 0, runs),
                                ("migrate-dirty-256m", 256, 32, runs),
                                ("control-plane", 4, 0, control_plane_runs)):
        if only_throughput:
            break
        result = await case(name, mem, dirty, n)
        (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        show(result)
    sizes = []
    for mib in sizes_mib:
        result = await case(f"idle-{mib}m", mib, 0, throughput_runs, raw=True)
        sizes.append(result)
        show(result)
    (RESULTS / "throughput.json").write_text(json.dumps(sizes, indent=2) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=7)
    p.add_argument("--control-plane-runs", type=int, default=200)
    p.add_argument("--throughput-runs", type=int, default=3)
    p.add_argument("--only-throughput", action="store_true",
                   help="run the throughput case only (with its raw-socket runs)")
    p.add_argument("--sizes", type=lambda v: tuple(int(x) for x in v.split(",")),
                   default=THROUGHPUT_SIZES_MIB, help="guest sizes of the throughput case, MiB "
                   "(comma-separated; default %(default)s)")
    a = p.parse_args()
    asyncio.run(main(a.runs, a.control_plane_runs, a.throughput_runs, a.only_throughput,
                     a.sizes))
