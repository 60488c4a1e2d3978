"""The one table of flag and parameter combinations, checked before anything changes.

Rules are libvirt's (the flag and parameter combinations it rejects), each with the layer that
checks it and libvirt's error class and message: ``CLIENT`` rules run in the client library
(``migrate3``/``migrate_to_uri3``) and again in the daemon for clients that skip them; ``DRIVER``
rules run in the daemon's phases.  Flags this implementation does not act on yet are refused here,
never ignored; parameters are refused by the params table's own columns
(``virtmig.proto.params``).  This module reads that table; the table never imports this module.
"""

from __future__ import annotations

import enum

from virtmig.proto.errors import (
    ArgumentUnsupported,
    InvalidArgument,
    OperationInvalid,
    OperationUnsupported,
    VirtmigError,
)
from virtmig.proto.flags import ALL_MIGRATE_FLAGS, NO_FLAGS, V3_ONLY_FLAGS, MigrateFlags
from virtmig.proto.params import MigrateParam as P
from virtmig.proto.params import TypedParams
from virtmig.proto.record import record

F = MigrateFlags


class Layer(enum.Flag):
    CLIENT = enum.auto()
    DRIVER = enum.auto()


@record
class Rule:
    """``when`` all of these flags are set ``and`` (``unless_any`` is empty or none of them is set)
    ``and`` (``param`` is empty or that param is present): raise ``error(message)``."""

    layer: Layer
    when: MigrateFlags
    error: type[VirtmigError]
    message: str
    unless_any: MigrateFlags = NO_FLAGS
    param: str = ""

    def violated(self, flags: MigrateFlags, params: TypedParams | None) -> bool:
        if (flags & self.when) != self.when:
            return False
        if self.unless_any and flags & self.unless_any:
            return False
        return not self.param or (params is not None and self.param in params)


_NS = F.NON_SHARED_DISK | F.NON_SHARED_INC

RULES: tuple[Rule, ...] = (
    Rule(Layer.CLIENT, F.NON_SHARED_DISK | F.NON_SHARED_INC, InvalidArgument,
         "Flags 'VIR_MIGRATE_NON_SHARED_DISK' and 'VIR_MIGRATE_NON_SHARED_INC' are mutually "
         "exclusive"),
    Rule(Layer.CLIENT, F.NON_SHARED_SYNCHRONOUS_WRITES, InvalidArgument,
         "Flag 'VIR_MIGRATE_NON_SHARED_DISK|VIR_MIGRATE_NON_SHARED_INC' is required by flag "
         "'VIR_MIGRATE_NON_SHARED_SYNCHRONOUS_WRITES'", unless_any=_NS),
    Rule(Layer.DRIVER, F.OFFLINE | F.NON_SHARED_DISK, OperationInvalid,
         "offline migration cannot handle non-shared storage"),
    Rule(Layer.DRIVER, F.OFFLINE | F.NON_SHARED_INC, OperationInvalid,
         "offline migration cannot handle non-shared storage"),
    Rule(Layer.DRIVER, F.OFFLINE, OperationInvalid,
         "offline migration must be specified with the persistent flag set",
         unless_any=F.PERSIST_DEST),
    Rule(Layer.DRIVER, F.OFFLINE | F.TUNNELLED, OperationInvalid,
         "tunnelled offline migration does not make sense"),
    Rule(Layer.DRIVER, F.POSTCOPY, ArgumentUnsupported,
         "post-copy migration is not supported with non-live or paused migration",
         unless_any=F.LIVE),
    Rule(Layer.DRIVER, F.POSTCOPY | F.PAUSED, ArgumentUnsupported,
         "post-copy migration is not supported with non-live or paused migration"),
    Rule(Layer.DRIVER, F.POSTCOPY | F.TUNNELLED, ArgumentUnsupported,
         "post-copy is not supported with tunnelled migration"),
    Rule(Layer.DRIVER, F.ZEROCOPY, ArgumentUnsupported,
         "zero-copy is only available for parallel migration", unless_any=F.PARALLEL),
    Rule(Layer.DRIVER, F.TUNNELLED | F.NON_SHARED_DISK, OperationUnsupported,
         "migration of non-shared storage is not supported with tunnelled migration and this "
         "QEMU"),
    Rule(Layer.DRIVER, F.TUNNELLED | F.NON_SHARED_INC, OperationUnsupported,
         "migration of non-shared storage is not supported with tunnelled migration and this "
         "QEMU"),
    Rule(Layer.DRIVER, F.POSTCOPY_RESUME, ArgumentUnsupported,
         "resuming failed post-copy migration requires post-copy to be enabled",
         unless_any=F.POSTCOPY),
    Rule(Layer.DRIVER, F.TUNNELLED, ArgumentUnsupported,
         "migration URI is not supported by tunnelled migration", param="migrate_uri"),
    Rule(Layer.DRIVER, F.TUNNELLED, ArgumentUnsupported,
         "listen address is not supported by tunnelled migration", param="listen_address"),
    Rule(Layer.DRIVER, F.TUNNELLED, ArgumentUnsupported,
         "disk port address is not supported by tunnelled migration", param="disks_port"),
)

