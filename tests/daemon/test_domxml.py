"""Domain XML: safe parsing, fields, verbatim round trip, migratable form, ABI checks."""

from __future__ import annotations

import dataclasses
import re
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from lxml import etree

from virtmig.daemon import domxml
from virtmig.daemon.domxml import (
    MAX_XML_BYTES,
    VIRTMIG_NS,
    DomainDef,
    check_abi_stability,
    device_counts,
    format_domain_xml,
    parse_domain_xml,
    parse_memory_kib,
    rename,
)
from virtmig.proto.errors import ConfigUnsupported, InvalidArgument, XMLError

DATA = Path(__file__).parent / "data" / "domxml"
REALISTIC = (DATA / "realistic.xml").read_text()
REALISTIC_UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"
UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def dom(
    body: str = "<memory>1024</memory>",
    *,
    head: str = "<domain type='test'>",
    name: str = "<name>vm1</name>",
    uuid: str = f"<uuid>{UUID}</uuid>",
) -> str:
    return f"{head}\n  {name}\n  {uuid}\n  {body}\n</domain>\n"


def c14n(text: str) -> bytes:
    return etree.tostring(etree.fromstring(text.encode()).getroottree(), method="c14n")


def raises(exc: type[Exception], text: str | bytes, match: str) -> None:
    with pytest.raises(exc, match=match):
        parse_domain_xml(text)


# --------------------------------------------------------------------------------------------
# Minimal documents and defaults


def test_minimal_defaults() -> None:
    d = parse_domain_xml(dom())
    assert d.name == "vm1"
    assert d.uuid == UUID
    assert d.domain_type == "test"
    assert d.memory_kib == 1024
    assert d.current_memory_kib == 1024
    assert d.vcpus == 1
    assert (d.os_type, d.arch, d.machine) == ("hvm", "x86_64", "")
    assert dict(d.options) == {}


def test_bytes_input_and_str_input_agree() -> None:
    assert parse_domain_xml(dom().encode()) == parse_domain_xml(dom())


@pytest.mark.parametrize("virt_type", ["test", "qemu", "kvm"])
def test_domain_types(virt_type: str) -> None:
    assert parse_domain_xml(dom(head=f"<domain type='{virt_type}'>")).domain_type == virt_type


def test_domain_def_is_frozen_and_hashable() -> None:
    d = parse_domain_xml(dom())
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.name = "other"  # type: ignore[misc]
    assert hash(d) == hash(parse_domain_xml(d.xml))
    assert "xml=" not in repr(d)


# --------------------------------------------------------------------------------------------
# Root element and name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<guest type='test'><name>x</name></guest>", "unexpected root element <guest>"),
        (
            "<domain xmlns='urn:other' type='test'><name>x</name></domain>",
            re.escape("unexpected root element <{urn:other}domain>, expecting <domain>"),
        ),
        ("<domain><name>x</name><memory>1</memory></domain>",
         "^XML error: missing domain type attribute$"),
        (
            "<domain type='xen'><name>x</name><memory>1</memory></domain>",
            "^XML error: invalid domain type 'xen': expected one of kvm, qemu, test$",
        ),
        ("<domain type='test'><memory>1</memory></domain>",
         "^XML error: missing name information$"),
        ("<domain type='test'><name/><memory>1</memory></domain>",
         "^XML error: missing name information$"),
    ],
)
def test_root_and_type_errors(text: str, message: str) -> None:
    raises(XMLError, text, message)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a/b", "^XML error: name a/b cannot contain '/'$"),
        (" vm", "^XML error: name ' vm' must not have leading or trailing whitespace$"),
        ("vm\t", "^XML error: name 'vm\t' must not have leading or trailing whitespace$"),
        ("v\nm", "^XML error: invalid char in name: 0x0a$"),
    ],
)
def test_name_errors(name: str, message: str) -> None:
    raises(XMLError, dom(name=f"<name>{name}</name>"), message)


def test_name_with_child_element_refused() -> None:
    raises(XMLError, dom(name="<name>vm<b/></name>"),
           "^XML error: element <name> must contain text only$")


def test_name_with_comment_inside_is_text() -> None:
    assert parse_domain_xml(dom(name="<name>v<!-- c -->m</name>")).name == "vm"


def test_duplicate_name_refused() -> None:
    raises(
        XMLError, dom(name="<name>a</name><name>b</name>"),
        "^XML error: element <name> may appear only once$"
    )


# --------------------------------------------------------------------------------------------
# UUID


def _children(xml: str) -> list[str]:
    return [str(el.tag) for el in etree.fromstring(xml.encode()) if isinstance(el.tag, str)]


