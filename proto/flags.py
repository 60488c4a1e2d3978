"""libvirt's migration flags, domain states and reasons, job types, daemon features and the
migration protocols they make.

Values are libvirt's own, so that a flags word means the same thing on the wire to us and to
anyone reading libvirt's documentation.
"""

from __future__ import annotations

import enum
import functools


class MigrateFlags(enum.IntFlag):
    """``virDomainMigrateFlags``."""

    LIVE = 1 << 0
    PEER2PEER = 1 << 1
    TUNNELLED = 1 << 2
    PERSIST_DEST = 1 << 3
    UNDEFINE_SOURCE = 1 << 4
    PAUSED = 1 << 5
    NON_SHARED_DISK = 1 << 6
    NON_SHARED_INC = 1 << 7
    CHANGE_PROTECTION = 1 << 8
    UNSAFE = 1 << 9
    OFFLINE = 1 << 10
    COMPRESSED = 1 << 11
    ABORT_ON_ERROR = 1 << 12
    AUTO_CONVERGE = 1 << 13
    RDMA_PIN_ALL = 1 << 14
    POSTCOPY = 1 << 15
    TLS = 1 << 16
    PARALLEL = 1 << 17
    NON_SHARED_SYNCHRONOUS_WRITES = 1 << 18
    POSTCOPY_RESUME = 1 << 19
    ZEROCOPY = 1 << 20


NO_FLAGS = MigrateFlags(0)
ALL_MIGRATE_FLAGS = MigrateFlags(sum(f.value for f in MigrateFlags))

# Flags only the source acts on; the sequence driver strips them before calling the destination.
SOURCE_ONLY_FLAGS = MigrateFlags.ABORT_ON_ERROR | MigrateFlags.AUTO_CONVERGE


def flag_names(flags: int) -> str:
    """``LIVE|PERSIST_DEST`` style spelling for messages and logs."""
    names = [f.name or "" for f in MigrateFlags if flags & f.value]
    rest = flags & ~ALL_MIGRATE_FLAGS.value
    if rest:
        names.append(hex(rest))
    return "|".join(names) or "0"


# Flags whose meaning needs protocol v3's phases, so that protocol v2 never had them: a job kept
# from Begin to Confirm (CHANGE_PROTECTION), a definition moved with nothing running (OFFLINE:
# libvirt advertises it only with v3), and post-copy (the destination runs the guest before the
# source's Perform ends, but v2's Perform stops the source at its end).  The v2 RPCs refuse
# them as libvirt's virCheckFlags does ("unsupported flags (0x...) in function ...").
V3_ONLY_FLAGS = (MigrateFlags.CHANGE_PROTECTION | MigrateFlags.OFFLINE | MigrateFlags.POSTCOPY
                 | MigrateFlags.POSTCOPY_RESUME)


class Feature(enum.StrEnum):
    """What a daemon advertises in ``Host.GetHost`` (libvirt's VIR_DRV_FEATURE_*)."""

    MIGRATION_PARAMS = "MIGRATION_PARAMS"
    V3 = "V3"
    V2 = "V2"
    P2P = "P2P"
    OFFLINE = "OFFLINE"
    CHANGE_PROTECTION = "CHANGE_PROTECTION"


#: The features that come with protocol v3 (a daemon that speaks only v2 lacks them all).
V3_FEATURES = frozenset({Feature.V3, Feature.MIGRATION_PARAMS, Feature.OFFLINE,
                         Feature.CHANGE_PROTECTION})


class MigrationProtocol(enum.StrEnum):
    """Which form of libvirt's migration protocol a migration ran with, newest first: what the
    client (or a peer-to-peer source) chose from both daemons' features, what
    ``virtmig migrate --verbose`` prints and the completed job's ``virtmig.protocol`` stat."""

    V3_PARAMS = "v3+params"  # Begin3Params ... Confirm3Params
    V3 = "v3"  # Begin3 ... Confirm3: URI, DEST_NAME, DEST_XML and BANDWIDTH only
    V2 = "v2"  # Prepare2, Perform, Finish2 (libvirt's virDomainMigrateVersion2)


def protocols_of(features: frozenset[str] | set[str]) -> tuple[MigrationProtocol, ...]:
    """The protocol forms a daemon advertising ``features`` speaks, newest first."""
    has = {
        MigrationProtocol.V3_PARAMS: Feature.MIGRATION_PARAMS in features
        and Feature.V3 in features,
        MigrationProtocol.V3: Feature.V3 in features,
        MigrationProtocol.V2: Feature.V2 in features,
    }
    return tuple(p for p in MigrationProtocol if has[p])


def protocol_features(protocols: tuple[int, ...], params: bool) -> frozenset[Feature]:
    """The features a daemon that speaks ``protocols`` (2, 3) advertises; ``params``: the
    extensible-parameter RPCs too (only with 3)."""
    features = {Feature.P2P}
    if 2 in protocols:
        features.add(Feature.V2)
    if 3 in protocols:
        features |= V3_FEATURES
        if not params:
            features.discard(Feature.MIGRATION_PARAMS)
    return frozenset(features)


class DomainState(enum.IntEnum):
    """``virDomainState``; the values match ``virtmig.v1.DomainState`` on the wire."""

    NOSTATE = 0
    RUNNING = 1
    BLOCKED = 2
    PAUSED = 3
    SHUTDOWN = 4
    SHUTOFF = 5
    CRASHED = 6
    PMSUSPENDED = 7

    @property
    def label(self) -> str:
        return _STATE_LABELS[self]


