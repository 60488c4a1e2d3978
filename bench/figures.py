"""``make bench-figures``: the PNGs beside ``bench/README.md``, drawn from ``bench/results/*.json``.

* ``libvirt-vs-virtmig.png``: the whole-command migration times of virsh and virtmig per case and
  accelerator (medians as bars, every migration as a dot), and the start-up of a command that
  talks to a daemon (``libvirt_vs_virtmig.py``);
* ``migration-phases.png``: where one virtmig CLI migration's time goes: the ``virtmig`` process
  (start-up, imports, TLS connections: the CLI median less the library's), then Begin, Prepare,
  Perform, Finish, Confirm and the rest of the driver (medians, ``phases.py``), beside virsh's
  whole command;
* ``control-plane.png``: the control-plane latency (4 MiB test-backend guest) as a distribution
  (histogram with p50 and p99) and in the order the migrations ran (drift): ``control_plane.py``'s
  daemons as processes, else ``run.py``'s in-process case;
* ``throughput.png``: test-backend migration throughput against guest size, beside a plain
  asyncio loopback socket moving the same bytes in the same run, with their ratio (``run.py``).

A figure whose results are missing is left out (and said so).  Needs matplotlib (the ``bench``
extra: ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLOURS = {"libvirt": "#7f7f7f", "virtmig": "#1f77b4"}
PHASE_COLOURS = ("#c7c7c7", "#aec7e8", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")


def _load(name: str) -> Any:
    path = RESULTS / name
    if not path.exists():
        print(f"figures: {name} missing: its figure is left out")
        return None
    return json.loads(path.read_text())


def _stamp(fig: Any, machine: dict[str, Any] | None) -> None:
    if machine:
        load = machine.get("loadavg_start", [0.0])[0]
        fig.text(0.01, 0.005, f"{machine.get('date', '')}, {machine.get('cpus')} cores, "
                 f"load average {load:.1f} at start (machine shared with other work)",
                 fontsize=7, color="#555555")


def libvirt_vs_virtmig(data: dict[str, Any]) -> Path:
    groups = [(f"{acc['accel']} {c['case']}", c)
              for acc in data["accels"] if "cases" in acc for c in acc["cases"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4.2),
                                  gridspec_kw={"width_ratios": [max(len(groups), 1), 1.5]})
    for i, (_label, c) in enumerate(groups):
        for j, tool in enumerate(("libvirt", "virtmig")):
            x = i + (j - 0.5) * 0.38
            ax.bar(x, c[f"{tool}_median_s"] * 1000, 0.36, color=COLOURS[tool],
                   label=tool if i == 0 else None)
            ax.scatter([x] * len(c[f"{tool}_s"]), [t * 1000 for t in c[f"{tool}_s"]], s=8,
                       color="black", zorder=3)
        top = max(*c["libvirt_s"], *c["virtmig_s"])
        ax.text(i, top * 1000 * 1.03, f"ratio {c['ratio']:.2f}", ha="center", va="bottom",
                fontsize=9)
    ax.set_xticks(range(len(groups)), [g for g, _ in groups])
    ax.set_ylabel("whole client command, ms")
    ax.set_title("virsh migrate --live vs virtmig migrate --live\n"
                 "(256 MiB idle guest, bars: median, dots: each migration)", fontsize=10)
    ax.set_ylim(top=ax.get_ylim()[1] * 1.12)
    ax.legend(loc="lower right")
    st = data.get("startup")
    if st:
        names = ("virsh", "virtmig", "import_grpc")
        ax2.bar(range(3), [st[f"{n}_median_s"] * 1000 for n in names],
                color=[COLOURS["libvirt"], COLOURS["virtmig"], "#bcbd22"])
        ax2.set_xticks(range(3), ["virsh\nhostname", "virtmig\nhostname", "python -c\n"
                                  "'import grpc'"], fontsize=8)
        ax2.set_title("start-up (median)", fontsize=10)
        ax2.set_ylabel("ms")
    else:
        ax2.axis("off")
    _stamp(fig, data.get("machine"))
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, "libvirt-vs-virtmig.png")


def phases(data: dict[str, Any]) -> Path | None:
    acc = next((a for a in data["accels"] if "phases" in a), None)
    if acc is None:
        return None
    regular = next(c for c in acc["cases"] if c["case"] == "regular")
    ph = {k: statistics.median(v) * 1000 for k, v in acc["phases"].items()}
    cli = regular["virtmig_median_s"] * 1000
    parts = [("virtmig process: start-up, imports, connections", max(cli - ph["total"], 0.0)),
             ("other driver calls", ph["other"]), ("Begin", ph["begin"]),
             ("Prepare (destination QEMU starts)", ph["prepare"]),
             ("Perform (memory)", ph["perform"]), ("Finish (guest resumes)", ph["finish"]),
             ("Confirm (source QEMU ends)", ph["confirm"])]
    fig, ax = plt.subplots(figsize=(10, 3.2))
    left = 0.0
    for (label, ms), colour in zip(parts, PHASE_COLOURS, strict=True):
        ax.barh(1, ms, left=left, color=colour, label=f"{label}: {ms:.0f} ms")
        left += ms
    ax.barh(0, regular["libvirt_median_s"] * 1000, color=COLOURS["libvirt"])
    ax.set_yticks([0, 1], ["virsh migrate\n(whole)", "virtmig migrate"])
    ax.set_xlabel("ms (medians)")
    ax.set_title(f"One regular live migration, {acc['accel'].upper()}, 256 MiB idle guest: "
                 "where virtmig's time goes", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _stamp(fig, data.get("machine"))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, "migration-phases.png")


def control_plane(data: dict[str, Any], where: str) -> Path:
    ms = [t * 1000 for t in data["samples_s"]]
    cut = sorted(ms)
    p50, p99 = statistics.median(ms), cut[min(len(cut) - 1, int(0.99 * len(cut)))]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.hist(ms, bins=40, color=COLOURS["virtmig"])
    for value, name in ((p50, "p50"), (p99, "p99")):
        ax.axvline(value, color="black", linestyle="--", linewidth=1)
        ax.text(value, ax.get_ylim()[1] * 0.95, f" {name} {value:.1f} ms", fontsize=8)
    ax.set_xlabel("ms per migration")
    ax.set_ylabel("migrations")
    ax.set_title(f"Control plane ({where}): {len(ms)} migrations of a 4 MiB test guest",
                 fontsize=9)
    ax2.plot(range(1, len(ms) + 1), ms, ".", markersize=3, color=COLOURS["virtmig"])
    ax2.set_xlabel("migration #")
    ax2.set_ylabel("ms")
    ax2.set_title("in the order they ran (drift)", fontsize=10)
    _stamp(fig, data.get("machine"))
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return _save(fig, "control-plane.png")


def throughput(data: list[dict[str, Any]], procs: list[dict[str, Any]] | None = None) -> Path:
    """``data``: run.py's (both daemons in one process); ``procs``: data_plane.py's (the
    daemons as processes, against a blocking socket pair), when there is one."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    sizes = [d["memory_mib"] for d in data]
    ax.plot(sizes, [d["throughput_mib_s"] for d in data], "o-", color=COLOURS["virtmig"],
            label="test-backend migration, daemons in one process")
    if procs:
        ax.plot([d["memory_mib"] for d in procs], [d["throughput_mib_s"] for d in procs], "D-",
                color=COLOURS["virtmig"], alpha=0.6, label="the same, daemons as processes")
        ax.plot([d["memory_mib"] for d in procs], [d["blocking_mib_s"] for d in procs], "v:",
                color=COLOURS["libvirt"], label="blocking loopback socket pair, same bytes")
        for d in procs:
            ax.annotate(f"{d['ratio']:.2f} of the socket pair", (d["memory_mib"],
                        d["throughput_mib_s"]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
        sizes = sorted(set(sizes) | {d["memory_mib"] for d in procs})
    raw = [d for d in data if "raw_mib_s" in d]
    if raw:  # the plain asyncio loopback socket measured beside each size (run.py)
        ax.plot([d["memory_mib"] for d in raw], [d["raw_mib_s"] for d in raw], "s--",
                color=COLOURS["libvirt"], label="raw asyncio loopback socket, same bytes")
        for d in raw:
            ax.annotate(f"{d['ratio']:.2f} of asyncio's", (d["memory_mib"], d["throughput_mib_s"]),
                        textcoords="offset points", xytext=(0, -12), ha="center", fontsize=7)
    if raw or procs:
        ax.legend(fontsize=7, loc="upper left")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("guest memory, MiB (idle)")
    ax.set_ylabel("MiB/s (median)")
    ax.set_ylim(bottom=0)
    ax.set_title("test backend: migration throughput by guest size", fontsize=10)
    _stamp(fig, data[0].get("machine"))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, "throughput.png")


def _save(fig: Any, name: str) -> Path:
    path = HERE / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"figures: wrote {path.relative_to(HERE.parent)}")
    return path


def main() -> int:
    lv = _load("libvirt-vs-virtmig.json")
    if lv is not None and any("cases" in a for a in lv["accels"]):
        libvirt_vs_virtmig(lv)
        phases(lv)
    cp = _load("control-plane-procs.json")
    if cp is not None and "samples_s" in cp:
        control_plane(cp, "daemons as processes")
    else:
        cp = _load("control-plane.json")
        if cp is not None and "samples_s" in cp:
            control_plane(cp, "daemons in one process")
    tp = _load("throughput.json")
    if tp:
        throughput(tp, _load("data-plane-procs.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
