"""The qemu backend's small devices without QEMU (domain XML -> command line, each refusal):
memory balloon (and libvirt's default one written at define), RNG, watchdog, USB controller,
USB and PS/2 inputs, their PCI slots (pci.py's, as every PCI device's)."""

from __future__ import annotations

import re

import pytest
from lxml import etree

from tests.daemon.backend_qemu_helpers import guest_xml, make_spec
from virtmig.daemon.backend.qemu import GuestFiles, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.caps import EmulatorCaps
from virtmig.daemon.backend.qemu.config import canonical_xml
from virtmig.daemon.domxml import format_domain_xml, parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported

EMULATOR = "/usr/bin/qemu-system-x86_64"
SETTINGS = QemuSettings(emulators=(EMULATOR,))
CAPS = EmulatorCaps(machines=frozenset({"pc", "q35", "pc-i440fx-7.2", "pc-q35-7.2"}),
                    aliases={"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"})


def _argv(devices: str, machine: str = "pc") -> list[str]:
    spec = make_spec(guest_xml(machine=machine, devices=devices))
    return parse_config(spec, {EMULATOR: CAPS}, SETTINGS).argv(GuestFiles(), incoming=False)


def _placed(argv: list[str]) -> list[str]:
    """The ``-device`` arguments, with the slot pci.py gave each PCI device."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


def _devices(argv: list[str]) -> list[str]:
    """The ``-device`` arguments without their slots (checked by the PCI tests below)."""
    return [re.sub(r",bus=pcie?\.0,addr=0x[0-9a-f.x]+$", "", d) for d in _placed(argv)]


def _refused(devices: str, message: str, machine: str = "pc") -> None:
    with pytest.raises(ConfigUnsupported) as info:
        parse_config(make_spec(guest_xml(machine=machine, devices=devices)), {EMULATOR: CAPS},
                     SETTINGS)
    assert message in str(info.value), str(info.value)


NO_USB = "<controller type='usb' model='none'/>"


def test_balloon_default_none_and_autodeflate() -> None:
    # libvirt's defaults: a piix3-uhci USB controller and a virtio balloon
    assert _devices(_argv("")) == ["piix3-usb-uhci,id=usb", "virtio-balloon-pci,id=balloon0"]
    assert _devices(_argv(NO_USB + "<memballoon model='virtio'/>")) == [
        "virtio-balloon-pci,id=balloon0"]
    assert _devices(_argv(NO_USB + "<memballoon model='none'/>")) == []
    assert _devices(_argv(NO_USB + "<memballoon model='virtio' autodeflate='on'/>")) == [
        "virtio-balloon-pci,id=balloon0,deflate-on-oom=on"]


def test_defaults_are_written_at_define() -> None:
    spec = make_spec(guest_xml(devices=""))
    stored = canonical_xml(spec, {EMULATOR: CAPS}, SETTINGS)
    assert "<memballoon model=\"virtio\"><address type=\"pci\"" in stored  # and its slot
    assert "<controller type=\"usb\" index=\"0\" model=\"piix3-uhci\"><address" in stored
    none = make_spec(guest_xml(devices="<memballoon model='none'/>" + NO_USB))
    assert canonical_xml(none, {EMULATOR: CAPS}, SETTINGS).count('model="none"') == 2
    assert "virtio" not in canonical_xml(none, {EMULATOR: CAPS}, SETTINGS)
    again = make_spec(stored)  # stored once: nothing more to add
    twice = canonical_xml(again, {EMULATOR: CAPS}, SETTINGS)
    assert twice == stored  # stored once: nothing more to add or place
    assert twice.count("<memballoon") == 1 and twice.count("type=\"usb\"") == 1


def _usb_model(xml: str) -> list[str | None]:
    """The model of each USB controller of a definition."""
    tree = etree.fromstring(xml.encode())
    return [c.get("model") for c in tree.iterfind("devices/controller[@type='usb']")]


@pytest.mark.parametrize(("machine", "devices", "model"), [
    ("q35", "", "qemu-xhci"),  # libvirt's default on q35
    ("pc-q35-7.2", "", "qemu-xhci"),
    ("q35", "<controller type='usb' index='0'/>", "qemu-xhci"),  # no model: the default's
    ("pc", "", "piix3-uhci"),
    ("pc", "<controller type='usb'/>", "piix3-uhci"),
    ("q35", "<controller type='usb' model='piix3-uhci'/>", "piix3-uhci"),  # named: kept
    ("q35", "<controller type='usb' model='ich9-ehci1'/>", "ich9-ehci1"),
])
def test_default_usb_controller_at_define(machine: str, devices: str, model: str) -> None:
    spec = make_spec(guest_xml(machine=machine, devices=devices))
    stored = canonical_xml(spec, {EMULATOR: CAPS}, SETTINGS, define=True)
    assert _usb_model(stored) == [model]
    device = {"qemu-xhci": "qemu-xhci", "piix3-uhci": "piix3-usb-uhci",
              "ich9-ehci1": "ich9-usb-ehci1"}[model]
    argv = parse_config(make_spec(stored), {EMULATOR: CAPS}, SETTINGS).argv(
        GuestFiles(), incoming=False)
    placed = [d for d in _placed(argv) if d.startswith(f"{device},id=usb")]
    assert len(placed) == 1
    if model == "qemu-xhci":  # a slot of the root bus, written at define
        assert re.search(r",bus=pcie\.0,addr=0x0[0-9a-f]$", placed[0]), placed[0]
        assert 'model="qemu-xhci"><address type="pci"' in stored
    # the migratable XML keeps it, and the destination (no define) runs the same controller
    migratable = format_domain_xml(parse_domain_xml(stored), migratable=True)
    dest = canonical_xml(make_spec(migratable), {EMULATOR: CAPS}, SETTINGS)
    assert parse_config(make_spec(dest), {EMULATOR: CAPS}, SETTINGS).pci == \
        parse_config(make_spec(stored), {EMULATOR: CAPS}, SETTINGS).pci
    assert _usb_model(dest) == [model]


def test_default_usb_controller_off_define_is_piix3() -> None:
    # A migration's XML (canonicalized without define) has lost its piix3-uhci controller
    # (the migratable XML leaves it out): it gets it back, also on q35; a stored definition
    # without a USB controller (older than this default) runs piix3-uhci too
    for machine in ("q35", "pc"):
        spec = make_spec(guest_xml(machine=machine, devices=""))
        assert _usb_model(canonical_xml(spec, {EMULATOR: CAPS}, SETTINGS)) == ["piix3-uhci"]
        assert "piix3-usb-uhci,id=usb" in _devices(_argv("", machine=machine))
    unnamed = make_spec(guest_xml(machine="q35", devices="<controller type='usb'/>"))
    assert _usb_model(canonical_xml(unnamed, {EMULATOR: CAPS}, SETTINGS)) == [None]


def test_rng_backends_and_rate() -> None:
    argv = _argv("<rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>"
                 "<rng model='virtio'><rate bytes='1024' period='2000'/>"
                 "<backend model='builtin'/></rng>")
    line = " ".join(argv)
    assert "-object rng-random,id=objrng0,filename=/dev/urandom" in line
    assert "-device virtio-rng-pci,rng=objrng0,id=rng0" in line
    assert "-object rng-builtin,id=objrng1" in line
    assert "-device virtio-rng-pci,rng=objrng1,id=rng1,max-bytes=1024,period=2000" in line


@pytest.mark.parametrize(("device", "message"), [
    ("<rng model='virtio'><backend model='random'>/etc/shadow</backend></rng>",
     "<backend model='random'>/etc/shadow</backend>: /dev/urandom or /dev/random only"),
    ("<rng model='virtio'><backend model='egd' type='tcp'/></rng>",
     "unsupported attribute 'type' of <devices><rng><backend>"),
    ("<rng model='virtio'><backend model='egd'/></rng>", "<backend model='egd'>"),
    ("<rng model='virtio'/>", "one <backend> is needed"),
    ("<rng model='virtio-non-transitional'><backend model='builtin'/></rng>", "'virtio' only"),
    ("<rng model='virtio'><backend model='builtin'>/dev/random</backend></rng>",
     "names no source"),
    ("<rng model='virtio'><rate bytes='0'/><backend model='builtin'/></rng>", "rate bytes '0'"),
    ("<rng model='virtio'><rate period='5'/><backend model='builtin'/></rng>",
     "rate bytes 'None'"),
])
def test_rng_refusals(device: str, message: str) -> None:
    _refused(device, message)


def test_watchdog_models_and_actions() -> None:
    argv = _argv(NO_USB + "<watchdog model='i6300esb' action='poweroff'/>")
    assert "i6300esb,id=watchdog0" in _devices(argv)
    assert argv[argv.index("-action") + 1] == "watchdog=poweroff"
    argv = _argv("<watchdog model='ib700'/>")
    assert "ib700,id=watchdog0" in _devices(argv)
    assert argv[argv.index("-action") + 1] == "watchdog=reset"  # libvirt's default
    _refused("<watchdog model='ib700' action='dump'/>", "action 'dump'")
    _refused("<watchdog model='i6300esb'/><watchdog model='ib700'/>", "one <watchdog> only")
    _refused("<watchdog model='ib700'><address type='pci' slot='0x05'/></watchdog>",
             "ib700 is an ISA device")


def test_usb_controllers_and_inputs() -> None:
    assert _devices(_argv("<controller type='usb' index='0'/><memballoon model='none'/>")) == [
        "piix3-usb-uhci,id=usb"]  # libvirt's default model on pc
    q35 = _argv("<controller type='usb'/><memballoon model='none'/>", machine="q35")
    assert _devices(q35) == ["piix3-usb-uhci,id=usb"]  # not defined here: see below
    assert _devices(_argv("<input type='tablet' bus='usb'/><memballoon model='none'/>")) == [
        "piix3-usb-uhci,id=usb", "usb-tablet,id=input0,bus=usb.0,port=1"]
    argv = _argv("<controller type='usb' index='0' model='ich9-ehci1'/>"
                 "<input type='tablet' bus='usb'/><input type='keyboard' bus='usb'/>"
                 "<input type='mouse' bus='ps2'/><input type='keyboard' bus='ps2'/>"
                 "<memballoon model='none'/>")
    assert _devices(argv) == ["ich9-usb-ehci1,id=usb", "usb-tablet,id=input0,bus=usb.0,port=1",
                              "usb-kbd,id=input1,bus=usb.0,port=2"]
    assert _devices(_argv("<controller type='usb' model='none'/>"
                          "<memballoon model='none'/>")) == []
    _refused("<controller type='usb' model='none'/><input type='tablet'/>",
             "a USB input needs a USB controller")
    _refused("<input type='tablet' bus='virtio'/>", "bus 'virtio'")
    _refused("<input type='tablet' bus='ps2'/>", "bus 'ps2'")
    _refused("<controller type='usb' index='1' model='qemu-xhci'/>", "index '1'")
    _refused("<controller type='usb' model='qemu-xhci'/><controller type='usb' "
             "model='piix3-uhci'/>", "one USB controller only")


def test_pci_slots_given_and_assigned() -> None:
    slot = "<address type='pci' domain='0x0000' bus='0x00' slot='0x{:02x}' function='0x0'/>"
    argv = _argv(f"<controller type='usb' model='qemu-xhci'>{slot.format(7)}</controller>"
                 f"<memballoon model='virtio'>{slot.format(5)}</memballoon>"
                 f"<rng model='virtio'><backend model='builtin'/>{slot.format(6)}</rng>"
                 f"<watchdog model='i6300esb'>{slot.format(8)}</watchdog>")
    assert _placed(argv) == ["qemu-xhci,id=usb,bus=pci.0,addr=0x07",
                             "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x05",
                             "virtio-rng-pci,rng=objrng0,id=rng0,bus=pci.0,addr=0x06",
                             "i6300esb,id=watchdog0,bus=pci.0,addr=0x08"]
    q35 = _argv(f"{NO_USB}<memballoon model='virtio'>{slot.format(3)}</memballoon>",
                machine="q35")
    assert _placed(q35) == ["virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x03"]
    # none given: pc's default USB controller is the PIIX3's function 2 (libvirt's place), the
    # others take the lowest free slots in document order (0x02 is kept for a video card)
    argv = _argv("<rng model='virtio'><backend model='builtin'/></rng>"
                 "<watchdog model='i6300esb'/>")
    assert _placed(argv) == ["piix3-usb-uhci,id=usb,bus=pci.0,addr=0x01.0x2",
                             "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x05",
                             "virtio-rng-pci,rng=objrng0,id=rng0,bus=pci.0,addr=0x03",
                             "i6300esb,id=watchdog0,bus=pci.0,addr=0x04"]
    # on q35 that controller is an ordinary PCI device (no PIIX3 there)
    assert _placed(_argv("", machine="q35")) == [
        "piix3-usb-uhci,id=usb,bus=pcie.0,addr=0x02",
        "virtio-balloon-pci,id=balloon0,bus=pcie.0,addr=0x03"]


def test_define_writes_the_slots_of_the_defaults() -> None:
    stored = canonical_xml(make_spec(guest_xml(devices="<watchdog model='i6300esb'/>")),
                           {EMULATOR: CAPS}, SETTINGS)
    assert ('<watchdog model="i6300esb"><address type="pci" domain="0x0000" bus="0x00" '
            'slot="0x03" function="0x0"/></watchdog>') in stored
    assert ('<controller type="usb" index="0" model="piix3-uhci"><address type="pci" '
            'domain="0x0000" bus="0x00" slot="0x01" function="0x2"/></controller>') in stored
    assert ('<memballoon model="virtio"><address type="pci" domain="0x0000" bus="0x00" '
            'slot="0x04" function="0x0"/></memballoon>') in stored
    # the stored definition runs the layout define wrote
    assert _placed(parse_config(make_spec(stored), {EMULATOR: CAPS}, SETTINGS).argv(
        GuestFiles(), incoming=False)) == _placed(_argv("<watchdog model='i6300esb'/>"))


@pytest.mark.parametrize(("address", "message"), [
    ("<address type='pci' bus='0x01' slot='0x05'/>", "PCI domain 0x0000 bus 0x01 (only the root"),
    ("<address type='pci' domain='0x0001' slot='0x05'/>", "PCI domain 0x0001 bus 0x00"),
    ("<address type='pci' slot='0x05' function='0x1'/>", "PCI function 0x1 (function 0x0 only)"),
    ("<address type='pci' slot='0x05' multifunction='on'/>",
     "unsupported attribute 'multifunction' of <devices><memballoon><address>"),
    ("<address type='pci' slot='0x01'/>", "PCI slot 0x01 is taken by the PIIX3 chipset"),
    ("<address type='pci' slot='0x20'/>", "PCI slot 0x20 (0x01-0x1f)"),
    ("<address type='pci' slot='x'/>", "<address slot='x'> is not a number"),
    ("<address type='ccw' slot='0x05'/>", "<address type='ccw'> (type='pci' only)"),
    ("<address type='pci' slot='0x05' zpci='1'/>",
     "unsupported attribute 'zpci' of <devices><memballoon><address>"),
])
def test_pci_address_refusals(address: str, message: str) -> None:
    _refused(f"<memballoon model='virtio'>{address}</memballoon>", message)


def test_pci_slot_used_twice_and_q35_lpc() -> None:
    _refused("<memballoon model='virtio'><address type='pci' slot='5'/></memballoon>"
             "<rng model='virtio'><backend model='builtin'/><address type='pci' slot='5'/>"
             "</rng>", "PCI slot 0x05 is already used by <memballoon model='virtio'>")
    _refused("<memballoon model='virtio'><address type='pci' slot='0x1f'/></memballoon>",
             "PCI slot 0x1f is taken by the ICH9 chipset", machine="q35")
    _refused("<memballoon model='none'><address type='pci' slot='5'/></memballoon>",
             "model='none' takes no address")
    # pc's piix3-uhci is the PIIX3's function 2: another address is refused
    _refused("<controller type='usb' model='piix3-uhci'><address type='pci' slot='0x05'/>"
             "</controller>", "PCI slot 0x05 function 0x0 (on this machine it is part of the "
             "chipset: slot 0x01 function 0x2 only)")
    _refused("<controller type='usb'><address type='pci' slot='0x01' function='0x3'/>"
             "</controller>", "slot 0x01 function 0x2 only")


@pytest.mark.parametrize(("slot", "kept"), [("", True), ("0x02", True), ("0x10", False)])
def test_q35_piix3_uhci_slot_survives_the_migratable_xml(slot: str, kept: bool) -> None:
    # the migratable XML leaves this controller out; the destination adds it back without an
    # address, so a given slot must be the one it gets there, else it is refused at define
    address = f"<address type='pci' slot='{slot}'/>" if slot else ""
    xml = guest_xml(machine="q35", devices=f"<controller type='usb' model='piix3-uhci'>"
                    f"{address}</controller><interface type='user'/>")
    if not kept:
        _refused(xml[xml.index("<controller"):xml.index("</devices>")],
                 "PCI slot 0x10 (a migration's destination puts this controller, which the "
                 "migratable XML leaves out, at 0x04", machine="q35")
        return
    stored = canonical_xml(make_spec(xml), {EMULATOR: CAPS}, SETTINGS)
    migratable = format_domain_xml(parse_domain_xml(stored), migratable=True)
    assert "piix3-uhci" not in migratable
    again = canonical_xml(make_spec(migratable), {EMULATOR: CAPS}, SETTINGS)
    source, dest = (parse_config(make_spec(x), {EMULATOR: CAPS}, SETTINGS).pci
                    for x in (stored, again))
    assert source == dest and source.by_id["usb"] == 2
