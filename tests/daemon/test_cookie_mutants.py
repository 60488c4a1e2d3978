"""The migration cookie's output style and parse details, to the letter.

Written against mutmut's survivors in ``virtmig.daemon.cookie`` (``make mutate``): each test pins
a detail that a mutant changed and the golden-file tests did not notice.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from virtmig.daemon.cookie import (
    MAX_COOKIE_BYTES,
    Cookie,
    CookieFlag,
    MigrationStats,
    build_cookie,
    canonical_domain_xml,
    parse_cookie,
)
from virtmig.proto.errors import InternalError

VM_UUID = "dcf47dbd-46d1-4d5b-b442-262a806a333a"
SRC_HOSTUUID = "4a802f00-4cba-5df6-9679-a08c4c5b577f"
DST_HOSTUUID = "8b3f4dc4-6a8e-5f9b-94a5-4c35babd8d95"
MINIMAL = Cookie(name="vm1", uuid=VM_UUID, hostname="src.example.org", hostuuid=SRC_HOSTUUID)

ALL = CookieFlag(0)
for _flag in CookieFlag:
    ALL |= _flag


def parse(data: bytes, accept: CookieFlag = ALL) -> Cookie:
    return parse_cookie(data, expected_name="vm1", expected_uuid=VM_UUID,
                        local_hostuuid=DST_HOSTUUID, accept=accept)


def body(inner: str) -> bytes:
    return ("<qemu-migration><name>vm1</name>"
            f"<uuid>{VM_UUID}</uuid><hostname>h</hostname><hostuuid>{SRC_HOSTUUID}</hostuuid>"
            f"{inner}</qemu-migration>").encode() + b"\0"


def internal_error(data: bytes, accept: CookieFlag = ALL) -> str:
    """The detail of the internal error ``data`` gets (its message is libvirt's prefix + it)."""
    with pytest.raises(InternalError) as info:
        parse(data, accept)
    assert str(info.value) == f"internal error: {info.value.detail}"
    return info.value.detail


# --- output style ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner", "expected"),
    [
        ("a<br/>b", "a<br/>b"),  # an empty child stays empty
        ("a<b><i>x</i></b>", "a<b><i>x</i></b>"),  # a child with children only
        ("a<b/>", "a<b/>"),  # a last child without tail
        ("a<b>t</b>", "a<b>t</b>"),
        ("a<b x='1'/>c &amp; &lt;d&gt;", "a<b x='1'/>c &amp; &lt;d&gt;"),
    ],
)
def test_mixed_content_is_written_as_it_came(inner: str, expected: str) -> None:
    xml = f"<domain><name>vm1</name><p>{inner}</p></domain>"
    assert canonical_domain_xml(xml) == (
        f"<domain>\n  <name>vm1</name>\n  <p>{expected}</p>\n</domain>\n")


def test_namespaced_attributes_keep_their_prefix() -> None:
    xml = ("<domain xmlns:a='urn:a' xmlns:b='urn:a'><name xml:lang='en'>vm1</name>"
           "<metadata><a:g a:x='1' y='2'/></metadata></domain>")
    assert canonical_domain_xml(xml) == (
        "<domain xmlns:a='urn:a' xmlns:b='urn:a'>\n"
        "  <name xml:lang='en'>vm1</name>\n"
        "  <metadata>\n"
        "    <a:g a:x='1' y='2'/>\n"
        "  </metadata>\n"
        "</domain>\n")


def test_default_namespace_is_written_and_undone() -> None:
    xml = ("<domain><metadata><g xmlns='urn:g'><h/><k xmlns=''/></g></metadata>"
           "<devices/></domain>")
    assert canonical_domain_xml(xml) == (
        "<domain>\n"
        "  <metadata>\n"
        "    <g xmlns='urn:g'>\n"
        "      <h/>\n"
        "      <k xmlns=''/>\n"
        "    </g>\n"
        "  </metadata>\n"
        "  <devices/>\n"
        "</domain>\n")


def test_text_and_attribute_escapes() -> None:
    xml = ("<domain><name>a&amp;b&lt;c&gt;d'e\"f&#13;</name>"
           "<x v=\"&amp;&lt;&gt;'&quot;&#13;&#10;&#9;\"/></domain>")
    assert canonical_domain_xml(xml) == (
        "<domain>\n"
        "  <name>a&amp;b&lt;c&gt;d&apos;e&quot;f&#13;</name>\n"
        "  <x v='&amp;&lt;&gt;&apos;&quot;&#13;&#10;&#9;'/>\n"
        "</domain>\n")


