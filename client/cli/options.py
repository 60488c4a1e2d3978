"""``migrate``'s options: one table, :data:`MIGRATE_OPTIONS`, declares each option once (its name,
what it gives the migration call, how its value is read, its ``--help``), and drives both the
argparse parser (:func:`setup_migrate`) and the checks and conversion (:func:`build_migration`).

A row is one of three kinds: a switch that sets a :class:`MigrateFlags` member, a value that
becomes a :class:`MigrateParam`, or an option the client acts on itself (``--verbose``,
``--timeout*``, ``--direct``, ``--postcopy-after-precopy``, ``desturi``), which
:func:`build_migration` reads by name.  Rows are in the order ``migrate --help`` lists them.
The data options' rows (``desturi`` ... ``dname``) are made from
:data:`~virtmig.client.cli.parsers.MIGRATE_DATA`, which the command table reads without importing
this module (``virtmig --help`` stays light).
"""

from __future__ import annotations

import argparse
import enum

from virtmig.client.cli.base import (
    INT_MAX,
    INT_MIN,
    ULLONG_MAX,
    UsageError,
    exclusive,
    number,
    read_file,
    require,
)
from virtmig.client.cli.parsers import MIGRATE_DATA
from virtmig.proto.flags import COMPLETION_ACTIONS, MigrateFlags
from virtmig.proto.params import MigrateParam, ParamType, TypedParams
from virtmig.proto.record import record

F = MigrateFlags
P = MigrateParam


class Read(enum.Enum):
    """How an option's command-line value is read."""

    SWITCH = "switch"  # no value: given or not
    STRING = "string"  # as it is: one STRING param
    LIST = "list"  # split on commas: a STRING param per item
    FILE = "file"  # the named file's content: one STRING param
    INT = "int"  # virsh's vshCommandOptInt: one INT param
    ULLONG = "ullong"  # virsh's vshCommandOptULongLong: one ULLONG param


@record
class MigrateOption:
    """One ``migrate`` option.  With neither ``flag`` nor ``param`` it is the client's own, and
    ``read`` only says whether it takes a value."""

    name: str  # as virsh spells it, without the dashes
    help: str
    flag: MigrateFlags | None = None
    param: MigrateParam | None = None
    read: Read = Read.SWITCH
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    # A virsh "data" option: it may also be given by position (the command parser adds it).
    data: bool = False

    def __post_init__(self) -> None:
        if self.flag is not None and (self.param is not None or self.read is not Read.SWITCH):
            raise ValueError(f"--{self.name}: a flag option is a switch and sets no param")
        if self.param is not None and self.read is Read.SWITCH:
            raise ValueError(f"--{self.name}: a param option takes a value")

    @property
    def dest(self) -> str:
        """The argparse attribute: ``listen-address`` → ``listen_address``."""
        return self.name.replace("-", "_")


def _flag(name: str, flag: MigrateFlags, text: str, *aliases: str) -> MigrateOption:
    return MigrateOption(name, text, flag=flag, aliases=aliases)


def _param(name: str, param: MigrateParam, read: Read, metavar: str | None, text: str, *,
           data: bool = False, choices: tuple[str, ...] | None = None) -> MigrateOption:
    return MigrateOption(name, text, param=param, read=read, metavar=metavar, choices=choices,
                         data=data)


def _own(name: str, text: str, metavar: str | None = None, *, data: bool = False
         ) -> MigrateOption:
    """The client's own option: a switch, or (with a metavar) a value it reads itself."""
    return MigrateOption(name, text, read=Read.SWITCH if metavar is None else Read.STRING,
                         metavar=metavar, data=data)


# The param each data option of MIGRATE_DATA gives (None: the client's own); every one is here.
_DATA_PARAMS: dict[str, MigrateParam | None] = {
    "desturi": None, "migrateuri": P.URI, "graphicsuri": P.GRAPHICS_URI,
    "listen-address": P.LISTEN_ADDRESS, "dname": P.DEST_NAME,
}