# Flags that are valid libvirt flags but that this implementation does not act on yet.  Each is
# refused with a clear error rather than silently ignored.
UNSUPPORTED_FLAGS = (
    F.NON_SHARED_DISK | F.NON_SHARED_INC | F.NON_SHARED_SYNCHRONOUS_WRITES
    | F.RDMA_PIN_ALL | F.POSTCOPY_RESUME | F.ZEROCOPY
)
# Flags only some backends act on (``Backend.extra_flags``: qemu has multifd and compression;
# TLS on the data stream is each backend's own); a backend without them refuses them like the
# flags above.
BACKEND_FLAGS = F.PARALLEL | F.COMPRESSED | F.TLS


def check_known_flags(flags: int, function: str) -> MigrateFlags:
    """libvirt's ``virCheckFlags``: unknown bits are an error naming the function."""
    unknown = flags & ~ALL_MIGRATE_FLAGS.value
    if unknown:
        raise InvalidArgument(f"unsupported flags (0x{unknown:x}) in function {function}")
    return MigrateFlags(flags)


def check_v2_flags(flags: int, function: str) -> MigrateFlags:
    """libvirt's ``virCheckFlags`` for the protocol v2 calls: unknown bits, and the flags v2
    never had (:data:`~virtmig.proto.flags.V3_ONLY_FLAGS`), are an error naming the function."""
    f = check_known_flags(flags, function)
    extra = f & V3_ONLY_FLAGS
    if extra:
        raise InvalidArgument(f"unsupported flags (0x{int(extra):x}) in function {function}")
    return f


#: Each rule with its ``when`` as an int: a rule whose flags are not all set is passed over
#: without enum arithmetic (most rules, for most flag words).
_RULES_WHEN: tuple[tuple[Rule, int], ...] = tuple((rule, int(rule.when)) for rule in RULES)


def check_rules(flags: int, params: TypedParams | None, layer: Layer) -> None:
    bits = int(flags) & ALL_MIGRATE_FLAGS.value
    f: MigrateFlags | None = None
    for rule, when in _RULES_WHEN:
        if bits & when != when:
            continue  # not violated: Rule.violated's first test
        if f is None:
            f = MigrateFlags(bits)
        if rule.layer & layer and rule.violated(f, params):
            raise rule.error(rule.message)


def check_flags_supported(flags: int, backend_flags: MigrateFlags = NO_FLAGS) -> None:
    unsupported = MigrateFlags(flags) & (UNSUPPORTED_FLAGS | (BACKEND_FLAGS & ~backend_flags))
    if unsupported:
        names = "|".join(f"VIR_MIGRATE_{f.name}" for f in MigrateFlags if f & unsupported)
        raise ArgumentUnsupported(f"migration flag {names} is not supported by this host")