def test_utf8_domain_xml() -> None:
    xml = "<domain><description>h\u00f6st \u2603</description></domain>"
    assert canonical_domain_xml(xml) == (
        "<domain>\n  <description>h\u00f6st \u2603</description>\n</domain>\n")


def test_statistics_and_capabilities_are_written_in_order() -> None:
    c = dataclasses.replace(MINIMAL, mandatory=("persistent",),
                            statistics=MigrationStats(started=1, downtime=-2),
                            capabilities=(("xbzrle", True), ("multifd", False)))
    text = build_cookie(c).decode()
    assert text.startswith(
        "<qemu-migration>\n  <name>vm1</name>\n"
        f"  <uuid>{VM_UUID}</uuid>\n  <hostname>src.example.org</hostname>\n"
        f"  <hostuuid>{SRC_HOSTUUID}</hostuuid>\n  <feature name='persistent'/>\n"
        "  <statistics>\n    <started>1</started>\n    <stopped>0</stopped>\n")
    assert "    <downtime>-2</downtime>\n" in text
    assert text.endswith(
        "    <memory_page_size>0</memory_page_size>\n  </statistics>\n"
        "  <capabilities>\n    <cap name='xbzrle' auto='yes'/>\n"
        "    <cap name='multifd' auto='no'/>\n  </capabilities>\n</qemu-migration>\n\0")


# --- parsing -----------------------------------------------------------------------------------


def test_statistics_values_may_be_signed_and_padded() -> None:
    got = parse(body("<statistics><delta> -12 </delta><downtime>+3</downtime>"
                     "<sent>0</sent></statistics>"))
    assert got.statistics == MigrationStats(delta=-12, downtime=3)


@pytest.mark.parametrize("value", ["1.5", "0x10", "1 2", "--1", " x "])
def test_statistics_values_must_be_integers(value: str) -> None:
    message = internal_error(body(f"<statistics><downtime>{value}</downtime></statistics>"))
    assert message == ("Malformed downtime element in migration cookie statistics: "
                       f"'{value.strip()}'")


def test_empty_statistics_value_is_absent() -> None:
    got = parse(body("<statistics><downtime></downtime><started>4</started></statistics>"))
    assert got.statistics == MigrationStats(started=4)


def test_capability_auto_only_when_yes() -> None:
    got = parse(body("<capabilities><cap name='a' auto='yes'/><cap name='b' auto='YES'/>"
                     "<cap name='c' auto='no'/></capabilities>"))
    assert got.capabilities == (("a", True), ("b", False), ("c", False))


def test_features_kept_in_order() -> None:
    got = parse(body("<feature name='statistics'/><feature name='persistent'/>"))
    assert got.mandatory == ("statistics", "persistent")


def test_text_of_an_element_is_all_its_text() -> None:
    got = parse(body("").replace(b"<hostname>h</hostname>",
                                 b"<hostname>a<x>b</x>c</hostname>"))
    assert got.hostname == "abc"


def test_uuid_with_spaces_and_upper_case() -> None:
    spaced = " " + VM_UUID.upper().replace("-", " ") + " "
    data = body("").replace(VM_UUID.encode(), spaced.encode())
    assert parse(data).uuid == VM_UUID


@pytest.mark.parametrize("uuid", [VM_UUID[:-1], VM_UUID + "0", VM_UUID[:-1] + "g",
                                  VM_UUID[:-1] + "X"])
def test_malformed_uuids(uuid: str) -> None:
    data = body("").replace(VM_UUID.encode(), uuid.encode())
    assert internal_error(data) == (
        f"Incoming cookie data had unexpected UUID {uuid} vs {VM_UUID}")
    with pytest.raises(ValueError, match="is not a UUID"):
        parse_cookie(body(""), expected_name="vm1", expected_uuid=uuid,
                     local_hostuuid=DST_HOSTUUID, accept=ALL)
    with pytest.raises(ValueError, match="is not a UUID"):
        parse_cookie(body(""), expected_name="vm1", expected_uuid=VM_UUID,
                     local_hostuuid=uuid, accept=ALL)


