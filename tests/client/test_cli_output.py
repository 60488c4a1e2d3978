"""The ``virtmig`` CLI's output: virsh's table, progress, ``domjobinfo`` and event layouts.
"""

from __future__ import annotations

import pytest

from virtmig.client.cli import (
    event_timestamp,
    format_event,
    format_job_info,
    format_job_rawstats,
    format_table,
    job_progress,
    pretty_capacity,
    progress_line,
)
from virtmig.client.connection import Event, JobInfo
from virtmig.proto.flags import JobOperation, JobType
from virtmig.proto.params import ParamType, TypedParam


def test_table_is_virsh_layout() -> None:
    assert format_table(["Id", "Name", "State"], [["-", "vm1", "shut off"]]) == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    vm1    shut off\n"
    )
    assert format_table(["Id", "Name", "State"],
                        [["1", "a-long-name", "running"], ["12", "b", "paused"]]) == (
        " Id   Name          State\n"
        "-----------------------------\n"
        " 1    a-long-name   running\n"
        " 12   b             paused\n"
    )
    assert format_table(["Id", "Name", "State"], []) == (
        " Id   Name   State\n"
        "--------------------\n"
    )


@pytest.mark.parametrize(
    ("remaining", "total", "expected"),
    [
        (0, 0, None),                # nothing known yet: no line
        (5, 0, None),
        (100, 100, 0.0),
        (50, 100, 50.0),
        (2, 3, 33.33),               # 33.333… truncated
        (1, 3, 66.66),               # 66.666… truncated, not rounded to 66.67
        (1, 10**9, 99.99),           # 99.9999999 would print as 100.00: capped
        (0, 100, 99.99),             # still running: never 100 before success
        (200, 100, 0.0),
    ],
)
def test_job_progress(remaining: int, total: int, expected: float | None) -> None:
    assert job_progress(remaining, total) == expected


def test_progress_line_format() -> None:
    assert progress_line("Migration", 8.59) == "\rMigration: [ 8.59 %]"
    assert progress_line("Migration", 42.17) == "\rMigration: [42.17 %]"
    assert progress_line("Migration", 100.0) == "\rMigration: [100.00 %]"


MIB = 1024 * 1024


def job(jtype: JobType, operation: JobOperation = JobOperation.MIGRATION_OUT,
        processed: int = 0, total: int = 0, **stats: int | str) -> JobInfo:
    """A job's info as the daemon sends it: INT for the throttle, STRING for errmsg."""
    def param(name: str, value: int | str) -> TypedParam:
        if isinstance(value, str):
            return TypedParam(name, ParamType.STRING, value)
        ptype = ParamType.INT if name == "auto_converge_throttle" else ParamType.ULLONG
        return TypedParam(name, ptype, value)

    remaining = total - processed
    return JobInfo(jtype, operation, int(stats.get("time_elapsed", 0)), total, processed,
                   remaining, total, processed, remaining,
                   tuple(param(k, v) for k, v in stats.items()), "", "")


RUNNING_STATS: dict[str, int | str] = dict(
    time_elapsed=1484, memory_bps=4241408, memory_dirty_rate=0, memory_iteration=1,
    memory_page_size=4096, memory_normal=1530, memory_normal_bytes=1530 * 4096,
    memory_postcopy_requests=0, setup_time=1, auto_converge_throttle=0, downtime=300)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(0, (0.0, "B")), (1023, (1023.0, "B")), (1024, (1.0, "KiB")), (1536, (1.5, "KiB")),
     (64 * MIB, (64.0, "MiB")), (3 * 1024**3, (3.0, "GiB")), (1024**4, (1.0, "TiB")),
     (2**64 - 1, (16.0, "EiB"))],
)
def test_pretty_capacity(value: int, expected: tuple[float, str]) -> None:
    assert pretty_capacity(value) == expected


