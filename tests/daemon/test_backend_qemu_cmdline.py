"""The ``qemu`` backend without QEMU: config refusals and domain XML -> command line.
"""

from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

import pytest

from tests.daemon.backend_qemu_helpers import guest_xml, make_spec, parse_only
from virtmig.daemon.backend.qemu import (
    GuestFiles,
    QemuSettings,
    parse_config,
)
from virtmig.proto.errors import ConfigUnsupported

REFUSED = [
    ("test-type", guest_xml(domain_type="test"), "domain type 'test'"),
    ("interface", guest_xml(devices="<interface type='network'><source network='default'/>"
                                    "</interface>"),
     "unsupported device <interface type='network'> for the qemu backend"),
    ("graphics", guest_xml(devices="<graphics type='spice' port='-1'/>"),
     "unsupported device <graphics type='spice'> for the qemu backend: graphics type 'spice' "
     "(vnc only)"),
    ("controller", guest_xml(devices="<controller type='scsi' index='0' model='lsilogic'/>"),
     "unsupported device <controller type='scsi' model='lsilogic'>"),
    ("floppy", guest_xml(devices="<disk type='file' device='floppy'><source file='/x.img'/>"
                                 "<target dev='fda' bus='fdc'/></disk>"),
     "unsupported device <disk type='file' device='floppy'>"),
    ("disk-bus", guest_xml(devices="<disk type='file' device='disk'><source file='/x.img'/>"
                                   "<target dev='sda' bus='usb'/></disk>"),
     "bus='usb'"),
    ("block-disk", guest_xml(devices="<disk type='block' device='disk'>"
                                     "<source dev='/dev/sda'/><target dev='vda'/></disk>"),
     "unsupported device <disk type='block' device='disk'> for the qemu backend: source dev "
     "'/dev/sda' is neither under the storage directories"),
    ("disk-format", guest_xml(devices="<disk type='file' device='disk'><driver type='vmdk'/>"
                                      "<source file='/x.vmdk'/><target dev='vda'/></disk>"),
     "<driver type='vmdk'> (supported: raw, qcow2)"),
    ("serial-tcp", guest_xml(devices="<serial type='tcp'><source mode='bind' host='127.0.0.1' "
                                     "service='4555'/></serial>"),
     "unsupported device <serial type='tcp'> for the qemu backend: type 'tcp' (supported: "
     "pty, file, unix)"),
    ("virtio-console", guest_xml(devices="<console type='pty'><target type='virtio'/></console>"),
     "unsupported device <console type='pty'> for the qemu backend: target type 'virtio'"),
    ("balloon", guest_xml(devices="<memballoon model='virtio-non-transitional'/>"),
     "unsupported device <memballoon model='virtio-non-transitional'>"),
    ("video", guest_xml(devices="<video><model type='bochs'/></video>"),
     "unsupported device <video> for the qemu backend: model type 'bochs' (supported: vga, "
     "cirrus, virtio, qxl, none)"),
    ("watchdog", guest_xml(devices="<watchdog model='i6300esb' action='dump'/>"),
     "unsupported device <watchdog model='i6300esb'> for the qemu backend: action 'dump'"),
    ("machine", guest_xml(machine="microvm"), "machine type 'microvm'"),
    ("emulator", guest_xml(devices="<emulator>/bin/sh</emulator>"), "unsupported emulator"),
    ("loader", guest_xml(os_extra="<loader readonly='yes' type='pflash'>/x.fd</loader>"),
     "unsupported <os><loader> for the qemu backend: '/x.fd' is outside the firmware "
     "directories"),
]


