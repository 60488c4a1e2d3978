"""The Python contract: errors and their status mapping, flags, params table, URIs, compat rules."""

from __future__ import annotations

import re

import grpc
import pytest

from virtmig.proto import errors
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.compat import (
    RULES,
    Compression,
    Layer,
    check_known_flags,
    check_migration,
    check_rules,
    compression_settings,
)
from virtmig.proto.flags import (
    MAX_BANDWIDTH_MIB,
    MAX_DOWNTIME_MS,
    DomainState,
    MigrateFlags,
    PausedReason,
    RunningReason,
    ShutoffReason,
    flag_names,
    reason_name,
)
from virtmig.proto.params import (
    MIGRATION_PARAMS,
    NON_PARAMS_ALLOWED,
    MigrateParam,
    ParamType,
    TypedParam,
    TypedParams,
    check_max_downtime,
    check_max_speed,
    check_param_values,
    validate_migration_params,
)
from virtmig.proto.uri import ConnectURI, ListenURI, check_not_local, parse_listen, parse_uri
from virtmig.proto.wire import from_wire, to_wire

F = MigrateFlags
P = MigrateParam


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(errors.ERROR_CLASSES))
def test_every_error_class_round_trips_exactly(name: str) -> None:
    cls = errors.ERROR_CLASSES[name]
    code, details, trailers = errors.to_status(cls("boom"))
    assert code is grpc.StatusCode[cls.status_name]
    back = errors.from_status(code, details, trailers)
    assert type(back) is cls and str(back) == str(cls("boom"))


def test_unknown_exception_is_internal_with_its_name() -> None:
    code, details, trailers = errors.to_status(KeyError("x"))
    assert code is grpc.StatusCode.INTERNAL and "KeyError" in details
    assert isinstance(errors.from_status(code, details, trailers), errors.InternalError)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.UNAVAILABLE, errors.ConnectionFailed),
        (grpc.StatusCode.NOT_FOUND, errors.NoDomain),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.OperationTimeout),
        (grpc.StatusCode.PERMISSION_DENIED, errors.PermissionDenied),
        (grpc.StatusCode.UNKNOWN, errors.InternalError),
    ],
)
def test_status_without_metadata_falls_back_by_code(
    code: grpc.StatusCode, cls: type[errors.VirtmigError]
) -> None:
    assert type(errors.from_status(code, "d", ())) is cls


def test_unavailable_says_it_could_not_connect() -> None:
    err = errors.from_status(grpc.StatusCode.UNAVAILABLE, "failed to connect", ())
    assert "unable to connect to the daemon" in str(err)


def test_tree_is_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for name in errors.ERROR_CLASSES:
        assert name in doc


# --- flags ---------------------------------------------------------------------------------------


def test_flag_values_are_libvirts() -> None:
    values = {f.name: int(f) for f in F}
    assert values["LIVE"] == 1 and values["PEER2PEER"] == 2 and values["TUNNELLED"] == 4
    assert values["PERSIST_DEST"] == 8 and values["CHANGE_PROTECTION"] == 256
    assert values["OFFLINE"] == 1024 and values["POSTCOPY"] == 32768
    assert values["ZEROCOPY"] == 1 << 20 and len(values) == 21
    assert flag_names(F.LIVE | F.PAUSED) == "LIVE|PAUSED"
    assert flag_names(1 << 30) == hex(1 << 30)


def test_reason_names_are_virshs() -> None:
    assert reason_name(DomainState.SHUTOFF, ShutoffReason.MIGRATED) == "migrated"
    assert reason_name(DomainState.RUNNING, RunningReason.MIGRATION_CANCELED) == \
        "migration-canceled"
    assert reason_name(DomainState.PAUSED, PausedReason.API_ERROR) == "api-error"
    assert reason_name(DomainState.PAUSED, 999) == "unknown"
    assert DomainState.SHUTOFF.label == "shut off"


