"""The qemu backend's consoles and channels (chardev.py), graphics and video (graphics.py) and
PCI addresses (pci.py): parse and command line (fast), then real QEMU read-backs over QMP and a
migration that keeps the PCI layout."""

from __future__ import annotations

import os
import socket
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import guest_xml, make_spec, to, within
from virtmig.daemon.backend.base import MigrationStatus, MigrationTuning
from virtmig.daemon.backend.qemu import GuestFiles, QemuBackend, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.caps import EmulatorCaps, parse_device_help
from virtmig.daemon.backend.qemu.config import canonical_xml
from virtmig.daemon.backend.qemu.confine import check_settings
from virtmig.daemon.backend.qemu.monitor import _socket_path
from virtmig.daemon.backend.qemu.runtime import Runtime
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.domxml import format_domain_xml, parse_domain_xml
from virtmig.daemon.main import qemu_settings as qemu_settings_of
from virtmig.proto.errors import ConfigUnsupported, InvalidArgument
from virtmig.testing import free_port

backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src
dst = backend_qemu_helpers.dst

EMU = "/usr/bin/qemu-system-x86_64"
SETTINGS = QemuSettings(emulators=(EMU,), storage_dirs=("/srv",))


def cfg_of(devices: str, *, machine: str = "pc", settings: QemuSettings = SETTINGS,
           guests: Path | None = None, uuid: str | None = None, caps: Any = None) -> Any:
    xml = guest_xml(devices=devices, machine=machine, uuid=uuid)
    return parse_config(make_spec(xml), caps, settings, guests)


def argv_of(cfg: Any, **files: Any) -> list[str]:
    files.setdefault("nics", (-1,) * len(cfg.nics))  # user networking: no tap
    files.setdefault("serials", tuple(range(12, 12 + len(cfg.serials))))
    return list(cfg.argv(GuestFiles(**files), incoming=False))


def vnc_of(argv: list[str]) -> str:
    return argv[argv.index("-vnc") + 1]


def refused(devices: str, *, machine: str = "pc", settings: QemuSettings = SETTINGS,
            guests: Path | None = None, uuid: str | None = None, caps: Any = None) -> str:
    with pytest.raises(ConfigUnsupported) as info:
        cfg_of(devices, machine=machine, settings=settings, guests=guests, uuid=uuid, caps=caps)
    return str(info.value)


def devices_of(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]


NIC = "<interface type='user'><mac address='52:54:00:00:00:{n:02x}'/><model type='{m}'/>{a}" \
      "</interface>"


def nic(n: int, model: str = "virtio", slot: str = "") -> str:
    addr = (f"<address type='pci' domain='0x0000' bus='0x00' slot='{slot}' function='0x0'/>"
            if slot else "")
    return NIC.format(n=n, m=model, a=addr)


# --- PCI addresses -------------------------------------------------------------------------------


def test_pci_slots_assigned_in_document_order_video_first() -> None:
    argv = argv_of(cfg_of(nic(1) + "<controller type='scsi' model='virtio-scsi'/>"
                          + "<video><model type='vga'/></video>" + nic(2, "e1000")))
    got = devices_of(argv)
    assert "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:00:00:01,bus=pci.0,addr=0x03" \
        in got
    assert '{"driver":"virtio-scsi-pci","id":"scsi0","bus":"pci.0","addr":"0x04"}' in got
    assert "VGA,id=video0,bus=pci.0,addr=0x02" in got  # libvirt's video slot on pc
    assert "e1000,netdev=hostnet1,id=net1,mac=52:54:00:00:00:02,bus=pci.0,addr=0x05" in got


def test_pci_q35_root_bus_and_slots() -> None:
    got = devices_of(argv_of(cfg_of(nic(1) + "<video><model type='virtio'/></video>",
                                    machine="q35")))
    assert "virtio-vga,id=video0,bus=pcie.0,addr=0x01" in got
    assert "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:00:00:01,bus=pcie.0,addr=0x02" \
        in got


