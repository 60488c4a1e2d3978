"""The ``virtmig`` CLI: option → flags/params mapping, virsh's validation messages and layouts,
and the commands against two real ``virtmigd`` processes on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtmig.client.cli import (
    COMMANDS_BY_NAME,
    CliError,
    MigrateOptions,
    UsageError,
    build_migration,
    event_timestamp,
    format_event,
    format_job_info,
    format_job_rawstats,
    format_table,
    job_progress,
    parse_command,
    pretty_capacity,
    progress_line,
)
from virtmig.client.cli import app as cli
from virtmig.client.connection import Event, JobInfo
from virtmig.proto.flags import JobOperation, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, ParamType, TypedParam
from virtmig.testing import WaitTimeout, wait_until_sync
from virtmig.testing.pki import session_pki

F = MigrateFlags
P = MigrateParam

DEST = "virtmig+tls://127.0.0.1:1"


def migration(*argv: str) -> MigrateOptions:
    return build_migration(parse_command(COMMANDS_BY_NAME["migrate"], argv))


# --- pure functions -------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("option", "flag"),
    [
        ("--live", F.LIVE),
        ("--offline", F.OFFLINE),
        ("--p2p", F.PEER2PEER),
        ("--tunnelled", F.TUNNELLED),
        ("--tunneled", F.TUNNELLED),
        ("--persistent", F.PERSIST_DEST),
        ("--undefinesource", F.UNDEFINE_SOURCE),
        ("--suspend", F.PAUSED),
        ("--copy-storage-all", F.NON_SHARED_DISK),
        ("--copy-storage-inc", F.NON_SHARED_INC),
        ("--copy-storage-synchronous-writes", F.NON_SHARED_SYNCHRONOUS_WRITES),
        ("--change-protection", F.CHANGE_PROTECTION),
        ("--unsafe", F.UNSAFE),
        ("--compressed", F.COMPRESSED),
        ("--auto-converge", F.AUTO_CONVERGE),
        ("--rdma-pin-all", F.RDMA_PIN_ALL),
        ("--abort-on-error", F.ABORT_ON_ERROR),
        ("--postcopy", F.POSTCOPY),
        ("--postcopy-resume", F.POSTCOPY_RESUME),
        ("--zerocopy", F.ZEROCOPY),
        ("--tls", F.TLS),
        ("--parallel", F.PARALLEL),
    ],
)
def test_flag_options(option: str, flag: MigrateFlags) -> None:
    opts = migration(option, "vm1", DEST)
    assert opts.flags == flag
    assert len(opts.params) == 0


def test_options_without_a_flag() -> None:
    opts = migration("--verbose", "--direct", "vm1", DEST)
    assert opts.flags == F(0)
    assert opts.verbose and opts.unmanaged
    assert migration("--p2p", "vm1", DEST).unmanaged
    plain = migration("vm1", DEST)
    assert not plain.verbose and not plain.unmanaged


@pytest.mark.parametrize(
    ("argv", "name", "ptype", "values"),
    [
        (["--migrateuri", "tcp://10.0.0.2:49152"], P.URI, ParamType.STRING,
         ["tcp://10.0.0.2:49152"]),
        (["--graphicsuri", "spice://h"], P.GRAPHICS_URI, ParamType.STRING, ["spice://h"]),
        (["--listen-address", "10.0.0.2"], P.LISTEN_ADDRESS, ParamType.STRING, ["10.0.0.2"]),
        (["--dname", "vm2"], P.DEST_NAME, ParamType.STRING, ["vm2"]),
        (["--bandwidth", "100"], P.BANDWIDTH, ParamType.ULLONG, [100]),
        (["--bandwidth", str(2**64 - 1)], P.BANDWIDTH, ParamType.ULLONG, [2**64 - 1]),
        (["--postcopy-bandwidth", "7"], P.BANDWIDTH_POSTCOPY, ParamType.ULLONG, [7]),
        (["--migrate-disks", "vda,vdb"], P.MIGRATE_DISKS, ParamType.STRING, ["vda", "vdb"]),
        (["--disks-port", "10809"], P.DISKS_PORT, ParamType.INT, [10809]),
        (["--disks-uri", "unix:///x"], P.DISKS_URI, ParamType.STRING, ["unix:///x"]),
        (["--comp-methods", "xbzrle,mt"], P.COMPRESSION, ParamType.STRING, ["xbzrle", "mt"]),
        (["--comp-mt-level", "3"], P.COMPRESSION_MT_LEVEL, ParamType.INT, [3]),
        (["--comp-mt-threads", "4"], P.COMPRESSION_MT_THREADS, ParamType.INT, [4]),
        (["--comp-mt-dthreads", "2"], P.COMPRESSION_MT_DTHREADS, ParamType.INT, [2]),
        (["--comp-xbzrle-cache", "1048576"], P.COMPRESSION_XBZRLE_CACHE, ParamType.ULLONG,
         [1048576]),
        (["--comp-zlib-level", "9"], P.COMPRESSION_ZLIB_LEVEL, ParamType.INT, [9]),
        (["--comp-zstd-level", "20"], P.COMPRESSION_ZSTD_LEVEL, ParamType.INT, [20]),
        (["--auto-converge-initial", "20"], P.AUTO_CONVERGE_INITIAL, ParamType.INT, [20]),
        (["--auto-converge-increment", "10"], P.AUTO_CONVERGE_INCREMENT, ParamType.INT, [10]),
        (["--parallel-connections", "4"], P.PARALLEL_CONNECTIONS, ParamType.INT, [4]),
        (["--tls-destination", "h.example"], P.TLS_DESTINATION, ParamType.STRING,
         ["h.example"]),
        (["--stall-timeout", "30"], P.STALL_TIMEOUT, ParamType.ULLONG, [30]),
        (["--completion-timeout", "120"], P.COMPLETION_TIMEOUT, ParamType.ULLONG, [120]),
        (["--completion-timeout-action", "postcopy"], P.COMPLETION_TIMEOUT_ACTION,
         ParamType.STRING, ["postcopy"]),
    ],
)
def test_param_options(argv: list[str], name: MigrateParam, ptype: ParamType,
                       values: list[int | str]) -> None:
    params = migration(*argv, "vm1", DEST).params
    assert list(params) == [TypedParam(name.value, ptype, v) for v in values]


def test_xml_files_are_read_into_params(tmp_path: Path) -> None:
    dxml, pxml = tmp_path / "d.xml", tmp_path / "p.xml"
    dxml.write_text("<domain>live</domain>")
    pxml.write_text("<domain>config</domain>")
    opts = migration("--live", "--persistent", "--xml", str(dxml), "--persistent-xml", str(pxml),
                     "vm1", DEST)
    assert opts.params.get(P.DEST_XML) == "<domain>live</domain>"
    assert opts.params.get(P.PERSIST_XML) == "<domain>config</domain>"
    assert opts.flags == F.LIVE | F.PERSIST_DEST


def test_unreadable_xml_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.xml"
    with pytest.raises(CliError) as info:
        migration("--xml", str(missing), "vm1", DEST)
    assert info.value.lines == (
        f"cannot read file '{missing}'",
        f"Failed to open file '{missing}': No such file or directory",
    )


def test_positional_data_options_fill_in_virsh_order() -> None:
    cmd = COMMANDS_BY_NAME["migrate"]
    args = parse_command(cmd, ["--live", "vm1", DEST, "tcp://m:1", "spice://g", "10.0.0.9",
                               "newname"])
    assert (args.domain, args.desturi, args.migrateuri, args.graphicsuri, args.listen_address,
            args.dname) == ("vm1", DEST, "tcp://m:1", "spice://g", "10.0.0.9", "newname")
    # Named data options are skipped by the positional ones; options may follow positionals.
    args = parse_command(cmd, ["--desturi", DEST, "vm1", "tcp://m:1", "--verbose"])
    assert (args.domain, args.desturi, args.migrateuri, args.verbose) == (
        "vm1", DEST, "tcp://m:1", True)
    opts = build_migration(parse_command(cmd, ["vm1", DEST, "tcp://m:1", "--dname", "x"]))
    assert opts.params.get(P.URI) == "tcp://m:1"
    assert opts.params.get(P.DEST_NAME) == "x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--live", "--offline"], "Options --live and --offline are mutually exclusive"),
        (["--live", "--timeout", "5", "--timeout-suspend", "--timeout-postcopy", "--postcopy"],
         "Options --timeout-suspend and --timeout-postcopy are mutually exclusive"),
        (["--persistent-xml", "x.xml"],
         "Option --persistent is required by option --persistent-xml"),
        (["--live", "--postcopy-after-precopy"],
         "Option --postcopy is required by option --postcopy-after-precopy"),
        (["--live", "--timeout", "5", "--timeout-postcopy"],
         "Option --postcopy is required by option --timeout-postcopy"),
        (["--offline", "--timeout", "5"], "migrate: Unexpected timeout for offline migration"),
        (["--timeout", "5"], "migrate: Unexpected timeout for offline migration"),
        (["--live", "--timeout", "0"],
         "Numeric value '0' for <timeout> option is malformed or out of range"),
        (["--live", "--timeout", "-3"],
         "Numeric value '-3' for <timeout> option is malformed or out of range"),
        (["--live", "--timeout", "soon"],
         "Numeric value 'soon' for <timeout> option is malformed or out of range"),
        (["--live", "--timeout-suspend"],
         "migrate: Unexpected --timeout-* option without --timeout"),
        (["--live", "--postcopy", "--timeout-postcopy"],
         "migrate: Unexpected --timeout-* option without --timeout"),
        (["--bandwidth", "-1"],
         "Numeric value '-1' for <bandwidth> option is malformed or out of range"),
        (["--bandwidth", "1e3"],
         "Numeric value '1e3' for <bandwidth> option is malformed or out of range"),
        (["--disks-port", str(2**31)],
         f"Numeric value '{2**31}' for <disks-port> option is malformed or out of range"),
    ],
)
def test_validation_messages(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        migration(*argv, "vm1", DEST)
    assert info.value.lines == (message,)


def test_client_side_options() -> None:
    """``--timeout*`` and ``--postcopy-after-precopy`` are the client's: no flag, no param."""
    opts = migration("--live", "--timeout", "5", "vm1", DEST)
    assert (opts.timeout, opts.timeout_action, opts.postcopy_after_precopy) == (5, "suspend", False)
    assert opts.flags == F.LIVE and len(opts.params) == 0
    opts = migration("--live", "--timeout", "7", "--timeout-suspend", "vm1", DEST)
    assert (opts.timeout, opts.timeout_action) == (7, "suspend")
    opts = migration("--live", "--postcopy", "--timeout", "2", "--timeout-postcopy", "vm1", DEST)
    assert (opts.timeout, opts.timeout_action) == (2, "postcopy")
    assert opts.flags == F.LIVE | F.POSTCOPY
    opts = migration("--live", "--postcopy", "--postcopy-after-precopy", "vm1", DEST)
    assert opts.postcopy_after_precopy and opts.timeout == 0
    assert opts.flags == F.LIVE | F.POSTCOPY and len(opts.params) == 0
    assert migration("--live", "vm1", DEST).timeout == 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["migrate", "--live"], "error: command 'migrate' requires <domain> option\n"),
        (["migrate", "vm1"], "error: command 'migrate' requires <desturi> option\n"),
        (["migrate", "vm1", DEST, "a", "b", "c", "d", "e"],
         "error: migrate: unexpected data 'e'\n"),
        (["migrate", "--nope", "vm1", DEST], "error: migrate: unrecognized arguments: --nope\n"),
        (["migrate", "--live", "--offline", "vm1", DEST],
         "error: Options --live and --offline are mutually exclusive\n"),
        (["frobnicate"], "error: unknown command: 'frobnicate'\n"),
        ([], "error: no command given; try 'virtmig help'\n"),
        (["dominfo"], "error: command 'dominfo' requires <domain> option\n"),
        (["-c"], "error: argument -c/--connect: expected one argument\n"),
        (["migrate-setmaxdowntime", "vm1"],
         "error: command 'migrate-setmaxdowntime' requires <downtime> option\n"),
        (["migrate-setspeed", "--bandwidth", "5"],
         "error: command 'migrate-setspeed' requires <domain> option\n"),
        (["domjobinfo", "--keep-completed", "vm1"],
         "error: Option --completed is required by option --keep-completed\n"),
        (["domjobinfo", "--completed", "--watch", "vm1"],
         "error: Options --completed and --watch are mutually exclusive\n"),
        (["event"], "error: one of --list, --all, or --event <type> is required\n"),
        (["event", "--event", "reboot"], "error: unknown event type reboot\n"),
        (["event", "--all", "--event", "lifecycle"],
         "error: Options --all and --event are mutually exclusive\n"),
        (["event", "--list", "--all"], "error: Options --list and --all are mutually exclusive\n"),
        (["event", "--all", "--timeout", "0"],
         "error: Numeric value '0' for <timeout> option is malformed or out of range\n"),
    ],
)
def test_usage_errors_in_process(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", message)


def test_completion_timeout_action_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["migrate", "--completion-timeout-action", "nap", "vm1", DEST]) == 1
    assert capsys.readouterr().err.startswith(
        "error: migrate: argument --completion-timeout-action: invalid choice: 'nap'")


