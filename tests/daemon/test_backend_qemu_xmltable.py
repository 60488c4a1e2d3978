"""The qemu backend's honour-or-refuse table: every schema element decided on, every unknown
element or attribute refused naming its path, metadata and delegated subtrees not entered."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.daemon.backend_qemu_helpers import PARSE_ONLY, guest_xml, make_spec, parse_only
from virtmig.daemon.backend.qemu import parse_config
from virtmig.daemon.backend.qemu.xmltable import (
    DELEGATED_NAMES,
    REFUSED_NAMES,
    TABLE,
    Kind,
    Rule,
    table_names,
)
from virtmig.proto.errors import ConfigUnsupported

SCHEMA_NAMES = Path(__file__).parent / "data" / "libvirt_domain_elements.txt"


def _schema_names() -> list[str]:
    lines = SCHEMA_NAMES.read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_every_schema_element_is_decided() -> None:
    names = _schema_names()
    assert len(names) > 400  # the whole schema, not a sample
    undecided = [n for n in names if n not in table_names() | DELEGATED_NAMES | REFUSED_NAMES]
    assert undecided == [], "decide on these (xmltable.py): honoured, delegated or refused"


def test_decisions_do_not_overlap() -> None:
    assert not table_names() & REFUSED_NAMES
    assert not table_names() & DELEGATED_NAMES
    assert not REFUSED_NAMES & DELEGATED_NAMES
    # Every honoured path hangs below an honoured element (the walk can reach it).
    for path, _rule in TABLE.items():
        parent = path.rsplit("/", 1)[0]
        assert path == "domain" or TABLE[parent].kind is Kind.HONOURED, path


def _top(extra: str) -> str:
    """The tiny guest with ``extra`` before its ``<devices>``."""
    return guest_xml().replace("<devices>", f"{extra}<devices>")


REFUSED = [
    ("element", _top("<cpu><numa><cell id='0' cpus='0' memory='64' unit='MiB'/></numa></cpu>"),
     "unsupported element <cpu><numa> for the qemu backend"),
    ("top-level", _top("<iothreads>2</iothreads>"), "unsupported element <iothreads>"),
    ("os-smbios", guest_xml(os_extra="<smbios mode='host'/>"),
     "unsupported element <os><smbios>"),
    ("os-loader", guest_xml(os_extra="<loader stateless='yes'>/x.fd</loader>"),
     "unsupported attribute 'stateless' of <os><loader>"),
    ("attribute", guest_xml().replace("<vcpu>1</vcpu>", "<vcpu cpuset='0-1'>1</vcpu>"),
     "unsupported attribute 'cpuset' of <vcpu>"),
    ("sub-attribute", _top("<features><apic eoi='on'/></features>"),
     "unsupported attribute 'eoi' of <features><apic>"),
    ("feature", _top("<features><kvm><hidden state='on'/></kvm></features>"),
     "unsupported element <features><kvm>"),
    ("hyperv-synic", _top("<features><hyperv><synic state='on'/></hyperv></features>"),
     "unsupported element <features><hyperv><synic>"),
    ("hyperv-attr", _top("<features><hyperv><relaxed state='on' x='1'/></hyperv></features>"),
     "unsupported attribute 'x' of <features><hyperv><relaxed>"),
    ("namespaced", _top("<qemu:commandline xmlns:qemu='http://libvirt.org/schemas/domain/qemu/"
                        "1.0'><qemu:arg value='-S'/></qemu:commandline>"),
     "unsupported element <{http://libvirt.org/schemas/domain/qemu/1.0}commandline>"),
    ("timer-child", _top("<clock offset='utc'><timer name='rtc'><catchup threshold='1'/>"
                         "</timer></clock>"), "unsupported element <clock><timer><catchup>"),
    ("seclabel-child", _top("<seclabel type='none'><label>x</label></seclabel>"),
     "unsupported element <seclabel><label>"),
    ("maxMemory", _top("<maxMemory slots='4' unit='MiB'>512</maxMemory>"),
     "unsupported element <maxMemory>"),
    ("memory-attr", guest_xml().replace("<memory unit='MiB'>", "<memory unit='MiB' dumpCore='on'>"),
     "unsupported attribute 'dumpCore' of <memory>"),
]


@pytest.mark.parametrize(("xml", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_unknown_elements_and_attributes_are_refused(xml: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        parse_only().validate(make_spec(xml))
    assert message in str(info.value)


@pytest.mark.parametrize(("device", "message"), [
    ("<serial type='pty'><target port='0'/><log file='/tmp/x'/></serial>",
     "unsupported device <serial type='pty'> for the qemu backend: element <log>"),
    ("<serial type='pty'><target port='0'><model name='pci-serial'/></target></serial>",
     "target model 'pci-serial'"),
    ("<controller type='usb' index='0' model='nec-xhci'/>",
     "unsupported device <controller type='usb' model='nec-xhci'> for the qemu backend: USB "
     "model 'nec-xhci'"),
    ("<controller type='usb' index='0' model='qemu-xhci' ports='8'/>",
     "unsupported attribute 'ports' of <devices><controller>"),
    ("<controller type='pci' index='0' model='pci-root'><alias name='pci.0'/></controller>",
     "unsupported element <devices><controller><alias>"),
    ("<video><model type='none' ram='1'/></video>",
     "unsupported device <video> for the qemu backend: attribute 'ram' of <model>"),
    ("<memballoon model='virtio' freePageReporting='on'/>",
     "unsupported attribute 'freePageReporting' of <devices><memballoon>"),
    ("<memballoon model='virtio'><stats period='10'/></memballoon>",
     "unsupported element <devices><memballoon><stats>"),
    ("<watchdog model='diag288'/>", "unsupported device <watchdog model='diag288'>"),
])
def test_device_parts_are_refused(device: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        parse_only().validate(make_spec(guest_xml(devices=device)))
    assert message in str(info.value)


def test_metadata_is_not_entered() -> None:
    meta = ("<title>t</title><description>d</description><metadata>"
            "<app:x xmlns:app='urn:app' any='thing'><app:y/></app:x></metadata>"
            "<seclabel type='none'/>")
    parse_only().validate(make_spec(_top(meta)))
    with pytest.raises(ConfigUnsupported, match="applies no security labels"):
        parse_only().validate(make_spec(_top("<seclabel type='dynamic' model='selinux'/>")))


def test_delegated_subtrees_go_to_their_parser() -> None:
    # <interface> is delegated to net.parse_interface: the table does not enter its subtree
    # (<mac>, <link> are no paths of its own), net.py's allow-list checks it.
    assert TABLE["domain/devices/interface"] == Rule(Kind.DELEGATED, "net.parse_interface")
    assert TABLE["domain/devices/disk"].kind is Kind.DELEGATED
    assert not any(p.startswith("domain/devices/interface/") for p in TABLE)
    nic = ("<interface type='user'><mac address='52:54:00:00:00:07'/><model type='e1000'/>"
           "<link state='down'/></interface>")
    cfg = parse_config(make_spec(guest_xml(devices=nic)), settings=PARSE_ONLY)
    assert [(n.mac, n.model, n.link_up) for n in cfg.nics] == [("52:54:00:00:00:07", "e1000",
                                                                 False)]
    for inner, named in (("<anything/>", "element <anything>"),
                         ("<bandwidth/>", "element <bandwidth>"),  # a name the table refuses
                         ("<mac address='52:54:00:00:00:07' x='1'/>", "attribute 'x' of <mac>")):
        with pytest.raises(ConfigUnsupported) as info:
            parse_only().validate(make_spec(guest_xml(
                devices=f"<interface type='user'>{inner}</interface>")))
        # net.py's refusal, naming the interface and the part
        assert str(info.value).startswith(
            "unsupported configuration: unsupported device <interface type='user'> for the "
            "qemu backend: "), str(info.value)
        assert named in str(info.value)