def test_pci_given_addresses_respected_and_others_around_them() -> None:
    got = devices_of(argv_of(cfg_of(nic(1) + nic(2, slot="0x03") + nic(3, slot="7"))))
    assert got == [
        "virtio-net-pci,netdev=hostnet0,id=net0,mac=52:54:00:00:00:01,bus=pci.0,addr=0x04",
        "virtio-net-pci,netdev=hostnet1,id=net1,mac=52:54:00:00:00:02,bus=pci.0,addr=0x03",
        "virtio-net-pci,netdev=hostnet2,id=net2,mac=52:54:00:00:00:03,bus=pci.0,addr=0x07",
        # libvirt's defaults: pc's USB controller is the PIIX3's function 2, the balloon next
        "piix3-usb-uhci,id=usb,bus=pci.0,addr=0x01.0x2",
        "virtio-balloon-pci,id=balloon0,bus=pci.0,addr=0x05",
    ]


def test_implicit_controller_gets_a_free_slot_not_a_given_one() -> None:
    # the virtio-serial controller a channel needs, without its element (no define step)
    guests = Path("/var/lib/virtmig/backend/qemu")
    uuid = str(uuidlib.uuid4())
    chan = (f"<channel type='unix'><source mode='bind' path='{guests / uuid}/ga.sock'/>"
            "<target type='virtio' name='org.qemu.guest_agent.0'/></channel>")
    got = devices_of(argv_of(cfg_of(nic(1, slot="0x03") + chan, guests=guests, uuid=uuid),
                             sockets=(30,)))
    # 0x04 is the default balloon's (an element, planned with the others)
    assert "virtio-serial-pci,id=virtio-serial0,bus=pci.0,addr=0x05" in got


@pytest.mark.parametrize(("devices", "message"), [
    (nic(1, slot="0x03") + nic(2, slot="0x03"),
     "unsupported device <interface type='user'> for the qemu backend: PCI slot 0x03 is already "
     "used by <interface type='user'>"),
    (nic(1, slot="0x01"), "PCI slot 0x01 is taken by the PIIX3 chipset"),
    (nic(1, slot="0x00"), "PCI slot 0x00 is taken by the host bridge"),
    (nic(1, slot="0x20"), "PCI slot 0x20 (0x01-0x1f)"),
    (nic(1, slot="zz"), "<address slot='zz'> is not a number"),
    (NIC.format(n=1, m="virtio", a="<address type='pci' slot='0x05' function='0x1'/>"),
     "PCI function 0x1 (function 0x0 only)"),
    (NIC.format(n=1, m="virtio", a="<address type='pci' bus='0x01' slot='0x05'/>"),
     "only the root bus pci.0"),
    (NIC.format(n=1, m="virtio", a="<address type='pci' slot='5' multifunction='on'/>"),
     "attribute 'multifunction' of <address>"),
    (NIC.format(n=1, m="virtio", a="<address type='pci'/>"), "<address type='pci'> needs a slot"),
    (NIC.format(n=1, m="virtio", a="<address type='ccw' slot='5'/>"),
     "<address type='ccw'> (type='pci' only)"),
    ("<controller type='ide' index='0'><address type='pci' slot='0x05'/></controller>",
     "unsupported device <controller type='ide'> for the qemu backend: <address type='pci'> on "
     "a device that takes no PCI slot"),
    ("<controller type='pci' index='0' model='pci-root'><address type='pci' slot='0x05'/>"
     "</controller>", "on a device that takes no PCI slot"),
])
def test_pci_refusals_name_the_device(devices: str, message: str) -> None:
    assert message in refused(devices)


def test_pci_q35_reserved_slot() -> None:
    assert "PCI slot 0x1f is taken by the ICH9 chipset" in refused(nic(1, slot="0x1f"),
                                                                   machine="q35")