def check_migration(flags: int, params: TypedParams | None, function: str,
                    backend_flags: MigrateFlags = NO_FLAGS) -> MigrateFlags:
    """Everything the daemon checks about a flags word and params before a phase changes state.

    ``backend_flags``: the flags of ``BACKEND_FLAGS`` this daemon's backend acts on.
    """
    f = check_known_flags(flags, function)
    check_rules(f, params, Layer.CLIENT | Layer.DRIVER)
    check_flags_supported(f & ~(F.PEER2PEER), backend_flags)
    if params is not None:
        compression_settings(params, f)
    return f


COMPRESSION_METHODS = ("xbzrle", "mt", "zlib", "zstd")
MULTIFD_COMPRESSION = ("zlib", "zstd")


@record
class Compression:
    """What COMPRESSED and the ``compression*`` params ask for (libvirt's rules)."""

    methods: tuple[str, ...] = ()
    mt_level: int | None = None
    mt_threads: int | None = None
    mt_dthreads: int | None = None
    xbzrle_cache: int | None = None
    zlib_level: int | None = None
    zstd_level: int | None = None

    @property
    def multifd_method(self) -> str:
        """zlib or zstd: the multifd channels' compression ("" when none)."""
        return next((m for m in self.methods if m in MULTIFD_COMPRESSION), "")


def compression_settings(params: TypedParams, flags: int) -> Compression:
    """The compression a migration asks for, or libvirt's error.

    COMPRESSED without methods means xbzrle; tuning a method that is not on is an error; zlib
    and zstd compress multifd channels, so they need PARALLEL, and only one of them applies;
    xbzrle and mt work on the single stream only.  Levels, threads and the cache size have
    their ranges in the params table (``virtmig.proto.params``), checked before this.
    """
    f = MigrateFlags(flags)
    methods: list[str] = []
    for method in params.get_all_str(P.COMPRESSION):
        if method not in COMPRESSION_METHODS:
            raise InvalidArgument(f"Unsupported compression method '{method}'")
        if method in methods:
            raise InvalidArgument(f"Compression method '{method}' is specified twice")
        methods.append(method)
    if not methods and f & F.COMPRESSED:
        methods = ["xbzrle"]
    multifd = [m for m in methods if m in MULTIFD_COMPRESSION]
    if multifd and not f & F.PARALLEL:
        raise InvalidArgument(
            f"Compression method '{multifd[0]}' is only supported with parallel migration")
    single = [m for m in methods if m not in MULTIFD_COMPRESSION]
    if single and f & F.PARALLEL:
        raise InvalidArgument(
            f"Compression method '{single[0]}' isn't supported with parallel migration")
    if len(multifd) > 1:
        raise InvalidArgument(
            "Only one compression method could be specified with parallel compression")
    c = Compression(
        methods=tuple(methods),
        mt_level=params.get_int_opt(P.COMPRESSION_MT_LEVEL),
        mt_threads=params.get_int_opt(P.COMPRESSION_MT_THREADS),
        mt_dthreads=params.get_int_opt(P.COMPRESSION_MT_DTHREADS),
        xbzrle_cache=params.get_int_opt(P.COMPRESSION_XBZRLE_CACHE),
        zlib_level=params.get_int_opt(P.COMPRESSION_ZLIB_LEVEL),
        zstd_level=params.get_int_opt(P.COMPRESSION_ZSTD_LEVEL),
    )
    for method, tuning, label in (
        ("mt", (c.mt_level, c.mt_threads, c.mt_dthreads), "multithread"),
        ("xbzrle", (c.xbzrle_cache,), "xbzrle"),
        ("zlib", (c.zlib_level,), "zlib"),
        ("zstd", (c.zstd_level,), "zstd"),
    ):
        if any(v is not None for v in tuning) and method not in methods:
            raise InvalidArgument(f"Turn {label} compression on to tune it")
    return c