def test_event_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["event", "--list"]) == 0
    assert capsys.readouterr().out == (
        "lifecycle\nmigration-iteration\njob-completed\njob-failed\n")


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS_BY_NAME:
        assert f"\n    {name} " in out
    assert cli.main(["--help"]) == 0
    assert "migrate" in capsys.readouterr().out
    assert cli.main(["help", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "--postcopy-after-precopy" in out and "--tunnelled" in out


def test_keyboard_interrupt_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["list"]) == 1
    assert capsys.readouterr().err == "error: interrupted\n"


# --- against real daemons -------------------------------------------------------------------------


def domain_xml(name: str, memory_mib: int = 64, dirty_rate_mib: int = 0) -> str:
    """A test-backend guest; ``dirty_rate_mib``: how fast it dirties its memory."""
    metadata = (f"<metadata><virtmig:guest xmlns:virtmig='urn:virtmig:domain:1' "
                f"dirty-rate-mib='{dirty_rate_mib}'/></metadata>" if dirty_rate_mib else "")
    return textwrap.dedent(f"""\
        <domain type='test'>
          <name>{name}</name>
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64'>hvm</type></os>
          {metadata}
        </domain>
        """)


def free_port_range(count: int = 8) -> str:
    """``LO-HI`` of ``count`` ports that are free right now (a base from the kernel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return f"{base}-{base + count - 1}"
    raise RuntimeError("no free port range")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    uri: str
    log: Path


def start_daemon(tmp: Path, name: str) -> Daemon:
    ready, log = tmp / f"{name}.ready", tmp / f"{name}.log"
    config = session_pki().config(tmp / f"{name}.toml", name)
    cmd = [
        sys.executable, "-m", "virtmig.daemon.main", "--config", str(config),
        "--listen", "tls://127.0.0.1:0",
        "--state-dir", str(tmp / name),
        "--hostname", f"{name}.test",
        "--migration-address", "127.0.0.1",
        "--migration-host", "127.0.0.1",
        "--migration-ports", free_port_range(),
        "--ready-file", str(ready),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    with contextlib.suppress(WaitTimeout):  # (it fails below, showing the daemon's log)
        wait_until_sync(lambda: ready.exists() or proc.poll() is not None, timeout=30,
                        interval=0.02, what=f"virtmigd {name} to start")
    if not ready.exists():
        stop_process(proc)
        pytest.fail(f"virtmigd {name} did not start:\n{log.read_text()}")
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    return Daemon(proc, f"virtmig+tls://{info['addresses'][0]}", log)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """Two ``virtmigd`` processes, ``src`` and ``dst``, on loopback."""
    started: list[Daemon] = []
    try:
        started.append(start_daemon(tmp_path, "src"))
        started.append(start_daemon(tmp_path, "dst"))
        yield started[0], started[1]
    finally:
        for d in started:
            stop_process(d.proc)


def virtmig(uri: str | None, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "virtmig.client.cli"]
    if uri is not None:
        cmd += ["-c", uri]
    raw = subprocess.run([*cmd, *args], capture_output=True, timeout=60, env=env)
    # Decoded by hand: text mode would turn the progress line's "\r" into "\n".
    res = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(),
                                      raw.stderr.decode())
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    return res


def background(uri: str, *args: str) -> subprocess.Popen[bytes]:
    """``virtmig -c URI ARGS...`` left running, its output on pipes."""
    return subprocess.Popen([sys.executable, "-m", "virtmig.client.cli", "-c", uri, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen[bytes], marker: bytes, *, stderr: bool = False,
               timeout: float = 30) -> bytes:
    """What the process wrote (to stdout, or stderr) up to and including ``marker``."""
    pipe = proc.stderr if stderr else proc.stdout
    assert pipe is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {seen!r}"
        ready, _, _ = select.select([pipe], [], [], left)
        if ready:
            chunk = os.read(pipe.fileno(), 4096)
            assert chunk, f"the process ended before {marker!r}: {seen!r}"
            seen += chunk
    return seen


def start_guest(tmp_path: Path, uri: str, name: str, memory_mib: int = 64,
                dirty_rate_mib: int = 0) -> None:
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, memory_mib, dirty_rate_mib))
    ok(uri, "define", str(xml))
    ok(uri, "start", name)


def migrating(uri: str, name: str) -> str:
    """``domjobinfo`` once the outgoing migration streams (its data total is known)."""
    out = ""

    def streaming() -> bool:
        nonlocal out
        out = ok(uri, "domjobinfo", name)
        return "Data total:" in out

    wait_until_sync(streaming, timeout=30, interval=0.1,
                    what=f"the migration of {name} to stream")
    return out


ABORTED = "error: operation aborted: job 'migration out' canceled by client\n"
NO_JOB = "error: Requested operation is not valid: no job is active on the domain\n"
EMPTY_LIST = " Id   Name   State\n--------------------\n"


def ok(uri: str, *args: str) -> str:
    res = virtmig(uri, *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return res.stdout


def fails(uri: str | None, *args: str) -> str:
    res = virtmig(uri, *args)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.startswith("error: ")
    return res.stderr


def test_lifecycle_and_live_migration(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    xml = tmp_path / "web.xml"
    xml.write_text(domain_xml("web"))

    assert ok(src.uri, "define", str(xml)) == f"Domain 'web' defined from {xml}\n"
    assert ok(src.uri, "list") == " Id   Name   State\n--------------------\n"
    assert ok(src.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    web    shut off\n"
    )
    assert ok(src.uri, "list", "--inactive") == ok(src.uri, "list", "--all")
    assert ok(src.uri, "start", "web") == "Domain 'web' started\n"
    assert ok(src.uri, "list") == (
        " Id   Name   State\n"
        "----------------------\n"
        " 1    web    running\n"
    )
    assert ok(src.uri, "domstate", "web") == "running\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "running (booted)\n"

    info = ok(src.uri, "dominfo", "web").splitlines()
    uuid = info[2].split()[1]
    assert info == [
        "Id:             1",
        "Name:           web",
        f"UUID:           {uuid}",
        "OS Type:        hvm",
        "State:          running",
        "CPU(s):         1",
        *([line for line in info if line.startswith("CPU time:")]),
        "Max memory:     65536 KiB",
        "Used memory:    65536 KiB",
        "Persistent:     yes",
        "Autostart:      disable",
        "Managed save:   no",
        "Security model: none",
        "Security DOI:   0",
    ]
    # By id and by UUID, like virsh.
    assert ok(src.uri, "domstate", "1") == "running\n"
    assert ok(src.uri, "domstate", "--domain", uuid) == "running\n"

    assert ok(src.uri, "suspend", "web") == "Domain 'web' suspended\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "paused (user)\n"
    assert ok(src.uri, "resume", "web") == "Domain 'web' resumed\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "running (unpaused)\n"

    dumped = ok(src.uri, "dumpxml", "web")
    assert "<name>web</name>" in dumped and uuid in dumped
    assert "<name>web</name>" in ok(src.uri, "dumpxml", "--inactive", "web")
    assert "<name>web</name>" in ok(src.uri, "dumpxml", "--migratable", "web")

    res = virtmig(src.uri, "migrate", "--live", "--verbose", "web", dst.uri)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert res.stderr.endswith("\rMigration: [100.00 %]\n")
    assert "error" not in res.stderr

    # The source keeps its persistent definition, shut off (migrated); the guest runs on dst.
    assert ok(src.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    web    shut off\n"
    )
    assert ok(src.uri, "domstate", "--reason", "web") == "shut off (migrated)\n"
    assert ok(dst.uri, "list", "--all") == (
        " Id   Name   State\n"
        "----------------------\n"
        " 1    web    running\n"
    )
    assert ok(dst.uri, "domstate", "--reason", "web") == "running (migrated)\n"
    assert "Persistent:     no" in ok(dst.uri, "dominfo", "web")

    assert ok(dst.uri, "destroy", "web") == "Domain 'web' destroyed\n"
    assert ok(src.uri, "undefine", "web") == "Domain 'web' has been undefined\n"
    assert ok(src.uri, "list", "--all") == " Id   Name   State\n--------------------\n"


def test_offline_persistent_and_rename_migrations(daemons: tuple[Daemon, Daemon],
                                                  tmp_path: Path) -> None:
    src, dst = daemons
    for name in ("cold", "warm"):
        (tmp_path / f"{name}.xml").write_text(domain_xml(name))
        ok(src.uri, "define", str(tmp_path / f"{name}.xml"))

    assert ok(src.uri, "migrate", "--offline", "--persistent", "cold", dst.uri) == ""
    assert ok(dst.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    cold   shut off\n"
    )
    assert "Persistent:     yes" in ok(dst.uri, "dominfo", "cold")
    assert "cold" in ok(src.uri, "list", "--inactive")

    # Params from options: a rename, with the source definition removed.
    ok(src.uri, "start", "warm")
    assert ok(src.uri, "migrate", "--live", "--persistent", "--undefinesource",
              "--dname", "warm2", "--bandwidth", "1000", "warm", dst.uri) == ""
    assert "warm" not in ok(src.uri, "list", "--all")
    assert ok(dst.uri, "domstate", "--reason", "warm2") == "running (migrated)\n"
    assert "Persistent:     yes" in ok(dst.uri, "dominfo", "warm2")


def test_errors_are_one_clear_line(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    (tmp_path / "vm.xml").write_text(domain_xml("vm"))
    ok(src.uri, "define", str(tmp_path / "vm.xml"))
    ok(src.uri, "start", "vm")

    assert fails(src.uri, "dominfo", "nosuch") == "error: failed to get domain 'nosuch'\n"
    assert fails(src.uri, "migrate", "--live", "nosuch", dst.uri) == (
        "error: failed to get domain 'nosuch'\n")
    assert fails(src.uri, "start", "vm") == "error: Domain is already active\n"
    assert fails(src.uri, "suspend", "--domain", "nosuch") == (
        "error: failed to get domain 'nosuch'\n")

    err = fails(src.uri, "define", str(tmp_path / "none.xml"))
    assert err == (f"error: Failed to open file '{tmp_path / 'none.xml'}': "
                   "No such file or directory\n")
    (tmp_path / "bad.xml").write_text("<domain type='test'><name>x</name>")
    err = fails(src.uri, "define", str(tmp_path / "bad.xml"))
    assert err.startswith(f"error: Failed to define domain from {tmp_path / 'bad.xml'}\nerror: ")

    assert fails(src.uri, "migrate", "--live", "--offline", "vm", dst.uri) == (
        "error: Options --live and --offline are mutually exclusive\n")

    # Options this version cannot do: parsed, passed on, refused with the daemon's reason.
    err = fails(src.uri, "migrate", "--live", "--copy-storage-all", "vm", dst.uri)
    assert err == ("error: argument unsupported: migration flag VIR_MIGRATE_NON_SHARED_DISK is "
                   "not supported by this host\n")
    err = fails(src.uri, "migrate", "--live", "--comp-mt-level", "3", "vm", dst.uri)
    assert err == "error: invalid argument: Turn multithread compression on to tune it\n"
    err = fails(src.uri, "migrate", "--live", "--compressed", "vm", dst.uri)  # test backend
    assert err == ("error: argument unsupported: migration flag VIR_MIGRATE_COMPRESSED is not "
                   "supported by this host\n")
    err = fails(src.uri, "migrate", "--live", "--direct", "vm", dst.uri)
    assert err == ("error: argument unsupported: direct migration is not supported by the source "
                   "host\n")
    # Nothing happened to the guest.
    assert ok(src.uri, "domstate", "--reason", "vm") == "running (booted)\n"
    assert ok(dst.uri, "list", "--all") == " Id   Name   State\n--------------------\n"

    err = fails(src.uri, "migrate", "--live", "vm", "virtmig+tls://127.0.0.1:1")
    assert err.startswith("error: failed to connect to the destination "
                          "'virtmig+tls://127.0.0.1:1'\nerror: unable to connect")
    err = fails("virtmig+tls://127.0.0.1:1", "list")
    assert err.startswith("error: failed to connect to the hypervisor\nerror: unable to connect")
    err = fails("bogus://x", "list")
    assert err.startswith("error: failed to connect to the hypervisor\n"
                          "error: invalid argument: unsupported connection URI 'bogus://x'")


def test_host_commands_and_default_uri(daemons: tuple[Daemon, Daemon]) -> None:
    src, _dst = daemons
    env = {**os.environ, "VIRTMIG_DEFAULT_URI": src.uri}
    res = virtmig(None, "hostname", env=env)
    assert (res.returncode, res.stdout) == (0, "src.test\n")

    lines = ok(src.uri, "version").splitlines()
    assert lines[0].startswith("Compiled against library: virtmig ")
    assert lines[1].startswith("Using library: virtmig ")
    assert lines[2].startswith("Using API: virtmig ")
    assert lines[3].startswith("Running hypervisor: test ")

    node = dict(line.split(":", 1) for line in ok(src.uri, "nodeinfo").splitlines())
    assert set(node) == {"CPU model", "CPU(s)", "Memory size", "Host UUID", "Backend",
                         "Features"}
    assert node["Memory size"].endswith(" KiB")
    assert node["Backend"].strip() == "test"
    assert "V3" in node["Features"].split()



# --- job control against real daemons -------------------------------------------------------------


def test_domjobinfo_watch_and_domjobabort(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "vm")
    assert ok(src.uri, "domjobinfo", "vm") == "Job type:         None        \n"
    assert ok(src.uri, "domjobinfo", "--rawstats", "vm") == "Job type: 0\n\n"
    assert fails(src.uri, "domjobabort", "vm") == NO_JOB

    # 64 MiB at 4 MiB/s: running for long enough to be looked at, then aborted.
    mig = background(src.uri, "migrate", "--live", "--bandwidth", "4", "vm", dst.uri)
    watch: subprocess.Popen[bytes] | None = None
    try:
        lines = migrating(src.uri, "vm").splitlines()
        assert lines[:2] == ["Job type:         Unbounded   ",
                             "Operation:        Outgoing migration"]
        assert re.fullmatch(r"Time elapsed:     \d+ +ms", lines[2])
        assert "Data total:       64.000 MiB" in lines
        assert "Memory total:     64.000 MiB" in lines
        assert "Page size:        4096         bytes" in lines
        assert any(re.fullmatch(r"Expected downtime: \d+ +ms", line) for line in lines)
        raw = ok(src.uri, "domjobinfo", "--rawstats", "vm").splitlines()
        assert raw[:3] == ["Job type: 2", "", "operation: 5"]
        assert "memory_total: 67108864" in raw
        incoming = ok(dst.uri, "domjobinfo", "vm").splitlines()
        assert incoming[:2] == ["Job type:         Unbounded   ",
                                "Operation:        Incoming migration"]

        watch = background(src.uri, "domjobinfo", "--watch", "vm")
        watched = read_until(watch, b"Operation:")
        assert ok(src.uri, "domjobabort", "vm") == ""
        out, err = mig.communicate(timeout=30)
        rest, watch_err = watch.communicate(timeout=30)
        watched += rest
    finally:
        stop_process(mig)
        if watch is not None:
            stop_process(watch)
    assert (mig.returncode, out, err.decode()) == (1, b"", ABORTED)
    # The watch printed blocks as the job went, and ended with the cancelled job's record.
    assert (watch.returncode, watch_err) == (0, b"")
    blocks = watched.decode().split("\n\n")
    assert blocks[0].startswith("Job type:         Unbounded   \nOperation:        Outgoing "
                                "migration\n")
    assert blocks[-1] == "Job type:         Cancelled   \n"

    assert ok(src.uri, "domstate", "--reason", "vm") == "running (migration-canceled)\n"
    assert ok(dst.uri, "list", "--all") == EMPTY_LIST
    assert ok(src.uri, "domjobinfo", "vm") == "Job type:         None        \n"
    assert ok(src.uri, "domjobinfo", "--completed", "vm") == "Job type:         Cancelled   \n"
    assert "Error message:    operation aborted: job 'migration out' canceled by client\n" in ok(
        src.uri, "domjobinfo", "--completed", "--anystats", "vm")
    assert fails(src.uri, "domjobabort", "vm") == NO_JOB

    # A migration that completes: the completed job's statistics on both sides.
    assert ok(src.uri, "migrate", "--live", "vm", dst.uri) == ""
    done = ok(src.uri, "domjobinfo", "--completed", "vm").splitlines()
    assert done[:2] == ["Job type:         Completed   ", "Operation:        Outgoing migration"]
    assert "Data remaining:   0.000 B" in done
    assert any(re.fullmatch(r"Total downtime:   \d+ +ms", line) for line in done)
    assert not any(line.startswith("Expected downtime:") for line in done)
    raw = ok(src.uri, "domjobinfo", "--completed", "--keep-completed", "--rawstats",
             "vm").splitlines()
    assert raw[:3] == ["Job type: 3", "", "operation: 5"]
    assert "memory_total: 67108864" in raw and "data_remaining: 0" in raw
    incoming = ok(dst.uri, "domjobinfo", "--completed", "vm").splitlines()
    assert incoming[:2] == ["Job type:         Completed   ",
                            "Operation:        Incoming migration"]
    # No job: --watch prints the one block and ends.
    assert ok(dst.uri, "domjobinfo", "--watch", "vm") == "Job type:         None        \n"


def test_speed_and_downtime(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, _dst = daemons
    start_guest(tmp_path, src.uri, "vm")
    assert ok(src.uri, "migrate-setspeed", "vm", "100") == ""
    assert ok(src.uri, "migrate-getspeed", "vm") == "100\n"
    assert ok(src.uri, "migrate-setspeed", "--postcopy", "--domain", "vm", "--bandwidth", "7") == ""
    assert ok(src.uri, "migrate-getspeed", "--postcopy", "vm") == "7\n"
    assert ok(src.uri, "migrate-getspeed", "vm") == "100\n"
    assert ok(src.uri, "migrate-setmaxdowntime", "vm", "--downtime", "250") == ""
    assert ok(src.uri, "migrate-getmaxdowntime", "vm") == "250\n"
    assert ok(src.uri, "migrate-setmaxdowntime", "vm", "42") == ""
    assert ok(src.uri, "migrate-getmaxdowntime", "vm") == "42\n"

    assert fails(src.uri, "migrate-setmaxdowntime", "vm", "0") == (
        "error: migrate: Invalid downtime\n")
    assert fails(src.uri, "migrate-setmaxdowntime", "vm", "--downtime=-5") == (
        "error: migrate: Invalid downtime\n")
    assert fails(src.uri, "migrate-setmaxdowntime", "vm", "soon") == (
        "error: Numeric value 'soon' for <downtime> option is malformed or out of range\n")
    assert ok(src.uri, "migrate-getmaxdowntime", "vm") == "42\n"
    # virsh wraps a negative bandwidth around; the daemon refuses the result.
    assert fails(src.uri, "migrate-setspeed", "vm", "--bandwidth=-1") == (
        "error: invalid argument: bandwidth must be less than 8796093022208\n")
    assert fails(src.uri, "migrate-postcopy", "vm") == (
        "error: Requested operation is not valid: post-copy can only be started while "
        "outgoing migration is in progress\n")
    assert fails(src.uri, "migrate-getspeed", "nosuch") == "error: failed to get domain 'nosuch'\n"


def test_event_command(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "vm")
    res = virtmig(src.uri, "event", "--all", "--timeout", "1")
    assert (res.returncode, res.stdout, res.stderr) == (
        1, "event loop timed out\nevents received: 0\n", "")

    # One-shot: the first lifecycle event ends it (suspend/resume until it has subscribed).
    once = background(src.uri, "event", "--event", "lifecycle", "--domain", "vm")
    try:
        def answered() -> bool:
            ok(src.uri, "suspend", "vm")
            ok(src.uri, "resume", "vm")
            return once.poll() is not None

        wait_until_sync(answered, timeout=30, interval=0.1, what="a one-shot event")
        out, err = once.communicate(timeout=10)
    finally:
        stop_process(once)
    assert (once.returncode, err) == (0, b"")
    assert re.fullmatch(r"event 'lifecycle' for domain 'vm': (Suspended Paused|Resumed Unpaused)\n"
                        r"events received: 1\n", out.decode())

    # A loop on the source during a migration, ended by Ctrl-C (an upper bound as --timeout).
    loop = background(src.uri, "event", "--all", "--loop", "--timeout", "60", "--domain", "vm")
    try:
        def subscribed() -> bool:
            ok(src.uri, "suspend", "vm")
            ok(src.uri, "resume", "vm")
            assert loop.stdout is not None
            return bool(select.select([loop.stdout], [], [], 0.5)[0])

        wait_until_sync(subscribed, timeout=30, interval=0.1, what="the event loop to subscribe")
        assert ok(src.uri, "migrate", "--live", "vm", dst.uri) == ""
        seen = read_until(loop, b"Stopped Migrated\n")
        loop.send_signal(signal.SIGINT)
        out, err = loop.communicate(timeout=10)
    finally:
        stop_process(loop)
    text = (seen + out).decode()
    assert (loop.returncode, err) == (0, b"")
    assert "event 'lifecycle' for domain 'vm': Suspended Migrated\n" in text
    assert "event 'lifecycle' for domain 'vm': Stopped Migrated\n" in text
    assert "event 'job-completed' for domain 'vm':\n\toperation: 5\n" in text
    assert "\tmemory_total: 67108864\n" in text
    count = len(re.findall(r"^event '", text, re.MULTILINE))
    assert text.endswith(f"event loop interrupted\nevents received: {count}\n")


def test_interrupt_aborts_the_migration(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "big")
    # 64 MiB at 4 MiB/s: interrupted once the first progress line shows.
    proc = background(src.uri, "migrate", "--live", "--verbose", "--bandwidth", "4", "big",
                      dst.uri)
    try:
        seen = read_until(proc, b"Migration: [", stderr=True)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    text = (seen + err).decode()
    assert proc.returncode == 1
    assert out == b""
    # Like virsh: Ctrl-C aborts the job, and the migration's own failure is reported.
    assert text.endswith("\n" + ABORTED)
    assert "Traceback" not in text and "interrupted" not in text
    assert ok(src.uri, "domstate", "--reason", "big") == "running (migration-canceled)\n"
    assert ok(dst.uri, "list", "--all") == EMPTY_LIST


def test_timeout_suspends_a_migration_that_cannot_converge(daemons: tuple[Daemon, Daemon],
                                                           tmp_path: Path) -> None:
    src, dst = daemons
    # Dirtying 64 MiB/s with 16 MiB/s to send: live, it never ends; suspended, it does.
    start_guest(tmp_path, src.uri, "busy", memory_mib=32, dirty_rate_mib=64)
    res = virtmig(src.uri, "migrate", "--live", "--verbose", "--timeout", "1", "--bandwidth",
                  "16", "busy", dst.uri)
    assert res.returncode == 0, res.stderr
    assert res.stderr.endswith("\rMigration: [100.00 %]\n")
    assert ok(dst.uri, "domstate", "--reason", "busy") == "running (migrated)\n"
    assert ok(src.uri, "domstate", "--reason", "busy") == "shut off (migrated)\n"


# These need post-copy in the daemon's backend.  The completion timeout (8 s for 32 MiB) is a
# safety net: without a switch to post-copy the migration is aborted instead of running forever.
SAFETY_NET = ("--completion-timeout", "256", "--completion-timeout-action", "abort")


def test_timeout_switches_to_postcopy(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "busy", memory_mib=32, dirty_rate_mib=64)
    res = virtmig(src.uri, "migrate", "--live", "--postcopy", "--timeout", "1",
                  "--timeout-postcopy", "--bandwidth", "16", *SAFETY_NET, "busy", dst.uri)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert ok(dst.uri, "domstate", "busy") == "running\n"
    assert ok(src.uri, "domstate", "--reason", "busy") == "shut off (migrated)\n"


def test_postcopy_after_precopy(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "busy", memory_mib=32, dirty_rate_mib=64)
    res = virtmig(src.uri, "migrate", "--live", "--postcopy", "--postcopy-after-precopy",
                  "--bandwidth", "16", *SAFETY_NET, "busy", dst.uri)
    assert (res.returncode, res.stdout, res.stderr) == (0, "", "")
    assert ok(dst.uri, "domstate", "busy") == "running\n"
    assert ok(src.uri, "domstate", "--reason", "busy") == "shut off (migrated)\n"