# --- params --------------------------------------------------------------------------------------


def test_table_has_every_libvirt_param_with_its_type() -> None:
    expected = {
        "migrate_uri": "string", "destination_name": "string", "destination_xml": "string",
        "persistent_xml": "string", "bandwidth": "ullong", "bandwidth.postcopy": "ullong",
        "graphics_uri": "string", "listen_address": "string", "migrate_disks": "string",
        "disks_port": "int", "disks_uri": "string", "compression": "string",
        "compression.mt.level": "int", "compression.mt.threads": "int",
        "compression.mt.dthreads": "int", "compression.xbzrle.cache": "ullong",
        "compression.zlib.level": "int", "compression.zstd.level": "int",
        "auto_converge.initial": "int", "auto_converge.increment": "int",
        "parallel.connections": "int", "tls.destination": "string",
        # virtmig's own
        "virtmig.stall_timeout": "ullong", "virtmig.completion_timeout": "ullong",
        "virtmig.completion_timeout_action": "string", "virtmig.dest_uri": "string",
    }
    assert {n: s.type.value for n, s in MIGRATION_PARAMS.items()} == expected
    assert {n for n, s in MIGRATION_PARAMS.items() if s.multiple} == {"migrate_disks",
                                                                      "compression"}
    assert {"migrate_uri", "destination_name", "destination_xml",
                                  "bandwidth"} == NON_PARAMS_ALLOWED


def test_typed_params_wire_round_trip() -> None:
    params = TypedParams([
        TypedParam("a", ParamType.INT, -5), TypedParam("b", ParamType.UINT, 5),
        TypedParam("c", ParamType.LLONG, -(2**40)), TypedParam("d", ParamType.ULLONG, 2**63),
        TypedParam("e", ParamType.DOUBLE, 1.5), TypedParam("f", ParamType.BOOLEAN, True),
        TypedParam("g", ParamType.STRING, "x"),
    ])
    assert from_wire(to_wire(params)) == params


def test_value_must_fit_its_type() -> None:
    with pytest.raises(errors.InvalidArgument):
        TypedParam("x", ParamType.UINT, -1)
    with pytest.raises(errors.InvalidArgument):
        TypedParam("x", ParamType.INT, 2**31)
    with pytest.raises(errors.InvalidArgument):
        TypedParam("x", ParamType.STRING, 3)
    with pytest.raises(errors.InvalidArgument):
        TypedParam("x", ParamType.ULLONG, True)


def test_value_missing_on_wire() -> None:
    with pytest.raises(errors.InvalidArgument, match="has no value"):
        from_wire([pb.TypedParam(name="x")])


def test_set_replaces_and_get_all() -> None:
    p = TypedParams.of({P.URI: "tcp://a:1"})
    p.set(P.URI, "tcp://b:2")
    assert p.get_all(P.URI) == ["tcp://b:2"]
    assert p.get_int(P.BANDWIDTH, 7) == 7


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ([TypedParam("nope", ParamType.STRING, "x")], "parameter 'nope' not supported"),
        ([TypedParam("bandwidth", ParamType.INT, 1)], "invalid type 'int'"),
        ([TypedParam("migrate_uri", ParamType.STRING, "a"),
          TypedParam("migrate_uri", ParamType.STRING, "b")], "occurs multiple times"),
        ([TypedParam("persistent_xml", ParamType.STRING, "x")], "requires flag"),
        ([TypedParam("graphics_uri", ParamType.STRING, "spice://h")],
         "not supported by this host"),
        ([TypedParam("compression", ParamType.STRING, "zstd")],
         "'compression' requires flag VIR_MIGRATE_COMPRESSED"),
    ],
)
def test_validation_messages(params: list[TypedParam], message: str) -> None:
    with pytest.raises(errors.VirtmigError, match=message):
        validate_migration_params(TypedParams(params), 0)


# --- compat --------------------------------------------------------------------------------------