def test_define_writes_addresses_and_is_stable() -> None:
    xml = guest_xml(devices=nic(1) + "<video><model type='cirrus'/></video>"
                    + "<controller type='scsi' model='virtio-scsi'/>")
    stored = canonical_xml(make_spec(xml), None, SETTINGS)
    root = etree.fromstring(stored)
    slots = [(el.tag, attr(el, "address", "slot"), attr(el, "address", "function"))
             for el in node(root, "devices")]
    assert slots == [("interface", "0x03", "0x0"), ("video", "0x02", "0x0"),
                     ("controller", "0x04", "0x0"),
                     ("controller", "0x01", "0x2"),  # the default USB: the PIIX3's function 2
                     ("memballoon", "0x05", "0x0")]
    addr = node(root, "devices/interface/address")
    assert {str(k): str(v) for k, v in addr.attrib.items()} == {
        "type": "pci", "domain": "0x0000", "bus": "0x00", "slot": "0x03", "function": "0x0"}
    assert canonical_xml(make_spec(stored), None, SETTINGS) == stored
    # the migratable form carries them (less the default USB controller, which the
    # destination adds back at the same place): the destination builds the same layout
    migratable = format_domain_xml(parse_domain_xml(stored), migratable=True)
    assert "piix3-uhci" not in migratable
    again = cfg_of_xml(migratable)
    assert again.pci == cfg_of_xml(stored).pci
    assert dict(again.pci.slots) == {"video0": 2, "net0": 3, "scsi0": 4, "usb": 1,
                                     "balloon0": 5}
    assert again.pci.functions == (("usb", 2),)


def node(root: etree._Element, path: str) -> etree._Element:
    found = root.find(path)
    assert found is not None, path
    return found


def attr(root: etree._Element, path: str, name: str) -> str:
    return str(node(root, path).get(name, ""))


def cfg_of_xml(xml: str) -> Any:
    return parse_config(make_spec(xml), None, SETTINGS)


# --- consoles and channels -----------------------------------------------------------------------


def test_pty_serial_and_console_alias() -> None:
    cfg = cfg_of("<serial type='pty'><target port='0'/></serial>"
                 "<console type='pty'><target type='serial' port='0'/></console>")
    line = " ".join(argv_of(cfg, serials=(12,)))
    assert ("-add-fd fd=12,set=1,opaque=serial0 -chardev pty,id=charserial0,"
            "logfile=/dev/fdset/1,logappend=on -device isa-serial,chardev=charserial0,"
            "id=serial0,index=0") in line
    assert line.count("isa-serial") == 1  # the console is serial0, not another port


def test_console_alone_is_serial0() -> None:
    cfg = cfg_of("<console type='pty'/>")
    assert [(s.port, s.kind) for s in cfg.serials] == [(0, "pty")]


def test_pty_paths_given_are_output_only() -> None:
    # a live or migratable XML carries the source's pty path: ignored, never passed to QEMU
    live = ("<serial type='pty'><source path='/dev/pts/4'/><target port='0'/></serial>"
            "<console type='pty' tty='/dev/pts/4'><source path='/dev/pts/4'/>"
            "<target type='serial' port='0'/></console>")
    uuid = str(uuidlib.uuid4())
    assert argv_of(cfg_of(live, uuid=uuid)) == argv_of(
        cfg_of("<serial type='pty'><target port='0'/></serial>", uuid=uuid))


def test_unix_serial_in_the_guest_folder(tmp_path: Path) -> None:
    uuid = str(uuidlib.uuid4())
    dev = (f"<serial type='unix'><source mode='bind' path='{tmp_path / uuid}/con.sock'/>"
           "<target port='1'/></serial>")
    cfg = cfg_of(dev, guests=tmp_path, uuid=uuid)
    assert cfg.socket_names == ("con.sock",)
    line = " ".join(argv_of(cfg, serials=(12,), sockets=(31,)))
    assert ("-chardev socket,id=charserial1,fd=31,server=on,wait=off,logfile=/dev/fdset/1,"
            "logappend=on -device isa-serial,chardev=charserial1,id=serial1,index=1") in line
    assert str(tmp_path) not in line  # QEMU gets the socket the daemon bound, not a path


