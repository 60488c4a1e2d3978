"""``virtmig`` start-up against its goal (issue 17): what a command costs as a user runs it.

Six commands, each a fresh process, run in interleaved rounds (every round runs each once, in a
rotating order, so that the machine's load hits them alike):

* ``import grpc``: a bare ``python -c "import grpc"`` (the floor of a command that talks gRPC);
* ``argparse``: a bare ``python -c "import argparse"`` (the interpreter plus argparse);
* ``argparse --help``: a bare argparse parser printing its ``--help`` (what argparse itself costs
  to format a help text: regular expressions, textwrap, shutil, all loaded on first use);
* ``--help``: ``virtmig --help``;
* ``parse error``: ``virtmig list --no-such-option``;
* ``list over TLS``: ``virtmig -c virtmig+tls://127.0.0.1:PORT?pkipath=DIR list`` against a
  ``virtmigd`` process listening on loopback with mutual TLS (the throw-away PKI of
  :mod:`virtmig.testing.pki`);
* ``migrate``: ``virtmig -c SRC migrate --live vm1 DST``, a regular live migration of a 4 MiB
  test-backend guest between two such daemons (protocol v3 with parameters), each run the other
  way round: the whole command, start-up, both connections and the five phases;
* ``library migrate``: the same migration made by a Python process through the client library
  (``AsyncConnection.migrate3``, both connections already open), which reports how long the call
  took: what ``migrate`` costs once started.  Its wall and CPU figures are the process's, its
  ``call`` figure the call's alone.

It prints the medians of wall-clock time (what a user waits) and of CPU time (the process's user +
system time: what the command costs, and far steadier than wall time on a loaded machine), and
the goal's ratios (``list`` / ``import grpc`` ≤ 1.3, and ``migrate`` / ``import grpc`` against
the same 1.3 and against ``import grpc`` plus the library's migration call; ``--help`` and the
parse error / ``argparse`` ≤ 1.0, also against ``argparse --help``), and writes
``bench/results/cli-startup.json``.  All run with this interpreter (``sys.executable``), so the
venv's site start-up is in every figure alike, and without ``PYTHONDONTWRITEBYTECODE`` and
``PYTHONUNBUFFERED`` in their environment: a user's Python caches compiled modules, so the
warm-up round writes the caches and no counted run compiles source.  Nothing here is asserted by
tests.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from virtmig.testing import free_port_range, wait_until_sync
from virtmig.testing.pki import session_pki

RESULTS = Path(__file__).resolve().parent / "results"
# The console script as installed beside this interpreter (what a user runs), else the module.
_SCRIPT = Path(sys.executable).with_name("virtmig")
VIRTMIG = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "virtmig.client.cli"]


@contextlib.contextmanager
def daemon(tmp: Path, name: str = "bench") -> Iterator[str]:
    """A ``virtmigd`` process on ``tls://127.0.0.1`` (a free port; incoming migrations on
    loopback too); yields its TLS URI."""
    pki = session_pki()
    ready, log = tmp / f"{name}.ready", tmp / f"{name}.log"
    config = pki.config(tmp / f"{name}.toml", name)
    cmd = [sys.executable, "-m", "virtmig.daemon.main", "--config", str(config),
           "--listen", "tls://127.0.0.1:0", "--state-dir", str(tmp / f"{name}-state"),
           "--hostname", f"{name}.test", "--migration-address", "127.0.0.1",
           "--migration-host", "127.0.0.1", "--migration-ports", free_port_range(),
           "--ready-file", str(ready)]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until_sync(lambda: ready.exists() or proc.poll() is not None, timeout=60,
                        interval=0.02, what="virtmigd to start")
        if not ready.exists():
            raise SystemExit(f"virtmigd did not start:\n{log.read_text()}")
        address = json.loads(ready.read_text())["addresses"][0]
        yield f"virtmig+tls://{address}?pkipath={pki.client()}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


GUEST = "vm1"
GUEST_XML = f"""<domain type='test'><name>{GUEST}</name><memory unit='MiB'>4</memory>
<vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os></domain>
"""

# The library's migration (regular, v3 with parameters, as the command's): both connections
# opened first, then only the call timed; prints its wall and CPU seconds.
LIBRARY_MIGRATE = """
import asyncio, sys, time
from virtmig.client import AsyncConnection
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
async def main(src, dst, guest):
    s, d = await AsyncConnection.open(src), await AsyncConnection.open(dst)
    dom = await s.lookup(guest)
    t0, c0 = time.perf_counter(), time.process_time()
    await s.migrate3(dom, d, TypedParams(), MigrateFlags.LIVE)
    print(time.perf_counter() - t0, time.process_time() - c0)
    await s.close(); await d.close()