def test_unknown_flag_bits_name_the_function() -> None:
    with pytest.raises(errors.InvalidArgument,
                       match=r"unsupported flags \(0x80000000\) in function f"):
        check_known_flags(1 << 31, "f")


@pytest.mark.parametrize("rule", RULES, ids=lambda r: r.message[:40])
def test_each_rule_fires_and_stays_quiet_otherwise(rule: object) -> None:
    from virtmig.proto.compat import Rule

    assert isinstance(rule, Rule)
    spec = MIGRATION_PARAMS.get(rule.param)
    value: int | str = 1 if spec is not None and spec.type is not ParamType.STRING else "x"
    params = TypedParams.of({rule.param: value}) if rule.param else None
    assert rule.violated(rule.when, params)
    with pytest.raises(errors.VirtmigError):
        check_rules(rule.when, params, rule.layer)
    if rule.unless_any:
        assert not rule.violated(rule.when | rule.unless_any, params)
    if rule.param:
        assert not rule.violated(rule.when, TypedParams())


def test_rule_error_and_message_are_libvirts() -> None:
    with pytest.raises(errors.OperationInvalid,
                       match=r"^Requested operation is not valid: offline migration must be "
                             r"specified with the persistent flag set$"):
        check_rules(F.OFFLINE, None, Layer.DRIVER)
    with pytest.raises(errors.ArgumentUnsupported,
                       match=r"^argument unsupported: post-copy migration is not supported "
                             r"with non-live or paused"):
        check_rules(F.POSTCOPY | F.LIVE | F.PAUSED, None, Layer.DRIVER)


def test_unsupported_flags_are_refused_not_ignored() -> None:
    with pytest.raises(errors.ArgumentUnsupported, match="VIR_MIGRATE_COMPRESSED"):
        check_migration(F.LIVE | F.COMPRESSED, None, "f")
    assert check_migration(F.LIVE | F.PERSIST_DEST, None, "f") == F.LIVE | F.PERSIST_DEST


def test_client_layer_only() -> None:
    check_rules(F.OFFLINE, None, Layer.CLIENT)  # a driver rule: not checked by the client
    with pytest.raises(errors.OperationInvalid):
        check_rules(F.OFFLINE, None, Layer.DRIVER)


# --- URIs ----------------------------------------------------------------------------------------


def test_connect_uris(monkeypatch: pytest.MonkeyPatch) -> None:
    assert parse_uri("virtmig+tcp://h") == ConnectURI("tcp", host="h", port=16609)
    assert parse_uri("virtmig+tcp://h:1234").grpc_target == "h:1234"
    assert parse_uri("virtmig+tcp://[::1]:5").grpc_target == "[::1]:5"
    assert parse_uri("virtmig+unix:///x/y.sock").grpc_target == "unix:/x/y.sock"
    monkeypatch.setenv("VIRTMIG_DEFAULT_URI", "virtmig+tcp://envhost:9")
    assert parse_uri(None).host == "envhost"
    monkeypatch.delenv("VIRTMIG_DEFAULT_URI")
    monkeypatch.setenv("VIRTMIG_RUN_DIR", "/tmp/rd")
    assert parse_uri(None).path == "/tmp/rd/virtmigd.sock"


@pytest.mark.parametrize("uri", ["qemu:///system", "virtmig+tcp://", "virtmig+tcp://h:x",
                                 "virtmig+unix://host/x"])
def test_bad_connect_uris(uri: str) -> None:
    with pytest.raises(errors.InvalidArgument):
        parse_uri(uri)


def test_loopback_uris() -> None:
    assert parse_uri("virtmig+tcp://localhost:1").is_loopback()
    assert parse_uri("virtmig+tcp://127.0.0.5").is_loopback()
    assert parse_uri("virtmig+unix:///s").is_loopback()
    assert not parse_uri("virtmig+tcp://10.0.0.2").is_loopback()
    assert not parse_uri("virtmig+tcp://host-b").is_loopback()