def test_missing_uuid_is_generated_and_inserted_after_name() -> None:
    text = "<domain type='test'>\n  <name>vm1</name>\n  <memory>1</memory>\n</domain>"
    d = parse_domain_xml(text)
    parsed = uuidlib.UUID(d.uuid)
    assert parsed.version == 4
    assert str(parsed) == d.uuid
    assert _children(d.xml) == ["name", "uuid", "memory"]
    assert f"  <name>vm1</name>\n  <uuid>{d.uuid}</uuid>\n  <memory>1</memory>" in d.xml
    # stable across re-parse: the generated uuid is part of the document now
    again = parse_domain_xml(d.xml)
    assert again == d
    assert again.xml == d.xml
    # ... but each parse of the uuid-less original generates a fresh one
    assert parse_domain_xml(text).uuid != d.uuid


def test_empty_uuid_element_is_filled() -> None:
    d = parse_domain_xml(dom(uuid="<uuid></uuid>"))
    assert uuidlib.UUID(d.uuid).version == 4
    assert f"<uuid>{d.uuid}</uuid>" in d.xml
    assert _children(d.xml) == ["name", "uuid", "memory"]


@pytest.mark.parametrize(
    "given",
    [
        "4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
        "4DEA22B3-1D52-D8F3-2516-782E98AB3FA0",
        "4dea22b31d52d8f32516782e98ab3fa0",
        "  4dea22b3-1d52-d8f3-2516-782e98ab3fa0\n",
        "4dea-22b3-1d52-d8f3-2516-782e-98ab-3fa0",
        "4d ea 22 b3 1d 52 d8 f3 25 16 78 2e 98 ab 3f a0",
    ],
)
def test_uuid_forms_are_canonicalised(given: str) -> None:
    d = parse_domain_xml(dom(uuid=f"<uuid>{given}</uuid>"))
    assert d.uuid == UUID
    assert f"<uuid>{UUID}</uuid>" in d.xml


@pytest.mark.parametrize(
    "given",
    [
        "4dea22b3-1d52-d8f3-2516-782e98ab3fa",  # 31 digits
        "4dea22b3-1d52-d8f3-2516-782e98ab3fa00",  # 33 digits
        "4dea22b3-1d52-d8f3-2516-782e98ab3fag",
        "4dea22b3-1d52-d8f3-2516-782e98ab3fa0-",
        "4dea22b-31d52-d8f3-2516-782e98ab3fa0",  # dash inside a byte
        "{4dea22b3-1d52-d8f3-2516-782e98ab3fa0}",
        "urn:uuid:4dea22b3-1d52-d8f3-2516-782e98ab3fa0",
        " ",
    ],
)
def test_malformed_uuid(given: str) -> None:
    raises(XMLError, dom(uuid=f"<uuid>{given}</uuid>"), "^XML error: malformed uuid element: ")


# --------------------------------------------------------------------------------------------
# Memory and units

KIB = 1024
UNITS: list[tuple[str, str | None, int]] = [
    ("4096", None, 4096),  # default unit is KiB
    ("4096", "", 4096),
    ("1024", "b", 1),
    ("1024", "bytes", 1),
    ("1025", "bytes", 2),  # rounded up to whole KiB
    ("1", "b", 1),
    ("1024", "byte", 1),
    ("1024", "B", 1),
    ("1", "KB", 1),  # 1000 bytes -> 1 KiB
    ("2048", "KB", 2000),
    ("3", "k", 3),
    ("3", "K", 3),
    ("3", "KiB", 3),
    ("3", "kib", 3),
    ("1", "MB", 977),  # 10^6 / 1024 = 976.5625
    ("1", "M", KIB),
    ("1", "MiB", KIB),
    ("1", "mb", 977),
    ("1", "GB", 976563),  # 10^9 / 1024 = 976562.5
    ("2", "G", 2 * KIB**2),
    ("2", "GiB", 2 * KIB**2),
    ("1", "TB", 976562500),
    ("1", "T", KIB**3),
    ("1", "TiB", KIB**3),
    ("1", "PB", 976562500000),
    ("1", "P", KIB**4),
    ("1", "PiB", KIB**4),
    ("1", "EB", 976562500000000),
    ("1", "E", KIB**5),
    ("7", "EiB", 7 * KIB**5),
    (" 12 ", "KiB", 12),
]


@pytest.mark.parametrize(("value", "unit", "kib"), UNITS)
def test_memory_units(value: str, unit: str | None, kib: int) -> None:
    attr = "" if unit is None else f" unit='{unit}'"
    d = parse_domain_xml(dom(f"<memory{attr}>{value}</memory>"))
    assert d.memory_kib == kib
    assert d.current_memory_kib == kib
    assert parse_memory_kib(value, unit) == kib


