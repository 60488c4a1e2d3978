"""``make bench``: every benchmark, one after another, then one table of their results.

Runs ``run.py`` (test backend, in process), ``data_plane.py`` (its throughput with the daemons
as processes, against a blocking socket pair), ``control_plane.py`` (the daemons as processes:
1,000 migrations one at a time, 200 at once), ``floor.py`` (what a migration's gRPC calls,
durable writes and 4 MiB cost with no virtmig code around them), ``cli_startup.py`` (the
client's start-up against bare interpreters), ``domains_scale.py`` (100,000 definitions on
one daemon), ``qemu_vs_qmp.py`` (needs QEMU and the test guest) and ``libvirt_vs_virtmig.py``
(needs root, libvirt 9.0 and QEMU), each as its own process with this interpreter; a
benchmark whose needs are missing says so and is skipped.  Each writes
``bench/results/*.json``; this script reads them back and prints one table (a result file left
by an earlier run is marked so), then draws the figures (``figures.py``) when matplotlib is
installed.  ``--only NAME`` (repeatable) runs some; ``--args NAME='--runs 3'`` passes options.
Exits 1 if a benchmark failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHMARKS = ("run", "data_plane", "control_plane", "floor", "cli_startup", "domains_scale",
              "qemu_vs_qmp", "libvirt_vs_virtmig")


def run(name: str, extra: list[str]) -> str:
    """Run ``bench/NAME.py``; ``ok``, ``skipped`` or ``failed (exit N)``."""
    print(f"== {name} {' '.join(extra)}", flush=True)
    seen = []
    with subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *extra],
                          stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # shown as it comes (the long ones print each round)
            print(line, end="", flush=True)
            seen.append(line)
    if proc.returncode:
        return f"failed (exit {proc.returncode})"
    return "skipped" if any(": skipped:" in line for line in seen) else "ok"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def rows(started: float) -> list[tuple[str, str, str, str]]:
    """(benchmark, case, figures, ratio) from every result file."""
    out: list[tuple[str, str, str, str]] = []

    def load(name: str) -> Any:
        path = RESULTS / name
        if not path.exists():
            return None
        stale = " (earlier run)" if path.stat().st_mtime < started else ""
        return json.loads(path.read_text()), stale

    for name in ("migrate-idle-256m", "migrate-dirty-256m", "control-plane"):
        got = load(f"{name}.json")
        if got:
            r, stale = got
            samples = sorted(r.get("samples_s", [r["median_s"]]))
            p99 = samples[min(len(samples) - 1, int(0.99 * len(samples)))]
            out.append(("run" + stale, name, f"median {_ms(r['median_s'])}, p99 {_ms(p99)} "
                        f"({r['runs']} runs)", ""))
    got = load("throughput.json")
    if got:
        sizes = ", ".join(f"{r['memory_mib']} MiB {r['throughput_mib_s']:.0f}" for r in got[0])
        out.append(("run" + got[1], "throughput (MiB/s)", sizes, ""))
        for r in got[0]:
            if "ratio" in r:  # the raw loopback socket measured beside it (run.py)
                out.append(("run" + got[1], f"throughput {r['memory_mib']} MiB / asyncio socket",
                            f"{r['throughput_mib_s']:.0f} / {r['raw_mib_s']:.0f} MiB/s",
                            f"{r['ratio']:.2f}"))
            if "ratio_blocking" in r:  # and a blocking socket pair (issue 17's raw socket)
                out.append(("run" + got[1], f"throughput {r['memory_mib']} MiB / blocking socket",
                            f"{r['throughput_mib_s']:.0f} / {r['blocking_mib_s']:.0f} MiB/s",
                            f"{r['ratio_blocking']:.2f}"))
    got = load("data-plane-procs.json")
    if got:
        for r in got[0]:
            out.append(("data_plane" + got[1],
                        f"throughput {r['memory_mib']} MiB / blocking socket, daemons as processes",
                        f"{r['throughput_mib_s']:.0f} / {r['blocking_mib_s']:.0f} MiB/s",
                        f"{r['ratio']:.2f}"))
    got = load("cli-startup.json")
    if got:
        for case, ratio in got[0]["ratios"].items():
            out.append(("cli_startup" + got[1], case, "wall-clock medians", f"{ratio:.2f}"))
    got = load("control-plane-procs.json")
    if got:
        r = got[0]
        out.append(("control_plane" + got[1], "one at a time, daemons as processes",
                    f"p50 {_ms(r['p50_s'])}, p99 {_ms(r['p99_s'])} ({r['runs']} runs)",
                    f"drift {r['drift']:.2f}"))
    got = load("control-plane-concurrent.json")
    if got:
        r = got[0]
        out.append(("control_plane" + got[1], f"{r['guests']} at once",
                    f"{r['together_per_s']:.1f}/s against {r['one_by_one_per_s']:.1f}/s, "
                    f"{len(r['failures'])} failures", f"{r['ratio']:.2f}"))
    got = load("floor.json")
    if got:
        r = got[0]
        g = r["grpc"]
        out.append(("floor" + got[1], "7 calls + 4 durable writes + 4 MiB, nothing else",
                    f"p50 {_ms(r['floor_s'])} (calls {_ms(g['p50_s'])}, "
                    f"{g['busy_cores_one_by_one']:.2f} cores busy)", ""))
        if "concurrency_ratio" in g:
            out.append(("floor" + got[1], f"{g['concurrent']} calls' sets at once",
                        f"{g['together_per_s']:.0f}/s against {g['one_by_one_per_s']:.0f}/s",
                        f"{g['concurrency_ratio']:.2f}"))
    got = load("domains-scale.json")
    if got:
        r = got[0]
        out.append(("domains_scale" + got[1], f"{r['domains']} definitions",
                    f"restart {r['start_s']:.1f} s, list --all {r['list_all_s']:.2f} s, "
                    f"RSS {r['rss_mib_after']:.0f} MiB", ""))
    got = load("qemu-vs-qmp.json")
    if got:
        for r in got[0]:
            rp = r.get("bare_rp_median_s")
            with_rp = "" if rp is None else f" (with a return path {_ms(rp)})"
            ratio_rp = "" if rp is None else f" ({r['ratio_rp']:.2f})"
            out.append(("qemu_vs_qmp" + got[1], r["case"], f"virtmig {_ms(r['virtmig_median_s'])}"
                        f", bare QMP {_ms(r['bare_median_s'])}{with_rp}",
                        f"{r['ratio']:.2f}{ratio_rp}"))
    got = load("libvirt-vs-virtmig.json")
    if got:
        out += _libvirt_rows(got[0], "libvirt_vs_virtmig" + got[1])
    return out


def _libvirt_rows(data: dict[str, Any], bench: str) -> list[tuple[str, str, str, str]]:
    out = []
    st = data.get("startup")
    if st:
        out.append((bench, "start-up (hostname)", f"virtmig {_ms(st['virtmig_median_s'])}, "
                    f"virsh {_ms(st['virsh_median_s'])}, import grpc "
                    f"{_ms(st['import_grpc_median_s'])}", f"{st['virtmig_vs_import_grpc']:.2f}"))
    for acc in data["accels"]:
        if "skipped" in acc:
            out.append((bench, acc["accel"], f"skipped: {acc['skipped'][:60]}", ""))
            continue
        for c in acc["cases"]:
            out.append((bench, f"{acc['accel']} {c['case']}",
                        f"virtmig {_ms(c['virtmig_median_s'])}, libvirt "
                        f"{_ms(c['libvirt_median_s'])}", f"{c['ratio']:.2f}"))
    return out


def table(lines: list[tuple[str, str, str, str]]) -> str:
    head = ("benchmark", "case", "figures", "ratio")
    widths = [max(len(r[i]) for r in [head, *lines]) for i in range(4)]
    fmt = "  ".join(f"{{:{w}}}" for w in widths)
    return "\n".join(fmt.format(*r).rstrip() for r in [head, tuple("-" * w for w in widths),
                                                         *lines])


def main() -> int:
    p = argparse.ArgumentParser(description="run every benchmark and print one table")
    p.add_argument("--only", action="append", choices=BENCHMARKS)
    p.add_argument("--args", action="append", default=[], metavar="NAME=OPTIONS")
    a = p.parse_args()
    extra = {name: shlex.split(opts) for name, _, opts in (x.partition("=") for x in a.args)}
    started = time.time()
    status = {name: run(name, extra.get(name, [])) for name in a.only or BENCHMARKS}
    print()
    print(table(rows(started)))
    print("\n" + ", ".join(f"{name}: {s}" for name, s in status.items()))
    if importlib.util.find_spec("matplotlib") is None:
        print("figures: skipped: matplotlib is not installed (pip install -e '.[bench]')")
    else:
        subprocess.run([sys.executable, str(HERE / "figures.py")], check=False)
    return 1 if any(s.startswith("failed") for s in status.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
