"""``virtmig``: the virsh-like command-line client, a thin shell over :class:`AsyncConnection`.

Commands, options, messages and layouts follow virsh (reference §8)::

    virtmig [-c URI | --connect URI] COMMAND [OPTIONS] [ARGS]

Like virsh, a command's "data" options may be given by name or by position: ``migrate --live
vm1 virtmig+tcp://host-b`` is ``migrate --live --domain vm1 --desturi virtmig+tcp://host-b``.

Every failure is one ``error: <message>`` line (or virsh's two: what failed, then why) on stderr
and exit status 1; a user never sees a Python traceback.  The two virsh habits not copied: the
blank line virsh prints after every command, and the interactive shell.

Ctrl-C during ``migrate`` aborts the migration job (virsh's ``virDomainAbortJob``) and waits for
the migration call to report it; a second Ctrl-C gives up at once.  virtmig's own additions are
marked as such in the help: ``domjobinfo --watch``, the ``job-failed`` event, and ``migrate
--stall-timeout/--completion-timeout/--completion-timeout-action``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import logging
import os
import re
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from virtmig import __version__
from virtmig.client.connection import AsyncConnection, Domain, Event, JobInfo
from virtmig.proto.errors import NoDomain, OperationInvalid, VirtmigError
from virtmig.proto.flags import (
    COMPLETION_ACTIONS,
    DomainState,
    JobOperation,
    JobType,
    MigrateFlags,
)
from virtmig.proto.params import MigrateParam, ParamType, TypedParams

T = TypeVar("T")

F = MigrateFlags
P = MigrateParam

log = logging.getLogger(__name__)

# Before the source's job exists (Begin, Prepare), a job watch has nothing to follow: it is
# opened again after this long.  Once the job exists, the daemon pushes every change.
JOB_WATCH_RETRY = 0.2
# Ctrl-C before the source's job exists: the abort is tried again after this long.
ABORT_RETRY = 0.2


# --- errors ---------------------------------------------------------------------------------------


class CliError(Exception):
    """A failure the CLI reports itself: each line becomes one ``error: <line>``."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0] if lines else "")
        self.lines = lines


class UsageError(CliError):
    """Bad command line (argparse's errors included)."""


class _Parser(argparse.ArgumentParser):
    """argparse without its ``exit(2)``: errors become :class:`UsageError`."""

    def __init__(self, *, label: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.label}: {message}" if self.label else message)


def _err(line: str) -> None:
    sys.stdout.flush()
    print(f"error: {line}", file=sys.stderr, flush=True)


# --- pure helpers: tables, progress, migration options ------------------------------------------


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """virsh's ``vshTable``: cells left-aligned, each preceded by a space, 2 spaces of padding
    after every cell but the last; a dash line of (column width + 3) per column."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        out = []
        for i, cell in enumerate(cells):
            out.append(f" {cell}")
            if i < len(cells) - 1:
                out.append(" " * (widths[i] - len(cell) + 2))
        return "".join(out) + "\n"

    text = line(header) + "-" * sum(w + 3 for w in widths) + "\n"
    return text + "".join(line(r) for r in rows)


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
    downtime = _ullong(info, "downtime")
    if downtime is not None:
        number("Total downtime:" if info.type is JobType.COMPLETED else "Expected downtime:",
               downtime, "ms")
    stat("Downtime w/o network:", "downtime_net", "ms")
    stat("Setup time:", "setup_time", "ms")
    if (cache := _ullong(info, "compression_cache")) is not None:
        capacity("Compression cache:", cache)
    if (compressed := _ullong(info, "compression_bytes")) is not None:
        capacity("Compressed data:", compressed)
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
    return "".join(out)


def format_job_rawstats(info: JobInfo) -> str:
    """virsh's ``domjobinfo --rawstats``: the numeric job type, a blank line, the raw stats."""
    return f"Job type: {int(info.type)}\n\n" + "".join(
        f"{name}: {value}\n" for name, value in job_params(info))


# ``event --event`` names: libvirt's, plus virtmig's ``job-failed``.
EVENT_NAMES = ("lifecycle", "migration-iteration", "job-completed", "job-failed")


def event_timestamp(ms: int) -> str:
    """virsh's ``virTimeStringNowRaw``: UTC, milliseconds, ``+0000``."""
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
        ms = ev.timestamp_ms or int(datetime.datetime.now(datetime.UTC).timestamp() * 1000)
        text = f"{event_timestamp(ms)}: {text}"
    return text


@dataclass(frozen=True)
class MigrateOptions:
    """What ``migrate`` does besides the library call: watch the job, and how to call."""

    flags: MigrateFlags
    params: TypedParams
    verbose: bool = False
    # ``--p2p`` or ``--direct``: migrate_to_uri3 instead of migrate3.
    unmanaged: bool = False
    # ``--timeout``: seconds (0: none) after which ``timeout_action`` runs once on the source.
    timeout: int = 0
    timeout_action: str = "suspend"  # or "postcopy"
    # ``--postcopy-after-precopy``: switch to post-copy once the first full pass is done.
    postcopy_after_precopy: bool = False


