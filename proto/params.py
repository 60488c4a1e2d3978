"""libvirt's typed parameters and the one table of migration parameters.

A typed parameter is a name, a type and a value (``virTypedParameter``).  Migration params travel
as a list of them; :data:`MIGRATION_PARAMS` says, for every ``VIR_MIGRATE_PARAM_*`` wire name, its
type, the values it may take (a :class:`Range` of numbers, or a set of words), whether it may
repeat, which party uses it, which flags it needs and whether this host acts on it.  Both the
client and the daemon validate against this table (:func:`validate_migration_params`); nothing
else lists parameter names.  The ranges are the only ones: the same :class:`Range` checks a
parameter however it arrives (a ``*Params`` RPC, or the ``resource`` field of a non-params RPC,
which the daemon turns into the ``bandwidth`` parameter), and :func:`check_max_speed` and
:func:`check_max_downtime` check ``SetMaxSpeed`` and ``SetMaxDowntime`` (client and daemon
alike: the client checks before it sends, the daemon never relies on it).  The wire form of
typed params is ``virtmig.proto.wire``'s concern.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Mapping

from virtmig.proto.errors import ArgumentUnsupported, InvalidArgument, Overflow
from virtmig.proto.flags import (
    COMPLETION_ACTIONS,
    MAX_BANDWIDTH_MIB,
    MAX_DOWNTIME_MS,
    NO_FLAGS,
    MigrateFlags,
)
from virtmig.proto.record import record


class ParamType(enum.Enum):
    """``virTypedParameterType``; the value is the field of ``TypedParam.value`` on the wire."""

    INT = "int"
    UINT = "uint"
    LLONG = "llong"
    ULLONG = "ullong"
    DOUBLE = "double"
    BOOLEAN = "boolean"
    STRING = "string"


_INT_RANGES = {
    ParamType.INT: (-(2**31), 2**31 - 1),
    ParamType.UINT: (0, 2**32 - 1),
    ParamType.LLONG: (-(2**63), 2**63 - 1),
    ParamType.ULLONG: (0, 2**64 - 1),
}

ParamValue = int | float | bool | str


@record
class TypedParam:
    name: str
    type: ParamType
    value: ParamValue

    def __post_init__(self) -> None:
        _check_value(self.name, self.type, self.value)


def _check_value(name: str, ptype: ParamType, value: object) -> None:
    ok: bool
    if ptype in _INT_RANGES:
        lo, hi = _INT_RANGES[ptype]
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
    elif ptype is ParamType.DOUBLE:
        ok = isinstance(value, float | int) and not isinstance(value, bool)
    elif ptype is ParamType.BOOLEAN:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise InvalidArgument(f"invalid value {value!r} for {ptype.value} parameter '{name}'")


class MigrateParam(enum.StrEnum):
    """``VIR_MIGRATE_PARAM_*`` wire names."""

    URI = "migrate_uri"
    DEST_NAME = "destination_name"
    DEST_XML = "destination_xml"
    PERSIST_XML = "persistent_xml"
    BANDWIDTH = "bandwidth"
    BANDWIDTH_POSTCOPY = "bandwidth.postcopy"
    GRAPHICS_URI = "graphics_uri"
    LISTEN_ADDRESS = "listen_address"
    MIGRATE_DISKS = "migrate_disks"
    DISKS_PORT = "disks_port"
    DISKS_URI = "disks_uri"
    COMPRESSION = "compression"
    COMPRESSION_MT_LEVEL = "compression.mt.level"
    COMPRESSION_MT_THREADS = "compression.mt.threads"
    COMPRESSION_MT_DTHREADS = "compression.mt.dthreads"
    COMPRESSION_XBZRLE_CACHE = "compression.xbzrle.cache"
    COMPRESSION_ZLIB_LEVEL = "compression.zlib.level"
    COMPRESSION_ZSTD_LEVEL = "compression.zstd.level"
    AUTO_CONVERGE_INITIAL = "auto_converge.initial"
    AUTO_CONVERGE_INCREMENT = "auto_converge.increment"
    PARALLEL_CONNECTIONS = "parallel.connections"
    TLS_DESTINATION = "tls.destination"
    # virtmig's own (not libvirt's): the stall watchdog and the completion timeout.
    STALL_TIMEOUT = "virtmig.stall_timeout"
    COMPLETION_TIMEOUT = "virtmig.completion_timeout"
    COMPLETION_TIMEOUT_ACTION = "virtmig.completion_timeout_action"
    # virtmig's own: the destination daemon's URI as the source host reaches it (recorded by the
    # source, which asks that daemon where the guest runs; see virtmig.daemon.locate).
    DEST_URI = "virtmig.dest_uri"


class Party(enum.Flag):
    """Which side of a migration reads a parameter."""

    SRC = enum.auto()
    DST = enum.auto()
    BOTH = SRC | DST


@record
class Range:
    """The values a number may take: ``lo`` to ``hi`` inclusive (and only powers of two).

    ``overflow``: libvirt's own message for a value above ``hi``, raised as
    :class:`~virtmig.proto.errors.Overflow` (libvirt's VIR_ERR_OVERFLOW); ``message``: the
    format of every other refusal (``{name}``, ``{lo}``, ``{hi}``, ``{value}``).
    """

    lo: int
    hi: int
    power_of_two: bool = False
    overflow: str = ""
    message: str = "parameter '{name}' must be between {lo} and {hi}, got {value}"

    def check(self, name: str, value: int) -> int:
        if self.overflow and value > self.hi:
            raise Overflow(self.overflow)
        if not self.lo <= value <= self.hi:
            raise InvalidArgument(self.message.format(name=name, lo=self.lo, hi=self.hi,
                                                      value=value))
        if self.power_of_two and value & (value - 1):
            raise InvalidArgument(f"parameter '{name}' must be a power of two, got {value}")
        return value


#: Migration bandwidth in MiB/s (0: the default, unlimited), as libvirt's QEMU driver allows.
BANDWIDTH_RANGE = Range(0, MAX_BANDWIDTH_MIB,
                        overflow=f"bandwidth must be less than {MAX_BANDWIDTH_MIB + 1}")
#: The xbzrle compression cache in bytes (the ``compression.xbzrle.cache`` parameter and
#: ``SetCompressionCache``): QEMU's rule, a power of two no smaller than a page.
XBZRLE_CACHE_RANGE = Range(4096, 2**63, power_of_two=True)
#: The maximum downtime in ms (``SetMaxDowntime``, the ``max_downtime_ms`` setting).
DOWNTIME_RANGE = Range(1, MAX_DOWNTIME_MS,
                       message="Invalid downtime {value}: must be between {lo} and {hi} ms")
#: virtmig's watchdog timeouts, in seconds (0: off).
TIMEOUT_RANGE = Range(0, 2**31 - 1)


@record
class ParamSpec:
    name: MigrateParam
    type: ParamType
    party: Party
    multiple: bool = False
    # The parameter is only meaningful with one of these flags (0: always).
    needs_any_flag: MigrateFlags = NO_FLAGS
    # Whether this implementation acts on it yet; unimplemented ones are refused, never ignored.
    supported: bool = True
    # The values it may take: a range for a number, a set of words for a string (None/(): any).
    range: Range | None = None
    choices: tuple[str, ...] = ()

    def check_value(self, value: ParamValue) -> None:
        """Refuse a value outside the parameter's range or choices."""
        if self.range is not None and isinstance(value, int) and not isinstance(value, bool):
            self.range.check(self.name.value, value)
        if self.choices and value not in self.choices:
            raise InvalidArgument(f"parameter '{self.name.value}' must be one of "
                                  f"{', '.join(self.choices)}, got {value!r}")


def _spec(
    name: MigrateParam,
    ptype: ParamType,
    party: Party,
    *,
    multiple: bool = False,
    needs: MigrateFlags = NO_FLAGS,
    supported: bool = True,
    values: Range | tuple[str, ...] | None = None,
) -> ParamSpec:
    if isinstance(values, tuple):
        return ParamSpec(name, ptype, party, multiple, needs, supported, choices=values)
    return ParamSpec(name, ptype, party, multiple, needs, supported, range=values)


_P = MigrateParam
_T = ParamType
_NON_SHARED = MigrateFlags.NON_SHARED_DISK | MigrateFlags.NON_SHARED_INC

# QEMU's ranges (migrate-set-parameters) where QEMU has one: compression levels and threads,
# multifd channels, CPU throttle percentages; xbzrle's cache is a power of two of at least a page.
_LEVEL = Range(0, 9)
_THREADS = Range(1, 255)
_PERCENT = Range(1, 99)

MIGRATION_PARAMS: Mapping[str, ParamSpec] = {
    s.name.value: s
    for s in (
        _spec(_P.URI, _T.STRING, Party.BOTH),
        _spec(_P.DEST_NAME, _T.STRING, Party.BOTH),
        _spec(_P.DEST_XML, _T.STRING, Party.BOTH),
        _spec(_P.PERSIST_XML, _T.STRING, Party.SRC, needs=MigrateFlags.PERSIST_DEST),
        _spec(_P.BANDWIDTH, _T.ULLONG, Party.SRC, values=BANDWIDTH_RANGE),
        _spec(_P.BANDWIDTH_POSTCOPY, _T.ULLONG, Party.SRC, needs=MigrateFlags.POSTCOPY,
              values=BANDWIDTH_RANGE),
        _spec(_P.GRAPHICS_URI, _T.STRING, Party.SRC, supported=False),
        _spec(_P.LISTEN_ADDRESS, _T.STRING, Party.DST),
        _spec(_P.MIGRATE_DISKS, _T.STRING, Party.BOTH, multiple=True, needs=_NON_SHARED,
              supported=False),
        _spec(_P.DISKS_PORT, _T.INT, Party.DST, supported=False, values=Range(0, 65535)),
        _spec(_P.DISKS_URI, _T.STRING, Party.DST, supported=False),
        # (whether the backend can compress is the COMPRESSED flag's check: compat.BACKEND_FLAGS)
        _spec(_P.COMPRESSION, _T.STRING, Party.BOTH, multiple=True,
              needs=MigrateFlags.COMPRESSED),
        _spec(_P.COMPRESSION_MT_LEVEL, _T.INT, Party.SRC, values=_LEVEL),
        _spec(_P.COMPRESSION_MT_THREADS, _T.INT, Party.SRC, values=_THREADS),
        _spec(_P.COMPRESSION_MT_DTHREADS, _T.INT, Party.DST, values=_THREADS),
        _spec(_P.COMPRESSION_XBZRLE_CACHE, _T.ULLONG, Party.SRC, values=XBZRLE_CACHE_RANGE),
        _spec(_P.COMPRESSION_ZLIB_LEVEL, _T.INT, Party.SRC, values=_LEVEL),
        _spec(_P.COMPRESSION_ZSTD_LEVEL, _T.INT, Party.SRC, values=Range(0, 20)),
        _spec(_P.AUTO_CONVERGE_INITIAL, _T.INT, Party.SRC, needs=MigrateFlags.AUTO_CONVERGE,
              values=_PERCENT),
        _spec(_P.AUTO_CONVERGE_INCREMENT, _T.INT, Party.SRC, needs=MigrateFlags.AUTO_CONVERGE,
              values=_PERCENT),
        _spec(_P.PARALLEL_CONNECTIONS, _T.INT, Party.BOTH, needs=MigrateFlags.PARALLEL,
              values=_THREADS),
        _spec(_P.TLS_DESTINATION, _T.STRING, Party.SRC, needs=MigrateFlags.TLS),
        _spec(_P.STALL_TIMEOUT, _T.ULLONG, Party.SRC, values=TIMEOUT_RANGE),
        _spec(_P.COMPLETION_TIMEOUT, _T.ULLONG, Party.SRC, values=TIMEOUT_RANGE),
        _spec(_P.COMPLETION_TIMEOUT_ACTION, _T.STRING, Party.SRC, values=COMPLETION_ACTIONS),
        _spec(_P.DEST_URI, _T.STRING, Party.SRC),
    )
}

# What the non-params v3 RPCs can carry (libvirt's rule for falling back from *Params).
NON_PARAMS_ALLOWED = frozenset({_P.URI.value, _P.DEST_NAME.value, _P.DEST_XML.value,
                                _P.BANDWIDTH.value})


class TypedParams:
    """An ordered list of typed parameters, as libvirt's ``virTypedParameterPtr`` array."""

    def __init__(self, items: Iterable[TypedParam] = ()) -> None:
        self._items: list[TypedParam] = list(items)

    @classmethod
    def of(cls, values: Mapping[str, ParamValue | list[str]]) -> TypedParams:
        """Build migration params from plain values, typed by the table."""
        out = cls()
        for name, value in values.items():
            spec = MIGRATION_PARAMS.get(name)
            if spec is None:
                raise InvalidArgument(f"parameter '{name}' not supported")
            for v in value if isinstance(value, list) else [value]:
                out.add(name, v, spec.type)
        return out

    def __iter__(self) -> Iterator[TypedParam]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return any(p.name == name for p in self._items)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TypedParams) and self._items == other._items

    def __repr__(self) -> str:
        return f"TypedParams({self._items!r})"

    def copy(self) -> TypedParams:
        return TypedParams(self._items)

    def names(self) -> set[str]:
        return {p.name for p in self._items}

    def get(self, name: str) -> ParamValue | None:
        for p in self._items:
            if p.name == name:
                return p.value
        return None

    def get_str(self, name: str) -> str | None:
        value = self.get(name)
        return value if isinstance(value, str) else None

    def get_int(self, name: str, default: int = 0) -> int:
        value = self.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    def get_int_opt(self, name: str) -> int | None:
        value = self.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def get_all_str(self, name: str) -> list[str]:
        return [v for v in self.get_all(name) if isinstance(v, str)]

    def get_all(self, name: str) -> list[ParamValue]:
        return [p.value for p in self._items if p.name == name]

    def add(self, name: str, value: ParamValue, ptype: ParamType | None = None) -> None:
        if ptype is None:
            spec = MIGRATION_PARAMS.get(name)
            if spec is None:
                raise InvalidArgument(f"parameter '{name}' not supported")
            ptype = spec.type
        self._items.append(TypedParam(name, ptype, value))

    def set(self, name: str, value: ParamValue, ptype: ParamType | None = None) -> None:
        """Replace every occurrence of ``name`` with one value (libvirt's replace-or-add)."""
        self.remove(name)
        self.add(name, value, ptype)

    def remove(self, name: str) -> None:
        self._items = [p for p in self._items if p.name != name]


