"""The ``virtmig`` CLI's job control against two real ``virtmigd`` processes: ``domjobinfo``,
``domjobabort``, speed and downtime, events, interrupts, completion timeouts and post-copy.
"""

from __future__ import annotations

import json
import re
import select
import signal
import subprocess
from pathlib import Path

from tests.client import cli_helpers
from tests.client.cli_helpers import (
    ABORTED,
    EMPTY_LIST,
    NO_JOB,
    Daemon,
    background,
    fails,
    ok,
    read_until,
    start_guest,
    stop_process,
    virtmig,
)
from virtmig.testing import wait_until_sync

# The shared fixtures, bound here so that pytest finds them.
daemons = cli_helpers.daemons


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

    # Aborted before the switchover: the guest was never stopped (libvirt leaves it as it was).
    assert ok(src.uri, "domstate", "--reason", "vm") == "running (booted)\n"
    assert ok(dst.uri, "list", "--all") == EMPTY_LIST
    assert ok(src.uri, "domjobinfo", "vm") == "Job type:         None        \n"
    # libvirt 9.0 keeps no statistics of an aborted job; --anystats shows virtmig's record.
    assert ok(src.uri, "domjobinfo", "--completed", "vm") == "Job type:         None        \n"
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
    # virsh wraps a negative bandwidth around; the library (and the daemon) refuse the result.
    assert fails(src.uri, "migrate-setspeed", "vm", "--bandwidth=-1") == (
        "error: numerical overflow: bandwidth must be less than 8796093022208\n")
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
    # Like virsh: Ctrl-C aborts the job, and the migration's own failure is reported (after
    # the migration's id, as --verbose prints it, here on stderr).
    [entry] = json.loads(ok(src.uri, "migrate-history", "big", "--json"))
    assert text.endswith(f"\nMigration id: {entry['migration_id']}\n" + ABORTED)
    assert "Traceback" not in text and "interrupted" not in text
    assert ok(src.uri, "domstate", "--reason", "big") == "running (booted)\n"
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