def test_domjobinfo_layout_of_a_running_migration() -> None:
    info = job(JobType.UNBOUNDED, JobOperation.MIGRATION_OUT, 1530 * 4096, 64 * MIB,
               **RUNNING_STATS)
    assert format_job_info(info) == (
        "Job type:         Unbounded   \n"
        "Operation:        Outgoing migration\n"
        "Time elapsed:     1484         ms\n"
        "Data processed:   5.977 MiB\n"
        "Data remaining:   58.023 MiB\n"
        "Data total:       64.000 MiB\n"
        "Memory processed: 5.977 MiB\n"
        "Memory remaining: 58.023 MiB\n"
        "Memory total:     64.000 MiB\n"
        "Memory bandwidth: 4.045 MiB/s\n"
        "Dirty rate:       0            pages/s\n"
        "Page size:        4096         bytes\n"
        "Iteration:        1           \n"
        "Postcopy requests: 0           \n"
        "Normal pages:     1530        \n"
        "Normal data:      5.977 MiB\n"
        "Expected downtime: 300          ms\n"
        "Setup time:       1            ms\n"
        "Auto converge throttle: 0            \n"
    )


def test_domjobinfo_layout_of_ended_jobs() -> None:
    assert format_job_info(job(JobType.NONE)) == "Job type:         None        \n"
    done = job(JobType.COMPLETED, JobOperation.MIGRATION_IN, processed=64 * MIB, total=64 * MIB,
               time_elapsed=2000, downtime=12)
    # Like virsh: a completed job's details only when the completed job was asked for.
    assert format_job_info(done) == "Job type:         Completed   \n"
    assert format_job_info(done, completed=True) == (
        "Job type:         Completed   \n"
        "Operation:        Incoming migration\n"
        "Time elapsed:     2000         ms\n"
        "Data processed:   64.000 MiB\n"
        "Data remaining:   0.000 B\n"
        "Data total:       64.000 MiB\n"
        "Memory processed: 64.000 MiB\n"
        "Memory remaining: 0.000 B\n"
        "Memory total:     64.000 MiB\n"
        "Total downtime:   12           ms\n"
    )
    failed = job(JobType.FAILED, time_elapsed=5, errmsg="migration stalled")
    assert format_job_info(failed, completed=True) == "Job type:         Failed      \n"
    assert format_job_info(failed, completed=True, anystats=True) == (
        "Job type:         Failed      \n"
        "Operation:        Outgoing migration\n"
        "Time elapsed:     5            ms\n"
        "Error message:    migration stalled\n"
    )


def test_domjobinfo_rawstats() -> None:
    assert format_job_rawstats(job(JobType.NONE)) == "Job type: 0\n\n"
    info = job(JobType.UNBOUNDED, processed=MIB, total=64 * MIB, time_elapsed=10,
               memory_total=64 * MIB, auto_converge_throttle=20, errmsg="x")
    assert format_job_rawstats(info) == (
        "Job type: 2\n"
        "\n"
        "operation: 5\n"
        "time_elapsed: 10\n"
        "memory_total: 67108864\n"
        "auto_converge_throttle: 20\n"
        "errmsg: x\n"
    )


def event(kind: str, **fields: object) -> Event:
    base: dict[str, object] = dict(kind=kind, domain_name="vm1", domain_uuid="u", event=0,
                                   detail=0, description="", iteration=0, job=None,
                                   timestamp_ms=0)
    base.update(fields)
    return Event(**base)  # type: ignore[arg-type]


def test_event_lines() -> None:
    assert format_event(event("lifecycle", description="Started Migrated")) == (
        "event 'lifecycle' for domain 'vm1': Started Migrated\n")
    assert format_event(event("migration-iteration", iteration=2)) == (
        "event 'migration-iteration' for domain 'vm1': iteration: '2'\n")
    done = job(JobType.COMPLETED, time_elapsed=76, memory_total=64 * MIB, downtime=1)
    assert format_event(event("job-completed", job=done)) == (
        "event 'job-completed' for domain 'vm1':\n"
        "\toperation: 5\n"
        "\ttime_elapsed: 76\n"
        "\tmemory_total: 67108864\n"
        "\tdowntime: 1\n"
    )
    failed = job(JobType.FAILED, errmsg="operation aborted")
    assert format_event(event("job-failed", job=failed)) == (
        "event 'job-failed' for domain 'vm1':\n"
        "\toperation: 5\n"
        "\terrmsg: operation aborted\n"
    )
    # 2026-01-02 03:04:05.006 UTC
    ms = 1767323045006
    assert event_timestamp(ms) == "2026-01-02 03:04:05.006+0000"
    assert format_event(event("migration-iteration", iteration=1, timestamp_ms=ms),
                        timestamp=True) == (
        "2026-01-02 03:04:05.006+0000: event 'migration-iteration' for domain 'vm1': "
        "iteration: '1'\n")
