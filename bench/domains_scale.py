"""How one daemon copes with many domains (issue 17): start with N definitions in its state dir,
``virtmig list --all``, define and undefine rates, resident memory.

``python bench/domains_scale.py --domains 100000`` writes the definitions straight into a fresh
state dir (as the daemon writes them), then, with ``virtmigd`` as its own process on a unix
socket:

* ``first_start_s``: from spawning ``virtmigd`` until it is ready (its ``--ready-file``) on the
  fresh state dir (no definition index yet: every definition is parsed, and the index
  written); ``start_s``: the same, median of ``--starts`` restarts after it (the index read);
  ``*_cpu_s``: the CPU time the daemon used for it (user + system, from ``/proc``: less
  dependent on the machine's load than the wall time; profile the load with ``--profile
  FILE``: the indexed load under cProfile, in-process);
* ``rss_mib``: the daemon's resident memory once started, and after the list runs;
* ``list_all_s``: the whole ``virtmig list --all`` command (a new process each time: start-up,
  the ListStream call, the table), median of ``--lists``, with the CPU time of the command
  (``list_all_client_cpu_s``) and of the daemon for it (``list_all_daemon_cpu_s``);
  ``list_lib_s``: the same list through the library, in this process;
* ``define_per_s`` / ``undefine_per_s``: ``--defines`` more domains defined and then undefined
  through the library one at a time, with the N already there (each definition is fsynced;
  ``max_domains`` is set to make room).

``--bin DIR`` runs the ``virtmigd`` and ``virtmig`` of another build (an A/B against a worktree
of ``main``: run both in turn on the same load).  Results go to
``bench/results/domains-scale.json`` (``--out`` names another file); nothing here is asserted
by tests.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from virtmig.client.connection import AsyncConnection
from virtmig.testing import domain_xml

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def write_definitions(state: Path, count: int) -> None:
    folder = state / "domains"
    folder.mkdir(parents=True)
    for i in range(count):
        uuid = str(uuidlib.UUID(int=i + 1, version=4))
        (folder / f"{uuid}.xml").write_text(domain_xml(f"vm{i:06d}", uuid=uuid))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Daemon:
    """``virtmigd`` as its own process, on a unix socket in ``root``."""

    def __init__(self, root: Path, max_domains: int, bin_dir: Path = BIN) -> None:
        self.bin = bin_dir
        self.root = root
        self.config = root / "virtmigd.toml"
        self.config.write_text(f"max_domains = {max_domains}\n")
        self.socket = root / "virtmigd.sock"
        self.uri = f"virtmig+unix://{self.socket}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> tuple[float, float]:
        """Wall and CPU seconds from spawn to ready."""
        ready = self.root / "ready.json"
        ready.unlink(missing_ok=True)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [str(self.bin / "virtmigd"), "--config", str(self.config), "--state-dir",
             str(self.root / "state"), "--listen", f"unix://{self.socket}", "--ready-file",
             str(ready), "--log-level", "warning"],
            env=dict(os.environ, VIRTMIG_RUN_DIR=str(self.root)))
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"virtmigd exited with {self.proc.returncode}")
            time.sleep(0.005)
        return time.perf_counter() - t0, cpu_s(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None


def list_all(daemon: Daemon) -> tuple[float, float, float]:
    """Wall seconds of a whole ``virtmig list --all``, its CPU seconds and the daemon's."""
    assert daemon.proc is not None
    t0, client0, daemon0 = time.perf_counter(), children_cpu_s(), cpu_s(daemon.proc.pid)
    subprocess.run([str(daemon.bin / "virtmig"), "-c", daemon.uri, "list", "--all"],
                   check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - t0, children_cpu_s() - client0,
            cpu_s(daemon.proc.pid) - daemon0)