def test_serial_paths_of_another_hosts_guest_folder_are_repointed(tmp_path: Path) -> None:
    """A migration's XML names the source's folder of the guest: the destination (not define)
    re-points a file or unix serial port there to its own folder, and runs it there; a path
    in no folder of this guest's is left as given (and refused)."""
    uuid = str(uuidlib.uuid4())
    theirs, ours = tmp_path / "src" / uuid, tmp_path / "dst"
    devices = (f"<serial type='file'><source path='{theirs}/serial0.log'/><target port='0'/>"
               f"</serial><serial type='unix'><source mode='bind' path='{theirs}/con.sock'/>"
               "<target port='1'/></serial>")
    spec = make_spec(guest_xml(devices=devices, uuid=uuid))
    moved = canonical_xml(spec, None, SETTINGS, ours)
    assert [s.get("path") for s in etree.fromstring(moved).iterfind("devices/serial/source")] \
        == [f"{ours / uuid}/serial0.log", f"{ours / uuid}/con.sock"]
    cfg = parse_config(make_spec(moved), None, SETTINGS, ours)
    assert [(s.kind, s.socket) for s in cfg.serials] == [("file", ""), ("unix", "con.sock")]
    # at define the user's path is kept, and refused: the daemon writes only to its own folder
    assert canonical_xml(spec, None, SETTINGS, ours, define=True).count(str(theirs)) == 2
    assert "is not this guest's serial log" in refused(devices, guests=ours, uuid=uuid)
    # re-pointed, then checked as at define: only this guest's folder, never QMP's socket
    qmp = make_spec(guest_xml(devices=devices.replace("con.sock", "qmp.sock"), uuid=uuid))
    with pytest.raises(ConfigUnsupported, match=r"socket name 'qmp\.sock'"):
        parse_config(make_spec(canonical_xml(qmp, None, SETTINGS, ours)), None, SETTINGS, ours)
    other = devices.replace(str(theirs), str(tmp_path / "elsewhere"))
    assert canonical_xml(make_spec(guest_xml(devices=other, uuid=uuid)), None, SETTINGS,
                         ours).count(str(tmp_path / "elsewhere")) == 2


@pytest.mark.parametrize(("source", "message"), [
    ("<source mode='bind' path='/tmp/x.sock'/>", "is not in this guest's folder"),
    ("<source mode='bind' path='{gdir}/../x.sock'/>", "is not in this guest's folder"),
    ("<source mode='bind' path='{gdir}/sub/x.sock'/>", "is not in this guest's folder"),
    ("<source mode='bind' path='{gdir}/qmp.sock'/>", "socket name 'qmp.sock'"),
    ("<source mode='bind' path='{gdir}/serial0.log'/>", "socket name 'serial0.log'"),
    ("<source mode='connect' path='{gdir}/x.sock'/>", "source mode 'connect' (mode='bind' only"),
    ("<source path='{gdir}/x.sock'/>", "source mode 'None'"),
    ("<source mode='bind' path='{gdir}/x.sock' append='on'/>", "append (for type 'file' only)"),
    ("<source mode='bind' path='{gdir}/x.sock' seclabel='x'/>", "attribute 'seclabel' of <source>"),
])
def test_unix_serial_refusals(tmp_path: Path, source: str, message: str) -> None:
    uuid = str(uuidlib.uuid4())
    dev = f"<serial type='unix'>{source.format(gdir=tmp_path / uuid)}<target port='0'/></serial>"
    assert message in refused(dev, guests=tmp_path, uuid=uuid)


@pytest.mark.parametrize(("device", "message"), [
    ("<serial type='file'><source path='/tmp/x.log'/></serial>",
     "is not this guest's serial log"),
    ("<serial type='pty'><source path='/dev/pts/1' mode='bind'/></serial>",
     "source mode 'bind' (for type 'unix' only)"),
    ("<serial type='pty'><log file='/tmp/x'/></serial>", "element <log>"),
    ("<serial type='pty'><target port='0'/><target port='1'/></serial>",
     "element <target> given twice"),
    ("<serial type='udp'/>", "type 'udp' (supported: pty, file, unix)"),
    ("<channel type='pty'><target type='virtio' name='x'/></channel>",
     "unsupported device <channel type='pty'> for the qemu backend: type 'pty' (unix only)"),
    ("<channel type='spicevmc'><target type='virtio' name='com.redhat.spice.0'/></channel>",
     "type 'spicevmc'"),
    ("<channel type='unix'><target type='guestfwd' address='10.0.2.1' port='4600'/></channel>",
     "attribute 'address' of <target>"),
    ("<channel type='unix'><target type='xen' name='x'/></channel>",
     "a channel needs <target type='virtio' name=...>"),
    ("<controller type='virtio-serial' index='1'/>", "one virtio-serial controller, index 0"),
])
def test_chardev_refusals(tmp_path: Path, device: str, message: str) -> None:
    assert message in refused(device, guests=tmp_path)


