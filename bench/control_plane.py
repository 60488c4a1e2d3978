"""The control plane with the daemons as processes (issue 17): latency, drift and concurrency.

``python bench/control_plane.py [--runs 1000] [--concurrent 200]`` starts two ``virtmigd``
processes (``test`` backend, mutual TLS on loopback with the throw-away PKI of
:mod:`virtmig.testing.pki`, fresh state dirs) and drives them through the client library from
this process:

* ``control-plane-procs``: one 4 MiB guest migrated back and forth ``--runs`` times (regular v3,
  live), one at a time: every migration's time (``samples_s``, in order), p50/p99, and the drift:
  the median of the last 100 against the first 100; the CPU time each daemon and this client
  spent per migration (``/proc``), and the daemons' CPU per migration over the last 100 against
  the first 100 (``cpu_drift``), and both daemons' CPU per migration in each block of 100
  (``cpu_per_block_ms``: a cost that grows with the migrations done climbs block after block,
  the machine's noise goes up and down).  CPU time is not immune to the load: on the 2 shared
  cores the same work's CPU time varies with the other processes (shared caches, a core's
  sibling), and ``cpu_drift`` of unchanged code read 0.73 to 1.62 from one run to the next
  (bench/README.md, "Control-plane drift, session 10"); ``client_cpu_drift``, the same ratio
  for this process, whose work per migration is constant, is the machine's share of it;
* ``control-plane-concurrent``: ``--concurrent`` distinct 4 MiB guests, each with its own client
  connections to both daemons, all migrated from A to B at once, then the same guests back one
  at a time: the two rates, their ratio and the failures, and what the ratio is made of: the CPU
  per migration (both daemons and this client) and the cores busy in each way.  The ratio is the
  cores busy at once over one at a time, times the CPU per migration one at a time over at once:
  on N cores it cannot pass N / (cores busy one at a time) unless the migrations at once cost
  less CPU each.  Migration ports are ``--ports`` per daemon: fewer than the guests, a Prepare
  waits for one (``migration_port_wait``).

``--event-loop uvloop`` runs the daemons on uvloop (their ``event_loop`` setting).

``--daemon-source DIR --tag=-base`` runs the daemons from another tree (a directory holding a
``virtmig`` package, e.g. a baseline's), for A/B runs interleaved with this tree's.

Results go to ``bench/results/control-plane-procs.json`` and
``bench/results/control-plane-concurrent.json`` (``bench/figures.py`` draws the first); the load
average is recorded beside them.  Nothing here is asserted by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from virtmig.client.connection import AsyncConnection
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import domain_xml
from virtmig.testing.pki import session_pki

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine() -> dict[str, object]:
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(), "loadavg_start": os.getloadavg()}


class Daemon:
    """``virtmigd`` as its own process on ``tls://127.0.0.1:0``."""

    def __init__(self, root: Path, name: str, ports: tuple[int, int], extra: str = "",
                 source: str = "") -> None:
        self.root = root / name
        self.root.mkdir()
        self.name = name
        config = self.root / "virtmigd.toml"
        config.write_text(
            f'pki_dir = "{session_pki().host(name)}"\n'
            f'migration_ports = "{ports[0]}-{ports[1]}"\n' + extra)
        ready = self.root / "ready.json"
        # source: another tree's virtmig package root (a baseline's), else this install's
        command = [sys.executable, "-c", "from virtmig.daemon.main import main; main()"] \
            if source else [str(BIN / "virtmigd")]
        env = dict(os.environ, VIRTMIG_RUN_DIR=str(self.root))
        if source:
            env["PYTHONPATH"] = source
        self.proc = subprocess.Popen(
            [*command, "--config", str(config), "--state-dir",
             str(self.root / "state"), "--listen", "tls://127.0.0.1:0", "--hostname",
             f"{name}.test", "--migration-address", "127.0.0.1", "--migration-host", "127.0.0.1",
             "--ready-file", str(ready), "--log-level", "warning"], env=env)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"virtmigd {name} did not start")
            time.sleep(0.01)
        address = json.loads(ready.read_text())["addresses"][0]
        self.uri = f"virtmig+tls://{address}"

    async def connect(self) -> AsyncConnection:
        return await AsyncConnection.open(self.uri, pki_dir=session_pki().client())

    def cpu_s(self) -> float:
        return cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def two_daemons(root: Path, ports: int, extra: str = "",
                source: str = "") -> Iterator[tuple[Daemon, Daemon]]:
    """Daemons ``a`` and ``b`` under ``root``, ``ports`` migration ports each (from 49400 and
    49600); both stopped at the end."""
    a = Daemon(root, "a", (49400, 49400 + ports - 1), extra, source)
    try:
        b = Daemon(root, "b", (49600, 49600 + ports - 1), extra, source)
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        a.stop()
        b.stop()