async def library(uri: str, defines: int, lists: int) -> dict[str, float]:
    conn = await AsyncConnection.open(uri)
    try:
        times, count = [], 0
        for _ in range(lists):
            t0 = time.perf_counter()
            count = len(await conn.list_domains(inactive=True))
            times.append(time.perf_counter() - t0)
        names = [f"extra{i}" for i in range(defines)]
        t0 = time.perf_counter()
        for name in names:
            await conn.define(domain_xml(name))
        define_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for name in names:
            await conn.undefine(name)
        undefine_s = time.perf_counter() - t0
    finally:
        await conn.close()
    return {"listed": count, "list_lib_s": statistics.median(times),
            "define_per_s": defines / define_s, "undefine_per_s": defines / undefine_s}


def profile_load(state: Path, out: str) -> None:
    """cProfile of a load with the definition index in place (the daemon's first start has
    written it)."""
    from virtmig.daemon.registry import Registry
    from virtmig.daemon.state import StateDir

    registry = Registry(StateDir(state))
    cProfile.runctx("registry.load()", globals(), {"registry": registry}, out)


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="virtmig-scale-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        write_definitions(root / "state", args.domains)
        written_s = time.perf_counter() - t0
        daemon = Daemon(root, args.domains + args.defines, Path(args.bin))
        starts, lists = [], []
        try:
            first = daemon.start()
            print(f"first start (no index) in {first[0]:.2f} s, CPU {first[1]:.2f} s", flush=True)
            for _ in range(args.starts):
                daemon.stop()
                starts.append(daemon.start())
                print(f"restarted in {starts[-1][0]:.2f} s, CPU {starts[-1][1]:.2f} s",
                      flush=True)
            assert daemon.proc is not None
            rss_started = rss_mib(daemon.proc.pid)
            for _ in range(args.lists):
                lists.append(list_all(daemon))
                print("virtmig list --all: {:.2f} s, CPU {:.2f} s, daemon CPU {:.2f} s".format(
                    *lists[-1]), flush=True)
            lib = asyncio.run(library(daemon.uri, args.defines, args.lists))
            print(lib, flush=True)
            rss_after = rss_mib(daemon.proc.pid)
        finally:
            daemon.stop()
        if args.profile:
            profile_load(root / "state", args.profile)
    return {
        "name": "domains-scale", "domains": args.domains, "written_s": written_s,
        "bin": args.bin, "first_start_s": first[0], "first_start_cpu_s": first[1],
        "start_s": statistics.median(s[0] for s in starts), "starts": starts,
        "start_cpu_s": statistics.median(s[1] for s in starts),
        "list_all_s": statistics.median(x[0] for x in lists),
        "list_all_client_cpu_s": statistics.median(x[1] for x in lists),
        "list_all_daemon_cpu_s": statistics.median(x[2] for x in lists), "lists": lists, **lib,
        "rss_mib_started": rss_started, "rss_mib_after": rss_after,
        "load_average": os.getloadavg(), "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--domains", type=int, default=100_000)
    p.add_argument("--starts", type=int, default=2)
    p.add_argument("--lists", type=int, default=5)
    p.add_argument("--defines", type=int, default=1000)
    p.add_argument("--profile", metavar="FILE", help="cProfile the state-dir load into FILE")
    p.add_argument("--bin", default=str(BIN), help="where virtmigd and virtmig are")
    p.add_argument("--out", default="domains-scale.json", help="results file in bench/results")
    args = p.parse_args()
    result = run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['domains']} domains: first start {result['first_start_s']:.2f} s, "
          f"restart {result['start_s']:.2f} s (CPU {result['start_cpu_s']:.2f} s), "
          f"list --all {result['list_all_s']:.2f} s (library {result['list_lib_s']:.2f} s), "
          f"define {result['define_per_s']:.0f}/s, undefine {result['undefine_per_s']:.0f}/s, "
          f"RSS {result['rss_mib_started']:.0f} MiB started, {result['rss_mib_after']:.0f} "
          f"MiB after; load average {result['load_average'][0]:.1f}")


if __name__ == "__main__":
    main()
