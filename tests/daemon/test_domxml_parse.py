"""Domain XML parsing: defaults, name, UUID, memory, vCPUs, OS and options fields, and their
errors.
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib

import pytest
from lxml import etree

from tests.daemon.domxml_helpers import UUID, dom, raises
from virtmig.daemon.domxml import (
    VIRTMIG_NS,
    parse_domain_xml,
    parse_memory_kib,
)
from virtmig.proto.errors import XMLError

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
