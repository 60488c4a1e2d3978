"""virtmig against a bare QMP script: the same 1 GiB QEMU guest, migrated both ways, alternating.

``python bench/qemu_vs_qmp.py [--runs N]`` (needs qemu-system-x86_64 and the test guest, which
:mod:`virtmig.testing.guest` builds and caches).  Two cases: the guest idle, and the guest dirtying
256 MiB.  Each migration is timed from the moment it is asked for until the guest runs on the
destination and the source QEMU has quit: answered ``quit`` and closed its monitor, which QEMU
does once it closed the guest's images and network backends (what virtmig's Confirm waits for;
the kernel's freeing of the process and its reaping follow, for both, untimed):

* virtmig: ``migrate3`` between two daemons (in this process, backend ``qemu``): Begin, Prepare
  (starts the destination QEMU), Perform, Finish, Confirm, with cookies, jobs and state files;
* bare: only what QEMU needs, on the same command line: start the destination with
  ``-incoming defer``, ``migrate-incoming``, ``migrate``, wait for ``completed`` on both sides,
  ``cont``, ``quit``;
* bare with a return path (``bare_rp``): the same script with QEMU's ``return-path`` capability
  on both sides, as libvirt 9.0 sets it for every migration that is not tunnelled (and virtmig
  for every one): the source completes only once the destination has loaded the whole stream.
  On Linux 6.x that capability costs QEMU itself time: the destination's first reply on the
  return path puts its end of the connection in delayed-ACK ("pingpong") mode, and a destination
  that reads slower than the source writes then holds the sender back by up to the 40 ms
  delayed-ACK timer (bench/README.md: gone with ``net.ipv4.tcp_pingpong_thresh=3`` or a
  ``quickack`` route).  ``ratio`` compares virtmig with the bare script, ``ratio_rp`` with this
  one: what the control plane adds to QEMU doing the same migration.

One run is a round trip of each (two migrations; the figure is their mean), and which of the three
goes first rotates from run to run.  Round trips, because on this kind of host one migration's
time depends on the one before: the destination QEMU's page faults alternate between cheap and
expensive (transparent huge pages available or not; 50 vs 350 ms of system time for the same
1 GiB), for the bare script alone as much as for virtmig, so single migrations compared one by one
measure that alternation's phase more than the control plane.

Cases: the test guest idle and dirtying 256 MiB under TCG, and, where ``/dev/kvm`` is usable
(checked at run time), ``kvm-idle``: a 1 GiB guest without disk or kernel that sits in SeaBIOS
under KVM (the test guest's Debian kernel hangs on this machine's nested KVM; SeaBIOS runs), given
25 s to finish its POST before the first migration.  After each case every task still pending
(a stopped daemon's, a closed connection's, qemu.qmp's) is cancelled and awaited, and named in
the output and the JSON (``leftover_tasks``): none is left to be garbage-collected pending ("Task
was destroyed but it is pending") at exit.

Results go to ``bench/results/qemu-vs-qmp.json``; the goal is virtmig within 15 % of bare.  Without
QEMU or the test guest it says so and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import shutil
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from virtmig.daemon.backend.base import GuestSpec
from virtmig.daemon.backend.qemu import SOCKET_NAME, QemuConfig, parse_config
from virtmig.daemon.backend.qemu.confine import kvm_refusal, run_as
from virtmig.daemon.backend.qemu.process import monitor_closed, open_guest_files
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import (
    GuestImage,
    GuestUnavailable,
    Host,
    ensure_guest,
    free_port,
    kvm_usable,
    qemu_domain_xml,
    qemu_settings,
    release_qemu_user,
    start_host,
    stop_host,
)

RESULTS = Path(__file__).resolve().parent / "results"
SETTLE_S = 5.0
#: SeaBIOS's POST ends in "No bootable device" after 8 to 20 s on this machine's nested KVM
KVM_SETTLE_S = 25.0
PAUSE_S = 1.0  # between migrations: let the guest that just resumed settle
STEP_TIMEOUT_S = 120.0
UNCAPPED = 100 * 1024**3  # QEMU 7.2's default max-bandwidth is 128 MiB/s: raise it for both


def domain_xml(image: GuestImage, name: str, dirty_mb: int, dirty_rate: int) -> str:
    # TCG even where KVM is usable: the test guest's kernel hangs on this machine's nested KVM
    # (bench/README.md); the KVM case runs a guest without one (kvm_domain_xml).
    return qemu_domain_xml(image, name, 1024, dirty_mb=dirty_mb, dirty_rate=dirty_rate,
                           domain_type="qemu")


def kvm_domain_xml(name: str) -> str:
    """The KVM case's guest: 1 GiB, 1 vCPU, machine ``pc``, no disk, no kernel, no devices: it
    sits in SeaBIOS (which runs on this machine's nested KVM, where the test guest's Debian
    kernel hangs), its memory nearly all zero pages; as ``libvirt_vs_virtmig.py``'s."""
    return (f"<domain type='kvm'><name>{name}</name><memory unit='MiB'>1024</memory>"
            "<vcpu>1</vcpu><os><type arch='x86_64' machine='pc'>hvm</type></os>"
            "<devices><video><model type='none'/></video><memballoon model='none'/></devices>"
            "</domain>\n")


