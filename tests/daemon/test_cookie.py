"""The migration cookie: golden files, round trips, and each of libvirt's parse checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from virtmig.daemon.cookie import (
    ACCEPT_CONFIRM,
    ACCEPT_FINISH,
    ACCEPT_PERFORM,
    ACCEPT_PREPARE,
    MAX_COOKIE_BYTES,
    Cookie,
    CookieFlag,
    MigrationStats,
    build_cookie,
    canonical_domain_xml,
    mandatory_features,
    parse_cookie,
    parse_cookie_opt,
)
from virtmig.proto.errors import InternalError, XMLError

DATA = Path(__file__).parent / "data" / "cookie"

VM_NAME = "vm1"
VM_UUID = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
SRC_HOSTUUID = "4a802f00-4cba-5df6-9679-a08c4c5b577f"
DST_HOSTUUID = "8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"

ALL = CookieFlag(0)
for _flag in CookieFlag:
    ALL |= _flag

DOMAIN_XML = """\
<domain type='virtmig'>
  <name>vm1</name>
  <uuid>dcf47dbd-46d1-4d5b-b442-262a806a333a</uuid>
  <description>web &amp; mail &lt;front&gt;</description>
  <metadata>
    <virtmig:guest xmlns:virtmig='urn:virtmig:domain:1' backend='test' dirty_rate='1000'/>
  </metadata>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <devices/>