def percentile(values: list[float], q: float) -> float:
    cut = sorted(values)
    return cut[min(len(cut) - 1, int(q * len(cut)))]


async def sequential(a: Daemon, b: Daemon, runs: int) -> dict[str, Any]:
    ca, cb = await a.connect(), await b.connect()
    try:
        await ca.define(domain_xml("vm", 4))
        await ca.start("vm")
        conns = ((ca, cb), (cb, ca))
        for i in range(4):  # warm-up: connections, caches, first files
            src, dst = conns[i % 2]
            await src.migrate3("vm", dst, TypedParams(), MigrateFlags.LIVE)
        start = machine()
        cpu0 = (a.cpu_s(), b.cpu_s(), time.process_time())
        times = []
        marks: dict[int, float] = {}  # both daemons' CPU at migrations 0, 100, runs-100, runs
        client: dict[int, float] = {}  # this process's CPU at the same migrations
        blocks: list[float] = []  # both daemons' CPU at every 100th migration
        for i in range(runs):
            if i in (0, min(100, runs), max(0, runs - 100)):
                marks[i] = a.cpu_s() + b.cpu_s()
                client[i] = time.process_time()
            if i % 100 == 0:
                blocks.append(a.cpu_s() + b.cpu_s())
            src, dst = conns[i % 2]
            t0 = time.perf_counter()
            await src.migrate3("vm", dst, TypedParams(), MigrateFlags.LIVE)
            times.append(time.perf_counter() - t0)
        cpu1 = (a.cpu_s(), b.cpu_s(), time.process_time())
        marks[runs] = cpu1[0] + cpu1[1]
        client[runs] = cpu1[2]
        blocks.append(marks[runs])
    finally:
        await ca.close()
        await cb.close()
    head, tail = times[:100], times[-100:]
    return {
        "name": "control-plane-procs", "machine": start, "loadavg_end": os.getloadavg(),
        "memory_mib": 4, "runs": runs, "samples_s": times,
        "median_s": statistics.median(times), "p50_s": statistics.median(times),
        "p99_s": percentile(times, 0.99), "min_s": min(times), "max_s": max(times),
        "drift": statistics.median(tail) / statistics.median(head),
        # the daemons' CPU per migration over the last 100 against the first 100: less moved
        # by the load than the wall-clock drift, not immune to it (the docstring)
        "cpu_drift": ((marks[runs] - marks[max(0, runs - 100)]) / len(tail))
        / ((marks[min(100, runs)] - marks[0]) / len(head)),
        # the same for this client, whose work per migration does not change (the same Python
        # calls per 100 migrations early and late, by cProfile): the machine's part of cpu_drift
        "client_cpu_drift": (client[runs] - client[max(0, runs - 100)])
        / (client[min(100, runs)] - client[0]),
        "cpu_per_block_ms": [(y - x) * 1000 / min(100, runs - k) for k, x, y
                             in zip(range(0, runs, 100), blocks[:-1], blocks[1:], strict=True)],
        "cpu_per_migration_ms": {
            "daemon_a": (cpu1[0] - cpu0[0]) / runs * 1000,
            "daemon_b": (cpu1[1] - cpu0[1]) / runs * 1000,
            "client": (cpu1[2] - cpu0[2]) / runs * 1000,
        },
    }


async def _one(src: AsyncConnection, dst: AsyncConnection, name: str) -> str | None:
    try:
        await src.migrate3(name, dst, TypedParams(), MigrateFlags.LIVE)
    except Exception as exc:  # counted, not raised: the bench reports failures
        return f"{name}: {exc}"
    return None