def validate_migration_params(params: TypedParams, flags: int = 0,
                              party: Party = Party.BOTH) -> None:
    """libvirt's ``virTypedParamsValidate`` against the migration table, plus our support check.

    ``party``: the side checking; a flag a parameter needs is only required where it is used
    (the destination never sees source-only flags such as AUTO_CONVERGE).
    """
    seen: set[str] = set()
    for p in params:
        spec = MIGRATION_PARAMS.get(p.name)
        if spec is None:
            raise InvalidArgument(f"parameter '{p.name}' not supported")
        if p.type is not spec.type:
            raise InvalidArgument(
                f"invalid type '{p.type.value}' for parameter '{p.name}', "
                f"expected '{spec.type.value}'"
            )
        if p.name in seen and not spec.multiple:
            raise InvalidArgument(f"parameter '{p.name}' occurs multiple times")
        seen.add(p.name)
        spec.check_value(p.value)
    check_params_supported(params, flags, party)


def check_param_values(params: TypedParams) -> None:
    """Every known parameter's value against its range or choices (the client's check before
    it sends; the daemon's is :func:`validate_migration_params`)."""
    for p in params:
        spec = MIGRATION_PARAMS.get(p.name)
        if spec is not None:
            spec.check_value(p.value)


def check_max_speed(bandwidth_mib: int) -> int:
    """``SetMaxSpeed``'s bandwidth (MiB/s, either phase): the ``bandwidth`` parameter's range."""
    return BANDWIDTH_RANGE.check(MigrateParam.BANDWIDTH.value, bandwidth_mib)