@pytest.mark.parametrize(("value", "unit", "kib"), UNITS)
def test_current_memory_units(value: str, unit: str | None, kib: int) -> None:
    attr = "" if unit is None else f" unit='{unit}'"
    body = f"<memory unit='EiB'>7</memory><currentMemory{attr}>{value}</currentMemory>"
    assert parse_domain_xml(dom(body)).current_memory_kib == kib


@pytest.mark.parametrize("unit", ["XB", "Kbytes", "iB", "q", "KiBs", "kibibytes", "bit"])
def test_unknown_unit(unit: str) -> None:
    raises(
        XMLError,
        dom(f"<memory unit='{unit}'>1</memory>"),
        f"^XML error: unknown unit '{unit}' for element <memory>$",
    )


@pytest.mark.parametrize("element", ["memory", "currentMemory"])
@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "", "0x10", "1 024", "+5", "١٢"])
def test_memory_not_a_positive_integer(element: str, value: str) -> None:
    body = f"<memory>1024</memory><{element}>{value}</{element}>"
    if element == "memory":
        body = f"<memory>{value}</memory>"
    raises(XMLError, dom(body),
           f"^XML error: invalid value '{re.escape(value)}' for element <{element}>: ")


@pytest.mark.parametrize("element", ["memory", "currentMemory"])
def test_memory_zero(element: str) -> None:
    body = (
        "<memory>0</memory>"
        if element == "memory"
        else "<memory>1024</memory><currentMemory>0</currentMemory>"
    )
    raises(
        XMLError,
        dom(body),
        f"^XML error: invalid value '0' for element <{element}>: must be greater than zero$",
    )


@pytest.mark.parametrize(
    ("value", "unit"), [("8", "EiB"), ("9223372036854775807", "KiB"), ("9" * 25, None)]
)
def test_memory_too_large(value: str, unit: str | None) -> None:
    attr = "" if unit is None else f" unit='{unit}'"
    raises(
        XMLError, dom(f"<memory{attr}>{value}</memory>"),
        "^XML error: value too large for element <memory>: "
    )


def test_memory_largest_accepted() -> None:
    d = parse_domain_xml(dom("<memory unit='b'>9223372036854775807</memory>"))
    assert d.memory_kib == 2**53


def test_memory_missing() -> None:
    raises(XMLError, dom("<vcpu>1</vcpu>"), "^XML error: missing element <memory>$")


def test_devices_duplicate() -> None:
    raises(
        XMLError,
        dom("<memory>1</memory><devices/><devices><disk/></devices>"),
        "^XML error: element <devices> may appear only once$",
    )


def test_memory_duplicate() -> None:
    raises(
        XMLError,
        dom("<memory>1</memory><memory>2</memory>"),
        "^XML error: element <memory> may appear only once$",
    )


def test_current_memory_above_memory() -> None:
    body = "<memory unit='MiB'>1</memory><currentMemory unit='KiB'>1025</currentMemory>"
    raises(XMLError, dom(body),
           "^XML error: current memory 1025 KiB exceeds maximum memory 1024 KiB$")


def test_current_memory_equal_and_below() -> None:
    body = "<memory unit='MiB'>2</memory><currentMemory unit='MiB'>{}</currentMemory>"
    assert parse_domain_xml(dom(body.format(2))).current_memory_kib == 2048
    assert parse_domain_xml(dom(body.format(1))).current_memory_kib == 1024


# --------------------------------------------------------------------------------------------
# vCPUs, OS, options


@pytest.mark.parametrize(
    ("vcpu", "count"),
    [
        ("<vcpu>4</vcpu>", 4),
        ("<vcpu placement='static' current='1'> 8 </vcpu>", 8),
        ("", 1),
    ],
)
def test_vcpus(vcpu: str, count: int) -> None:
    assert parse_domain_xml(dom(f"<memory>1</memory>{vcpu}")).vcpus == count


@pytest.mark.parametrize("value", ["", "two", "-1", "1.0", "99999999999"])
def test_vcpus_not_an_integer(value: str) -> None:
    raises(
        XMLError,
        dom(f"<memory>1</memory><vcpu>{value}</vcpu>"),
        "^XML error: maximum vcpus count must be an integer",
    )


def test_vcpus_zero() -> None:
    raises(XMLError, dom("<memory>1</memory><vcpu>0</vcpu>"),
           "^XML error: Domain requires at least 1 vCPU$")