# Boolean options → flag, in virsh's order.
MIGRATE_FLAG_OPTIONS: tuple[tuple[str, MigrateFlags], ...] = (
    ("live", F.LIVE),
    ("p2p", F.PEER2PEER),
    ("tunnelled", F.TUNNELLED),
    ("persistent", F.PERSIST_DEST),
    ("undefinesource", F.UNDEFINE_SOURCE),
    ("suspend", F.PAUSED),
    ("copy_storage_all", F.NON_SHARED_DISK),
    ("copy_storage_inc", F.NON_SHARED_INC),
    ("copy_storage_synchronous_writes", F.NON_SHARED_SYNCHRONOUS_WRITES),
    ("change_protection", F.CHANGE_PROTECTION),
    ("unsafe", F.UNSAFE),
    ("compressed", F.COMPRESSED),
    ("auto_converge", F.AUTO_CONVERGE),
    ("rdma_pin_all", F.RDMA_PIN_ALL),
    ("offline", F.OFFLINE),
    ("abort_on_error", F.ABORT_ON_ERROR),
    ("postcopy", F.POSTCOPY),
    ("postcopy_resume", F.POSTCOPY_RESUME),
    ("zerocopy", F.ZEROCOPY),
    ("tls", F.TLS),
    ("parallel", F.PARALLEL),
)

# Valued options → param: (dest, wire name, how the value is read).  "list" splits on commas
# into a repeated string param, "file" reads the named file.
MIGRATE_PARAM_OPTIONS: tuple[tuple[str, MigrateParam, str], ...] = (
    ("migrateuri", P.URI, "string"),
    ("graphicsuri", P.GRAPHICS_URI, "string"),
    ("listen_address", P.LISTEN_ADDRESS, "string"),
    ("disks_port", P.DISKS_PORT, "int"),
    ("disks_uri", P.DISKS_URI, "string"),
    ("dname", P.DEST_NAME, "string"),
    ("migrate_disks", P.MIGRATE_DISKS, "list"),
    ("comp_methods", P.COMPRESSION, "list"),
    ("comp_mt_level", P.COMPRESSION_MT_LEVEL, "int"),
    ("comp_mt_threads", P.COMPRESSION_MT_THREADS, "int"),
    ("comp_mt_dthreads", P.COMPRESSION_MT_DTHREADS, "int"),
    ("comp_xbzrle_cache", P.COMPRESSION_XBZRLE_CACHE, "ullong"),
    ("comp_zlib_level", P.COMPRESSION_ZLIB_LEVEL, "int"),
    ("comp_zstd_level", P.COMPRESSION_ZSTD_LEVEL, "int"),
    ("xml", P.DEST_XML, "file"),
    ("persistent_xml", P.PERSIST_XML, "file"),
    ("auto_converge_initial", P.AUTO_CONVERGE_INITIAL, "int"),
    ("auto_converge_increment", P.AUTO_CONVERGE_INCREMENT, "int"),
    ("postcopy_bandwidth", P.BANDWIDTH_POSTCOPY, "ullong"),
    ("parallel_connections", P.PARALLEL_CONNECTIONS, "int"),
    ("tls_destination", P.TLS_DESTINATION, "string"),
    ("bandwidth", P.BANDWIDTH, "ullong"),
    # virtmig's own.
    ("stall_timeout", P.STALL_TIMEOUT, "ullong"),
    ("completion_timeout", P.COMPLETION_TIMEOUT, "ullong"),
    ("completion_timeout_action", P.COMPLETION_TIMEOUT_ACTION, "string"),
)

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
_LLONG_MIN, _LLONG_MAX = -(2**63), 2**63 - 1
_ULLONG_MAX = 2**64 - 1
_DECIMAL = re.compile(r"[+-]?[0-9]+")


def _option(dest: str) -> str:
    return dest.replace("_", "-")


def _number(dest: str, text: str, lo: int, hi: int) -> int:
    """virsh's ``vshCommandOpt{Int,UInt,ULongLong}``: decimal, in range, or the virsh error."""
    if not _DECIMAL.fullmatch(text) or not lo <= int(text, 10) <= hi:
        raise UsageError(
            f"Numeric value '{text}' for <{_option(dest)}> option is malformed or out of range"
        )
    return int(text, 10)


def read_file(path: str, *context: str) -> str:
    """virsh's ``virFileReadAll``: the content, or ``Failed to open file``, after ``context``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(*context, f"Failed to open file '{path}': {reason}") from None


def _exclusive(args: argparse.Namespace, a: str, b: str) -> None:
    if getattr(args, a) and getattr(args, b):
        raise UsageError(f"Options --{_option(a)} and --{_option(b)} are mutually exclusive")


def _require(args: argparse.Namespace, option: str, required: str) -> None:
    """virsh's ``VSH_REQUIRE_OPTION(option, required)``."""
    if getattr(args, option) and not getattr(args, required):
        raise UsageError(f"Option --{_option(required)} is required by option --{_option(option)}")