def check_compression_cache(size: int) -> int:
    """``SetCompressionCache``'s size: the ``compression.xbzrle.cache`` parameter's range."""
    return XBZRLE_CACHE_RANGE.check(MigrateParam.COMPRESSION_XBZRLE_CACHE.value, size)


def check_max_downtime(downtime_ms: int) -> int:
    """``SetMaxDowntime``'s value, and the ``max_downtime_ms`` setting."""
    return DOWNTIME_RANGE.check("downtime", downtime_ms)


def check_params_supported(params: TypedParams, flags: int, party: Party | None = None) -> None:
    """The table's support columns: refuse a parameter this host does not act on yet, or one
    whose flag is missing (``party``: the side checking; None checks every parameter)."""
    for p in params:
        spec = MIGRATION_PARAMS[p.name]
        if party is not None and not spec.party & party:
            continue  # the other side's parameter: checked there
        if not spec.supported:
            raise ArgumentUnsupported(
                f"migration parameter '{p.name}' is not supported by this host"
            )
        if spec.needs_any_flag and not flags & spec.needs_any_flag:
            needed = "|".join(f"VIR_MIGRATE_{f.name}" for f in MigrateFlags
                              if f & spec.needs_any_flag)
            raise ArgumentUnsupported(f"parameter '{p.name}' requires flag {needed}")