async def wait_ready(log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and b"HEARTBEAT" in log.read_bytes():
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"the guest did not boot: {log}")


class BareGuest:
    """One QEMU driven by nothing but QMP (on virtmig's command line, files opened alike)."""

    def __init__(self, config: QemuConfig, folder: Path, *, incoming: bool) -> None:
        self.config, self.folder, self.incoming = config, folder, incoming
        self.proc: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient("bench")
        self.completed = asyncio.Event()
        self.events: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """QEMU with its monitor on a socket bound here and inherited (as virtmig's), so that
        the connection is made at once, with no polling for the socket."""
        self.folder.mkdir(parents=True, exist_ok=True)
        sock = self.folder / SOCKET_NAME
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(sock))
            listener.listen(1)
            with open_guest_files(self.config, qemu_settings().resolved(), self.folder,
                                  None) as files:
                argv = self.config.argv(files, incoming=self.incoming,
                                        monitor_fd=listener.fileno())
                self.proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=self.folder, pass_fds=(*files.fds, listener.fileno()))
        await self.qmp.connect(str(sock))
        self.events = asyncio.get_running_loop().create_task(self._events())

    async def _events(self) -> None:
        async for event in self.qmp.events:
            if event["event"] != "MIGRATION":
                continue
            data: Any = event["data"]
            if data["status"] == "completed":
                self.completed.set()

    async def run(self, cmd: str, args: dict[str, Any] | None = None) -> Any:
        return await self.qmp.execute(cmd, args)

    async def quit_monitor(self) -> None:
        """``quit``, then wait until QEMU closed its monitor (the end of its own clean-up)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.execute("quit"), 5)
        assert self.proc is not None
        await monitor_closed(self.qmp, self.proc.wait(), 5)

    async def quit(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.qmp.execute("quit"), 5)
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.events is not None:  # else "Task was destroyed but it is pending" at exit
            self.events.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.events
        if self.proc is not None:
            # Killed only if it did not end after its "quit": asyncio's Process.kill() polls
            # first (subprocess.Popen.send_signal), which reaps a QEMU that has exited before
            # asyncio's child watcher does; the watcher then logs "Unknown child process pid
            # N, will report returncode 255" (what every run of this bench printed).
            try:
                await asyncio.wait_for(asyncio.shield(self.proc.wait()), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                await self.proc.wait()


async def bare_migrate(src: BareGuest, config: QemuConfig, folder: Path, *,
                       return_path: bool = False) -> tuple[float, BareGuest]:
    """One migration of ``src`` to a new QEMU in ``folder``; ``return_path``: with QEMU's
    return path on both sides (set explicitly on the source either way: it may have been a
    destination that had it)."""
    t0 = time.perf_counter()
    dst = BareGuest(config, folder, incoming=True)
    await dst.start()
    caps = {"capabilities": [{"capability": "events", "state": True},
                             {"capability": "return-path", "state": return_path}]}
    await dst.run("migrate-set-capabilities", caps)
    await src.run("migrate-set-capabilities", caps)
    await src.run("migrate-set-parameters", {"max-bandwidth": UNCAPPED})
    uri = f"tcp:127.0.0.1:{free_port()}"
    await dst.run("migrate-incoming", {"uri": uri})
    src.completed.clear()
    await src.run("migrate", {"uri": uri})
    await asyncio.wait_for(src.completed.wait(), STEP_TIMEOUT_S)
    await asyncio.wait_for(dst.completed.wait(), STEP_TIMEOUT_S)
    await dst.run("cont")
    await src.quit_monitor()
    elapsed = time.perf_counter() - t0
    await src.quit()  # (its reaping: untimed, as virtmig's)
    return elapsed, dst


async def case(work: Path, name: str, xml: str, runs: int, *, booted_by_log: bool,
               daemon: dict[str, Any] | None = None) -> dict[str, object]:
    """``runs`` round trips of each; ``booted_by_log``: the guest says it booted on its serial
    port (the test guest), else it is given ``KVM_SETTLE_S`` (SeaBIOS on nested KVM);
    ``daemon``: settings of both daemons."""
    daemon = daemon or {}
    d = parse_domain_xml(xml)
    spec = GuestSpec(uuid=d.uuid, name=d.name, memory_bytes=d.memory_kib * 1024,
                     vcpus=d.vcpus, options={}, xml=d.xml)
    config = parse_config(spec, None, qemu_settings().resolved())  # the emulator on PATH

    # bare: a guest of its own, booted once
    bare = BareGuest(config, work / f"{name}-bare0", incoming=False)
    await bare.start()
    await bare.run("cont")
    if booted_by_log:
        await wait_ready(work / f"{name}-bare0" / "serial0.log")

    # virtmig: two daemons, the guest booted on the first
    hosts: list[Host] = []
    virtmig_s: list[float] = []
    bare_s: list[float] = []
    bare_rp_s: list[float] = []
    folders = iter(range(1, 10**6))

    async def virtmig_round_trip() -> float:
        elapsed = 0.0
        for src, dst in ((hosts[0], hosts[1]), (hosts[1], hosts[0])):
            t0 = time.perf_counter()
            await asyncio.wait_for(
                src.conn.migrate3(name, dst.conn, TypedParams(), MigrateFlags.LIVE),
                STEP_TIMEOUT_S)
            elapsed += time.perf_counter() - t0
            await asyncio.sleep(PAUSE_S)
        return elapsed

    async def bare_round_trip(return_path: bool) -> float:
        nonlocal bare
        elapsed = 0.0
        for _ in range(2):
            folder = work / f"{name}-bare{next(folders)}"
            t, bare = await bare_migrate(bare, config, folder, return_path=return_path)
            elapsed += t
            await asyncio.sleep(PAUSE_S)
        return elapsed

    sides: dict[str, Callable[[], Awaitable[float]]] = {
        "virtmig": virtmig_round_trip, "bare": lambda: bare_round_trip(False),
        "bare_rp": lambda: bare_round_trip(True)}
    samples: dict[str, list[float]] = {"virtmig": virtmig_s, "bare": bare_s, "bare_rp": bare_rp_s}

    try:
        for side in ("a", "b"):
            hosts.append(await start_host(work, f"{name}-{side}", backend="qemu", **daemon))
        await hosts[0].conn.define(xml)
        await hosts[0].conn.start(name)
        if booted_by_log:
            guest_dir = hosts[0].state_dir / "backend" / "qemu"
            await wait_ready(sorted(guest_dir.rglob("serial0.log"))[0])
        else:
            await asyncio.sleep(KVM_SETTLE_S)
        await asyncio.sleep(SETTLE_S)  # boot-time page activity would favour whoever booted first
        order = list(sides)
        for i in range(-1, runs):  # run -1 warms all up and is not counted
            # Who goes first rotates too, so none always follows the same one's teardown.
            for side in order[i % 3:] + order[:i % 3]:
                t = await sides[side]()
                if i >= 0:
                    samples[side].append(t / 2)
    finally:
        await bare.quit()
        for host in hosts:
            for dom in list(host.daemon.registry):
                if dom.active:
                    await host.daemon.backend.destroy(dom.uuid)
            await stop_host(host)
    v, b, brp = (statistics.median(x) for x in (virtmig_s, bare_s, bare_rp_s))
    return {"case": name, "memory_mib": 1024, "accel": config.accel, "runs": runs,
            "virtmig_s": virtmig_s, "bare_s": bare_s, "bare_rp_s": bare_rp_s,
            "virtmig_median_s": v, "bare_median_s": b, "bare_rp_median_s": brp,
            "ratio": v / b, "ratio_rp": v / brp}


async def settle_leftovers() -> list[str]:
    """Cancel and await every task still pending besides this one: what a stopped daemon, a
    closed client connection or a disconnected QMP client left behind.  Their names are
    returned (and printed): a task dropped while pending would otherwise be garbage-collected
    later with asyncio's "Task was destroyed but it is pending", far from its cause."""
    current = asyncio.current_task()
    left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
    for task in left:
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    gc.collect()  # a task that is still unreachable and pending says so now, here
    return sorted(_task_name(t) for t in left)


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    return getattr(coro, "__qualname__", None) or repr(coro)