_STATE_LABELS = {
    DomainState.NOSTATE: "no state",
    DomainState.RUNNING: "running",
    DomainState.BLOCKED: "idle",
    DomainState.PAUSED: "paused",
    DomainState.SHUTDOWN: "in shutdown",
    DomainState.SHUTOFF: "shut off",
    DomainState.CRASHED: "crashed",
    DomainState.PMSUSPENDED: "pmsuspended",
}


class RunningReason(enum.IntEnum):
    UNKNOWN = 0
    BOOTED = 1
    MIGRATED = 2
    RESTORED = 3
    FROM_SNAPSHOT = 4
    UNPAUSED = 5
    MIGRATION_CANCELED = 6
    SAVE_CANCELED = 7
    WAKEUP = 8
    CRASHED = 9
    POSTCOPY = 10
    POSTCOPY_FAILED = 11


class PausedReason(enum.IntEnum):
    UNKNOWN = 0
    USER = 1
    MIGRATION = 2
    SAVE = 3
    DUMP = 4
    IOERROR = 5
    WATCHDOG = 6
    FROM_SNAPSHOT = 7
    SHUTTING_DOWN = 8
    SNAPSHOT = 9
    CRASHED = 10
    STARTING_UP = 11
    POSTCOPY = 12
    POSTCOPY_FAILED = 13
    API_ERROR = 14


class ShutoffReason(enum.IntEnum):
    UNKNOWN = 0
    SHUTDOWN = 1
    DESTROYED = 2
    CRASHED = 3
    MIGRATED = 4
    SAVED = 5
    FAILED = 6
    FROM_SNAPSHOT = 7
    DAEMON = 8


REASONS: dict[DomainState, type[enum.IntEnum]] = {
    DomainState.RUNNING: RunningReason,
    DomainState.PAUSED: PausedReason,
    DomainState.SHUTOFF: ShutoffReason,
}


@functools.lru_cache(maxsize=256)
def reason_name(state: DomainState, reason: int) -> str:
    """virsh's spelling of a state reason: ``migrated``, ``migration-canceled``, ``user``...
    (cached: a list of many domains asks for the same few)."""
    enum_cls = REASONS.get(state)
    if enum_cls is None:
        return "unknown"
    try:
        return enum_cls(reason).name.lower().replace("_", "-")
    except ValueError:
        return "unknown"


# virsh's words for each state's reasons (virshDomain*ReasonTypeToString), by reason number.
_REASON_LABELS: dict[DomainState, tuple[str, ...]] = {
    DomainState.NOSTATE: ("unknown",),
    DomainState.RUNNING: ("unknown", "booted", "migrated", "restored", "from snapshot",
                          "unpaused", "migration canceled", "save canceled", "event wakeup",
                          "crashed", "post-copy", "post-copy failed"),
    DomainState.BLOCKED: ("unknown",),
    DomainState.PAUSED: ("unknown", "user", "migrating", "saving", "dumping", "I/O error",
                         "watchdog", "from snapshot", "shutting down", "creating snapshot",
                         "crashed", "starting up", "post-copy", "post-copy failed", "api error"),
    DomainState.SHUTDOWN: ("unknown", "user"),
    DomainState.SHUTOFF: ("unknown", "shutdown", "destroyed", "crashed", "migrated", "saved",
                          "failed", "from snapshot", "daemon"),
    DomainState.CRASHED: ("unknown", "panicked"),
    DomainState.PMSUSPENDED: ("unknown",),
}


def reason_label(state: int, reason: int) -> str:
    """virsh's text for a state's reason, as ``domstate --reason`` prints it: ``migration
    canceled``, ``migrating``, ``I/O error``; ``unknown`` for what virsh does not know."""
    try:
        labels = _REASON_LABELS[DomainState(state)]
    except ValueError:
        return "unknown"
    return labels[reason] if 0 <= reason < len(labels) else "unknown"


class JobType(enum.IntEnum):
    """``virDomainJobType``."""

    NONE = 0
    BOUNDED = 1
    UNBOUNDED = 2
    COMPLETED = 3
    FAILED = 4
    CANCELLED = 5


class JobOperation(enum.IntEnum):
    """``virDomainJobOperation``."""

    UNKNOWN = 0
    START = 1
    SAVE = 2
    RESTORE = 3
    MIGRATION_IN = 4
    MIGRATION_OUT = 5
    SNAPSHOT = 6
    SNAPSHOT_REVERT = 7
    DUMP = 8
    BACKUP = 9
    SNAPSHOT_DELETE = 10


#: libvirt's largest migration bandwidth (``QEMU_DOMAIN_MIG_BANDWIDTH_MAX``), in MiB/s: what
#: fits in a signed 64-bit count of bytes per second.  Also what "unlimited" means to QEMU.
MAX_BANDWIDTH_MIB = (2**63 - 1) // (1024 * 1024)

#: The largest maximum downtime, in ms: QEMU's bound for ``downtime-limit`` (2000 s).
MAX_DOWNTIME_MS = 2_000_000


class CompletionAction(enum.StrEnum):
    """What virtmig's completion timeout does when a migration has not finished in time."""

    ABORT = "abort"
    SUSPEND = "suspend"
    POSTCOPY = "postcopy"


#: The completion-timeout action names, in the order messages and ``--help`` list them.
COMPLETION_ACTIONS: tuple[str, ...] = tuple(a.value for a in CompletionAction)