async def concurrent(a: Daemon, b: Daemon, count: int) -> dict[str, Any]:
    names = [f"c{i:04d}" for i in range(count)]
    pairs = [(await a.connect(), await b.connect()) for _ in names]
    try:
        admin = pairs[0][0]
        for name in names:
            await admin.define(domain_xml(name, 4))
            await admin.start(name)
        start = machine()
        cpu0, t0 = _cpu(a, b), time.perf_counter()
        out = await asyncio.gather(*(_one(s, d, n) for (s, d), n in zip(pairs, names, strict=True)))
        together_s, together_cpu = time.perf_counter() - t0, _cpu(a, b) - cpu0
        failures = [e for e in out if e]
        cpu0, t0 = _cpu(a, b), time.perf_counter()
        back = [await _one(d, s, n) for (s, d), n in zip(pairs, names, strict=True)]
        one_by_one_s, one_by_one_cpu = time.perf_counter() - t0, _cpu(a, b) - cpu0
        failures += [e for e in back if e]
    finally:
        for s, d in pairs:
            await s.close()
            await d.close()
    return {
        "name": "control-plane-concurrent", "machine": start, "loadavg_end": os.getloadavg(),
        "memory_mib": 4, "guests": count,
        "together_s": together_s, "together_per_s": count / together_s,
        "one_by_one_s": one_by_one_s, "one_by_one_per_s": count / one_by_one_s,
        "ratio": one_by_one_s / together_s, "failures": failures,
        # The ratio is (cores busy at once / one at a time) x (CPU per migration one at a time /
        # at once): on N cores at most N / cores_busy_one_by_one x the CPU it saves.
        "cpu_per_migration_ms": {"together": 1000 * together_cpu / count,
                                 "one_by_one": 1000 * one_by_one_cpu / count},
        "cores_busy": {"together": together_cpu / together_s,
                       "one_by_one": one_by_one_cpu / one_by_one_s},
        "cpus": os.cpu_count(),
    }


def _cpu(a: Daemon, b: Daemon) -> float:
    """CPU seconds so far of both daemons and this client (the whole of a migration's CPU)."""
    return a.cpu_s() + b.cpu_s() + time.process_time()


def _record(result: dict[str, Any], name: str, args: argparse.Namespace) -> dict[str, Any]:
    """``result`` with the daemons' source and event loop, written to ``results/NAME{tag}.json``."""
    result["daemon_source"] = args.daemon_source
    result["event_loop"] = args.event_loop
    (RESULTS / f"{name}{args.tag}.json").write_text(json.dumps(result, indent=2))
    return result


async def main(args: argparse.Namespace) -> None:
    RESULTS.mkdir(exist_ok=True)
    extra = ("max_calls_per_client = 64\nmigration_port_wait = 120\n"
             f'event_loop = "{args.event_loop}"\n')
    with tempfile.TemporaryDirectory() as tmp, two_daemons(
            Path(tmp), args.ports, extra, args.daemon_source) as (a, b):
        if args.runs:
            seq = _record(await sequential(a, b, args.runs), "control-plane-procs", args)
            cpu = seq["cpu_per_migration_ms"]
            print(f"control-plane-procs  p50 {seq['p50_s'] * 1000:.1f} ms, p99 "
                  f"{seq['p99_s'] * 1000:.1f} ms, drift {seq['drift']:.2f}, CPU drift "
                  f"{seq['cpu_drift']:.2f}, the client's {seq['client_cpu_drift']:.2f} "
                  f"({args.runs} "
                  f"runs; CPU per migration: a {cpu['daemon_a']:.1f} ms, b "
                  f"{cpu['daemon_b']:.1f} ms, client {cpu['client']:.1f} ms; load "
                  f"{seq['machine']['loadavg_start'][0]:.1f})", flush=True)
        if args.concurrent:
            con = _record(await concurrent(a, b, args.concurrent), "control-plane-concurrent",
                          args)
            print(f"control-plane-concurrent  {args.concurrent} at once "
                  f"{con['together_per_s']:.1f}/s, one at a time "
                  f"{con['one_by_one_per_s']:.1f}/s: ratio {con['ratio']:.2f}, "
                  f"{len(con['failures'])} failures; CPU per migration "
                  f"{con['cpu_per_migration_ms']['together']:.1f} / "
                  f"{con['cpu_per_migration_ms']['one_by_one']:.1f} ms, cores busy "
                  f"{con['cores_busy']['together']:.2f} / "
                  f"{con['cores_busy']['one_by_one']:.2f} (load "
                  f"{con['machine']['loadavg_start'][0]:.1f})", flush=True)
            for failure in con["failures"][:5]:
                print("  ", failure)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--concurrent", type=int, default=200)
    p.add_argument("--ports", type=int, default=64)
    p.add_argument("--daemon-source", default="", metavar="DIR",
                   help="run the daemons from this package root (PYTHONPATH; an A/B baseline)")
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="the daemons' event_loop setting")
    asyncio.run(main(p.parse_args()))