@pytest.mark.parametrize("uri", ["virtmig+tcp://localhost:1", "virtmig+tcp://localhost.localdomain",
                                 "virtmig:///", "virtmig+tcp:///x"])
def test_same_host_dconnuri_is_refused(uri: str) -> None:
    with pytest.raises(errors.InvalidArgument, match="Attempt to migrate guest to the same host"):
        check_not_local(uri)


@pytest.mark.parametrize("uri", ["virtmig+tcp://127.0.0.1:5", "virtmig+tcp://host-b",
                                 "virtmig+unix:///run/other.sock"])
def test_other_dconnuri_is_accepted(uri: str) -> None:
    check_not_local(uri)


def test_tls_connect_uris() -> None:
    assert parse_uri("virtmig+tls://h") == ConnectURI("tls", host="h", port=16614)
    assert parse_uri("virtmig+tls://h:7?pkipath=/etc/pki/x") == ConnectURI(
        "tls", host="h", port=7, pki_dir="/etc/pki/x")
    assert parse_uri("virtmig+tls://[::1]:5").grpc_target == "[::1]:5"
    assert parse_uri("virtmig+tls://h/").port == 16614


@pytest.mark.parametrize(("uri", "refusal"), [
    ("virtmig+tcp://h?pkipath=/x", "unsupported parameter 'pkipath'"),  # plain TCP has no PKI
    ("virtmig+tls://h:7/system", "unsupported path '/system'"),
    ("virtmig+tcp://h:7/a/b?c=d", "unsupported path '/a/b'"),
    ("virtmig+tls://h:7?no_verify=1", "unsupported parameter 'no_verify'"),
    ("virtmig+tcp://h?x", "unsupported parameter 'x'"),
    ("virtmig+unix:///run/s.sock?socket=/x", "unsupported parameter 'socket'"),
    ("virtmig+tcp://root@h", "unsupported user name"),
    ("virtmig+tls://h#frag", "unsupported fragment '#frag'"),
])
def test_connect_uri_parts_not_understood_are_refused(uri: str, refusal: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=f"^invalid argument: {refusal} in "
                                                     f"connection URI '{re.escape(uri)}'"):
        parse_uri(uri)


@pytest.mark.parametrize("uri", [
    "virtmig+tls://h:16614", "virtmig+tls://h:1?pkipath=/a/b", "virtmig+tls://[::1]:2",
    "virtmig+tls://h:3?pkipath=/a%20dir/%3Fx%26y", "virtmig+tcp://h:4", "virtmig+unix:///s",
])
def test_connect_uris_round_trip(uri: str) -> None:
    assert str(parse_uri(uri)) == uri
    assert parse_uri(str(parse_uri(uri))) == parse_uri(uri)