@pytest.mark.parametrize(("xml", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_validate_refuses(xml: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        parse_only().validate(make_spec(xml))
    assert message in str(info.value)


def test_validate_refuses_realistic_libvirt_xml() -> None:
    xml = (Path(__file__).parent / "data" / "domxml" / "realistic.xml").read_text()
    # The first element the honour-or-refuse table does not name (see test_backend_qemu_xmltable)
    with pytest.raises(ConfigUnsupported, match=r"unsupported element <resource> for the qemu"):
        parse_only().validate(make_spec(xml))


def test_command_line(tmp_path: Path) -> None:
    spec_uuid = str(uuidlib.uuid4())
    log = tmp_path / "guests" / spec_uuid / "serial0.log"
    devices = f"""
        <emulator>/usr/bin/qemu-system-x86_64</emulator>
        <disk type='file' device='disk'>
          <driver name='qemu' type='qcow2'/>
          <source file='{tmp_path}/a,b.qcow2'/>
          <target dev='vda' bus='virtio'/>
        </disk>
        <disk type='file' device='disk'>
          <source file='/srv/data.img'/><target dev='vdb'/><readonly/>
        </disk>
        <serial type='file'><source path='{log}' append='on'/>
          <target port='0'/></serial>
        <serial type='pty'><target port='1'/></serial>
        <console type='file'><source path='{log}'/>
          <target type='serial' port='0'/></console>
        <controller type='usb' index='0' model='none'/>
        <controller type='pci' index='0' model='pcie-root'/>
        <input type='keyboard' bus='ps2'/>
        <memballoon model='none'/>
        <video><model type='none'/></video>
    """
    os_extra = (f"<kernel>{tmp_path}/vmlinuz</kernel><initrd>{tmp_path}/initrd</initrd>"
                "<cmdline>console=ttyS0 quiet</cmdline>")
    spec = make_spec(guest_xml("web,1", uuid=spec_uuid, domain_type="kvm",
                               machine="pc-q35-7.2", memory_mib=256, os_extra=os_extra,
                               devices=devices))
    settings = QemuSettings(emulators=("/usr/bin/qemu-system-x86_64",),
                            storage_dirs=(str(tmp_path), "/srv"))
    cfg = parse_config(spec, frozenset({"pc", "q35", "pc-q35-7.2"}), settings,
                       tmp_path / "guests")
    files = GuestFiles(disks=(10, 11), serials=(12, 13), kernel=14, initrd=15)
    argv = cfg.argv(files, incoming=True)
    line = " ".join(argv)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert "-no-user-config -nodefaults -display none" in line
    assert ("-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            in line)
    assert "-name guest=web,,1,debug-threads=on" in line
    assert f"-uuid {spec.uuid}" in line
    assert ("-accel kvm -machine pc-q35-7.2,acpi=off -m 262144k "
            "-smp 1,maxcpus=1,sockets=1,dies=1,cores=1,threads=1 -rtc base=utc") in line
    assert "-qmp unix:qmp.sock,server=on,wait=off" in line
    # No host path reaches QEMU: only descriptors the daemon opened.
    assert "-kernel /proc/self/fd/14 -initrd /proc/self/fd/15" in line
    assert str(tmp_path) not in line and "/srv" not in line
    assert argv[argv.index("-append") + 1] == "console=ttyS0 quiet"
    assert "-add-fd fd=10,set=1,opaque=disk-vda -blockdev " in line
    assert ('{"driver":"file","filename":"/dev/fdset/1","node-name":"file-vda",'
            '"read-only":false}') in line
    assert ('{"driver":"qcow2","file":"file-vda","node-name":"drive-vda","read-only":false,'
            '"backing":null}') in line  # never a backing file named by the image
    assert "-add-fd fd=11,set=2,opaque=disk-vdb" in line
    assert '{"driver":"raw","file":"file-vdb","node-name":"drive-vdb","read-only":true}' in line
    # PCI slots from 0x02 on q35's root bus (0x01: kept for a video card, 0x1f: ICH9)
    assert ('{"driver":"virtio-blk-pci","drive":"drive-vda","id":"virtio-vda","bus":"pcie.0",'
            '"addr":"0x02"}') in line
    assert ('{"driver":"virtio-blk-pci","drive":"drive-vdb","id":"virtio-vdb","bus":"pcie.0",'
            '"addr":"0x03"}') in line
    assert "-add-fd fd=12,set=3,opaque=serial0 -chardev file,id=charserial0,path=/dev/fdset/3,"\
           "append=on" in line
    assert "-add-fd fd=13,set=4,opaque=serial1 -chardev pty,id=charserial1,logfile=/dev/fdset/4,"\
           "logappend=on " in line  # a pty that also logs to its serialN.log
    assert line.count("isa-serial") == 2  # the console is serial 0, not a third port
    assert line.endswith("-incoming defer -S")
    assert "-vnc" not in line and "-netdev" not in line
    assert files.fds == (10, 11, 12, 13, 14, 15)

    inherited = " ".join(cfg.argv(files, incoming=True, monitor_fd=7, sandbox=False))
    assert ("-chardev socket,id=monitor,fd=7,server=on,wait=off "
            "-mon chardev=monitor,mode=control") in inherited
    assert "-qmp" not in inherited and "-sandbox" not in inherited


def test_command_line_defaults_and_the_emulators_machines(tmp_path: Path) -> None:
    """No <emulator>: the first configured one; no <domain type='kvm'>: TCG; a machine type
    the emulator does not know (all of them, or the one named) is refused."""
    settings = QemuSettings(emulators=("/usr/bin/qemu-system-x86_64",),
                            storage_dirs=(str(tmp_path), "/srv"))
    plain = parse_config(make_spec(guest_xml()), None, settings).argv(GuestFiles(),
                                                                      incoming=False)
    assert plain[0] == "/usr/bin/qemu-system-x86_64"  # no <emulator>: the first configured
    assert plain[plain.index("-accel") + 1] == "tcg"
    assert plain[plain.index("-machine") + 1] == "pc,acpi=off"
    assert plain[-1] == "-S" and "-incoming" not in plain and "-add-fd" not in plain
    with pytest.raises(ConfigUnsupported, match="not known to the emulator"):
        parse_config(make_spec(guest_xml(machine="pc-q35-99.0")), frozenset({"pc", "q35"}),
                     settings)
    known = {"/usr/bin/qemu-system-x86_64": frozenset({"pc"})}  # per emulator
    parse_config(make_spec(guest_xml()), known, settings)
    with pytest.raises(ConfigUnsupported, match="not known to the emulator"):
        parse_config(make_spec(guest_xml(machine="q35")), known, settings)