def guest_agent(path: str = "", port: str = "") -> str:
    source = f"<source mode='bind' path='{path}'/>" if path else ""
    address = (f"<address type='virtio-serial' controller='0' bus='0' port='{port}'/>"
               if port else "")
    return (f"<channel type='unix'>{source}<target type='virtio' name='org.qemu.guest_agent.0'/>"
            f"{address}</channel>")


def test_guest_agent_channel_define_and_command_line(tmp_path: Path) -> None:
    uuid = str(uuidlib.uuid4())
    xml = guest_xml(uuid=uuid, devices=guest_agent())
    refusal = pytest.raises(ConfigUnsupported, match="a channel needs <source path=")
    with refusal:  # a path is given at define time, never invented per start
        parse_config(make_spec(xml), None, SETTINGS, tmp_path)
    stored = canonical_xml(make_spec(xml), None, SETTINGS, tmp_path)
    root = etree.fromstring(stored)
    source = node(root, "devices/channel/source")
    assert {str(k): str(v) for k, v in source.attrib.items()} == {
        "mode": "bind", "path": str(tmp_path / uuid / "channel0.sock")}
    ctrl = node(root, "devices/controller")
    assert ctrl.get("type") == "virtio-serial" and attr(ctrl, "address", "slot") == "0x03"
    assert canonical_xml(make_spec(stored), None, SETTINGS, tmp_path) == stored
    cfg = parse_config(make_spec(stored), None, SETTINGS, tmp_path)
    assert cfg.socket_names == ("channel0.sock",)
    line = " ".join(argv_of(cfg, sockets=(33,)))
    assert ("-device virtio-serial-pci,id=virtio-serial0,bus=pci.0,addr=0x03 "
            "-chardev socket,id=charchannel0,fd=33,server=on,wait=off "
            "-device virtserialport,bus=virtio-serial0.0,nr=1,chardev=charchannel0,id=channel0,"
            "name=org.qemu.guest_agent.0") in line
    # Another host (another state folder) re-points the generated path into its own folder.
    elsewhere = tmp_path / "other"
    moved = etree.fromstring(canonical_xml(make_spec(stored), None, SETTINGS, elsewhere))
    assert attr(moved, "devices/channel/source", "path") == \
        str(elsewhere / uuid / "channel0.sock")


def test_guest_agent_channel_address_and_clashes(tmp_path: Path) -> None:
    uuid = str(uuidlib.uuid4())
    gdir = tmp_path / uuid
    cfg = cfg_of(guest_agent(f"{gdir}/ga.sock", port="5"), guests=tmp_path, uuid=uuid)
    assert cfg.channels[0].nr == 5 and cfg.channels[0].socket == "ga.sock"
    two = guest_agent(f"{gdir}/a.sock") + guest_agent(f"{gdir}/b.sock")
    assert "target name 'org.qemu.guest_agent.0' used twice" in refused(two, guests=tmp_path,
                                                                        uuid=uuid)
    assert "virtio-serial port '31' (1-30)" in refused(guest_agent(f"{gdir}/a.sock", port="31"),
                                                        guests=tmp_path, uuid=uuid)
    # a path the user gave elsewhere is not re-pointed: it is refused
    stored = canonical_xml(make_spec(guest_xml(uuid=uuid, devices=guest_agent("/tmp/ga.sock"))),
                           None, SETTINGS, tmp_path)
    assert "/tmp/ga.sock" in stored
    assert "is not in this guest's folder" in refused(guest_agent("/tmp/ga.sock"),
                                                      guests=tmp_path, uuid=uuid)


def test_runtime_values_in_the_live_xml() -> None:
    xml = guest_xml(devices="<serial type='pty'><target port='0'/></serial>"
                            "<console type='pty'><target type='serial' port='0'/></console>"
                            "<graphics type='vnc' autoport='yes'/>")
    live = Runtime(ptys=((0, "/dev/pts/7"),), vnc_port=5907).apply(xml)
    root = etree.fromstring(live)
    assert attr(root, "devices/serial/source", "path") == "/dev/pts/7"
    assert attr(root, "devices/console", "tty") == "/dev/pts/7"
    assert attr(root, "devices/console/source", "path") == "/dev/pts/7"
    assert attr(root, "devices/graphics", "port") == "5907"
    assert Runtime().apply(xml) == xml
    # the live XML (what a migration's XML carries) runs as the definition does
    assert argv_of(cfg_of_xml(live), serials=(12,)) == argv_of(cfg_of_xml(xml), serials=(12,))