@pytest.mark.parametrize(
    ("os", "expected"),
    [
        ("", ("hvm", "x86_64", "")),
        ("<os><boot dev='hd'/></os>", ("hvm", "x86_64", "")),
        ("<os><type>hvm</type></os>", ("hvm", "x86_64", "")),
        ("<os><type/></os>", ("hvm", "x86_64", "")),
        (
            "<os><type arch='aarch64' machine='virt-8.2'>hvm</type></os>",
            ("hvm", "aarch64", "virt-8.2"),
        ),
        ("<os><type machine='pc-i440fx-9.0'>exe</type></os>", ("exe", "x86_64", "pc-i440fx-9.0")),
    ],
)
def test_os(os: str, expected: tuple[str, str, str]) -> None:
    d = parse_domain_xml(dom(f"<memory>1</memory>{os}"))
    assert (d.os_type, d.arch, d.machine) == expected


def test_os_empty_arch_refused() -> None:
    raises(
        XMLError,
        dom("<memory>1</memory><os><type arch=''>hvm</type></os>"),
        "^XML error: invalid empty attribute 'arch' in element <type>$",
    )


def test_os_duplicate_type_refused() -> None:
    raises(
        XMLError,
        dom("<memory>1</memory><os><type>hvm</type><type>exe</type></os>"),
        "^XML error: element <type> may appear only once$",
    )


def _guest(attrs: str, extra: str = "") -> str:
    return dom(
        "<memory>1</memory><metadata><other:guest xmlns:other='urn:other' a='b'/>"
        f"<vm:guest xmlns:vm='{VIRTMIG_NS}' {attrs}/>{extra}</metadata>"
    )


def test_options() -> None:
    d = parse_domain_xml(_guest("workload='db' dirty_rate='12' vm:ignored='x'"))
    assert dict(d.options) == {"workload": "db", "dirty_rate": "12"}
    with pytest.raises(TypeError):
        d.options["workload"] = "web"  # type: ignore[index]


def test_options_absent_when_only_foreign_metadata() -> None:
    text = dom("<memory>1</memory><metadata><o:guest xmlns:o='urn:other' a='b'/></metadata>")
    assert dict(parse_domain_xml(text).options) == {}


def test_options_duplicate_guest_refused() -> None:
    raises(
        XMLError,
        _guest("a='1'", f"<virtmig:guest xmlns:virtmig='{VIRTMIG_NS}' a='2'/>"),
        "^XML error: element <virtmig:guest> may appear only once$",
    )


# --------------------------------------------------------------------------------------------
# Malformed input, encodings


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "<domain type='test'>\n  <name>x</nam>\n</domain>",
            r"^XML error: malformed domain XML at line 2, column \d+: "
            r"Opening and ending tag mismatch: name line 2 and nam$",
        ),
        ("", r"^XML error: malformed domain XML at line 1, column 1: Document is empty$"),
        ("   \n", r"^XML error: malformed domain XML at line \d+, column \d+: "),
        (
            "<domain type='test'>\n<name>&foo;</name>",
            r"line 2, column \d+: Entity 'foo' not defined",
        ),
        ("<domain type='test'/><domain/>", r"Extra content at the end of the document$"),
        ("<domain type='test' type='kvm'/>", r"Attribute type redefined$"),
    ],
)
def test_malformed(text: str, message: str) -> None:
    raises(XMLError, text, message)


def test_not_str_or_bytes() -> None:
    with pytest.raises(InvalidArgument,
                       match=r"^invalid argument: domain XML must be str or bytes, not int$"):
        parse_domain_xml(42)  # type: ignore[arg-type]


def test_str_with_encoding_declaration() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + dom(name="<name>café</name>")
    assert parse_domain_xml(text).name == "café"


def test_bytes_in_declared_latin1() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + dom(name="<name>café</name>")
    d = parse_domain_xml(text.encode("latin-1"))
    assert d.name == "café"
    assert parse_domain_xml(d.xml) == d


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_bytes_in_unicode_encodings(codec: str) -> None:
    text = "<?xml version='1.0'?>" + dom(name="<name>café</name>")
    assert parse_domain_xml(text.encode(codec)).name == "café"


def test_invalid_utf8_bytes() -> None:
    raises(XMLError, dom().encode() + b"<!-- \xff -->",
           "^XML error: domain XML is not valid utf-8: ")


def test_unknown_declared_encoding() -> None:
    text = "<?xml version='1.0' encoding='x-nonesuch'?>" + dom()
    raises(XMLError, text.encode(), "^XML error: unsupported encoding 'x-nonesuch' in domain XML$")


def test_lone_surrogate_in_str() -> None:
    raises(XMLError, dom(name="<name>a\ud800</name>"),
           "^XML error: domain XML is not valid Unicode: ")


