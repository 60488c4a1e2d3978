"""virsh conformance: virsh 9.0's text for each case, as read from its sources
(``tools/virsh-domain-monitor.c``, ``tools/virsh-domain.c``, ``tools/vsh.c``,
``src/util/virerror.c``), against what virtmig prints.

The tables are the reference: each row is one string a script or a person reads.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.client import cli_helpers
from tests.client.cli_helpers import (
    Daemon,
    domain_xml,
    ok,
    start_guest,
    virtmig,
)
from virtmig.client.cli import JOB_TYPE_LABELS
from virtmig.proto import errors
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.flags import (
    MAX_BANDWIDTH_MIB,
    DomainState,
    JobType,
    MigrateFlags,
    PausedReason,
    RunningReason,
    ShutoffReason,
    reason_label,
)
from virtmig.proto.params import MigrateParam as P
from virtmig.proto.params import TypedParams
from virtmig.proto.wire import to_wire
from virtmig.testing import Host, free_port_range, hosts, wait_until_sync

daemons = cli_helpers.daemons

S = DomainState
F = MigrateFlags

# virshDomainStateToString / virshDomain*ReasonTypeToString: (state, reason) -> "state (reason)"
# as `domstate --reason` prints it.
STATE_REASONS = [
    (S.RUNNING, RunningReason.UNKNOWN, "running (unknown)"),
    (S.RUNNING, RunningReason.BOOTED, "running (booted)"),
    (S.RUNNING, RunningReason.MIGRATED, "running (migrated)"),
    (S.RUNNING, RunningReason.RESTORED, "running (restored)"),
    (S.RUNNING, RunningReason.FROM_SNAPSHOT, "running (from snapshot)"),
    (S.RUNNING, RunningReason.UNPAUSED, "running (unpaused)"),
    (S.RUNNING, RunningReason.MIGRATION_CANCELED, "running (migration canceled)"),
    (S.RUNNING, RunningReason.SAVE_CANCELED, "running (save canceled)"),
    (S.RUNNING, RunningReason.WAKEUP, "running (event wakeup)"),
    (S.RUNNING, RunningReason.CRASHED, "running (crashed)"),
    (S.RUNNING, RunningReason.POSTCOPY, "running (post-copy)"),
    (S.RUNNING, RunningReason.POSTCOPY_FAILED, "running (post-copy failed)"),
    (S.PAUSED, PausedReason.UNKNOWN, "paused (unknown)"),
    (S.PAUSED, PausedReason.USER, "paused (user)"),
    (S.PAUSED, PausedReason.MIGRATION, "paused (migrating)"),
    (S.PAUSED, PausedReason.SAVE, "paused (saving)"),
    (S.PAUSED, PausedReason.DUMP, "paused (dumping)"),
    (S.PAUSED, PausedReason.IOERROR, "paused (I/O error)"),
    (S.PAUSED, PausedReason.WATCHDOG, "paused (watchdog)"),
    (S.PAUSED, PausedReason.FROM_SNAPSHOT, "paused (from snapshot)"),
    (S.PAUSED, PausedReason.SHUTTING_DOWN, "paused (shutting down)"),
    (S.PAUSED, PausedReason.SNAPSHOT, "paused (creating snapshot)"),
    (S.PAUSED, PausedReason.CRASHED, "paused (crashed)"),
    (S.PAUSED, PausedReason.STARTING_UP, "paused (starting up)"),
    (S.PAUSED, PausedReason.POSTCOPY, "paused (post-copy)"),
    (S.PAUSED, PausedReason.POSTCOPY_FAILED, "paused (post-copy failed)"),
    (S.PAUSED, PausedReason.API_ERROR, "paused (api error)"),
    (S.SHUTOFF, ShutoffReason.UNKNOWN, "shut off (unknown)"),
    (S.SHUTOFF, ShutoffReason.SHUTDOWN, "shut off (shutdown)"),
    (S.SHUTOFF, ShutoffReason.DESTROYED, "shut off (destroyed)"),
    (S.SHUTOFF, ShutoffReason.CRASHED, "shut off (crashed)"),
    (S.SHUTOFF, ShutoffReason.MIGRATED, "shut off (migrated)"),
    (S.SHUTOFF, ShutoffReason.SAVED, "shut off (saved)"),
    (S.SHUTOFF, ShutoffReason.FAILED, "shut off (failed)"),
    (S.SHUTOFF, ShutoffReason.FROM_SNAPSHOT, "shut off (from snapshot)"),
    (S.SHUTOFF, ShutoffReason.DAEMON, "shut off (daemon)"),
    (S.SHUTDOWN, 1, "in shutdown (user)"),
    (S.CRASHED, 1, "crashed (panicked)"),
    (S.BLOCKED, 0, "idle (unknown)"),
    (S.PMSUSPENDED, 0, "pmsuspended (unknown)"),
    (S.NOSTATE, 0, "no state (unknown)"),
    (S.RUNNING, 99, "running (unknown)"),  # a reason virsh does not know
]


@pytest.mark.parametrize(("state", "reason", "virsh"), STATE_REASONS)
def test_state_and_reason_words(state: DomainState, reason: int, virsh: str) -> None:
    assert f"{state.label} ({reason_label(state, reason)})" == virsh


# virerror.c's virErrorMsg: each class's message, with and without a detail.
ERROR_FORMATS = [
    (errors.OperationInvalid, "Requested operation is not valid: %s",
     "Requested operation is not valid"),
    (errors.ConfigUnsupported, "unsupported configuration: %s", "unsupported configuration"),
    (errors.InternalError, "internal error: %s", "internal error"),
    # libvirt's internal errors that are the caller's input, or a resource (the gRPC status
    # says so: INVALID_ARGUMENT, RESOURCE_EXHAUSTED), in libvirt's words.
    (errors.InternalInputError, "internal error: %s", "internal error"),
    (errors.CookieError, "internal error: %s", "internal error"),
    (errors.PortsExhausted, "internal error: %s", "internal error"),
    (errors.Overflow, "numerical overflow: %s", "numerical overflow"),
    (errors.InvalidArgument, "invalid argument: %s", "invalid argument"),
    (errors.XMLError, "XML error: %s", "XML description is invalid or not well formed"),
    (errors.ArgumentUnsupported, "argument unsupported: %s", "argument unsupported"),
    (errors.OperationUnsupported, "Operation not supported: %s", "Operation not supported"),
    (errors.NoSupport, "this function is not supported by the connection driver: %s",
     "this function is not supported by the connection driver"),
    (errors.NoDomain, "Domain not found: %s", "Domain not found"),
    (errors.DomainExists, "domain %s exists already", "this domain exists already"),
    (errors.OperationFailed, "operation failed: %s", "operation failed"),
    (errors.OperationAborted, "operation aborted: %s", "operation aborted"),
    (errors.MigrateFinishOk, "migration successfully aborted: %s",
     "migration successfully aborted"),
    (errors.MigrateUnsafe, "Unsafe migration: %s", "Unsafe migration"),
    (errors.OperationTimeout, "Timed out during operation: %s", "Timed out during operation"),
    (errors.ResourceExhausted, "resource busy: %s", "resource busy"),
    (errors.PermissionDenied, "access denied: %s", "access denied"),
]


@pytest.mark.parametrize(("cls", "with_detail", "bare"), ERROR_FORMATS,
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_error_class_prefixes(cls: type[errors.VirtmigError], with_detail: str,
                              bare: str) -> None:
    assert str(cls("DETAIL")) == with_detail.replace("%s", "DETAIL")
    assert str(cls()) == bare


# The class libvirt 9.0 reports for each of these situations (its qemu driver, the port
# allocator), as the message reads; each row is driven through the daemons' RPCs below.
LIBVIRT_ERRORS = {
    "p2p-with-cookie": (errors.OperationInvalid, "FAILED_PRECONDITION",
                        "Requested operation is not valid: received unexpected cookie with P2P "
                        "migration"),
    "dconnuri-without-p2p": (errors.InternalInputError, "INVALID_ARGUMENT",
                             "internal error: Unexpected dconnuri parameter with non-peer2peer "
                             "migration"),
    "prepare-without-xml": (errors.InternalInputError, "INVALID_ARGUMENT",
                            "internal error: no domain XML passed"),
    "localhost-destination": (errors.InternalError, "INTERNAL",
                              "internal error: hostname on destination resolved to localhost, "
                              "but migration requires an FQDN"),
    "no-free-port": (errors.PortsExhausted, "RESOURCE_EXHAUSTED",
                     "internal error: Unable to find an unused port in range 'migration' "
                     "({lo}-{lo})"),
    "range-ports-bound": (errors.PortsExhausted, "RESOURCE_EXHAUSTED",
                          "internal error: Unable to find an unused port in range 'migration' "
                          "({lo}-{lo})"),
}


async def _libvirt_error(situation: str, src: Host, dst: Host, lo: int) -> None:
    """Make ``situation`` happen (the call that must fail)."""
    mig = src.conn.migration_stub
    ref = pb.DomainRef(name="vm1")
    if situation == "p2p-with-cookie":
        await src.conn._call(mig.Perform3Params, pb.Perform3ParamsRequest(
            domain=ref, dconnuri=dst.uri, cookie_in=b"x", flags=int(F.LIVE | F.PEER2PEER)))
    elif situation == "dconnuri-without-p2p":
        await src.conn._call(mig.Perform3Params, pb.Perform3ParamsRequest(
            domain=ref, dconnuri=dst.uri, flags=int(F.LIVE)))
    elif situation == "prepare-without-xml":
        await dst.conn._call(dst.conn.migration_stub.Prepare3Params,
                             pb.Prepare3ParamsRequest(flags=int(F.LIVE)))
    else:
        host = src if situation == "localhost-destination" else dst
        xml = await src.conn.xml_desc("vm1", migratable=True)
        if situation == "range-ports-bound":  # its one port is bound by another program
            with socket.socket() as busy:
                busy.bind(("127.0.0.1", lo))
                busy.listen()
                await dst.conn._call(dst.conn.migration_stub.Prepare2, pb.Prepare2Request(
                    dom_xml=xml, flags=int(F.LIVE)))
        if situation == "no-free-port":  # its one port is taken by another incoming guest
            await src.conn.define(domain_xml("other"))
            await dst.conn.open_session()
            for name in ("other", "vm1"):  # (v2's Prepare2: no cookie to make)
                await dst.conn._call(dst.conn.migration_stub.Prepare2, pb.Prepare2Request(
                    dom_xml=await src.conn.xml_desc(name, migratable=True), flags=int(F.LIVE)))
        await host.conn._call(host.conn.migration_stub.Prepare3Params, pb.Prepare3ParamsRequest(
            params=to_wire(TypedParams.of({P.DEST_XML: xml})), flags=int(F.LIVE)))


@pytest.mark.parametrize("situation", list(LIBVIRT_ERRORS))
async def test_libvirt_error_classes(situation: str, tmp_path: Path) -> None:
    cls, status, message = LIBVIRT_ERRORS[situation]
    lo = int(free_port_range(1).split("-")[0])
    # "src" also plays a destination whose host name is localhost (no migration_host).
    # (migration_port_wait 0: libvirt fails at once when no port is free, in these words.)
    async with hosts(tmp_path, "test",
                     ("src", {"hostname": "localhost.localdomain", "migration_host": ""}),
                     ("dst", {"migration_port_min": lo, "migration_port_max": lo,
                              "migration_port_wait": 0})) as (src, dst):
        await src.conn.define(domain_xml("vm1"))
        await src.conn.start("vm1")
        with pytest.raises(errors.VirtmigError) as info:
            await _libvirt_error(situation, src, dst, lo)
    assert type(info.value) is cls
    assert str(info.value) == message.format(lo=lo)
    assert info.value.status_name == status


# virshDomainJobTypeToString.
JOB_TYPES = [(JobType.NONE, "None"), (JobType.BOUNDED, "Bounded"),
             (JobType.UNBOUNDED, "Unbounded"), (JobType.COMPLETED, "Completed"),
             (JobType.FAILED, "Failed"), (JobType.CANCELLED, "Cancelled")]


@pytest.mark.parametrize(("jtype", "virsh"), JOB_TYPES)
def test_job_type_words(jtype: JobType, virsh: str) -> None:
    assert JOB_TYPE_LABELS[jtype] == virsh


def plain(uri: str, *args: str) -> tuple[int, str, str]:
    """``virtmig ARGS`` without ``-q``: as virsh prints, blank line included."""
    res = subprocess.run(
        [sys.executable, "-m", "virtmig.client.cli", "-c", uri, *args],
        capture_output=True, text=True, timeout=60)
    return res.returncode, res.stdout, res.stderr


def test_live_conformance(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "vm", memory_mib=64)

    # vsh.c: a blank line after every command it ran, failed ones too; -q leaves it out.
    assert plain(src.uri, "domstate", "vm") == (0, "running\n\n", "")
    assert plain(src.uri, "domstate", "nosuch") == (
        1, "\n", "error: failed to get domain 'nosuch'\n")
    assert plain(src.uri, "-q", "domstate", "vm") == (0, "running\n", "")
    assert plain(src.uri, "migrate", "--live", "--offline", "vm", dst.uri)[0] == 1

    # dominfo's "CPU time:" line ("%-15s %.1lfs").
    assert re.search(r"^CPU time:       \d+\.\ds$", ok(src.uri, "dominfo", "vm"), re.M)

    # migrate-getspeed: "unlimited" is QEMU_DOMAIN_MIG_BANDWIDTH_MAX; a running migration's
    # own --bandwidth while it runs.
    assert ok(src.uri, "migrate-getspeed", "vm") == f"{MAX_BANDWIDTH_MIB}\n"
    assert MAX_BANDWIDTH_MIB == 8796093022207
    proc = cli_helpers.background(src.uri, "migrate", "--live", "--bandwidth", "1", "vm",
                                  dst.uri)
    try:
        # Streaming: the job has figures (before, in Begin and Prepare, no limit is set yet).
        wait_until_sync(lambda: "Data total:" in ok(src.uri, "domjobinfo", "vm"), timeout=30,
                        interval=0.1, what="the migration to stream")
        assert ok(src.uri, "migrate-getspeed", "vm") == "1\n"
        ok(src.uri, "domjobabort", "vm")
        _out, err = proc.communicate(timeout=30)
    finally:
        cli_helpers.stop_process(proc)
    assert proc.returncode == 1 and err.decode() == cli_helpers.ABORTED
    # Aborted before the switchover: never stopped, the guest stays as it was (libvirt).
    assert ok(src.uri, "domstate", "--reason", "vm") == "running (booted)\n"
    # libvirt 9.0 keeps no statistics of an aborted job (--anystats shows virtmig's record).
    assert ok(src.uri, "domjobinfo", "--completed", "vm") == "Job type:         None        \n"
    anystats = ok(src.uri, "domjobinfo", "--completed", "--anystats", "vm")
    assert anystats.startswith("Job type:         Cancelled   \n")

    # --timeout 0 is taken (no timeout), and the destination's completed job has the figures.
    assert ok(src.uri, "migrate", "--live", "--timeout", "0", "vm", dst.uri) == ""
    done = ok(dst.uri, "domjobinfo", "--completed", "vm")
    assert done.startswith("Job type:         Completed   \n"
                           "Operation:        Incoming migration\n"), done
    for label in ("Time elapsed:", "Data processed:", "Memory total:", "Total downtime:"):
        assert re.search(rf"^{label}", done, re.M), (label, done)
    # Both sides report the same downtime, counted from the source's stop (libvirt's).
    total = re.compile(r"^Total downtime: .*$", re.M)
    assert total.findall(done) == total.findall(ok(src.uri, "domjobinfo", "--completed", "vm"))
    # ... which is not 0 ms: the guest stops on the source and resumes after Finish3 (RPCs
    # apart), not in the same millisecond.
    downtime = re.search(r"^Total downtime:\s+(\d+)\s+ms$", done, re.M)
    assert downtime is not None and int(downtime.group(1)) > 0, done

    # create FILE: a transient domain, started.
    xml = tmp_path / "tr.xml"
    xml.write_text(domain_xml("tr"))
    assert ok(src.uri, "create", str(xml)) == f"Domain 'tr' created from {xml}\n"
    assert ok(src.uri, "list", "--transient", "--name") == "tr\n"
    res = virtmig(src.uri, "create", str(xml))
    assert res.returncode == 1 and res.stderr.startswith(
        f"error: Failed to create domain from {xml}\n"
        "error: operation failed: domain 'tr' already exists with uuid ")
    # migrate-compcache: the test backend has no compression cache; refused in libvirt's words
    # for a driver without the API (set first with --size, as virsh calls it first).
    res = virtmig(src.uri, "migrate-compcache", "tr")
    assert res.stderr == ("error: this function is not supported by the connection driver: "
                          "virDomainMigrateGetCompressionCache\n")
    res = virtmig(src.uri, "migrate-compcache", "tr", "--size", "100")
    assert res.stderr == ("error: this function is not supported by the connection driver: "
                          "virDomainMigrateSetCompressionCache\n")
    res = virtmig(src.uri, "migrate-compcache", "tr", "--size", "-1")
    assert res.stderr == ("error: Numeric value '-1' for <size> option is malformed or out of "
                          "range\n")