def test_size_limit_is_inclusive() -> None:
    # 1 MiB text nodes: lxml refuses a single text node over 10 MB (huge_tree is off)
    pad = "<p>" + "x" * (1 << 20) + "</p>"
    short = MAX_COOKIE_BYTES - len(body(""))
    data = body(pad * (short // len(pad)) + "<p>" + "x" * (short % len(pad) - 7) + "</p>")
    assert len(data) == MAX_COOKIE_BYTES
    assert parse(data).name == "vm1"
    data = data[:-1] + b" \0"
    assert internal_error(data) == (
        f"Migration cookie too large: {len(data)} bytes (limit {MAX_COOKIE_BYTES})")


def test_comments_and_processing_instructions_are_dropped() -> None:
    xml = "<domain><!-- c --><?pi x?><name>vm1</name></domain>"
    assert canonical_domain_xml(xml) == "<domain>\n  <name>vm1</name>\n</domain>\n"


# --- the parser's safety settings --------------------------------------------------------------


def test_external_entities_are_never_loaded(tmp_path: Path) -> None:
    broken = tmp_path / "entity.xml"
    broken.write_text("<broken")  # a parser that loaded it would fail on it
    doctype = f'<!DOCTYPE qemu-migration [<!ENTITY x SYSTEM "{broken.as_uri()}">]>'
    data = doctype.encode() + body("<p>&x;</p>")
    assert internal_error(data) == (
        "Malformed migration cookie: DOCTYPE declarations are not allowed")


def test_deep_documents_are_refused() -> None:
    assert parse(body("<a>" * 250 + "</a>" * 250)).name == "vm1"
    message = internal_error(body("<a>" * 300 + "</a>" * 300))
    assert message.startswith("Malformed migration cookie XML: Excessive depth in document")


def test_namespace_declarations_default_first_then_by_prefix() -> None:
    xml = ("<domain><metadata><g xmlns:b='urn:b' xmlns='urn:g' xmlns:A='urn:A'/>"
           "</metadata></domain>")
    assert canonical_domain_xml(xml) == (
        "<domain>\n  <metadata>\n"
        "    <g xmlns='urn:g' xmlns:A='urn:A' xmlns:b='urn:b'/>\n"
        "  </metadata>\n</domain>\n")


# --- virtmig's own elements: the stream token and the migration id ---------------------------

TOKEN = "0123456789abcdef0123456789abcdef"
MID = "fedcba9876543210fedcba9876543210"


def test_the_token_and_the_migration_id_are_written_last_and_read_back() -> None:
    c = dataclasses.replace(MINIMAL, stream_token=TOKEN, migration_id=MID)
    data = build_cookie(c)
    assert data.decode().endswith(
        f"  <hostuuid>{SRC_HOSTUUID}</hostuuid>\n"
        f"  <virtmig-stream-token>{TOKEN}</virtmig-stream-token>\n"
        f"  <virtmig-migration-id>{MID}</virtmig-migration-id>\n"
        "</qemu-migration>\n\0")
    assert parse(data, CookieFlag(0)) == c


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stream_token": TOKEN.upper()}, "malformed stream token"),
        ({"migration_id": MID + "0"}, "malformed migration id"),
    ],
)
def test_a_malformed_token_or_migration_id_is_not_built(
    change: dict[str, str], message: str
) -> None:
    """A build error, not the parse error that a peer's bad element gets."""
    with pytest.raises(InternalError) as info:
        build_cookie(dataclasses.replace(MINIMAL, **change))  # type: ignore[arg-type]
    assert str(info.value) == f"internal error: cannot build migration cookie: {message}"


def test_the_migration_id_may_be_padded() -> None:
    assert parse(body(f"<virtmig-migration-id> {MID}\n</virtmig-migration-id>")).migration_id \
        == MID
    assert parse(body("")).migration_id == ""


@pytest.mark.parametrize("bad", ["", "xyz", MID.upper(), MID + "0", "<b/>"])
def test_a_malformed_migration_id_is_refused(bad: str) -> None:
    message = internal_error(body(f"<virtmig-migration-id>{bad}</virtmig-migration-id>"))
    assert message == "Malformed virtmig-migration-id element in migration cookie"


@pytest.mark.parametrize("bad", ["", "xyz", TOKEN.upper(), TOKEN + "0"])
def test_a_malformed_token_is_refused_and_not_shown(bad: str) -> None:
    message = internal_error(body(f"<virtmig-stream-token>{bad}</virtmig-stream-token>"))
    assert message == "Malformed virtmig-stream-token element in migration cookie"