asyncio.run(main(*sys.argv[1:]))
"""


class PingPong:
    """A migration between two daemons, each run the other way round."""

    def __init__(self, uris: tuple[str, str]) -> None:
        self.uris = uris
        self.at = 0  # where the guest is

    def step(self) -> tuple[str, str]:
        """This run's source and destination (the guest is at the destination afterwards)."""
        src, dst = self.uris[self.at], self.uris[1 - self.at]
        self.at = 1 - self.at
        return src, dst


Argv = list[str] | Callable[[], list[str]]


def define_guest(uri: str, tmp: Path) -> None:
    """The 4 MiB test guest, defined and started on the daemon at ``uri``."""
    xml = tmp / f"{GUEST}.xml"
    xml.write_text(GUEST_XML)
    for step in (["define", str(xml)], ["start", GUEST]):
        timed([*VIRTMIG, "-q", "-c", uri, *step], 0)


def commands(uri: str, pair: PingPong | None = None) -> dict[str, tuple[Argv, int]]:
    """Each case's argv (or what makes it, run by run) and the exit status it must end with."""
    cases: dict[str, tuple[Argv, int]] = {
        "import grpc": ([sys.executable, "-c", "import grpc"], 0),
        "argparse": ([sys.executable, "-c", "import argparse"], 0),
        "argparse --help": ([sys.executable, "-c",
                             "import argparse; argparse.ArgumentParser().parse_args()", "--help"],
                            0),
        "--help": ([*VIRTMIG, "--help"], 0),
        "parse error": ([*VIRTMIG, "list", "--no-such-option"], 1),
        "list over TLS": ([*VIRTMIG, "-q", "-c", uri, "list"], 0),
    }
    if pair is not None:
        def migrate() -> list[str]:
            src, dst = pair.step()
            return [*VIRTMIG, "-q", "-c", src, "migrate", "--live", GUEST, dst]

        def library() -> list[str]:
            return [sys.executable, "-c", LIBRARY_MIGRATE, *pair.step(), GUEST]

        cases["migrate"] = (migrate, 0)
        cases["library migrate"] = (library, 0)
    return cases


# As a user runs them: with the bytecode caches Python writes (a CI or sandbox may switch them off,
# which makes every run compile virtmig's modules from source), and buffered output.
ENV = {k: v for k, v in os.environ.items()
       if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED")}


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: Argv, status: int) -> tuple[float, float, str]:
    """The wall-clock and CPU seconds of one run of ``argv``, which must exit ``status``, and
    what it printed."""
    if callable(argv):
        argv = argv()
    cpu0, t0 = _cpu(), time.perf_counter()
    res = subprocess.run(argv, capture_output=True, timeout=120, env=ENV)
    elapsed, cpu = time.perf_counter() - t0, _cpu() - cpu0
    if res.returncode != status:
        raise SystemExit(f"{argv} exited {res.returncode}, not {status}:\n"
                         f"{res.stderr.decode(errors='replace')}")
    return elapsed, cpu, res.stdout.decode(errors="replace")