def _data(name: str, metavar: str, text: str) -> MigrateOption:
    param = _DATA_PARAMS[name]
    if param is None:
        return _own(name, text, metavar, data=True)
    return _param(name, param, Read.STRING, metavar, text, data=True)


MIGRATE_OPTIONS: tuple[MigrateOption, ...] = (
    # Data options, after ``domain``: by name or by position, in this order.
    *(_data(name, metavar, text) for name, metavar, text in MIGRATE_DATA),
    # Switches.
    _flag("live", F.LIVE, "live migration"),
    _flag("offline", F.OFFLINE, "offline migration"),
    _flag("p2p", F.PEER2PEER, "peer-2-peer migration"),
    _own("direct", "direct migration"),
    _flag("tunnelled", F.TUNNELLED, "tunnelled migration", "tunneled"),
    _flag("persistent", F.PERSIST_DEST, "persist VM on destination"),
    _flag("undefinesource", F.UNDEFINE_SOURCE, "undefine VM on source"),
    _flag("suspend", F.PAUSED, "do not restart the domain on the destination host"),
    _flag("copy-storage-all", F.NON_SHARED_DISK,
          "migration with non-shared storage with full disk copy"),
    _flag("copy-storage-inc", F.NON_SHARED_INC,
          "migration with non-shared storage with incremental copy (same base image shared "
          "between source and destination)"),
    _flag("copy-storage-synchronous-writes", F.NON_SHARED_SYNCHRONOUS_WRITES,
          "force guest disk writes to be synchronously written to the destination to improve "
          "storage migration convergence"),
    _flag("change-protection", F.CHANGE_PROTECTION,
          "prevent any configuration changes to domain until migration ends"),
    _flag("unsafe", F.UNSAFE, "force migration even if it may be unsafe"),
    _own("verbose", "display the progress of migration"),
    _flag("compressed", F.COMPRESSED, "compress repeated pages during live migration"),
    _flag("auto-converge", F.AUTO_CONVERGE, "force convergence during live migration"),
    _flag("rdma-pin-all", F.RDMA_PIN_ALL, "pin all memory before starting RDMA live migration"),
    _flag("abort-on-error", F.ABORT_ON_ERROR, "abort on soft errors during migration"),
    _flag("postcopy", F.POSTCOPY,
          "enable post-copy migration; switch to it using migrate-postcopy command"),
    _own("postcopy-after-precopy",
         "automatically switch to post-copy migration after one pass of pre-copy"),
    _flag("postcopy-resume", F.POSTCOPY_RESUME, "resume failed post-copy migration"),
    _flag("zerocopy", F.ZEROCOPY, "use zero-copy mechanism for migrating memory pages"),
    _flag("tls", F.TLS, "use TLS for migration"),
    _flag("parallel", F.PARALLEL, "enable parallel migration"),
    _own("timeout-suspend", "suspend the guest after timeout"),
    _own("timeout-postcopy", "switch to post-copy after timeout"),
    # Values.
    _param("xml", P.DEST_XML, Read.FILE, "FILE", "filename containing updated XML for the target"),
    _param("persistent-xml", P.PERSIST_XML, Read.FILE, "FILE",
           "filename containing updated persistent XML for the target"),
    _param("bandwidth", P.BANDWIDTH, Read.ULLONG, "MiB/s", "network bandwidth limit in MiB/s"),
    _own("timeout", "run action specified by --timeout-* option (suspend by default) if live "
                    "migration exceeds timeout (in seconds)", "SECONDS"),
    _param("migrate-disks", P.MIGRATE_DISKS, Read.LIST, "DISKS",
           "comma separated list of disks to be migrated"),
    _param("disks-port", P.DISKS_PORT, Read.INT, "PORT",
           "port to use by target server for incoming disks migration"),
    _param("disks-uri", P.DISKS_URI, Read.STRING, "URI",
           "URI to use for disks migration (overrides --disks-port)"),
    _param("comp-methods", P.COMPRESSION, Read.LIST, "METHODS",
           "comma separated list of compression methods to be used"),
    _param("comp-mt-level", P.COMPRESSION_MT_LEVEL, Read.INT, "N",
           "compress level for multithread compression"),
    _param("comp-mt-threads", P.COMPRESSION_MT_THREADS, Read.INT, "N",
           "number of compression threads for multithread compression"),
    _param("comp-mt-dthreads", P.COMPRESSION_MT_DTHREADS, Read.INT, "N",
           "number of decompression threads for multithread compression"),
    _param("comp-xbzrle-cache", P.COMPRESSION_XBZRLE_CACHE, Read.ULLONG, "BYTES",
           "page cache size for xbzrle compression"),
    _param("comp-zlib-level", P.COMPRESSION_ZLIB_LEVEL, Read.INT, "N",
           "compression level for zlib compression"),
    _param("comp-zstd-level", P.COMPRESSION_ZSTD_LEVEL, Read.INT, "N",
           "compression level for zstd compression"),
    _param("auto-converge-initial", P.AUTO_CONVERGE_INITIAL, Read.INT, "PCT",
           "initial CPU throttling rate for auto-convergence"),
    _param("auto-converge-increment", P.AUTO_CONVERGE_INCREMENT, Read.INT, "PCT",
           "CPU throttling rate increment for auto-convergence"),
    _param("postcopy-bandwidth", P.BANDWIDTH_POSTCOPY, Read.ULLONG, "MiB/s",
           "post-copy migration bandwidth limit in MiB/s"),
    _param("parallel-connections", P.PARALLEL_CONNECTIONS, Read.INT, "N",
           "number of connections for parallel migration"),
    _param("tls-destination", P.TLS_DESTINATION, Read.STRING, "HOST",
           "override the destination host name used for TLS verification"),
    # virtmig's own params.
    _param("stall-timeout", P.STALL_TIMEOUT, Read.ULLONG, "SECONDS",
           "virtmig: fail the migration when it makes no progress for this long"),
    _param("completion-timeout", P.COMPLETION_TIMEOUT, Read.ULLONG, "SEC-PER-GIB",
           "virtmig: run --completion-timeout-action when the migration takes longer than "
           "this many seconds per GiB of guest memory"),
    _param("completion-timeout-action", P.COMPLETION_TIMEOUT_ACTION, Read.STRING, None,
           "virtmig: what the source does on the completion timeout: "
           f"{', '.join(COMPLETION_ACTIONS)} (default: the daemon's)",
           choices=COMPLETION_ACTIONS),
    _param("dest-uri", P.DEST_URI, Read.STRING, "URI",
           "virtmig: the destination daemon's URI as the source host reaches it, which the "
           "source records and asks where the guest runs (default: DESTURI)"),
)