# --- graphics and video --------------------------------------------------------------------------


def test_vnc_autoport_and_fixed_port() -> None:
    assert vnc_of(argv_of(cfg_of("<graphics type='vnc' port='-1' autoport='yes'/>"))) == \
        "127.0.0.1:0,to=59635"
    narrow = QemuSettings(emulators=(EMU,), vnc_port_min=5910, vnc_port_max=5920)
    assert vnc_of(argv_of(cfg_of("<graphics type='vnc'/>", settings=narrow))) == \
        "127.0.0.1:10,to=20"
    fixed = argv_of(cfg_of("<graphics type='vnc' port='5999' autoport='no' listen='::1'/>"))
    assert vnc_of(fixed) == "[::1]:99"
    # an automatic port given (the source's, in a migration's XML) is ignored
    uuid = str(uuidlib.uuid4())
    assert argv_of(cfg_of("<graphics type='vnc' port='5905' autoport='yes'/>", uuid=uuid)) == \
        argv_of(cfg_of("<graphics type='vnc' autoport='yes'/>", uuid=uuid))
    listen = argv_of(cfg_of("<graphics type='vnc'><listen type='address' address='127.0.0.2'/>"
                            "</graphics>"))
    assert vnc_of(listen) == "127.0.0.2:0,to=59635"


def test_vnc_remote_listen_needs_the_setting() -> None:
    dev = "<graphics type='vnc' listen='0.0.0.0'/>"
    assert "listen '0.0.0.0' is not a loopback address" in refused(dev)
    allowed = QemuSettings(emulators=(EMU,), vnc_remote_listen=True)
    assert vnc_of(argv_of(cfg_of(dev, settings=allowed))) == "0.0.0.0:0,to=59635"


@pytest.mark.parametrize(("device", "message"), [
    ("<graphics type='spice' autoport='yes'/>", "graphics type 'spice' (vnc only)"),
    ("<graphics type='sdl'/>", "graphics type 'sdl' (vnc only)"),
    ("<graphics type='vnc' keymap='de'/>", "attribute 'keymap' of <graphics>"),
    ("<graphics type='vnc'><listen type='socket' socket='/tmp/v.sock'/></graphics>",
     "socket '/tmp/v.sock' (only the daemon's own, vnc/vnc.sock in the guest's folder"),
    ("<graphics type='vnc'><listen type='network' network='default'/></graphics>",
     "<listen type='network'> (type='address' or 'socket')"),
    ("<graphics type='vnc' listen='127.0.0.1'><listen type='address' address='127.0.0.2'/>"
     "</graphics>", "differ"),
    ("<graphics type='vnc' listen='localhost'/>", "listen 'localhost' is not an IP address"),
    ("<graphics type='vnc' port='80' autoport='no'/>", "port '80' (5900-65535"),
    ("<graphics type='vnc'/><graphics type='vnc'/>", "one <graphics> only"),
    ("<video><model type='vga'/></video><video><model type='vga'/></video>", "one <video> only"),
    ("<video><model type='vga' heads='2'/></video>", "heads '2' (1)"),
    ("<video><model type='vga' vram='1000'/></video>", "vram '1000' (KiB: a power of two"),
    ("<video><model type='vga'><acceleration accel3d='yes'/></model></video>",
     "content of <model>"),
    ("<video><driver name='qemu'/><model type='vga'/></video>", "element <driver>"),
    ("<video/>", "a <video> needs one <model type=...>"),
])
def test_graphics_refusals(device: str, message: str) -> None:
    assert message in refused(device)