def measure(cases: dict[str, tuple[Argv, int]], runs: int
            ) -> tuple[dict[str, list[float]], dict[str, list[float]], dict[str, list[float]]]:
    """Wall and CPU times of ``runs`` interleaved rounds (plus one warm-up round, not counted),
    and the library's migration calls' own wall and CPU times (``call``, ``call CPU``)."""
    names = list(cases)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    calls: dict[str, list[float]] = {"call": [], "call CPU": []}
    for r in range(runs + 1):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            elapsed, used, out = timed(*cases[name])
            if r:
                wall[name].append(elapsed)
                cpu[name].append(used)
                if name == "library migrate":
                    call, call_cpu = out.split()
                    calls["call"].append(float(call))
                    calls["call CPU"].append(float(call_cpu))
    return wall, cpu, calls


def ratios(medians: dict[str, float], call: float | None = None) -> dict[str, float]:
    """The goal's ratios (and ``--help`` against argparse doing the same job); with the
    migration cases, ``migrate`` against ``import grpc``, and against ``import grpc`` plus the
    library's migration call (``call``)."""
    out = {
        "list/import grpc": medians["list over TLS"] / medians["import grpc"],
        "--help/argparse": medians["--help"] / medians["argparse"],
        "parse error/argparse": medians["parse error"] / medians["argparse"],
        "--help/argparse --help": medians["--help"] / medians["argparse --help"],
    }
    if "migrate" in medians:
        out["migrate/import grpc"] = medians["migrate"] / medians["import grpc"]
        if call is not None:
            out["migrate/(grpc+call)"] = medians["migrate"] / (medians["import grpc"] + call)
    return out


GOALS = {"list/import grpc": 1.3, "--help/argparse": 1.0, "parse error/argparse": 1.0,
         "--help/argparse --help": 1.0, "migrate/import grpc": 1.3, "migrate/(grpc+call)": 1.3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=30, help="rounds counted (default 30)")
    p.add_argument("--no-migrate", action="store_true",
                   help="leave out the migrate cases (and their second daemon)")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="virtmig-bench-")))
        uri = stack.enter_context(daemon(tmp))
        pair = None
        if not args.no_migrate:
            pair = PingPong((uri, stack.enter_context(daemon(tmp, "bench-dst"))))
            define_guest(uri, tmp)
        wall, cpu, calls = measure(commands(uri, pair), args.runs)
    medians = {name: statistics.median(t) for name, t in wall.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu.items()}
    call_medians = {name: statistics.median(t) for name, t in calls.items() if t}
    print(f"{'':<16} {'wall median':>12} {'(min - max)':>18} {'CPU median':>11}")
    for name, t in wall.items():
        print(f"{name:<16} {medians[name] * 1000:9.1f} ms {min(t) * 1000:7.1f} - "
              f"{max(t) * 1000:7.1f} ms {cpu_medians[name] * 1000:8.1f} ms")
    if call_medians:
        print(f"{'  (its call)':<16} {call_medians['call'] * 1000:9.1f} ms {'':>18} "
              f"{call_medians['call CPU'] * 1000:8.1f} ms")
    wall_ratios = ratios(medians, call_medians.get("call"))
    cpu_ratios = ratios(cpu_medians, call_medians.get("call CPU"))
    print(f"{'ratio':<23} {'wall':>5} {'CPU':>5}  goal")
    for name, goal in GOALS.items():
        if name in wall_ratios:
            print(f"{name:<23} {wall_ratios[name]:5.2f} {cpu_ratios[name]:5.2f}  ≤ {goal}")
    load_after = os.getloadavg()
    print(f"{args.runs} rounds, {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    result = {
        "name": "cli-startup",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "runs": args.runs,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "median_s": medians,
        "cpu_median_s": cpu_medians,
        "library_call_median_s": call_medians,
        "ratios": wall_ratios,
        "cpu_ratios": cpu_ratios,
        "goals": GOALS,
        "wall_s": wall,
        "cpu_s": cpu,
        "library_call_s": calls,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cli-startup.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