# --------------------------------------------------------------------------------------------
# Size limit, DTDs, entities

PASSWD = Path("/etc/passwd")


def _padded(size: int, filler: str = " ") -> str:
    base = dom()
    return base + filler * (size - len(base.encode()))


def test_oversize_refused_before_parsing() -> None:
    text = "x" * (MAX_XML_BYTES + 1)  # not even XML: the size check comes first
    raises(
        XMLError,
        text,
        f"^XML error: domain XML is too large: {MAX_XML_BYTES + 1} bytes exceeds the limit of "
        f"{MAX_XML_BYTES} bytes$",
    )
    raises(XMLError, text.encode(), "too large")


def test_exactly_max_size_accepted() -> None:
    text = _padded(MAX_XML_BYTES)
    assert len(text.encode()) == MAX_XML_BYTES
    assert parse_domain_xml(text).name == "vm1"
    raises(XMLError, text + " ", "too large")


def test_size_counts_utf8_bytes_not_characters() -> None:
    text = dom() + "<!--" + "é" * (MAX_XML_BYTES // 2) + "-->"
    assert len(text) < MAX_XML_BYTES < len(text.encode())
    raises(XMLError, text, "^XML error: domain XML is too large: ")


DTD_DOCUMENTS = {
    "plain doctype": "<!DOCTYPE domain>\n" + dom(),
    "system doctype": "<!DOCTYPE domain SYSTEM 'http://example.invalid/domain.dtd'>" + dom(),
    "after declaration, comment and PI": (
        "<?xml version='1.0'?>\n<!-- hi -->\n<?pi x?>\n<!DOCTYPE domain>" + dom()
    ),
    "internal entity": ("<!DOCTYPE domain [<!ENTITY vm 'vm1'>]>" + dom(name="<name>&vm;</name>")),
    "xxe": (
        "<!DOCTYPE domain [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"
        + dom(name="<name>&xxe;</name>")
    ),
    "xxe in attribute default": (
        "<!DOCTYPE domain [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>"
        "<!ATTLIST domain leak CDATA '&xxe;'>]>" + dom()
    ),
    "parameter entity": (
        "<!DOCTYPE domain [<!ENTITY % p SYSTEM 'file:///etc/passwd'> %p;]>" + dom()
    ),
    "network dtd": "<!DOCTYPE domain SYSTEM 'http://127.0.0.1:9/x.dtd'>" + dom(),
}


def _billion_laughs() -> str:
    entities = "<!ENTITY lol0 'lol'>" + "".join(
        f"<!ENTITY lol{i} '{f'&lol{i - 1};' * 10}'>" for i in range(1, 10)
    )
    return f"<!DOCTYPE domain [{entities}]>" + dom(
        name="<name>&lol9;</name>", body="<memory>1</memory><description a='&lol9;'/>"
    )


DTD_DOCUMENTS["billion laughs"] = _billion_laughs()


@pytest.mark.parametrize("text", DTD_DOCUMENTS.values(), ids=DTD_DOCUMENTS.keys())
def test_dtd_and_entities_refused(text: str) -> None:
    for given in (text, text.encode(), text.encode("utf-16")):
        started = time.monotonic()
        with pytest.raises(XMLError) as info:
            parse_domain_xml(given)
        assert str(info.value) == "XML error: DTDs and entities are not allowed in domain XML"
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("text", DTD_DOCUMENTS.values(), ids=DTD_DOCUMENTS.keys())
def test_dtd_refused_even_past_the_prolog_scan(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: without the prolog scan, libxml2 must still neither expand nor leak."""
    monkeypatch.setattr(domxml, "_has_doctype", lambda data: False)
    started = time.monotonic()
    with pytest.raises(XMLError) as info:
        parse_domain_xml(text)
    assert time.monotonic() - started < 1.0
    message = str(info.value)
    assert "lollollol" not in message
    if PASSWD.exists():
        for line in PASSWD.read_text().splitlines()[:3]:
            assert line not in message
    assert "root:" not in message


def test_xxe_does_not_leak_through_any_field() -> None:
    text = DTD_DOCUMENTS["xxe"]
    with pytest.raises(XMLError) as info:
        parse_domain_xml(text)
    assert "root:" not in str(info.value)
    assert "passwd" not in str(info.value)


def test_doctype_text_in_body_is_not_a_doctype() -> None:
    text = dom(
        "<memory>1</memory><description>&lt;!DOCTYPE x&gt; <![CDATA[<!ENTITY y 'z'>]]>"
        "</description><!-- <!DOCTYPE domain> -->"
    )
    d = parse_domain_xml("<!-- <!DOCTYPE domain> -->" + text)
    assert "<!DOCTYPE domain> -->" in d.xml


# --------------------------------------------------------------------------------------------
# Realistic document: interpretation, verbatim round trip


@pytest.fixture
def realistic() -> DomainDef:
    return parse_domain_xml(REALISTIC)


def test_realistic_fields(realistic: DomainDef) -> None:
    d = realistic
    assert d.name == "web01"
    assert d.uuid == REALISTIC_UUID
    assert d.domain_type == "kvm"
    assert d.memory_kib == 4 * 1024 * 1024
    assert d.current_memory_kib == 2 * 1024 * 1024
    assert d.vcpus == 4
    assert (d.os_type, d.arch, d.machine) == ("hvm", "x86_64", "pc-q35-8.2")
    assert dict(d.options) == {"workload": "web", "ram_dirty_rate_mib": "64"}


def test_realistic_round_trip_is_verbatim(realistic: DomainDef) -> None:
    # The only change parsing makes: the uuid is written in canonical form.
    original = etree.fromstring(REALISTIC.encode()).getroottree()
    uuid_el = original.getroot().find("uuid")
    assert uuid_el is not None
    uuid_el.text = REALISTIC_UUID
    expected = etree.tostring(original, method="c14n")
    assert c14n(realistic.xml) == expected
    assert c14n(format_domain_xml(realistic)) == expected
    again = parse_domain_xml(realistic.xml)
    assert again == realistic
    assert again.xml == realistic.xml
    assert parse_domain_xml(format_domain_xml(realistic)) == realistic


@pytest.mark.parametrize(
    "kept",
    [
        "<!-- a live definition, as virsh dumpxml would print it -->",
        "<!-- the uplink; its MAC is guest-visible -->",
        "<title><![CDATA[Web <front> end]]></title>",
        "Serves &lt;static&gt; content &amp; proxies the API",
        '<app1:foo xmlns:app1="http://app1.org/app1/">fizz</app1:foo>',
        "<app2:baz>buzz</app2:baz></app2:bar>",
        "<on_poweroff>destroy</on_poweroff>",
        '<timer name="hpet" present="no"/>',
        '<vmport state="off"/>',
        '<source file="/var/lib/libvirt/images/web01.qcow2" index="2"/>',
        '<alias name="virtio-disk0"/>',
        '<controller type="usb" index="0" model="piix3-uhci">',
        '<qemu:arg value="-newarg"/>',
        'id="7"',
        '<vcpu placement="static" current="2">4</vcpu>',
    ],
)
def test_realistic_keeps_what_it_does_not_interpret(realistic: DomainDef, kept: str) -> None:
    assert kept in realistic.xml
    assert kept in format_domain_xml(realistic)


def test_format_is_stable(realistic: DomainDef) -> None:
    assert format_domain_xml(realistic) is realistic.xml
    assert format_domain_xml(realistic) == format_domain_xml(realistic)
    first = format_domain_xml(realistic, migratable=True)
    assert first == format_domain_xml(realistic, migratable=True)
    reparsed = parse_domain_xml(first)
    assert format_domain_xml(reparsed, migratable=True) == first
    assert reparsed.xml == first


# --------------------------------------------------------------------------------------------
# Migratable form


def test_migratable_matches_golden(realistic: DomainDef) -> None:
    golden = (DATA / "realistic.migratable.xml").read_text()
    assert format_domain_xml(realistic, migratable=True) + "\n" == golden


def test_migratable_strips_runtime_data(realistic: DomainDef) -> None:
    out = format_domain_xml(realistic, migratable=True)
    root = etree.fromstring(out.encode())
    assert root.get("id") is None
    aliases = [a.get("name") for a in root.iterfind("devices/*/alias")]
    assert aliases == ["ua-install-cd"]
    controllers = [(c.get("type"), c.get("model")) for c in root.iterfind("devices/controller")]
    assert controllers == [("sata", None)]
    # everything else is still there, fields unchanged
    assert parse_domain_xml(out) == dataclasses.replace(realistic, xml=out)
    assert '<source file="/var/lib/libvirt/images/web01.qcow2" index="2"/>' in out
    # indentation survives the removals
    assert '<input type="mouse" bus="ps2"/>\n    <graphics' in out
    assert '      <target dev="sda" bus="sata"/>\n      <readonly/>\n' in out


def _controllers(*controllers: str, head: str = "<domain type='kvm' id='3'>") -> str:
    devices = "\n    ".join(controllers)
    return dom(f"<memory>1</memory>\n  <devices>\n    {devices}\n  </devices>", head=head)


def _kept_controllers(text: str) -> list[str]:
    out = format_domain_xml(parse_domain_xml(text), migratable=True)
    root = etree.fromstring(out.encode())
    return [
        f"{c.get('type')}/{c.get('model')}/{c.get('index')}"
        for c in root.iterfind("devices/controller")
    ]


@pytest.mark.parametrize(
    ("controllers", "kept"),
    [
        (["<controller type='usb' index='0'/>"], []),
        (["<controller type='usb' index='0' model='piix3-uhci'/>"], []),
        (["<controller type='usb'/>"], []),
        (["<controller type='usb' index='0' model='qemu-xhci'/>"], ["usb/qemu-xhci/0"]),
        (
            ["<controller type='usb' index='0'><alias name='ua-myusb'/></controller>"],
            ["usb/None/0"],
        ),
        (["<controller type='usb' index='0'><alias name='usb'/></controller>"], []),
        (
            ["<controller type='usb' index='0'/>", "<controller type='usb' index='1'/>"],
            ["usb/None/0", "usb/None/1"],
        ),
        (["<controller type='pci' index='0' model='pci-root'/>"], []),
        (
            [
                "<controller type='pci' index='0' model='pci-root'/>",
                "<controller type='pci' index='1' model='pci-bridge'/>",
            ],
            ["pci/pci-root/0", "pci/pci-bridge/1"],
        ),
        (["<controller type='pci' index='0' model='pcie-root'/>"], ["pci/pcie-root/0"]),
        (
            [
                "<controller type='pci' index='0' model='pci-root'/>",
                "<controller type='usb' index='0' model='piix3-uhci'/>",
                "<controller type='ide' index='0'/>",
            ],
            ["ide/None/0"],
        ),
    ],
)
def test_migratable_implicit_controllers(controllers: list[str], kept: list[str]) -> None:
    assert _kept_controllers(_controllers(*controllers)) == kept


def test_migratable_keeps_non_device_aliases_and_domain_without_devices() -> None:
    text = dom(
        "<memory>1</memory><metadata><alias name='x'/></metadata>",
        head="<domain type='kvm' id='9'>",
    )
    out = format_domain_xml(parse_domain_xml(text), migratable=True)
    assert '<alias name="x"/>' in out
    assert 'id="9"' not in out
    assert 'id="9"' in parse_domain_xml(text).xml


def test_migratable_removal_keeps_mixed_text() -> None:
    text = _controllers("<disk>a<alias name='d0'/>b</disk>")
    out = format_domain_xml(parse_domain_xml(text), migratable=True)
    assert "<disk>ab</disk>" in out


# --------------------------------------------------------------------------------------------
# rename


def test_rename(realistic: DomainDef) -> None:
    renamed = rename(realistic, "web02")
    assert renamed.name == "web02"
    assert "<name>web02</name>" in renamed.xml
    assert "web01" not in renamed.xml.replace("web01.qcow2", "")
    assert parse_domain_xml(renamed.xml) == renamed
    assert dataclasses.replace(renamed, name="web01", xml=realistic.xml) == realistic
    assert realistic.name == "web01"  # the original is unchanged
    assert "<name>web01</name>" in realistic.xml


def test_rename_drops_comments_inside_name() -> None:
    d = parse_domain_xml(dom(name="<name>v<!-- c -->m</name>"))
    assert "<name>new</name>" in rename(d, "new").xml


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "^invalid argument: missing name information$"),
        ("a/b", "^invalid argument: name a/b cannot contain '/'$"),
        ("vm ", "^invalid argument: name 'vm ' must not have leading or trailing whitespace$"),
        ("v\x01m", "^invalid argument: invalid char in name: 0x01$"),
    ],
)
def test_rename_invalid(realistic: DomainDef, name: str, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message) as info:
        rename(realistic, name)
    assert type(info.value) is InvalidArgument


# --------------------------------------------------------------------------------------------
# ABI stability


def _variant(old: str, new: str, text: str = REALISTIC) -> DomainDef:
    assert old in text
    return parse_domain_xml(text.replace(old, new, 1))


def test_abi_identical_passes(realistic: DomainDef) -> None:
    check_abi_stability(realistic, realistic)
    check_abi_stability(realistic, parse_domain_xml(format_domain_xml(realistic, migratable=True)))


def test_abi_host_side_differences_pass(realistic: DomainDef) -> None:
    dst = _variant("/var/lib/libvirt/images/web01.qcow2", "/srv/images/web01-copy.qcow2")
    check_abi_stability(realistic, dst)
    check_abi_stability(dst, realistic)


def test_abi_other_host_details_pass(realistic: DomainDef) -> None:
    text = REALISTIC
    for old, new in [
        ("<source path='/dev/pts/4'/>", "<source path='/dev/pts/9'/>"),
        ("<target dev='vnet3'/>", "<target dev='vnet0'/>"),
        ("<emulator>/usr/bin/qemu-system-x86_64</emulator>", ""),
        ("id='7'", "id='12'"),
        ("<alias name='virtio-disk0'/>", ""),
        ("<currentMemory unit='KiB'>2097152</currentMemory>", ""),
        ('workload="web"', 'workload="batch"'),
    ]:
        assert old in text
        text = text.replace(old, new)
    check_abi_stability(realistic, parse_domain_xml(text))


def test_abi_implicit_controllers_on_one_side_only_pass(realistic: DomainDef) -> None:
    dst = parse_domain_xml(format_domain_xml(realistic, migratable=True))
    assert device_counts(realistic, migratable=False)["controller"] == 3
    assert device_counts(dst, migratable=False)["controller"] == 1
    check_abi_stability(realistic, dst)
    check_abi_stability(dst, realistic)


ABI_MISMATCHES = [
    (
        "<name>web01</name>",
        "<name>web02</name>",
        "Target domain name 'web02' does not match source 'web01'",
    ),
    (
        "C7A5FDBD-EDAF-9455-926A-D65C16DB1809",
        "c7a5fdbd-edaf-9455-926a-d65c16db1800",
        f"Target domain uuid c7a5fdbd-edaf-9455-926a-d65c16db1800 does not match source "
        f"{REALISTIC_UUID}",
    ),
    (
        "<domain type='kvm'",
        "<domain type='qemu'",
        "Target domain virt type qemu does not match source kvm",
    ),
    (
        "<memory unit='GiB'>4</memory>",
        "<memory unit='MiB'>4097</memory>",
        "Target domain max memory 4195328 does not match source 4194304",
    ),
    (">4</vcpu>", ">8</vcpu>", "Target domain vCPU max 8 does not match source 4"),
    (">hvm</type>", ">exe</type>", "Target domain OS type exe does not match source hvm"),
    (
        "arch='x86_64'",
        "arch='i686'",
        "Target domain architecture i686 does not match source x86_64",
    ),
    (
        "machine='pc-q35-8.2'",
        "machine='pc-q35-9.0'",
        "Target domain machine type pc-q35-9.0 does not match source pc-q35-8.2",
    ),
    (
        "    <serial type='pty'>",
        "    <serial type='null'/>\n    <serial type='pty'>",
        "Target domain serial device count 2 does not match source 1",
    ),
    (
        "    <input type='mouse' bus='ps2'>",
        "    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\n"
        "    <input type='mouse' bus='ps2'>",
        "Target domain rng device count 1 does not match source 0",
    ),
    (
        "<controller type='sata' index='0'>",
        "<controller type='sata' index='0'/><controller type='scsi' index='0'>",
        "Target domain controller device count 2 does not match source 1",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), ABI_MISMATCHES, ids=[m[2].split(" does")[0] for m in ABI_MISMATCHES]
)
def test_abi_mismatch(realistic: DomainDef, old: str, new: str, message: str) -> None:
    dst = _variant(old, new)
    with pytest.raises(ConfigUnsupported,
                       match=f"^unsupported configuration: {re.escape(message)}$"):
        check_abi_stability(realistic, dst)


def test_abi_disk_removed(realistic: DomainDef) -> None:
    start = REALISTIC.index("    <disk type='file' device='cdrom'>")
    end = REALISTIC.index("</disk>", start) + len("</disk>\n")
    dst = parse_domain_xml(REALISTIC[:start] + REALISTIC[end:])
    with pytest.raises(
        ConfigUnsupported,
        match=r"^unsupported configuration: Target domain disk device count 1 does not match "
              r"source 2$"
    ):
        check_abi_stability(realistic, dst)


def test_abi_machine_absent_on_one_side(realistic: DomainDef) -> None:
    dst = _variant(" machine='pc-q35-8.2'", "")
    with pytest.raises(
        ConfigUnsupported,
        match=r"^unsupported configuration: Target domain machine type  does not match source "
              r"pc-q35-8.2$"
    ):
        check_abi_stability(realistic, dst)


def test_abi_first_mismatch_wins(realistic: DomainDef) -> None:
    text = REALISTIC.replace("<name>web01</name>", "<name>other</name>").replace(
        "<domain type='kvm'", "<domain type='qemu'"
    )
    with pytest.raises(ConfigUnsupported,
                       match=r"^unsupported configuration: Target domain name 'other'"):
        check_abi_stability(realistic, parse_domain_xml(text))