@pytest.mark.parametrize(("model", "device"), [
    ("vga", "VGA,id=video0,vgamem_mb=32"), ("cirrus", "cirrus-vga,id=video0,vgamem_mb=32"),
    ("virtio", "virtio-vga,id=video0,vgamem_mb=32"),
    ("qxl", "qxl-vga,id=video0,vram_size=33554432"),
])
def test_video_models(model: str, device: str) -> None:
    got = devices_of(argv_of(cfg_of(f"<video><model type='{model}' vram='32768'/></video>")))
    assert got[0] == f"{device},bus=pci.0,addr=0x02"
    assert [d.split(",")[0] for d in devices_of(argv_of(cfg_of(
        "<video><model type='none'/></video>")))] == ["piix3-usb-uhci", "virtio-balloon-pci"]


def test_vnc_settings_from_the_daemon_config(tmp_path: Path) -> None:
    toml = tmp_path / "virtmigd.toml"
    toml.write_text("vnc_port_min = 5910\nvnc_port_max = 5919\nvnc_remote_listen = true\n")
    config = load_config(build_parser().parse_args(["--config", str(toml)]))
    settings = qemu_settings_of(config)
    assert (settings.vnc_port_min, settings.vnc_port_max, settings.vnc_remote_listen) == \
        (5910, 5919, True)
    default = qemu_settings_of(load_config(build_parser().parse_args([])))
    assert (default.vnc_port_min, default.vnc_port_max, default.vnc_remote_listen) == \
        (5900, 65535, False)
    for line, message in (("vnc_port_min = 80", "invalid vnc_port_min '80': expected a port "
                                                "5900-65535"),
                          ("vnc_port_max = true",
                           "invalid vnc_port_max True .*: expected a whole number"),
                          ("vnc_port_min = 6000\nvnc_port_max = 5999",
                           "invalid vnc_port_min 6000: above vnc_port_max 5999"),
                          ('vnc_remote_listen = "yes"', "invalid vnc_remote_listen 'yes' .*: "
                                                        "expected true or false")):
        toml.write_text(line + "\n")
        with pytest.raises(InvalidArgument, match=message):
            load_config(build_parser().parse_args(["--config", str(toml)]))
    with pytest.raises(InvalidArgument, match="vnc_port_min/vnc_port_max: 6000-5999"):
        check_settings(QemuSettings(emulators=(), vnc_port_min=6000, vnc_port_max=5999))


def test_video_model_missing_from_the_emulator_is_refused() -> None:
    help_text = 'name "VGA", bus PCI\nname "cirrus-vga", bus PCI, desc "Cirrus"\n'
    caps = EmulatorCaps(machines=frozenset({"pc"}), devices=parse_device_help(help_text))
    assert caps.devices == {"VGA", "cirrus-vga"}
    assert "model type 'qxl': this QEMU has no device 'qxl-vga'" in refused(
        "<video><model type='qxl'/></video>", caps=caps)
    assert cfg_of("<video><model type='vga'/></video>", caps=caps).video.device == "VGA"


# --- real QEMU -----------------------------------------------------------------------------------

DEVICES = ("<serial type='pty'><target port='0'/></serial>"
           "<console type='pty'><target type='serial' port='0'/></console>"
           "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
           "<graphics type='vnc' autoport='yes'/>"
           "<video><model type='cirrus'/></video>"
           "<controller type='scsi' model='virtio-scsi'/>"
           + nic(1) + nic(2, "e1000", slot="0x09"))


def pci_layout(pci: Any) -> dict[str, tuple[int, int, int]]:
    """query-pci: qdev id -> (slot, vendor, device)."""
    return {d["qdev_id"]: (d["slot"], d["id"]["vendor"], d["id"]["device"])
            for bus in pci for d in bus["devices"] if d.get("qdev_id")}


async def start_canonical(backend: QemuBackend, xml: str) -> Any:
    spec = make_spec(backend.canonicalize(make_spec(xml)))
    backend.validate(spec)
    await within(backend.start(spec, paused=True))
    return spec