def build_migration(args: argparse.Namespace) -> MigrateOptions:
    """Check ``migrate``'s options as virsh does and build the flags and typed params.

    Pure apart from reading the ``--xml``/``--persistent-xml`` files.  The client acts on
    ``--timeout*`` and ``--postcopy-after-precopy`` itself while it watches the job; everything
    else goes to the library and the daemons, which refuse what they cannot do.
    """
    _exclusive(args, "live", "offline")
    _exclusive(args, "timeout_suspend", "timeout_postcopy")
    _require(args, "postcopy_after_precopy", "postcopy")
    _require(args, "timeout_postcopy", "postcopy")
    _require(args, "persistent_xml", "persistent")

    timeout = 0
    if args.timeout is not None:
        # Seconds, > 0, and convertible to milliseconds in an int (vshCommandOptTimeoutToMs).
        timeout = _number("timeout", args.timeout, 1, _INT_MAX // 1000)
        if not args.live:
            raise UsageError("migrate: Unexpected timeout for offline migration")
    if not timeout and (args.timeout_suspend or args.timeout_postcopy):
        raise UsageError("migrate: Unexpected --timeout-* option without --timeout")

    params = TypedParams()
    for dest, name, kind in MIGRATE_PARAM_OPTIONS:
        raw = getattr(args, dest)
        if raw is None:
            continue
        if kind == "string":
            params.add(name, raw, ParamType.STRING)
        elif kind == "list":
            for item in raw.split(","):
                params.add(name, item, ParamType.STRING)
        elif kind == "file":
            params.add(name, read_file(raw, f"cannot read file '{raw}'"), ParamType.STRING)
        elif kind == "int":
            params.add(name, _number(dest, raw, _INT_MIN, _INT_MAX), ParamType.INT)
        else:
            params.add(name, _number(dest, raw, 0, _ULLONG_MAX), ParamType.ULLONG)

    flags = F(0)
    for dest, flag in MIGRATE_FLAG_OPTIONS:
        if getattr(args, dest):
            flags |= flag
    return MigrateOptions(flags, params, verbose=bool(args.verbose),
                          unmanaged=bool(args.p2p or args.direct), timeout=timeout,
                          timeout_action="postcopy" if args.timeout_postcopy else "suspend",
                          postcopy_after_precopy=bool(args.postcopy_after_precopy))


# --- connections ----------------------------------------------------------------------------------


class Session:
    """The command's connections: the ``-c`` one, opened on first use, plus any others."""

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._conn: AsyncConnection | None = None
        self._opened: list[AsyncConnection] = []

    async def conn(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self.open(self.uri, "failed to connect to the hypervisor")
        return self._conn

    async def open(self, uri: str | None, what: str) -> AsyncConnection:
        try:
            conn = await AsyncConnection.open(uri)
        except VirtmigError as exc:
            raise CliError(what, str(exc)) from None
        self._opened.append(conn)
        return conn

    async def close(self) -> None:
        for conn in reversed(self._opened):
            with contextlib.suppress(Exception):
                await conn.close()
        self._opened.clear()


async def lookup(conn: AsyncConnection, key: str) -> Domain:
    """virsh's ``virshCommandOptDomain``: by id, UUID or name, or "failed to get domain"."""
    try:
        return await conn.lookup(key)
    except NoDomain:
        raise CliError(f"failed to get domain '{key}'") from None


async def _act(what: str, call: Awaitable[T]) -> T:
    """virsh's two-line failure: what the command could not do, then the library's reason."""
    try:
        return await call
    except VirtmigError as exc:
        raise CliError(what, str(exc)) from None


# --- commands -------------------------------------------------------------------------------------

Handler = Callable[[Session, argparse.Namespace], Awaitable[None]]


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    handler: Handler
    # virsh "data" options, in positional order; each can also be given as --NAME.
    data: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    setup: Callable[[argparse.ArgumentParser], None] | None = None
    metavars: dict[str, str] = field(default_factory=dict)


async def cmd_list(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    inactive = bool(args.all or args.inactive)
    active = bool(args.all or not args.inactive)
    doms = await conn.list_domains(active=active, inactive=inactive)
    # virsh's order: running domains by id, then inactive ones by name (case-insensitive).
    doms.sort(key=lambda d: (0, d.id, "") if d.id >= 0 else (1, 0, d.name.lower()))
    rows = [[str(d.id) if d.id >= 0 else "-", d.name, d.state.label] for d in doms]
    sys.stdout.write(format_table(["Id", "Name", "State"], rows))


async def cmd_define(s: Session, args: argparse.Namespace) -> None:
    xml = read_file(args.file)
    conn = await s.conn()
    dom = await _act(f"Failed to define domain from {args.file}", conn.define(xml))
    print(f"Domain '{dom.name}' defined from {args.file}")


async def cmd_undefine(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    await _act(f"Failed to undefine domain '{dom.name}'", conn.undefine(dom))
    print(f"Domain '{dom.name}' has been undefined")


async def cmd_start(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    if dom.id >= 0:
        raise CliError("Domain is already active")
    await _act(f"Failed to start domain '{dom.name}'", conn.start(dom, paused=args.paused))
    print(f"Domain '{dom.name}' started")


def _simple(verb: str, done: str, call: Callable[[AsyncConnection, Domain], Awaitable[None]]
            ) -> Handler:
    async def handler(s: Session, args: argparse.Namespace) -> None:
        conn = await s.conn()
        dom = await lookup(conn, args.domain)
        await _act(f"Failed to {verb} domain '{dom.name}'", call(conn, dom))
        print(f"Domain '{dom.name}' {done}")

    return handler


async def cmd_dominfo(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    info = await conn.info(dom)
    d = info.domain
    lines = [
        ("Id:", str(d.id) if d.id >= 0 else "-"),
        ("Name:", d.name),
        ("UUID:", d.uuid),
        ("OS Type:", info.os_type),
        ("State:", d.state.label),
        ("CPU(s):", str(info.vcpus)),
    ]
    if info.cpu_time_ns:
        lines.append(("CPU time:", f"{info.cpu_time_ns / 1e9:.1f}s"))
    lines += [
        ("Max memory:", f"{info.max_memory_kib} KiB"),
        ("Used memory:", f"{info.memory_kib} KiB"),
        ("Persistent:", "yes" if d.persistent else "no"),
        ("Autostart:", "disable"),
        ("Managed save:", "no"),
        ("Security model:", "none"),
        ("Security DOI:", "0"),
    ]
    for label, value in lines:
        print(f"{label:<15} {value}")


async def cmd_domstate(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    state, _reason, reason_name = await conn.state(dom)
    label = DomainState(state).label
    print(f"{label} ({reason_name})" if args.reason else label)


async def cmd_dumpxml(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    xml = await conn.xml_desc(dom, inactive=args.inactive, migratable=args.migratable)
    sys.stdout.write(xml if xml.endswith("\n") else xml + "\n")


async def cmd_hostname(s: Session, args: argparse.Namespace) -> None:
    print((await (await s.conn()).host()).hostname)


async def cmd_version(s: Session, args: argparse.Namespace) -> None:
    host = await (await s.conn()).host()
    print(f"Compiled against library: virtmig {__version__}")
    print(f"Using library: virtmig {__version__}")
    print(f"Using API: virtmig {host.version}")
    print(f"Running hypervisor: {host.backend} {host.version}")


async def cmd_nodeinfo(s: Session, args: argparse.Namespace) -> None:
    host = await (await s.conn()).host()
    lines = [
        ("CPU model:", host.arch),
        ("CPU(s):", str(host.cpus)),
        ("Memory size:", f"{host.memory_kib} KiB"),
        ("Host UUID:", host.host_uuid),
        ("Backend:", host.backend),
        ("Features:", " ".join(sorted(host.features))),
    ]
    for label, value in lines:
        print(f"{label:<20} {value}")


@contextlib.contextmanager
def on_sigint(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` on the event loop for each SIGINT while the block runs (instead of
    asyncio.run's cancel-and-raise); the previous handler is back afterwards."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not main thread)
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if previous is not None:  # None: not set from Python, nothing to put back
            signal.signal(signal.SIGINT, previous)


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


_RUNNING_JOBS = (JobType.BOUNDED, JobType.UNBOUNDED)


async def _show_progress(conn: AsyncConnection, dom: Domain, work: asyncio.Future[object],
                         line: ProgressLine) -> None:
    """Follow the source's job as the daemon pushes it (``watch_job``) and keep the progress
    line; until the job exists (Begin, Prepare) the watch is opened again."""
    seen = False
    while not work.done():
        try:
            async for info in conn.watch_job(dom):
                if info.type not in _RUNNING_JOBS:
                    continue  # not started yet, or its final record: the call reports
                seen = True
                progress = job_progress(info.data_remaining, info.data_total)
                if progress is not None and not work.done():
                    line.show(progress)
        except VirtmigError as exc:
            log.debug("cannot watch the job of %s: %s", dom.name, exc)  # the call decides
        if seen:
            return
        await asyncio.sleep(JOB_WATCH_RETRY)


async def _abort(conn: AsyncConnection, dom: Domain, work: asyncio.Future[object]) -> None:
    """Ctrl-C: virsh's ``virDomainAbortJob`` on the source; before the job exists (Begin,
    Prepare), tried again until it does or the call ends.  Failures are only logged: the
    migration call's own result is reported."""
    while not work.done():
        try:
            await conn.abort_job(dom)
            return
        except OperationInvalid as exc:
            if "no job is active" not in str(exc):
                log.debug("cannot abort the migration of %s: %s", dom.name, exc)
                return
        except VirtmigError as exc:
            log.debug("cannot abort the migration of %s: %s", dom.name, exc)
            return
        await asyncio.sleep(ABORT_RETRY)


async def _after_timeout(conn: AsyncConnection, dom: Domain, seconds: int, action: str) -> None:
    """virsh's ``virshMigrateTimeout``: once, suspend the source or switch to post-copy;
    a failure is only logged."""
    await asyncio.sleep(seconds)
    try:
        if action == "postcopy":
            log.debug("migration timed out; switching to post-copy")
            await conn.start_postcopy(dom)
        else:
            log.debug("migration timed out; suspending domain")
            await conn.suspend(dom)
    except VirtmigError as exc:
        log.debug("migration timeout action %s failed: %s", action, exc)


async def _postcopy_after_precopy(conn: AsyncConnection, dom: Domain) -> None:
    """virsh's ``virshMigrateIteration``: switch to post-copy when iteration 2 starts (the
    first full pass is done); ``>= 2`` so that a missed event does not lose the switch."""
    try:
        async for ev in conn.events(dom):
            if ev.kind == "migration-iteration" and ev.iteration >= 2:
                log.debug("iteration %d finished, switching to post-copy", ev.iteration - 1)
                await conn.start_postcopy(dom)
                return
    except VirtmigError as exc:
        log.debug("failed to switch to post-copy: %s", exc)


async def watch_migration(conn: AsyncConnection, dom: Domain,
                          start: Callable[[], Awaitable[object]], opts: MigrateOptions, *,
                          label: str = "Migration") -> None:
    """virsh's ``virshWatchJob`` around the migration call ``start()``.

    Alongside the call: the progress line (``verbose``), the one-shot ``--timeout`` action, the
    switch after pre-copy (subscribed to the source's events before the call starts), and
    Ctrl-C, which aborts the job and keeps waiting for the call to fail; a second Ctrl-C
    raises :class:`KeyboardInterrupt` at once.
    """
    loop = asyncio.get_running_loop()
    helpers: list[asyncio.Task[None]] = []
    if opts.postcopy_after_precopy:
        helpers.append(loop.create_task(_postcopy_after_precopy(conn, dom)))
        await asyncio.sleep(0)  # the subscription goes out before the migration's first call
    work: asyncio.Future[object] = asyncio.ensure_future(start())
    line = ProgressLine(label)
    if opts.verbose:
        helpers.append(loop.create_task(_show_progress(conn, dom, work, line)))
    if opts.timeout:
        helpers.append(loop.create_task(
            _after_timeout(conn, dom, opts.timeout, opts.timeout_action)))
    interrupts = 0

    def interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        helpers.append(loop.create_task(_abort(conn, dom, work)))

    try:
        with on_sigint(interrupt):
            await work
    except BaseException:
        if not work.done():
            work.cancel()
            with contextlib.suppress(BaseException):
                await work
        line.interrupted()
        raise
    finally:
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    if opts.verbose:
        line.done()


async def cmd_migrate(s: Session, args: argparse.Namespace) -> None:
    opts = build_migration(args)
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    start: Callable[[], Awaitable[object]]
    if opts.unmanaged:
        dconnuri = args.desturi if args.p2p else None
        start = functools.partial(conn.migrate_to_uri3, dom, dconnuri, opts.params, opts.flags)
    else:
        dconn = await s.open(args.desturi, f"failed to connect to the destination '{args.desturi}'")
        start = functools.partial(conn.migrate3, dom, dconn, opts.params, opts.flags)
    await watch_migration(conn, dom, start, opts)


async def cmd_domjobinfo(s: Session, args: argparse.Namespace) -> None:
    _require(args, "keep_completed", "completed")
    _exclusive(args, "completed", "watch")
    conn = await s.conn()
    dom = await lookup(conn, args.domain)

    def block(info: JobInfo, completed: bool) -> str:
        if args.rawstats:
            return format_job_rawstats(info)
        return format_job_info(info, completed=completed, anystats=args.anystats)

    if not args.watch:
        sys.stdout.write(block(await conn.job_info(dom, completed=args.completed),
                               args.completed))
        return
    # virtmig's extension: a block each time the daemon pushes a change, the last one being
    # the job's completed (or failed) record; blocks are separated by a blank line.
    first = True
    async for info in conn.watch_job(dom):
        final = info.type in (JobType.COMPLETED, JobType.FAILED, JobType.CANCELLED)
        sys.stdout.write(("" if first else "\n") + block(info, final))
        sys.stdout.flush()
        first = False


async def cmd_domjobabort(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    await conn.abort_job(dom, postcopy=args.postcopy)


async def cmd_migrate_setmaxdowntime(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    downtime = _number("downtime", args.downtime, _LLONG_MIN, _LLONG_MAX)
    if downtime < 1:
        raise CliError("migrate: Invalid downtime")
    await conn.set_max_downtime(dom, downtime)


async def cmd_migrate_getmaxdowntime(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    print(await conn.get_max_downtime(dom))


async def cmd_migrate_setspeed(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    # virsh's vshCommandOptULWrap: a negative value wraps around (-1 is the largest).
    bandwidth = _number("bandwidth", args.bandwidth, _LLONG_MIN, _ULLONG_MAX) % 2**64
    await conn.set_max_speed(dom, bandwidth, postcopy=args.postcopy)


async def cmd_migrate_getspeed(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    print(await conn.get_max_speed(dom, postcopy=args.postcopy))


async def cmd_migrate_postcopy(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    await conn.start_postcopy(dom)


async def cmd_event(s: Session, args: argparse.Namespace) -> None:
    """virsh's ``event``: print domain events as they come; one (or, with ``--loop``, all
    until ``--timeout`` or Ctrl-C), then how many.  Exit status 1 when none came, as virsh."""
    _exclusive(args, "all", "event")
    _exclusive(args, "list", "all")
    _exclusive(args, "list", "event")
    if args.list:
        for name in EVENT_NAMES:
            print(name)
        return
    if args.event is None and not args.all:
        raise CliError("one of --list, --all, or --event <type> is required")
    if args.event is not None and args.event not in EVENT_NAMES:
        raise CliError(f"unknown event type {args.event}")
    timeout = 0
    if args.timeout is not None:
        timeout = _number("timeout", args.timeout, 1, _INT_MAX // 1000)
    conn = await s.conn()
    dom = await lookup(conn, args.domain) if args.domain is not None else None
    count = 0

    async def receive() -> None:
        nonlocal count
        async for ev in conn.events(dom):
            if ev.kind not in EVENT_NAMES or args.event not in (None, ev.kind):
                continue
            sys.stdout.write(format_event(ev, timestamp=args.timestamp))
            sys.stdout.flush()
            count += 1
            if not args.loop:
                return

    interrupted = asyncio.Event()
    receiving = asyncio.ensure_future(receive())
    stop = asyncio.ensure_future(interrupted.wait())
    try:
        with on_sigint(interrupted.set):
            await asyncio.wait({receiving, stop}, timeout=timeout or None,
                               return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (receiving, stop):
            if not task.done():
                task.cancel()
        await asyncio.gather(receiving, stop, return_exceptions=True)
    if receiving.done() and not receiving.cancelled():
        receiving.result()  # the stream's failure, if any
    elif interrupted.is_set():
        print("event loop interrupted")
    else:
        print("event loop timed out")
    print(f"events received: {count}", flush=True)
    if not count:
        raise CliError()


def _setup_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="list inactive & active domains")
    p.add_argument("--inactive", action="store_true", help="list inactive domains")


def _setup_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paused", action="store_true", help="leave the guest paused after creation")


def _setup_domstate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", action="store_true", help="also print reason for the state")


def _setup_dumpxml(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inactive", action="store_true", help="show inactive defined XML")
    p.add_argument("--migratable", action="store_true",
                   help="provide XML suitable for migrations")


_MIGRATE_BOOLS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("--live",), "live migration"),
    (("--offline",), "offline migration"),
    (("--p2p",), "peer-2-peer migration"),
    (("--direct",), "direct migration"),
    (("--tunnelled", "--tunneled"), "tunnelled migration"),
    (("--persistent",), "persist VM on destination"),
    (("--undefinesource",), "undefine VM on source"),
    (("--suspend",), "do not restart the domain on the destination host"),
    (("--copy-storage-all",), "migration with non-shared storage with full disk copy"),
    (("--copy-storage-inc",),
     "migration with non-shared storage with incremental copy (same base image shared "
     "between source and destination)"),
    (("--copy-storage-synchronous-writes",),
     "force guest disk writes to be synchronously written to the destination to improve "
     "storage migration convergence"),
    (("--change-protection",),
     "prevent any configuration changes to domain until migration ends"),
    (("--unsafe",), "force migration even if it may be unsafe"),
    (("--verbose",), "display the progress of migration"),
    (("--compressed",), "compress repeated pages during live migration"),
    (("--auto-converge",), "force convergence during live migration"),
    (("--rdma-pin-all",), "pin all memory before starting RDMA live migration"),
    (("--abort-on-error",), "abort on soft errors during migration"),
    (("--postcopy",), "enable post-copy migration; switch to it using migrate-postcopy command"),
    (("--postcopy-after-precopy",), "automatically switch to post-copy migration after one pass "
                                    "of pre-copy"),
    (("--postcopy-resume",), "resume failed post-copy migration"),
    (("--zerocopy",), "use zero-copy mechanism for migrating memory pages"),
    (("--tls",), "use TLS for migration"),
    (("--parallel",), "enable parallel migration"),
    (("--timeout-suspend",), "suspend the guest after timeout"),
    (("--timeout-postcopy",), "switch to post-copy after timeout"),
)

_MIGRATE_VALUES: tuple[tuple[str, str, str], ...] = (
    ("--xml", "FILE", "filename containing updated XML for the target"),
    ("--persistent-xml", "FILE", "filename containing updated persistent XML for the target"),
    ("--bandwidth", "MiB/s", "network bandwidth limit in MiB/s"),
    ("--timeout", "SECONDS", "run action specified by --timeout-* option (suspend by default) "
                             "if live migration exceeds timeout (in seconds)"),
    ("--migrate-disks", "DISKS", "comma separated list of disks to be migrated"),
    ("--disks-port", "PORT", "port to use by target server for incoming disks migration"),
    ("--disks-uri", "URI", "URI to use for disks migration (overrides --disks-port)"),
    ("--comp-methods", "METHODS", "comma separated list of compression methods to be used"),
    ("--comp-mt-level", "N", "compress level for multithread compression"),
    ("--comp-mt-threads", "N", "number of compression threads for multithread compression"),
    ("--comp-mt-dthreads", "N", "number of decompression threads for multithread compression"),
    ("--comp-xbzrle-cache", "BYTES", "page cache size for xbzrle compression"),
    ("--comp-zlib-level", "N", "compression level for zlib compression"),
    ("--comp-zstd-level", "N", "compression level for zstd compression"),
    ("--auto-converge-initial", "PCT", "initial CPU throttling rate for auto-convergence"),
    ("--auto-converge-increment", "PCT", "CPU throttling rate increment for auto-convergence"),
    ("--postcopy-bandwidth", "MiB/s", "post-copy migration bandwidth limit in MiB/s"),
    ("--parallel-connections", "N", "number of connections for parallel migration"),
    ("--tls-destination", "HOST", "override the destination host name used for TLS "
                                  "verification"),
)


def _setup_migrate(p: argparse.ArgumentParser) -> None:
    for names, help_text in _MIGRATE_BOOLS:
        p.add_argument(*names, action="store_true", help=help_text)
    for name, metavar, help_text in _MIGRATE_VALUES:
        p.add_argument(name, metavar=metavar, help=help_text)
    p.add_argument("--stall-timeout", metavar="SECONDS",
                   help="virtmig: fail the migration when it makes no progress for this long")
    p.add_argument("--completion-timeout", metavar="SEC-PER-GIB",
                   help="virtmig: run --completion-timeout-action when the migration takes "
                        "longer than this many seconds per GiB of guest memory")
    p.add_argument("--completion-timeout-action", choices=COMPLETION_ACTIONS,
                   help="virtmig: what the source does on the completion timeout: "
                        f"{', '.join(COMPLETION_ACTIONS)} (default: the daemon's)")


def _setup_domjobinfo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--completed", action="store_true",
                   help="return statistics of a recently completed job")
    p.add_argument("--keep-completed", action="store_true",
                   help="don't destroy statistics of a recently completed job when reading")
    p.add_argument("--anystats", action="store_true",
                   help="print statistics for any kind of job (even failed ones)")
    p.add_argument("--rawstats", action="store_true",
                   help="print the raw data returned by libvirt")
    p.add_argument("--watch", action="store_true",
                   help="virtmig: print the job's information each time it changes, until "
                        "the job ends")


def _setup_postcopy(help_text: str) -> Callable[[argparse.ArgumentParser], None]:
    def setup(p: argparse.ArgumentParser) -> None:
        p.add_argument("--postcopy", action="store_true", help=help_text)

    return setup


def _setup_event(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true",
                   help="wait for all events instead of just one type")
    p.add_argument("--loop", action="store_true",
                   help="loop until timeout or interrupt, rather than one-shot")
    p.add_argument("--list", action="store_true", help="list valid event types")
    p.add_argument("--timestamp", action="store_true",
                   help="show timestamp for each printed event")


def _lifecycle(verb: str, done: str, call: Callable[[AsyncConnection, Domain], Awaitable[None]],
               help_text: str) -> Command:
    return Command(verb, help_text, _simple(verb, done, call), ("domain",), ("domain",))


COMMANDS: tuple[Command, ...] = (
    Command("list", "list domains", cmd_list, setup=_setup_list),
    Command("define", "define (but don't start) a domain from an XML file", cmd_define,
            ("file",), ("file",)),
    Command("undefine", "undefine a domain", cmd_undefine, ("domain",), ("domain",)),
    Command("start", "start a (previously defined) inactive domain", cmd_start, ("domain",),
            ("domain",), _setup_start),
    _lifecycle("destroy", "destroyed", lambda c, d: c.destroy(d),
               "destroy (stop) a domain"),
    _lifecycle("suspend", "suspended", lambda c, d: c.suspend(d), "suspend a domain"),
    _lifecycle("resume", "resumed", lambda c, d: c.resume(d), "resume a domain"),
    Command("dominfo", "domain information", cmd_dominfo, ("domain",), ("domain",)),
    Command("domstate", "domain state", cmd_domstate, ("domain",), ("domain",), _setup_domstate),
    Command("dumpxml", "domain information in XML", cmd_dumpxml, ("domain",), ("domain",),
            _setup_dumpxml),
    Command("migrate", "migrate domain to another host", cmd_migrate,
            ("domain", "desturi", "migrateuri", "graphicsuri", "listen_address", "dname"),
            ("domain", "desturi"), _setup_migrate,
            {"migrateuri": "URI", "graphicsuri": "URI", "listen_address": "ADDR",
             "dname": "NAME"}),
    Command("domjobinfo", "domain job information", cmd_domjobinfo, ("domain",), ("domain",),
            _setup_domjobinfo),
    Command("domjobabort", "abort active domain job", cmd_domjobabort, ("domain",), ("domain",),
            _setup_postcopy("abort a post-copy migration")),
    Command("migrate-setmaxdowntime", "set maximum tolerable downtime",
            cmd_migrate_setmaxdowntime, ("domain", "downtime"), ("domain", "downtime"),
            metavars={"downtime": "MS"}),
    Command("migrate-getmaxdowntime", "get maximum tolerable downtime",
            cmd_migrate_getmaxdowntime, ("domain",), ("domain",)),
    Command("migrate-setspeed", "Set the maximum migration bandwidth", cmd_migrate_setspeed,
            ("domain", "bandwidth"), ("domain", "bandwidth"),
            _setup_postcopy("set post-copy migration bandwidth"), {"bandwidth": "MiB/s"}),
    Command("migrate-getspeed", "Get the maximum migration bandwidth", cmd_migrate_getspeed,
            ("domain",), ("domain",), _setup_postcopy("get post-copy migration bandwidth")),
    Command("migrate-postcopy", "Switch running migration from pre-copy to post-copy",
            cmd_migrate_postcopy, ("domain",), ("domain",)),
    Command("event", "Domain Events", cmd_event, ("domain", "event", "timeout"), (),
            _setup_event, {"event": "TYPE", "timeout": "SECONDS"}),
    Command("hostname", "print the daemon's hostname", cmd_hostname),
    Command("version", "show version", cmd_version),
    Command("nodeinfo", "node information", cmd_nodeinfo),
)

COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}

_DATA_HELP = {
    "domain": "domain name, id or uuid",
    "file": "file containing an XML domain description",
    "desturi": "connection URI of the destination host as seen from the client (normal "
               "migration) or source (p2p migration)",
    "migrateuri": "migration URI, usually can be omitted",
    "graphicsuri": "graphics URI to be used for seamless graphics migration",
    "listen_address": "listen address that destination should bind to for incoming migration",
    "dname": "rename to new name during migration (if supported)",
    "downtime": "maximum tolerable downtime (in milliseconds) for migration",
    "bandwidth": "migration bandwidth limit in MiB/s",
    "event": f"which event type to wait for: {', '.join(EVENT_NAMES)}",
    "timeout": "timeout seconds",
}


def command_parser(cmd: Command) -> _Parser:
    """The argparse parser of one command (its data options by name or by position)."""
    usage_parts = []
    for name in cmd.data:
        metavar = cmd.metavars.get(name, name.upper())
        part = f"[--{_option(name)}] {metavar}"
        usage_parts.append(part if name in cmd.required else f"[{part}]")
    p = _Parser(prog=f"virtmig {cmd.name}", description=cmd.help, allow_abbrev=False,
                label=cmd.name,
                usage=f"%(prog)s [OPTIONS] {' '.join(usage_parts)}".rstrip())
    for name in cmd.data:
        p.add_argument(f"--{_option(name)}", dest=name,
                       metavar=cmd.metavars.get(name, name.upper()), help=_DATA_HELP.get(name))
    if cmd.data:
        p.add_argument("positional", nargs="*", metavar="ARG", help=argparse.SUPPRESS)
    if cmd.setup is not None:
        cmd.setup(p)
    return p


def parse_command(cmd: Command, argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command's arguments; positional values fill the data options not given by name,
    in order, as virsh does."""
    args = command_parser(cmd).parse_intermixed_args(list(argv))
    for value in getattr(args, "positional", None) or []:
        for name in cmd.data:
            if getattr(args, name) is None:
                setattr(args, name, value)
                break
        else:
            raise UsageError(f"{cmd.name}: unexpected data '{value}'")
    for name in cmd.required:
        if getattr(args, name) is None:
            raise UsageError(f"command '{cmd.name}' requires <{_option(name)}> option")
    return args


def commands_help() -> str:
    lines = ["Commands:"]
    lines += [f"    {c.name:<16} {c.help}" for c in COMMANDS]
    lines.append("    help [COMMAND]   this list, or one command's options")
    return "\n".join(lines) + "\n"


def main_parser() -> _Parser:
    p = _Parser(prog="virtmig", usage="%(prog)s [-c URI] COMMAND [OPTIONS] [ARGS]",
                description="virtmig: virsh-like client of virtmigd",
                epilog=commands_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--connect", metavar="URI",
                   help="daemon connection URI (default: $VIRTMIG_DEFAULT_URI or the local "
                        "daemon's socket)")
    p.add_argument("-v", "--version", action="version", version=__version__)
    p.add_argument("command", nargs="?", metavar="COMMAND", help=argparse.SUPPRESS)
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


# --- main -----------------------------------------------------------------------------------------


async def run(cmd: Command, uri: str | None, args: argparse.Namespace) -> None:
    session = Session(uri)
    try:
        await cmd.handler(session, args)
    finally:
        await session.close()


def _main(argv: list[str]) -> int:
    top = main_parser()
    try:
        ns = top.parse_args(argv)
        if ns.command is None:
            raise UsageError("no command given; try 'virtmig help'")
        if ns.command == "help":
            if not ns.args:
                top.print_help()
                return 0
            name = ns.args[0]
            if name not in COMMANDS_BY_NAME:
                raise UsageError(f"command or command group '{name}' doesn't exist")
            command_parser(COMMANDS_BY_NAME[name]).print_help()
            return 0
        cmd = COMMANDS_BY_NAME.get(ns.command)
        if cmd is None:
            raise UsageError(f"unknown command: '{ns.command}'")
        args = parse_command(cmd, ns.args)
        asyncio.run(run(cmd, ns.connect, args))
    except CliError as exc:
        for line in exc.lines:
            _err(line)
        return 1
    except VirtmigError as exc:
        _err(str(exc))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``virtmig`` console script: returns the exit status (0 success, 1 failure)."""
    try:
        return _run_main(argv)
    finally:
        if argv is None:
            # The command is over and has reported: a late Ctrl-C (a second one during a
            # migration's abort) must not turn the exit status into a death by SIGINT while
            # the interpreter and gRPC's threads shut down.
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_main(argv: list[str] | None) -> int:
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        _err("interrupted")
        return 1
    except BrokenPipeError:
        # stdout went away (``virtmig list | head``): say nothing more, and don't let the
        # interpreter's final flush fail either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # a bug: still no traceback for the user
        _err(f"internal error: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