# The order in which the params are added, which is virsh's (doMigrate's), not --help's: it is
# the order on the wire (the daemons refuse the first param they cannot take) and decides which
# of two malformed values is reported.  Each param of MIGRATE_OPTIONS is here exactly once.
PARAM_ORDER: tuple[MigrateParam, ...] = (
    P.URI, P.GRAPHICS_URI, P.LISTEN_ADDRESS, P.DISKS_PORT, P.DISKS_URI, P.DEST_NAME,
    P.MIGRATE_DISKS, P.COMPRESSION, P.COMPRESSION_MT_LEVEL, P.COMPRESSION_MT_THREADS,
    P.COMPRESSION_MT_DTHREADS, P.COMPRESSION_XBZRLE_CACHE, P.COMPRESSION_ZLIB_LEVEL,
    P.COMPRESSION_ZSTD_LEVEL, P.DEST_XML, P.PERSIST_XML, P.AUTO_CONVERGE_INITIAL,
    P.AUTO_CONVERGE_INCREMENT, P.BANDWIDTH_POSTCOPY, P.PARALLEL_CONNECTIONS, P.TLS_DESTINATION,
    P.BANDWIDTH,
    P.STALL_TIMEOUT, P.COMPLETION_TIMEOUT, P.COMPLETION_TIMEOUT_ACTION, P.DEST_URI,
)


