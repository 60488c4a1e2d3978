"""virsh's output layouts: the ``vshTable`` of ``list``, capacities, the ``--verbose`` progress
line (and :class:`ProgressLine`, which keeps it on stderr), the ``domjobinfo`` blocks and the
``event`` lines.  Apart from :class:`ProgressLine`, pure functions of the values.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from virtmig.proto.flags import JobOperation, JobType

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from virtmig.client.records import Event, JobInfo


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """virsh's ``vshTable``: cells left-aligned, each preceded by a space, 2 spaces of padding
    after every cell but the last; a dash line of (column width + 3) per column.  One format
    string for every line (``list --all`` may print 100,000 of them)."""
    columns = list(zip(*rows, strict=True)) or [()] * len(header)
    widths = [max(len(h), max(map(len, col), default=0))
              for h, col in zip(header, columns, strict=True)]
    layout = "".join(f" {{{i}:<{w}}}  " for i, w in enumerate(widths[:-1])) + \
        f" {{{len(widths) - 1}}}\n"
    text = layout.format(*header) + "-" * sum(w + 3 for w in widths) + "\n"
    return text + "".join([layout.format(*r) for r in rows])


def job_progress(remaining: int, total: int) -> float | None:
    """virsh's ``virshPrintJobProgress`` value while the job runs, ``None`` when ``total`` is 0.

    100 - remaining * 100 / total, truncated (not rounded) to 2 decimals, and never 100 while the
    job is still running: only the final line after success says 100.00.
    """
    if total <= 0:
        return None
    progress = 100.0 - remaining * 100.0 / total
    if progress >= 100.0:
        progress = 99.99
    progress = max(progress, 0.0)
    return int(progress * 100) / 100.0


def progress_line(label: str, progress: float) -> str:
    """``\\rMigration: [ 42.17 %]``."""
    return f"\r{label}: [{progress:5.2f} %]"


class ProgressLine:
    """virsh's ``--verbose`` line on stderr, rewritten in place."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.shown = ""

    def show(self, progress: float) -> None:
        text = progress_line(self.label, progress)
        if text != self.shown:
            sys.stderr.write(text)
            sys.stderr.flush()
            self.shown = text

    def interrupted(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()

    def done(self) -> None:
        sys.stderr.write(progress_line(self.label, 100.0) + "\n")
        sys.stderr.flush()


JOB_TYPE_LABELS = {
    JobType.NONE: "None",
    JobType.BOUNDED: "Bounded",
    JobType.UNBOUNDED: "Unbounded",
    JobType.COMPLETED: "Completed",
    JobType.FAILED: "Failed",
    JobType.CANCELLED: "Cancelled",
}

JOB_OPERATION_LABELS = {
    JobOperation.UNKNOWN: "Unknown",
    JobOperation.START: "Start",
    JobOperation.SAVE: "Save",
    JobOperation.RESTORE: "Restore",
    JobOperation.MIGRATION_IN: "Incoming migration",
    JobOperation.MIGRATION_OUT: "Outgoing migration",
    JobOperation.SNAPSHOT: "Snapshot",
    JobOperation.SNAPSHOT_REVERT: "Snapshot revert",
    JobOperation.DUMP: "Dump",
    JobOperation.BACKUP: "Backup",
    JobOperation.SNAPSHOT_DELETE: "Snapshot delete",
}

_CAPACITY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def pretty_capacity(value: int) -> tuple[float, str]:
    """virsh's ``vshPrettyCapacity``: the value in the largest binary unit below it."""
    for exp, unit in enumerate(_CAPACITY_UNITS):
        if value < 1024 ** (exp + 1) or unit == _CAPACITY_UNITS[-1]:
            return value / 1024**exp, unit
    raise AssertionError("unreachable")


def typed_value(value: int | float | bool | str) -> str:
    """virsh's ``virTypedParameterToString``."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def job_params(info: JobInfo) -> list[tuple[str, str]]:
    """libvirt's job stats as typed params: ``operation`` first (as libvirt's drivers put it),
    then the daemon's stats in its order.  A NONE job has none."""
    if info.type is JobType.NONE:
        return []
    return [("operation", str(int(info.operation)))] + [
        (p.name, typed_value(p.value)) for p in info.stats]