@pytest.mark.parametrize(("uri", "message"), [
    ("virtmig+tls://h?no_verify=1", "unsupported parameter 'no_verify'"),
    ("virtmig+tls://h?pkipath=", "empty pkipath"),
    ("virtmig+tls://", "missing host"),
])
def test_bad_tls_uris(uri: str, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        parse_uri(uri)


def test_listen_uris() -> None:
    assert parse_listen("tcp://0.0.0.0:0").grpc_address == "0.0.0.0:0"
    assert parse_listen("unix:///run/x.sock").grpc_address == "unix:/run/x.sock"
    assert parse_listen("tls://0.0.0.0") == ListenURI("tls", host="0.0.0.0", port=16614)
    assert parse_listen("tcp://h") == ListenURI("tcp", host="h", port=16609)
    with pytest.raises(errors.InvalidArgument):
        parse_listen("http://x")


@pytest.mark.parametrize("uri", ["virtmig+tls://[::1", "virtmig+tcp://[127.0.0.1]:16509"])
def test_unparsable_uris_are_invalid_arguments(uri: str) -> None:
    """urllib's ValueError (an unbalanced '[', an IPv4 address in brackets) is the caller's
    mistake, not a daemon bug (the property tests found it in a migration URI; connection and
    listen URIs had the same gap)."""
    for parse in (parse_uri, check_not_local, parse_listen):
        with pytest.raises(errors.InvalidArgument, match=r"cannot parse (connection|listen) URI"):
            parse(uri)


# --- compression and parallel connections (libvirt's rules; the qemu backend acts on them) ------

C = MigrateFlags.COMPRESSED
PAR = MigrateFlags.PARALLEL


def _params(*items: tuple[str, object]) -> TypedParams:
    out = TypedParams()
    for name, value in items:
        out.add(name, value)  # type: ignore[arg-type]
    return out


def test_compression_defaults_and_settings() -> None:
    assert compression_settings(TypedParams(), 0) == Compression()
    assert compression_settings(TypedParams(), C).methods == ("xbzrle",)
    c = compression_settings(_params(("compression", "mt"), ("compression", "xbzrle"),
                                     ("compression.mt.level", 3),
                                     ("compression.mt.threads", 4),
                                     ("compression.mt.dthreads", 2),
                                     ("compression.xbzrle.cache", 1 << 26)), C)
    assert c.methods == ("mt", "xbzrle") and c.multifd_method == ""
    assert (c.mt_level, c.mt_threads, c.mt_dthreads, c.xbzrle_cache) == (3, 4, 2, 1 << 26)
    z = compression_settings(_params(("compression", "zstd"),
                                     ("compression.zstd.level", 7)), C | PAR)
    assert z.multifd_method == "zstd" and z.zstd_level == 7


@pytest.mark.parametrize(
    ("items", "flags", "message"),
    [
        ([("compression", "lz4")], C, "Unsupported compression method 'lz4'"),
        ([("compression", "mt"), ("compression", "mt")], C,
         "Compression method 'mt' is specified twice"),
        ([("compression", "zlib")], C, "Compression method 'zlib' is only supported with "
                                       "parallel migration"),
        ([("compression", "zlib"), ("compression", "zstd")], C | PAR,
         "Only one compression method could be specified with parallel compression"),
        ([("compression", "mt")], C | PAR, "Compression method 'mt' isn't supported with "
                                           "parallel migration"),
        ([], C | PAR, "Compression method 'xbzrle' isn't supported with parallel migration"),
        ([("compression.mt.level", 3)], 0, "Turn multithread compression on to tune it"),
        ([("compression", "mt"), ("compression.xbzrle.cache", 1 << 20)], C,
         "Turn xbzrle compression on to tune it"),
        ([("compression", "zlib"), ("compression.zstd.level", 3)], C | PAR,
         "Turn zstd compression on to tune it"),
    ],
)
def test_compression_errors(items: list[tuple[str, object]], flags: int, message: str) -> None:
    with pytest.raises(errors.InvalidArgument, match=message):
        compression_settings(_params(*items), flags)


AC = MigrateFlags.AUTO_CONVERGE
PC = MigrateFlags.POSTCOPY
MAXBW = MAX_BANDWIDTH_MIB

# Each typed parameter's range: the last value accepted and the first refused, at each end.
RANGES: list[tuple[str, int, int, int]] = [
    # name, the flags it needs, the lowest and the highest value accepted
    ("bandwidth", 0, 0, MAXBW),
    ("bandwidth.postcopy", PC, 0, MAXBW),
    ("compression.mt.level", C, 0, 9),
    ("compression.mt.threads", C, 1, 255),
    ("compression.mt.dthreads", C, 1, 255),
    ("compression.zlib.level", C | PAR, 0, 9),
    ("compression.zstd.level", C | PAR, 0, 20),
    ("compression.xbzrle.cache", C, 4096, 2**63),
    ("auto_converge.initial", AC, 1, 99),
    ("auto_converge.increment", AC, 1, 99),
    ("parallel.connections", PAR, 1, 255),
    ("virtmig.stall_timeout", 0, 0, 2**31 - 1),
    ("virtmig.completion_timeout", 0, 0, 2**31 - 1),
]
_METHOD = {"compression.mt": "mt", "compression.zlib": "zlib", "compression.zstd": "zstd",
           "compression.xbzrle": "xbzrle"}


def _fits(ptype: ParamType, value: int) -> bool:
    try:
        TypedParam("x", ptype, value)
    except errors.InvalidArgument:
        return False
    return True


def _one(name: str, value: int) -> TypedParams:
    params = TypedParams()
    method = next((m for prefix, m in _METHOD.items() if name.startswith(prefix)), None)
    if method is not None:
        params.add("compression", method)
    params.add(name, value)
    return params


@pytest.mark.parametrize("entry", RANGES, ids=lambda e: e[0])
def test_every_typed_param_has_a_range(entry: tuple[str, int, int, int]) -> None:
    name, flags, lo, hi = entry
    spec = MIGRATION_PARAMS[name]
    assert spec.range is not None and (spec.range.lo, spec.range.hi) == (lo, hi)
    for ok in (lo, hi):
        validate_migration_params(_one(name, ok), flags)
        check_param_values(_one(name, ok))
    refused = [v for v in (lo - 1, hi + 1) if _fits(spec.type, v)]
    assert refused  # every range is narrower than its type
    for bad in refused:
        for check in (lambda p: validate_migration_params(p, flags), check_param_values):
            with pytest.raises(errors.InvalidArgument, match=f"{name}|bandwidth must be less"):
                check(_one(name, bad))


def test_every_numeric_param_is_in_the_range_table() -> None:
    numeric = {n for n, s in MIGRATION_PARAMS.items() if s.type is not ParamType.STRING}
    assert numeric == {e[0] for e in RANGES} | {"disks_port"}


def test_range_messages() -> None:
    with pytest.raises(errors.Overflow,
                       match=f"^numerical overflow: bandwidth must be less than {MAXBW + 1}$"):
        validate_migration_params(_params(("bandwidth", 2**64 - 1)), 0)
    with pytest.raises(errors.InvalidArgument, match=(
            r"^invalid argument: parameter 'compression.mt.level' must be between 0 and 9, "
            r"got 10$")):
        validate_migration_params(_one("compression.mt.level", 10), C)
    with pytest.raises(errors.InvalidArgument,
                       match=r"'compression\.xbzrle\.cache' must be a power of two, got 12288"):
        validate_migration_params(_one("compression.xbzrle.cache", 12288), C)
    with pytest.raises(errors.InvalidArgument, match=(
            r"'virtmig\.completion_timeout_action' must be one of abort, suspend, postcopy, "
            r"got 'explode'")):
        validate_migration_params(_params(("virtmig.completion_timeout_action", "explode")), 0)
    assert check_max_speed(MAXBW) == MAXBW
    with pytest.raises(errors.Overflow, match="bandwidth must be less than"):
        check_max_speed(MAXBW + 1)
    assert check_max_downtime(1) == 1 and check_max_downtime(MAX_DOWNTIME_MS) == MAX_DOWNTIME_MS
    for bad in (0, MAX_DOWNTIME_MS + 1, 2**64 - 1):
        with pytest.raises(errors.InvalidArgument, match=(
                f"^invalid argument: Invalid downtime {bad}: must be between 1 and "
                f"{MAX_DOWNTIME_MS} ms$")):
            check_max_downtime(bad)


def test_parallel_and_compressed_depend_on_the_backend() -> None:
    for flag in (C, PAR):
        with pytest.raises(errors.ArgumentUnsupported, match="not supported by this host"):
            check_migration(flag | MigrateFlags.LIVE, TypedParams(), "f")
        check_migration(flag | MigrateFlags.LIVE, TypedParams(), "f", backend_flags=C | PAR)