def _param_rows() -> tuple[MigrateOption, ...]:
    """The param rows in :data:`PARAM_ORDER`; a row missing there fails at import."""
    rows = {o.param: o for o in MIGRATE_OPTIONS if o.param is not None}
    if set(rows) != set(PARAM_ORDER) or len(PARAM_ORDER) != len(set(PARAM_ORDER)):
        raise AssertionError("PARAM_ORDER must list each param of MIGRATE_OPTIONS once; "
                             f"differences: {sorted(set(rows) ^ set(PARAM_ORDER))}")
    return tuple(rows[p] for p in PARAM_ORDER)


_PARAM_ROWS = _param_rows()

# What the command parser needs for the data options (after ``domain``).
DATA_OPTIONS: tuple[str, ...] = tuple(o.dest for o in MIGRATE_OPTIONS if o.data)
DATA_METAVARS: dict[str, str] = {o.dest: o.metavar for o in MIGRATE_OPTIONS
                                 if o.data and o.metavar is not None}
DATA_HELP: dict[str, str] = {o.dest: o.help for o in MIGRATE_OPTIONS if o.data}


def setup_migrate(p: argparse.ArgumentParser) -> None:
    """Add ``migrate``'s options but the data ones (the command parser adds those)."""
    for o in MIGRATE_OPTIONS:
        if o.data:
            continue
        names = [f"--{n}" for n in (o.name, *o.aliases)]
        if o.read is Read.SWITCH:
            p.add_argument(*names, action="store_true", help=o.help)
        else:
            p.add_argument(*names, metavar=o.metavar, choices=o.choices, help=o.help)


@record
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


def _add_param(params: TypedParams, o: MigrateOption, raw: str) -> None:
    assert o.param is not None
    if o.read is Read.STRING:
        params.add(o.param, raw, ParamType.STRING)
    elif o.read is Read.LIST:
        for item in raw.split(","):
            params.add(o.param, item, ParamType.STRING)
    elif o.read is Read.FILE:
        params.add(o.param, read_file(raw, f"cannot read file '{raw}'"), ParamType.STRING)
    elif o.read is Read.INT:
        params.add(o.param, number(o.dest, raw, INT_MIN, INT_MAX), ParamType.INT)
    else:
        params.add(o.param, number(o.dest, raw, 0, ULLONG_MAX), ParamType.ULLONG)


def build_migration(args: argparse.Namespace) -> MigrateOptions:
    """Check ``migrate``'s options as virsh does and build the flags and typed params.

    Pure apart from reading the ``--xml``/``--persistent-xml`` files.  The client acts on
    ``--timeout*`` and ``--postcopy-after-precopy`` itself while it watches the job; everything
    else goes to the library and the daemons, which refuse what they cannot do.
    """
    exclusive(args, "live", "offline")
    exclusive(args, "timeout_suspend", "timeout_postcopy")
    require(args, "postcopy_after_precopy", "postcopy")
    require(args, "timeout_postcopy", "postcopy")
    require(args, "persistent_xml", "persistent")

    timeout = 0
    if args.timeout is not None:
        # Seconds, convertible to milliseconds in an int; 0 is accepted and means none, as in
        # virsh 9.0's migrate.
        timeout = number("timeout", args.timeout, 0, INT_MAX // 1000)
        if timeout and not args.live:
            raise UsageError("migrate: Unexpected timeout for offline migration")
    if not timeout and (args.timeout_suspend or args.timeout_postcopy):
        raise UsageError("migrate: Unexpected --timeout-* option without --timeout")

    params = TypedParams()
    for o in _PARAM_ROWS:
        raw = getattr(args, o.dest)
        if raw is not None:
            _add_param(params, o, raw)

    flags = F(0)
    for o in MIGRATE_OPTIONS:
        if o.flag is not None and getattr(args, o.dest):
            flags |= o.flag
    return MigrateOptions(flags, params, verbose=bool(args.verbose),
                          unmanaged=bool(args.p2p or args.direct), timeout=timeout,
                          timeout_action="postcopy" if args.timeout_postcopy else "suspend",
                          postcopy_after_precopy=bool(args.postcopy_after_precopy))