def _ullong(info: JobInfo, name: str) -> int | None:
    value = info.stat(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def format_job_info(info: JobInfo, *, completed: bool = False, anystats: bool = False) -> str:
    """virsh's ``domjobinfo`` layout (``"%-17s %-12s"`` lines, trailing padding included).

    Like virsh, only the ``Job type:`` line is printed unless the job runs, or is the completed
    job asked for with ``completed`` (or ``anystats``: any job, failed ones too).
    """
    out: list[str] = []

    def line(label: str, value: str) -> None:
        out.append(f"{label:<17} {value}\n")

    def number(label: str, value: int, unit: str = "") -> None:
        line(label, f"{value:<12}" + (f" {unit}" if unit else ""))

    def capacity(label: str, value: int, per: str = "") -> None:
        scaled, unit = pretty_capacity(value)
        line(label, f"{scaled:.3f} {unit}{per}")

    def stat(label: str, name: str, unit: str = "") -> None:
        value = _ullong(info, name)
        if value is not None:
            number(label, value, unit)

    line("Job type:", f"{JOB_TYPE_LABELS.get(info.type, 'unknown'):<12}")
    if not anystats and info.type not in (JobType.BOUNDED, JobType.UNBOUNDED) and not (
            completed and info.type is JobType.COMPLETED):
        return "".join(out)
    line("Operation:", f"{JOB_OPERATION_LABELS.get(info.operation, 'unknown'):<12}")
    number("Time elapsed:", info.time_elapsed_ms, "ms")
    stat("Time elapsed w/o network:", "time_elapsed_net", "ms")
    if info.type is JobType.BOUNDED:
        number("Time remaining:", _ullong(info, "time_remaining") or 0, "ms")
    if info.data_total or info.data_remaining or info.data_processed:
        capacity("Data processed:", info.data_processed)
        capacity("Data remaining:", info.data_remaining)
        capacity("Data total:", info.data_total)
    if info.mem_total or info.mem_remaining or info.mem_processed:
        capacity("Memory processed:", info.mem_processed)
        capacity("Memory remaining:", info.mem_remaining)
        capacity("Memory total:", info.mem_total)
        if bps := _ullong(info, "memory_bps"):
            capacity("Memory bandwidth:", bps, "/s")
        stat("Dirty rate:", "memory_dirty_rate", "pages/s")
        stat("Page size:", "memory_page_size", "bytes")
        stat("Iteration:", "memory_iteration")
        stat("Postcopy requests:", "memory_postcopy_requests")
    disk = [_ullong(info, f"disk_{n}") or 0 for n in ("processed", "remaining", "total")]
    if any(disk):
        for label, size in zip(("File processed:", "File remaining:", "File total:"), disk,
                               strict=True):
            capacity(label, size)
        if bps := _ullong(info, "disk_bps"):
            capacity("File bandwidth:", bps, "/s")
    stat("Constant pages:", "memory_constant")
    stat("Normal pages:", "memory_normal")
    if (normal := _ullong(info, "memory_normal_bytes")) is not None:
        capacity("Normal data:", normal)
    stat("Total downtime:" if info.type is JobType.COMPLETED else "Expected downtime:",
         "downtime", "ms")
    stat("Downtime w/o network:", "downtime_net", "ms")
    stat("Setup time:", "setup_time", "ms")
    for label, name in (("Compression cache:", "compression_cache"),
                        ("Compressed data:", "compression_bytes")):
        if (amount := _ullong(info, name)) is not None:
            capacity(label, amount)
    for label, name in (("Compressed pages:", "compression_pages"),
                        ("Compression cache misses:", "compression_cache_misses"),
                        ("Compression overflows:", "compression_overflow")):
        if (pages := _ullong(info, name)) is not None:
            line(label, f"{pages:<13}")
    throttle = info.stat("auto_converge_throttle")
    if isinstance(throttle, int) and not isinstance(throttle, bool):
        line("Auto converge throttle:", f"{throttle:<13}")
    errmsg = info.stat("errmsg")
    if isinstance(errmsg, str):
        line("Error message:", errmsg)
    protocol = info.stat("virtmig.protocol")  # virtmig's: the migration protocol used
    if isinstance(protocol, str):
        line("Migration protocol:", protocol)
    return "".join(out)


def format_job_rawstats(info: JobInfo) -> str:
    """virsh's ``domjobinfo --rawstats``: the numeric job type, a blank line, the raw stats."""
    return f"Job type: {int(info.type)}\n\n" + "".join(
        f"{name}: {value}\n" for name, value in job_params(info))


def event_timestamp(ms: int) -> str:
    """virsh's ``virTimeStringNowRaw``: UTC, milliseconds, ``+0000``."""
    import datetime  # here: `list` and the other commands need no datetime

    t = datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC)
    return f"{t:%Y-%m-%d %H:%M:%S}.{ms % 1000:03d}+0000"


def format_event(ev: Event, *, timestamp: bool = False) -> str:
    """virsh's ``event`` lines (``virshEvent*Print``)."""
    head = f"event '{ev.kind}' for domain '{ev.domain_name}'"
    if ev.kind == "lifecycle":
        text = f"{head}: {ev.description}\n"
    elif ev.kind == "migration-iteration":
        text = f"{head}: iteration: '{ev.iteration}'\n"
    else:  # job-completed, job-failed: the job's stats, one tab-indented line each
        params = job_params(ev.job) if ev.job is not None else []
        text = f"{head}:\n" + "".join(f"\t{name}: {value}\n" for name, value in params)
    if timestamp:
        import datetime

        ms = ev.timestamp_ms or int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)
        text = f"{event_timestamp(ms)}: {text}"
    return text
