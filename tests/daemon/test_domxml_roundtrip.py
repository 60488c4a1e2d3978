"""Domain XML round trip: the realistic document's fields, verbatim formatting, the migratable
form and renaming.
"""

from __future__ import annotations

import dataclasses

import pytest
from lxml import etree

from tests.daemon import domxml_helpers
from tests.daemon.domxml_helpers import DATA, REALISTIC, REALISTIC_UUID, c14n, dom
from virtmig.daemon.domxml import (
    DomainDef,
    format_domain_xml,
    parse_domain_xml,
    rename,
)
from virtmig.proto.errors import InvalidArgument

# The shared fixtures, bound here so that pytest finds them.
realistic = domxml_helpers.realistic


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
