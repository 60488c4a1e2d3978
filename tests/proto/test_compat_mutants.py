"""The compat table's checks, to the letter: exact messages, range bounds, which layer and party.

Written against mutmut's survivors in ``virtmig.proto.compat`` (``make mutate``): each test pins
a detail that a mutant changed and the contract tests did not notice.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from virtmig.proto import errors
from virtmig.proto.compat import (
    Compression,
    Layer,
    Rule,
    check_flags_supported,
    check_known_flags,
    check_migration,
    check_rules,
    compression_settings,
)
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import (
    MIGRATION_PARAMS,
    MigrateParam,
    ParamSpec,
    ParamType,
    Party,
    TypedParams,
    check_params_supported,
)

F = MigrateFlags
P = MigrateParam
C = F.COMPRESSED
PAR = F.PARALLEL


def error_of(call: Callable[[], object]) -> errors.VirtmigError:
    with pytest.raises(errors.VirtmigError) as info:
        call()
    return info.value


def params(*items: tuple[str, object]) -> TypedParams:
    out = TypedParams()
    for name, value in items:
        out.add(name, value)  # type: ignore[arg-type]
    return out


# --- flags -------------------------------------------------------------------------------------


def test_known_flags_come_back_as_flags() -> None:
    assert check_known_flags(int(F.LIVE | F.PEER2PEER), "f") == F.LIVE | F.PEER2PEER
    err = error_of(lambda: check_known_flags(int(F.LIVE) | 1 << 40, "virDomainMigrate3"))
    assert type(err) is errors.InvalidArgument
    assert str(err) == ("invalid argument: unsupported flags (0x10000000000) in function "
                        "virDomainMigrate3")


def test_every_unsupported_flag_is_named_in_bit_order() -> None:
    err = error_of(lambda: check_flags_supported(F.LIVE | F.ZEROCOPY | F.TLS))
    assert type(err) is errors.ArgumentUnsupported
    assert str(err) == ("argument unsupported: migration flag VIR_MIGRATE_TLS|VIR_MIGRATE_ZEROCOPY "
                        "is not supported by this host")


def test_backend_flags_are_refused_only_without_the_backend() -> None:
    err = error_of(lambda: check_flags_supported(F.PARALLEL | F.COMPRESSED, F.PARALLEL))
    assert str(err) == ("argument unsupported: migration flag VIR_MIGRATE_COMPRESSED is not "
                        "supported by this host")
    check_flags_supported(F.PARALLEL | F.COMPRESSED, F.PARALLEL | F.COMPRESSED)


def test_check_migration_passes_p2p_and_checks_compression() -> None:
    assert check_migration(F.LIVE | F.PEER2PEER, None, "f") == F.LIVE | F.PEER2PEER
    err = error_of(lambda: check_migration(F.LIVE | C, params(("compression", "lz4")), "f",
                                           backend_flags=C))
    assert str(err) == "invalid argument: Unsupported compression method 'lz4'"


def test_rules_of_the_other_layer_are_skipped() -> None:
    check_rules(F.NON_SHARED_DISK | F.NON_SHARED_INC, None, Layer.DRIVER)
    err = error_of(lambda: check_rules(F.NON_SHARED_DISK | F.NON_SHARED_INC, None, Layer.CLIENT))
    assert type(err) is errors.InvalidArgument


def test_rule_needs_every_when_flag() -> None:
    rule = Rule(Layer.DRIVER, F.OFFLINE | F.TUNNELLED, errors.OperationInvalid, "m")
    assert not rule.violated(F.OFFLINE, None)
    assert not rule.violated(F.TUNNELLED, None)
    assert rule.violated(F.OFFLINE | F.TUNNELLED | F.LIVE, None)


def test_rule_with_a_param_needs_params() -> None:
    rule = Rule(Layer.DRIVER, F.TUNNELLED, errors.ArgumentUnsupported, "m", param="x")
    assert not rule.violated(F.TUNNELLED, None)


# --- params ------------------------------------------------------------------------------------


def test_unsupported_param_message() -> None:
    err = error_of(lambda: check_params_supported(params((P.GRAPHICS_URI, "spice://h")), 0))
    assert type(err) is errors.ArgumentUnsupported
    assert str(err) == ("argument unsupported: migration parameter 'graphics_uri' is not "
                        "supported by this host")


def test_the_other_partys_param_is_left_to_it() -> None:
    check_params_supported(params((P.GRAPHICS_URI, "spice://h")), 0, Party.DST)
    check_params_supported(params((P.DISKS_PORT, 1)), 0, Party.SRC)
    with pytest.raises(errors.ArgumentUnsupported):
        check_params_supported(params((P.DISKS_PORT, 1)), 0, Party.DST)
    err = error_of(lambda: check_params_supported(
        params((P.DISKS_PORT, 1), (P.GRAPHICS_URI, "spice://h")), 0, Party.SRC))
    assert str(err) == ("argument unsupported: migration parameter 'graphics_uri' is not "
                        "supported by this host")


def test_needed_flags_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ParamSpec(P.BANDWIDTH, ParamType.ULLONG, Party.SRC,
                     needs_any_flag=F.POSTCOPY | F.PARALLEL)
    monkeypatch.setitem(MIGRATION_PARAMS, P.BANDWIDTH.value, spec)
    err = error_of(lambda: check_params_supported(params((P.BANDWIDTH, 1)), int(F.LIVE)))
    assert type(err) is errors.ArgumentUnsupported
    assert str(err) == ("argument unsupported: parameter 'bandwidth' requires flag "
                        "VIR_MIGRATE_POSTCOPY|VIR_MIGRATE_PARALLEL")
    check_params_supported(params((P.BANDWIDTH, 1)), int(F.PARALLEL))


# --- compression -------------------------------------------------------------------------------


def test_each_tuning_value_is_read() -> None:
    c = compression_settings(params(("compression", "zlib"), ("compression.zlib.level", 4)),
                             C | PAR)
    assert c == Compression(methods=("zlib",), zlib_level=4)
    assert c.multifd_method == "zlib"
    c = compression_settings(params(("compression", "zstd"), ("compression.zstd.level", 20)),
                             C | PAR)
    assert c == Compression(methods=("zstd",), zstd_level=20)
    c = compression_settings(params(("compression", "xbzrle"),
                                    ("compression.xbzrle.cache", 1 << 20)), C)
    assert c == Compression(methods=("xbzrle",), xbzrle_cache=1 << 20)


def test_compressed_without_methods_is_xbzrle_and_methods_keep_their_order() -> None:
    assert compression_settings(TypedParams(), C).methods == ("xbzrle",)
    assert compression_settings(TypedParams(), F.LIVE).methods == ()
    c = compression_settings(params(("compression", "xbzrle"), ("compression", "mt")), C)
    assert c.methods == ("xbzrle", "mt") and c.multifd_method == ""


@pytest.mark.parametrize(
    ("items", "flags", "message"),
    [
        ([("compression", "lz4")], C, "Unsupported compression method 'lz4'"),
        ([("compression", "zstd"), ("compression", "zstd")], C | PAR,
         "Compression method 'zstd' is specified twice"),
        ([("compression", "mt"), ("compression", "zstd")], C,
         "Compression method 'zstd' is only supported with parallel migration"),
        ([("compression", "zlib"), ("compression", "xbzrle"), ("compression", "mt")], C | PAR,
         "Compression method 'xbzrle' isn't supported with parallel migration"),
        ([("compression", "zstd"), ("compression", "zlib")], C | PAR,
         "Only one compression method could be specified with parallel compression"),
        ([("compression.mt.threads", 2)], C, "Turn multithread compression on to tune it"),
        ([("compression.mt.dthreads", 2)], C, "Turn multithread compression on to tune it"),
        ([("compression.xbzrle.cache", 1)], 0, "Turn xbzrle compression on to tune it"),
        ([("compression", "zstd"), ("compression.zlib.level", 1)], C | PAR,
         "Turn zlib compression on to tune it"),
        ([("compression", "zlib"), ("compression.zstd.level", 1)], C | PAR,
         "Turn zstd compression on to tune it"),
    ],
)
def test_compression_messages_exactly(items: list[tuple[str, object]], flags: int,
                                      message: str) -> None:
    err = error_of(lambda: compression_settings(params(*items), flags))
    assert type(err) is errors.InvalidArgument
    assert str(err) == f"invalid argument: {message}"


# The tuning ranges (levels, threads, parallel connections) live in the params table now:
# tests/daemon/test_param_ranges.py and tests/proto/test_contract.py.