@pytest.mark.qemu
async def test_devices_read_back(src: QemuBackend) -> None:
    spec = await start_canonical(src, guest_xml(devices=DEVICES))
    live = etree.fromstring(src.live_xml(spec.uuid, spec.xml))
    # the pty: QEMU's, in the live XML (serial and console), a real terminal
    chardevs = {c["label"]: c["filename"] for c in await src.query(spec.uuid, "query-chardev")}
    pty = attr(live, "devices/console", "tty")
    assert chardevs["charserial0"] == f"pty:{pty}"
    assert attr(live, "devices/serial/source", "path") == pty
    fd = os.open(pty, os.O_RDWR | os.O_NOCTTY)
    try:
        assert os.isatty(fd)
    finally:
        os.close(fd)
    # the guest agent's socket: bound by the daemon in the guest's folder, QEMU listens on it
    path = attr(live, "devices/channel/source", "path")
    assert Path(path).parent == src._state_dir() / spec.uuid
    with socket.socket(socket.AF_UNIX) as client, _socket_path(Path(path)) as reachable:
        client.connect(reachable)
    assert "charchannel0" in chardevs
    name = await src.query(spec.uuid, "qom-get", {"path": "/machine/peripheral/channel0",
                                                 "property": "name"})
    assert name == "org.qemu.guest_agent.0"
    # VNC: on loopback, at a port of the range, written into the live XML
    vnc = await src.query(spec.uuid, "query-vnc")
    assert vnc["enabled"] and vnc["host"] == "127.0.0.1"
    assert 5900 <= int(vnc["service"]) <= 65535
    assert attr(live, "devices/graphics", "port") == vnc["service"]
    # PCI: every device at the slot its definition's <address> names
    layout = pci_layout(await src.query(spec.uuid, "query-pci"))
    stored = etree.fromstring(spec.xml)
    wanted = {"video0": node(stored, "devices/video/address"),
              "scsi0": node(stored, "devices/controller[@type='scsi']/address"),
              "virtio-serial0": node(stored, "devices/controller[@type='virtio-serial']/address"),
              "net0": stored.findall("devices/interface/address")[0],
              "net1": stored.findall("devices/interface/address")[1]}
    for qid, addr in wanted.items():
        assert layout[qid][0] == int(addr.get("slot", ""), 16), qid
    assert layout["net1"][0] == 9 and layout["video0"][1:] == (0x1013, 0x00b8)  # Cirrus


@pytest.mark.qemu
async def test_q35_devices_on_pcie_root(src: QemuBackend) -> None:
    spec = await start_canonical(src, guest_xml(machine="q35", devices=nic(1) + guest_agent()
                                                + "<video><model type='virtio'/></video>"))
    layout = pci_layout(await src.query(spec.uuid, "query-pci"))
    assert {k: v[0] for k, v in layout.items()} == {  # with the default USB and balloon
        "video0": 1, "net0": 2, "virtio-serial0": 3, "usb": 4, "balloon0": 5}
    buses = await src.query(spec.uuid, "qom-get", {"path": "/machine/peripheral/net0",
                                                  "property": "parent_bus"})
    assert buses.endswith("pcie.0")


@pytest.mark.qemu
async def test_migration_keeps_the_pci_layout(src: QemuBackend, dst: QemuBackend) -> None:
    """The migratable XML carries the addresses: both QEMUs build the same device tree; the
    destination allocates its own pty, VNC port and channel socket."""
    spec = await start_canonical(src, guest_xml(devices=DEVICES))
    before = pci_layout(await src.query(spec.uuid, "query-pci"))
    src_live = src.live_xml(spec.uuid, spec.xml)
    migratable = format_domain_xml(parse_domain_xml(src_live), migratable=True)
    dst_spec = make_spec(dst.canonicalize(make_spec(migratable)))
    port = await within(dst.incoming_start(dst_spec, to(free_port())))
    out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning(max_downtime_ms=50)),
                       60)
    assert out.status is MigrationStatus.COMPLETED
    assert (await within(dst.incoming_wait(spec.uuid), 60)).status is MigrationStatus.COMPLETED
    after = pci_layout(await dst.query(spec.uuid, "query-pci"))
    assert after == before
    assert set(after) == {"video0", "virtio-serial0", "scsi0", "net0", "net1", "usb", "balloon0"}
    src_root = etree.fromstring(src_live)
    dst_root = etree.fromstring(dst.live_xml(spec.uuid, dst_spec.xml))
    assert attr(dst_root, "devices/console", "tty") != \
        attr(src_root, "devices/console", "tty")
    assert attr(dst_root, "devices/graphics", "port") != \
        attr(src_root, "devices/graphics", "port")
    assert Path(attr(dst_root, "devices/channel/source", "path")).parent == \
        dst._state_dir() / spec.uuid