async def main(runs: int) -> int:
    binary = shutil.which("qemu-system-x86_64")
    if binary is None:
        print("qemu_vs_qmp: skipped: qemu-system-x86_64 is not installed")
        return 0
    try:
        image = ensure_guest()
    except GuestUnavailable as exc:
        print(f"qemu_vs_qmp: skipped: cannot build the test guest: {exc}")
        return 0
    RESULTS.mkdir(exist_ok=True)
    results = []
    cases: list[tuple[str, str, bool, dict[str, Any]]] = [
        (name, domain_xml(image, name, mb, rate), True, {})
        for name, mb, rate in (("idle", 16, 1), ("dirty-256m", 256, 64))]
    with tempfile.TemporaryDirectory(prefix="vmbench-") as tmp, _test_user():
        if kvm_usable():
            cases.append(("kvm-idle", kvm_domain_xml("kvm-idle"), False, _kvm_daemon()))
        else:
            print("qemu_vs_qmp: kvm-idle: skipped: /dev/kvm is not usable here")
        for name, xml, booted_by_log, daemon in cases:
            r = await case(Path(tmp), name, xml, runs, booted_by_log=booted_by_log,
                           daemon=daemon)
            if daemon:
                r["daemon_settings"] = daemon
            r["leftover_tasks"] = await settle_leftovers()
            if r["leftover_tasks"]:
                print(f"qemu_vs_qmp: {name}: tasks left pending, cancelled: "
                      f"{', '.join(r['leftover_tasks'])}")  # type: ignore[arg-type]
            results.append(r)
            print(f"{name:12} virtmig {float(r['virtmig_median_s']) * 1000:7.0f} ms   "  # type: ignore[arg-type]
                  f"bare QMP {float(r['bare_median_s']) * 1000:7.0f} ms   "  # type: ignore[arg-type]
                  f"with a return path {float(r['bare_rp_median_s']) * 1000:7.0f} ms   "  # type: ignore[arg-type]
                  f"ratio {float(r['ratio']):.2f} / {float(r['ratio_rp']):.2f}",  # type: ignore[arg-type]
                  flush=True)
    (RESULTS / "qemu-vs-qmp.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _kvm_daemon() -> dict[str, Any]:
    """The KVM case's daemon settings: QEMU as the tests' user where that user may open
    ``/dev/kvm``, else as root (as the bare QMP script's QEMU runs; said so)."""
    refusal = kvm_refusal(run_as(qemu_settings()))
    if not refusal:
        return {}
    print(f"qemu_vs_qmp: kvm-idle: QEMU runs as root in both daemons ({refusal})", flush=True)
    return {"qemu_user": "root"}


@contextlib.contextmanager
def _test_user() -> Iterator[None]:
    """The daemons' QEMU runs as the tests' unprivileged user (when root): removed afterwards."""
    try:
        yield
    finally:
        release_qemu_user()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=5)
    sys.exit(asyncio.run(main(p.parse_args().runs)))
