"""virtmig beside real libvirt 9.0 in one run: the whole client command, alternating, same guest.

``python bench/libvirt_vs_virtmig.py [--rounds N] [--accel tcg,kvm]`` (root; Debian's
``libvirt-daemon``, ``libvirt-daemon-driver-qemu``, ``libvirt-clients`` and QEMU): stands up two
libvirtd and two virtmigd in the same two network namespaces (:mod:`standup`), defines and starts
the same idle guest on host A with each (256 MiB, 1 vCPU, machine ``pc``, no disk, no devices:
it sits in SeaBIOS), then, round by round, times the client commands as a user types them:

* ``virsh -c qemu+tcp://A/system migrate --live tiny qemu+tcp://B/system`` against
  ``virtmig -c virtmig+tls://A migrate --live tiny virtmig+tls://B``, and
* the same with ``--p2p``,

each from the source's namespace, there and back (a round trip per tool and round: on this kind
of host one QEMU migration's cost depends on the one before it, see ``bench/README.md``); the
tool that goes first alternates from round to round; round 0 is a warm-up and not counted.  Both
migration streams are plain TCP (no ``--tls``; virtmigd has ``migrate_tls_force = false``); the
control planes differ: libvirt's is plain TCP without authentication (``auth_tcp = "none"``),
virtmig's mutual TLS 1.3, so virtmig pays for a TLS handshake per connection that libvirt does not.
A ``kvm`` case runs where ``/dev/kvm`` is usable (:func:`virtmig.testing.kvm_usable`); if either
side cannot run the guest under KVM the case records why and is skipped.  Afterwards
:mod:`phases` times the phases of virtmig's migrations through the library in the same
namespaces (the rest of a CLI migration is the ``virtmig`` process: start-up, imports,
connections).  Before the migrations, start-up: ``virsh hostname`` and ``virtmig hostname``
against host A, and a bare ``python -c "import grpc"``, alternating, as many rounds.  Prints the
medians and ratios; writes ``bench/results/libvirt-vs-virtmig.json``.
Without root or libvirt it says why and exits 0 (skipped).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

from standup import QEMU, Side, Stand, Unavailable, check_prerequisites

from virtmig.testing import kvm_usable

RESULTS = Path(__file__).resolve().parent / "results"
DOMAIN = "tiny"
COMMAND_TIMEOUT_S = 180.0
PAUSE_S = 0.5  # after each migration: the guest that just resumed, the QEMU that just ended
#: after the guests start: SeaBIOS's POST ends in "No bootable device" within a few seconds under
#: TCG, and after 8 to 20 s under this machine's nested KVM (seen on its debug port)
SETTLE_S = 25.0
CASES: tuple[tuple[str, list[str]], ...] = (("regular", []), ("p2p", ["--p2p"]))


def guest_xml(domain_type: str) -> str:
    """The guest both tools run (libvirt adds its USB controller, PS/2 and audio 'none')."""
    return (f"<domain type='{domain_type}'><name>{DOMAIN}</name>"
            "<memory unit='MiB'>256</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64' machine='pc'>hvm</type></os>"
            f"<devices><emulator>{QEMU}</emulator><video><model type='none'/></video>"
            "<memballoon model='none'/></devices></domain>\n")


class Tools:
    """The two clients' command lines, run inside a side's namespace."""

    def __init__(self, stand: Stand) -> None:
        self.stand = stand
        self.virtmig = str(Path(sys.executable).with_name("virtmig"))

    def argv(self, tool: str, side: Side, *args: str) -> list[str]:
        if tool == "libvirt":
            return side.inside(["virsh", "-q", "-c", side.libvirt_uri, *args])
        return side.inside([self.virtmig, "-q", "-c", side.virtmig_uri, *args])

    def run(self, tool: str, side: Side, *args: str) -> float:
        """Run one command; its wall time in seconds (raises with its output if it failed)."""
        argv = self.argv(tool, side, *args)
        t0 = time.perf_counter()
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S, env=self.stand.client_env())
        elapsed = time.perf_counter() - t0
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[4:])}: exit {done.returncode}: "
                               f"{done.stderr.strip() or done.stdout.strip()}")
        return elapsed

    def migrate(self, tool: str, src: Side, dst: Side, extra: list[str]) -> float:
        uri = dst.libvirt_uri if tool == "libvirt" else dst.virtmig_uri
        return self.run(tool, src, "migrate", "--live", *extra, DOMAIN, uri)


def start_guests(stand: Stand, tools: Tools, domain_type: str) -> None:
    a = stand.sides[0]
    xml = stand.work / f"{DOMAIN}-{domain_type}.xml"
    xml.write_text(guest_xml(domain_type))
    for tool in ("libvirt", "virtmig"):
        tools.run(tool, a, "define", str(xml))
        tools.run(tool, a, "start", DOMAIN)
    time.sleep(SETTLE_S)  # both idle before the first migration (the warm-up round follows)


def stop_guests(stand: Stand, tools: Tools) -> None:
    """Destroy and undefine the guest wherever it is (errors ignored: it may be elsewhere)."""
    for tool in ("libvirt", "virtmig"):
        for side in stand.sides:
            for args in (("destroy", DOMAIN), ("undefine", DOMAIN)):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    tools.run(tool, side, *args)


def round_trip(tools: Tools, stand: Stand, tool: str, extra: list[str]) -> list[float]:
    a, b = stand.sides
    times = []
    for src, dst in ((a, b), (b, a)):
        times.append(tools.migrate(tool, src, dst, extra))
        time.sleep(PAUSE_S)
    return times


def run_case(stand: Stand, tools: Tools, name: str, extra: list[str],
             rounds: int) -> dict[str, Any]:
    """``rounds`` counted rounds (after one warm-up) of a round trip per tool, alternating."""
    samples: dict[str, list[float]] = {"libvirt": [], "virtmig": []}
    for r in range(rounds + 1):
        order = ("libvirt", "virtmig") if r % 2 else ("virtmig", "libvirt")
        for tool in order:
            times = round_trip(tools, stand, tool, extra)
            if r:
                samples[tool] += times
        if r:
            lv, vm = (statistics.median(samples[t][-2:]) for t in ("libvirt", "virtmig"))
            print(f"  {name} round {r}: libvirt {lv * 1000:.0f} ms, virtmig {vm * 1000:.0f} ms",
                  flush=True)
    lv, vm = statistics.median(samples["libvirt"]), statistics.median(samples["virtmig"])
    return {"case": name, "rounds": rounds, "migrations_per_tool": len(samples["libvirt"]),
            "libvirt_s": samples["libvirt"], "virtmig_s": samples["virtmig"],
            "libvirt_median_s": lv, "virtmig_median_s": vm, "ratio": vm / lv}


def startup(stand: Stand, tools: Tools, rounds: int) -> dict[str, Any]:
    """A command that talks to a daemon (``hostname``) with each client, and a bare
    ``python -c "import grpc"`` with virtmig's interpreter, alternating, in A's namespace."""
    a = stand.sides[0]
    samples: dict[str, list[float]] = {"virsh": [], "virtmig": [], "import_grpc": []}

    def import_grpc() -> float:
        # Its output captured, as the clients' is (Tools.run): with a timeout and no pipe to
        # read, subprocess.run waits by polling (sleeps doubling up to 50 ms), so it would see
        # a ~67 ms process end at ~114 ms (session 18).
        t0 = time.perf_counter()
        subprocess.run(a.inside([sys.executable, "-c", "import grpc"]), check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=COMMAND_TIMEOUT_S)
        return time.perf_counter() - t0

    runs = {"virsh": lambda: tools.run("libvirt", a, "hostname"),
            "virtmig": lambda: tools.run("virtmig", a, "hostname"), "import_grpc": import_grpc}
    for r in range(rounds + 1):
        names = list(runs) if r % 2 else list(reversed(runs))
        for name in names:
            elapsed = runs[name]()
            if r:
                samples[name].append(elapsed)
    medians = {f"{k}_median_s": statistics.median(v) for k, v in samples.items()}
    return {**{f"{k}_s": v for k, v in samples.items()}, **medians,
            "virtmig_vs_import_grpc": medians["virtmig_median_s"] / medians["import_grpc_median_s"]}


def phase_breakdown(stand: Stand, runs: int) -> dict[str, list[float]]:
    """:mod:`phases` inside A's namespace: virtmig's regular migrations through the library."""
    a, b = stand.sides
    script = Path(__file__).resolve().parent / "phases.py"
    done = subprocess.run(
        a.inside([sys.executable, str(script), a.virtmig_uri, b.virtmig_uri, DOMAIN,
                  "--runs", str(runs)]),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600,
        env=stand.client_env(), check=True)
    result: dict[str, list[float]] = json.loads(done.stdout)
    return result


def accel_cases(stand: Stand, tools: Tools, accel: str, rounds: int) -> dict[str, Any]:
    """Both cases under one accelerator: ``{"accel", "cases": [...]}`` or a ``"skipped"``."""
    domain_type = "kvm" if accel == "kvm" else "qemu"
    out: dict[str, Any] = {"accel": accel, "domain_type": domain_type}
    if accel == "kvm" and not kvm_usable():
        out["skipped"] = "/dev/kvm is not usable here"
        return out
    try:
        start_guests(stand, tools, domain_type)
        out["cases"] = [run_case(stand, tools, name, extra, rounds) for name, extra in CASES]
        out["phases"] = phase_breakdown(stand, 3)
    except (RuntimeError, subprocess.TimeoutExpired, subprocess.CalledProcessError) as exc:
        if accel != "kvm":
            raise
        out["skipped"] = f"failed under KVM: {exc}"
    finally:
        stop_guests(stand, tools)
    return out


def machine() -> dict[str, Any]:
    return {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "libvirt": _version(["libvirtd", "--version"]),
            "qemu": _version([QEMU, "--version"])}


def _version(argv: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    return done.stdout.splitlines()[0] if done.stdout else ""


def report(result: dict[str, Any]) -> None:
    st = result["startup"]
    print(f"start-up  virsh hostname {st['virsh_median_s'] * 1000:.0f} ms   virtmig hostname "
          f"{st['virtmig_median_s'] * 1000:.0f} ms   python -c 'import grpc' "
          f"{st['import_grpc_median_s'] * 1000:.0f} ms   (virtmig/import grpc "
          f"{st['virtmig_vs_import_grpc']:.2f})")
    for acc in result["accels"]:
        if "skipped" in acc:
            print(f"{acc['accel']}: skipped: {acc['skipped']}")
            continue
        for c in acc["cases"]:
            print(f"{acc['accel']} {c['case']:8} libvirt {c['libvirt_median_s'] * 1000:6.0f} ms"
                  f"   virtmig {c['virtmig_median_s'] * 1000:6.0f} ms   ratio {c['ratio']:.2f}")


def _interrupted(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(rounds: int, accels: list[str]) -> int:
    try:
        check_prerequisites()
    except Unavailable as exc:
        print(f"libvirt_vs_virtmig: skipped: {exc}")
        return 0
    signal.signal(signal.SIGTERM, _interrupted)  # clean up as after Ctrl-C
    RESULTS.mkdir(exist_ok=True)
    result: dict[str, Any] = {"machine": machine(), "accels": []}
    with tempfile.TemporaryDirectory(prefix="vmbench-libvirt-") as tmp:
        stand = Stand(Path(tmp))
        try:
            stand.start()
            tools = Tools(stand)
            result["startup"] = startup(stand, tools, rounds)
            for accel in accels:
                result["accels"].append(accel_cases(stand, tools, accel, rounds))
        finally:
            stand.close()
    result["machine"]["loadavg_end"] = os.getloadavg()
    (RESULTS / "libvirt-vs-virtmig.json").write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="counted rounds (at least 1)")
    p.add_argument("--accel", default="tcg,kvm", help="tcg, kvm or both (comma-separated)")
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    sys.exit(main(args.rounds, [a for a in args.accel.split(",") if a]))