</domain>
"""

MINIMAL = Cookie(name=VM_NAME, uuid=VM_UUID, hostname="src.example.org", hostuuid=SRC_HOSTUUID)

STATISTICS = dataclasses.replace(
    MINIMAL,
    statistics=MigrationStats(
        started=1700000000000,
        stopped=1700000004321,
        sent=1700000004400,
        delta=-12,
        time_elapsed=4400,
        downtime=35,
        setup_time=2,
        memory_total=1073741824,
        memory_processed=1105920000,
        memory_remaining=0,
        memory_bps=268435456,
        memory_constant=131072,
        memory_normal=131072,
        memory_normal_bytes=536870912,
        memory_dirty_rate=1000,
        memory_iteration=3,
        memory_page_size=4096,
    ),
)

PERSISTENT = dataclasses.replace(
    MINIMAL,
    mandatory=("persistent",),
    persistent_xml=DOMAIN_XML,
    capabilities=(("xbzrle", True), ("postcopy-ram", False)),
)

MANDATORY = dataclasses.replace(
    MINIMAL,
    mandatory=("memory-hotplug", "cpu-hotplug"),
    capabilities=(),
)

GOLDEN = {
    "minimal": MINIMAL,
    "statistics": STATISTICS,
    "persistent": PERSISTENT,
    "mandatory": MANDATORY,
}


def parse(data: bytes, accept: CookieFlag = ALL, **overrides: str) -> Cookie:
    kwargs = {"expected_name": VM_NAME, "expected_uuid": VM_UUID, "local_hostuuid": DST_HOSTUUID}
    kwargs.update(overrides)
    return parse_cookie(data, accept=accept, **kwargs)


def cookie_bytes(body: str) -> bytes:
    """A hand-written cookie: ``body`` goes after the four always-present elements."""
    return (
        "<qemu-migration>\n"
        f"  <name>{VM_NAME}</name>\n"
        f"  <uuid>{VM_UUID}</uuid>\n"
        "  <hostname>src.example.org</hostname>\n"
        f"  <hostuuid>{SRC_HOSTUUID}</hostuuid>\n"
        f"{body}"
        "</qemu-migration>\n"
    ).encode() + b"\0"


def expect_error(data: bytes, message: str, accept: CookieFlag = ALL) -> None:
    with pytest.raises(InternalError) as info:
        parse(data, accept)
    assert str(info.value) == message
    assert info.value.code == "VIR_ERR_INTERNAL_ERROR"


# ---------------------------------------------------------------------------------------------
# Golden files and round trips


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_build_matches_golden_file(name: str) -> None:
    data = build_cookie(GOLDEN[name])
    assert data.endswith(b"\0")
    assert data.count(b"\0") == 1
    assert data[:-1] == (DATA / f"{name}.xml").read_bytes()


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_parse_of_build_round_trips(name: str) -> None:
    assert parse(build_cookie(GOLDEN[name])) == GOLDEN[name]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_file_parses_to_its_cookie(name: str) -> None:
    assert parse((DATA / f"{name}.xml").read_bytes() + b"\0") == GOLDEN[name]


def test_build_is_deterministic() -> None:
    assert build_cookie(PERSISTENT) == build_cookie(dataclasses.replace(PERSISTENT))


def test_domain_xml_fixture_is_canonical() -> None:
    assert canonical_domain_xml(DOMAIN_XML) == DOMAIN_XML


def test_persistent_xml_comes_back_canonical() -> None:
    sent = (
        '<domain type="virtmig"><name>vm1</name>'
        "<!-- dropped --><description>two\n  lines</description>"
        "<p>mixed <b>content</b> kept</p></domain>"
    )
    got = parse(build_cookie(dataclasses.replace(MINIMAL, persistent_xml=sent)))
    assert got.persistent_xml == canonical_domain_xml(sent)
    assert got.persistent_xml == (
        "<domain type='virtmig'>\n"
        "  <name>vm1</name>\n"
        "  <description>two\n  lines</description>\n"
        "  <p>mixed <b>content</b> kept</p>\n"
        "</domain>\n"
    )
    assert canonical_domain_xml(got.persistent_xml) == got.persistent_xml


def test_special_characters_round_trip() -> None:
    c = dataclasses.replace(
        MINIMAL,
        name="it's <a> & \"b\"",
        hostname="h\u00f6st",
        capabilities=(("we'ird&<cap>", True),),
    )
    data = build_cookie(c)
    assert b"<name>it&apos;s &lt;a&gt; &amp; &quot;b&quot;</name>" in data
    assert "<hostname>h\u00f6st</hostname>".encode() in data
    assert parse(data, expected_name=c.name) == c


def test_uuids_are_written_canonically() -> None:
    c = dataclasses.replace(MINIMAL, uuid=VM_UUID.upper(), hostuuid=SRC_HOSTUUID.replace("-", ""))
    data = build_cookie(c)
    assert f"<uuid>{VM_UUID}</uuid>".encode() in data
    assert f"<hostuuid>{SRC_HOSTUUID}</hostuuid>".encode() in data


def test_mandatory_features_in_libvirt_bit_order() -> None:
    flags = CookieFlag.CPU_HOTPLUG | CookieFlag.PERSISTENT | CookieFlag.MEMORY_HOTPLUG
    assert mandatory_features(flags) == ("persistent", "memory-hotplug", "cpu-hotplug")
    assert mandatory_features(CookieFlag(0)) == ()


def test_feature_names_are_libvirts() -> None:
    assert [f.feature for f in CookieFlag] == [
        "graphics", "lockstate", "persistent", "network", "nbd", "statistics",
        "memory-hotplug", "cpu-hotplug", "cpu", "allowReboot", "capabilities",
        "block-dirty-bitmaps",
    ]
    assert [f.value for f in CookieFlag] == [1 << i for i in range(12)]
    assert CookieFlag.from_feature("allowReboot") is CookieFlag.ALLOW_REBOOT
    assert CookieFlag.from_feature("bogus") is None
    with pytest.raises(ValueError):
        _ = (CookieFlag.NBD | CookieFlag.CPU).feature


def test_accept_sets_per_step() -> None:
    assert ACCEPT_PREPARE == CookieFlag.CAPABILITIES
    assert ACCEPT_PERFORM == CookieFlag.CAPABILITIES
    assert ACCEPT_FINISH == CookieFlag.PERSISTENT | CookieFlag.STATISTICS
    assert ACCEPT_CONFIRM == CookieFlag.STATISTICS


# ---------------------------------------------------------------------------------------------
# What a parse returns


def test_empty_cookie_is_no_cookie() -> None:
    kwargs = {"expected_name": VM_NAME, "expected_uuid": VM_UUID, "local_hostuuid": DST_HOSTUUID}
    assert parse_cookie_opt(b"", accept=ALL, **kwargs) is None
    assert parse_cookie_opt(build_cookie(MINIMAL), accept=ALL, **kwargs) == MINIMAL
    with pytest.raises(InternalError, match="not NULL terminated"):
        parse_cookie(b"", accept=ALL, **kwargs)


def test_sections_not_accepted_are_ignored() -> None:
    full = dataclasses.replace(PERSISTENT, mandatory=(), statistics=STATISTICS.statistics)
    data = build_cookie(full)
    assert parse(data, CookieFlag(0)) == MINIMAL
    assert parse(data, CookieFlag.STATISTICS) == dataclasses.replace(
        MINIMAL, statistics=STATISTICS.statistics
    )
    assert parse(data, CookieFlag.PERSISTENT).persistent_xml == DOMAIN_XML
    assert parse(data, CookieFlag.CAPABILITIES).capabilities == PERSISTENT.capabilities


def test_two_domains_ignored_when_persistent_not_accepted() -> None:
    data = cookie_bytes("  <domain type='kvm'/>\n  <domain type='kvm'/>\n")
    assert parse(data, ALL & ~CookieFlag.PERSISTENT) == MINIMAL


def test_hostname_equal_to_ours_is_allowed() -> None:
    # libvirt stopped comparing hostnames; only the host UUID decides "same host".
    c = dataclasses.replace(MINIMAL, hostname="localhost")
    assert parse(build_cookie(c)).hostname == "localhost"


def test_uuids_compared_in_canonical_form() -> None:
    data = cookie_bytes("").replace(VM_UUID.encode(), VM_UUID.upper().encode())
    assert parse(data, expected_uuid=VM_UUID.replace("-", "")).uuid == VM_UUID


def test_libvirt_style_cookie_with_unmodelled_sections() -> None:
    # What libvirt itself sends: sections virtmig does not model are skipped, unknown statistics
    # and capabilities are kept or dropped as documented.
    data = cookie_bytes(
        "  <graphics type='spice' port='5900' listen='0.0.0.0' tlsPort='-1'/>\n"
        "  <lockstate driver='sanlock'>\n    <leases>abc</leases>\n  </lockstate>\n"
        "  <network>\n    <interface index='0' vporttype='openvswitch'/>\n  </network>\n"
        "  <nbd port='49153'>\n    <disk target='vda' capacity='10737418240'/>\n  </nbd>\n"
        "  <statistics>\n    <started>5</started>\n    <memory_postcopy_requests>8"
        "</memory_postcopy_requests>\n    <disk_total>10</disk_total>\n"
        "    <auto_converge_throttle>0</auto_converge_throttle>\n  </statistics>\n"
        "  <cpu mode='host-passthrough' check='partial' migratable='on'/>\n"
        "  <allowReboot value='yes'/>\n"
        "  <capabilities>\n    <cap name='xbzrle' auto='yes'/>\n"
        "    <cap name='multifd'/>\n  </capabilities>\n"
    )
    got = parse(data)
    assert got.statistics == MigrationStats(started=5)
    assert got.capabilities == (("xbzrle", True), ("multifd", False))
    assert got.persistent_xml is None


def test_libvirt_empty_capabilities_section() -> None:
    got = parse(cookie_bytes("  <capabilities>\n  </capabilities>\n"))
    assert got.capabilities == ()


def test_missing_statistics_elements_default_to_zero() -> None:
    got = parse(cookie_bytes("  <statistics>\n    <downtime>7</downtime>\n  </statistics>\n"))
    assert got.statistics == MigrationStats(downtime=7)


# ---------------------------------------------------------------------------------------------
# libvirt's cookie parse checks, one each


def test_not_nul_terminated() -> None:
    expect_error(build_cookie(MINIMAL)[:-1],
                 "internal error: Migration cookie was not NULL terminated")


def test_embedded_nul() -> None:
    data = build_cookie(MINIMAL)
    expect_error(data[:10] + b"\0" + data[10:],
                 "internal error: Migration cookie contains an embedded NUL byte")


def test_not_well_formed() -> None:
    with pytest.raises(InternalError, match=r"^internal error: Malformed migration cookie XML: "):
        parse(b"<qemu-migration><name>vm1</qemu-migration>\0")


def test_not_utf8() -> None:
    with pytest.raises(InternalError, match=r"^internal error: Malformed migration cookie XML: "):
        parse(cookie_bytes("").replace(b"src.example.org", b"src\xff"))


def test_wrong_root() -> None:
    expect_error(
        b"<migration><name>vm1</name></migration>\n\0",
        "internal error: Malformed migration cookie: unexpected root element <migration>, "
        "expecting <qemu-migration>",
    )


@pytest.mark.parametrize(
    "doctype",
    [
        "<!DOCTYPE qemu-migration>",
        "<!DOCTYPE qemu-migration SYSTEM 'http://example.com/x.dtd'>",
        "<!DOCTYPE qemu-migration [<!ENTITY big 'xxxxxxxx'>]>",
    ],
)
def test_doctype_refused(doctype: str) -> None:
    data = doctype.encode() + cookie_bytes("")
    expect_error(data,
                 "internal error: Malformed migration cookie: DOCTYPE declarations are not allowed")


def test_entities_never_expanded() -> None:
    data = b"<!DOCTYPE qemu-migration [<!ENTITY n 'vm1'>]>" + cookie_bytes("").replace(
        b"<name>vm1</name>", b"<name>&n;</name>"
    )
    expect_error(data,
                 "internal error: Malformed migration cookie: DOCTYPE declarations are not allowed")


def test_too_large() -> None:
    data = b" " * MAX_COOKIE_BYTES + cookie_bytes("")
    expect_error(
        data,
        f"internal error: Migration cookie too large: {len(data)} bytes (limit {MAX_COOKIE_BYTES})",
    )


def test_missing_name() -> None:
    expect_error(cookie_bytes("").replace(b"<name>vm1</name>", b""),
                 "internal error: missing name element in migration data")


def test_empty_name_is_missing() -> None:
    expect_error(cookie_bytes("").replace(b"<name>vm1</name>", b"<name></name>"),
                 "internal error: missing name element in migration data")


def test_unexpected_name() -> None:
    expect_error(cookie_bytes("").replace(b"<name>vm1</name>", b"<name>vm2</name>"),
                 "internal error: Incoming cookie data had unexpected name vm2 vs vm1")


def test_missing_uuid() -> None:
    expect_error(cookie_bytes("").replace(f"<uuid>{VM_UUID}</uuid>".encode(), b""),
                 "internal error: missing uuid element in migration data")


def test_unexpected_uuid() -> None:
    other = "11111111-2222-3333-4444-555555555555"
    expect_error(cookie_bytes("").replace(VM_UUID.encode(), other.encode()),
                 f"internal error: Incoming cookie data had unexpected UUID {other} vs {VM_UUID}")


def test_malformed_uuid_is_unexpected() -> None:
    # As libvirt: a uuid that is not one cannot match ours.
    expect_error(cookie_bytes("").replace(VM_UUID.encode(), b"not-a-uuid"),
                 "internal error: Incoming cookie data had unexpected UUID not-a-uuid vs "
                 f"{VM_UUID}")


def test_missing_hostname() -> None:
    expect_error(cookie_bytes("").replace(b"<hostname>src.example.org</hostname>", b""),
                 "internal error: missing hostname element in migration data")


def test_missing_hostuuid() -> None:
    expect_error(cookie_bytes("").replace(f"<hostuuid>{SRC_HOSTUUID}</hostuuid>".encode(), b""),
                 "internal error: missing hostuuid element in migration data")


def test_malformed_hostuuid() -> None:
    expect_error(cookie_bytes("").replace(SRC_HOSTUUID.encode(), b"4a802f00-zzzz"),
                 "internal error: malformed hostuuid element in migration data")


def test_same_host() -> None:
    expect_error(build_cookie(dataclasses.replace(MINIMAL, hostuuid=DST_HOSTUUID)),
                 f"internal error: Attempt to migrate guest to the same host {DST_HOSTUUID}")


def test_same_host_compares_canonical_forms() -> None:
    data = cookie_bytes("").replace(SRC_HOSTUUID.encode(), DST_HOSTUUID.upper().encode())
    expect_error(data, "internal error: Attempt to migrate guest to the same host "
                       f"{DST_HOSTUUID.upper()}")


def test_unknown_mandatory_feature() -> None:
    expect_error(cookie_bytes("  <feature name='teleport'/>\n"),
                 "internal error: Unknown migration cookie feature teleport")


def test_unsupported_mandatory_feature() -> None:
    expect_error(build_cookie(MANDATORY),
                 "internal error: Unsupported migration cookie feature memory-hotplug",
                 accept=ACCEPT_PREPARE)


def test_mandatory_feature_without_name() -> None:
    expect_error(cookie_bytes("  <feature/>\n"), "internal error: missing feature name")


def test_too_many_domains() -> None:
    expect_error(cookie_bytes("  <domain type='kvm'/>\n  <domain type='kvm'/>\n"),
                 "internal error: Too many domain elements in migration cookie",
                 accept=CookieFlag.PERSISTENT)


def test_malformed_statistics_value() -> None:
    expect_error(
        cookie_bytes("  <statistics>\n    <downtime>1_000</downtime>\n  </statistics>\n"),
        "internal error: Malformed downtime element in migration cookie statistics: '1_000'",
    )


def test_capability_without_name() -> None:
    expect_error(cookie_bytes("  <capabilities>\n    <cap auto='yes'/>\n  </capabilities>\n"),
                 "internal error: missing migration capability name")


# ---------------------------------------------------------------------------------------------
# Build refusals


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": ""}, "internal error: cannot build migration cookie: empty name"),
        ({"hostname": ""}, "internal error: cannot build migration cookie: empty hostname"),
        ({"uuid": "nope"}, "internal error: cannot build migration cookie: malformed uuid 'nope'"),
        ({"hostuuid": ""}, "internal error: cannot build migration cookie: malformed hostuuid ''"),
        ({"mandatory": ("",)}, "internal error: cannot build migration cookie: empty feature name"),
        ({"capabilities": (("", False),)},
         "internal error: cannot build migration cookie: empty capability name"),
    ],
)
def test_build_refuses_bad_values(change: dict[str, object], message: str) -> None:
    with pytest.raises(InternalError) as info:
        build_cookie(dataclasses.replace(MINIMAL, **change))  # type: ignore[arg-type]
    assert str(info.value) == message


def test_build_refuses_control_characters() -> None:
    with pytest.raises(InternalError, match=r"^internal error: cannot build migration cookie: "):
        build_cookie(dataclasses.replace(MINIMAL, hostname="bad\x01host"))


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("<domain>", "XML error: persistent domain XML is not well-formed: "),
        ("<vm/>",
         "XML error: persistent domain XML: unexpected root element <vm>, expecting <domain>"),
        ("<!DOCTYPE domain><domain/>",
         "XML error: persistent domain XML: DOCTYPE declarations are not"),
    ],
)
def test_build_refuses_bad_persistent_xml(xml: str, message: str) -> None:
    with pytest.raises(XMLError) as info:
        build_cookie(dataclasses.replace(MINIMAL, persistent_xml=xml))
    assert str(info.value).startswith(message)


def test_destination_downtime_counts_from_the_source_stop() -> None:
    """libvirt's destination downtime: the source's, plus the time since it sent its cookie
    (clock delta applied); a gap from clocks that disagree is not counted."""
    from virtmig.daemon.backend.base import MigrationProgress
    from virtmig.daemon.cookie import MigrationStats
    from virtmig.daemon.migration.destination import dst_downtime

    local = MigrationProgress(downtime_ms=0)
    stats = MigrationStats(sent=10_000, downtime=7)
    assert dst_downtime(local, stats, 10_005).downtime_ms == 12
    assert dst_downtime(local, MigrationStats(sent=10_000, delta=3, downtime=7),
                        10_005).downtime_ms == 9
    assert dst_downtime(local, stats, 9_000).downtime_ms == 7  # the clocks disagree
    assert dst_downtime(local, stats, 10_000 + 3_600_000).downtime_ms == 7
    assert dst_downtime(local, stats, 10_000 + 60_000).downtime_ms == 60_007  # the bound counts
    assert dst_downtime(MigrationProgress(downtime_ms=40), stats, 10_005).downtime_ms == 40
    assert dst_downtime(local, MigrationStats(), 10_005).downtime_ms == 0


def test_host_cpu_digest_round_trips_and_is_checked() -> None:
    """``<virtmig-host-cpu>`` (cookie A, host-passthrough guests): carried as given, absent
    when empty, a malformed one refused both ways."""
    kwargs = {"expected_name": VM_NAME, "expected_uuid": VM_UUID, "local_hostuuid": DST_HOSTUUID}
    with_cpu = dataclasses.replace(MINIMAL, host_cpu="ab" * 32)
    data = build_cookie(with_cpu)
    assert b"<virtmig-host-cpu>" + b"ab" * 32 + b"</virtmig-host-cpu>" in data
    assert parse_cookie(data, accept=ACCEPT_PREPARE, **kwargs).host_cpu == "ab" * 32
    assert b"virtmig-host-cpu" not in build_cookie(MINIMAL)
    assert parse_cookie(build_cookie(MINIMAL), accept=ALL, **kwargs).host_cpu == ""
    with pytest.raises(InternalError, match="malformed host CPU digest"):
        build_cookie(dataclasses.replace(MINIMAL, host_cpu="AB" * 32))
    bad = data.replace(b"ab" * 32, b"ab" * 31)
    with pytest.raises(InternalError, match="Malformed virtmig-host-cpu element"):
        parse_cookie(bad, accept=ALL, **kwargs)
