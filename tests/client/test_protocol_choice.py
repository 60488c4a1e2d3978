"""The one choice of migration protocol (``choose_protocol``), table-driven: libvirt's order
(v3 with extensible parameters, v3, v2) and its refusals of what the protocol it falls back to
cannot carry; and what a daemon configured for some protocols advertises."""

from __future__ import annotations

import pytest

from virtmig.client.sequence import choose_protocol
from virtmig.proto.errors import ArgumentUnsupported, InvalidArgument, NoSupport, VirtmigError
from virtmig.proto.flags import (
    Feature,
    MigrateFlags,
    MigrationProtocol,
    protocol_features,
    protocols_of,
)
from virtmig.proto.params import MigrateParam, TypedParams

F = MigrateFlags
P = MigrateParam
M = MigrationProtocol

# What daemons of each generation advertise (libvirt's QEMU driver: PARAMS came after V3, which
# came after V2; a daemon speaking only v2 has none of v3's features).
PARAMS = frozenset(protocol_features((2, 3), True))
V3 = frozenset(protocol_features((2, 3), False))
V3_ONLY = frozenset(protocol_features((3,), True))
V2 = frozenset(protocol_features((2,), True))
NONE: frozenset[str] = frozenset({Feature.P2P})

XML = "<domain type='test'><name>vm1</name></domain>"


@pytest.mark.parametrize(("src", "dst", "expected"), [
    (PARAMS, PARAMS, M.V3_PARAMS),
    (PARAMS, V3, M.V3),
    (V3, PARAMS, M.V3),
    (V3, V3, M.V3),
    (PARAMS, V2, M.V2),
    (V2, PARAMS, M.V2),
    (V3, V2, M.V2),
    (V2, V3, M.V2),
    (V2, V2, M.V2),
    (V3_ONLY, PARAMS, M.V3_PARAMS),
    (V3_ONLY, V3, M.V3),
])
def test_newest_protocol_both_speak(src: frozenset[str], dst: frozenset[str],
                                    expected: MigrationProtocol) -> None:
    assert choose_protocol(src, dst, TypedParams(), F.LIVE) is expected
    # The four arguments every protocol carries (DEST_XML aside: v2 cannot change it).
    four = TypedParams.of({P.URI: "tcp://127.0.0.1:49152", P.DEST_NAME: "vm2",
                           P.BANDWIDTH: 10})
    assert choose_protocol(src, dst, four, F.LIVE | F.PERSIST_DEST) is expected


@pytest.mark.parametrize(("src", "dst", "params", "flags", "error", "message"), [
    # Extensible params need MIGRATION_PARAMS on both sides.
    (PARAMS, V3, {P.LISTEN_ADDRESS: "127.0.0.1"}, F.LIVE, ArgumentUnsupported,
     "Migration APIs with extensible parameters are not supported but extended parameters "
     "were passed"),
    (V2, PARAMS, {P.PERSIST_XML: XML}, F.LIVE, ArgumentUnsupported, "extensible parameters"),
    # v2 cannot change the destination's XML.
    (PARAMS, V2, {P.DEST_XML: XML}, F.LIVE, ArgumentUnsupported,
     "Unable to change target guest XML during migration"),
    # Flags v2 never had: virCheckFlags' message, naming what a v2 destination would.
    (V3, V2, {}, F.LIVE | F.POSTCOPY, InvalidArgument,
     r"unsupported flags \(0x8000\) in function virDomainMigratePrepare2"),
    (V2, V2, {}, F.OFFLINE | F.PERSIST_DEST, InvalidArgument, r"unsupported flags \(0x400\)"),
    # No protocol in common.
    (V3_ONLY, V2, {}, F.LIVE, NoSupport,
     "this function is not supported by the connection driver: virDomainMigrate3"),
    (NONE, PARAMS, {}, F.LIVE, NoSupport, "virDomainMigrate3"),
])
def test_refused_with_libvirts_messages(
    src: frozenset[str], dst: frozenset[str], params: dict[str, str], flags: int,
    error: type[VirtmigError], message: str,
) -> None:
    with pytest.raises(error, match=message):
        choose_protocol(src, dst, TypedParams.of(params), flags)


def test_what_v3_can_carry_is_not_refused_there() -> None:
    """DEST_XML and post-copy are fine as long as both speak v3."""
    params = TypedParams.of({P.DEST_XML: XML})
    assert choose_protocol(V3, V3, params, F.LIVE | F.POSTCOPY) is M.V3
    assert choose_protocol(PARAMS, PARAMS, params, F.LIVE | F.POSTCOPY) is M.V3_PARAMS


@pytest.mark.parametrize(("protocols", "params", "features", "spoken"), [
    ((2, 3), True, {"V2", "V3", "MIGRATION_PARAMS", "OFFLINE", "CHANGE_PROTECTION", "P2P"},
     (M.V3_PARAMS, M.V3, M.V2)),
    ((2, 3), False, {"V2", "V3", "OFFLINE", "CHANGE_PROTECTION", "P2P"}, (M.V3, M.V2)),
    ((3,), True, {"V3", "MIGRATION_PARAMS", "OFFLINE", "CHANGE_PROTECTION", "P2P"},
     (M.V3_PARAMS, M.V3)),
    ((2,), True, {"V2", "P2P"}, (M.V2,)),
    ((2,), False, {"V2", "P2P"}, (M.V2,)),
])
def test_configured_protocols_make_the_features(
    protocols: tuple[int, ...], params: bool, features: set[str],
    spoken: tuple[MigrationProtocol, ...],
) -> None:
    made = protocol_features(protocols, params)
    assert made == features
    assert protocols_of(set(made)) == spoken
