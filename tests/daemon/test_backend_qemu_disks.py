"""Disks on the ``qemu`` backend without QEMU: ``<disk>`` and its controllers -> command line,
every refusal of the ``<disk>`` subtree, block device confinement, and the migration safety rule
(the backend's, and the source's Begin applying it).
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.backend_qemu_helpers import MIB, guest_xml, make_spec, within
from tests.daemon.migration_helpers import F, assert_rolled_back, migrate, running_guest
from virtmig.client.sequence import Trace
from virtmig.daemon.backend.base import BackendError, GuestSpec
from virtmig.daemon.backend.qemu import GuestFiles, QemuBackend, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.confine import block_refusal, open_image
from virtmig.daemon.backend.qemu.disks import UNSAFE_CACHE, DiskConfig, migration_unsafe
from virtmig.proto.errors import ConfigUnsupported, MigrateUnsafe
from virtmig.testing import Host, kill_leftover_qemus, qemu_binary_or_skip, qemu_settings

LOOP = "/dev/loop0"  # a block device every Linux host has; only stat()ed here


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.img", "b.qcow2", "c.iso", "d.img"):
        (folder / name).write_bytes(b"\0" * 4096)
    return folder


def settings_for(storage: Path, block_devices: tuple[str, ...] = ()) -> QemuSettings:
    return QemuSettings(emulators=("/usr/bin/qemu-system-x86_64",),
                        storage_dirs=(str(storage),), block_devices=block_devices)


def spec_of(devices: str, machine: str = "pc") -> GuestSpec:
    return make_spec(guest_xml(machine=machine, devices=devices))


def argv_of(devices: str, storage: Path, machine: str = "pc",
            block_devices: tuple[str, ...] = ()) -> tuple[list[str], list[DiskConfig]]:
    cfg = parse_config(spec_of(devices, machine), None, settings_for(storage, block_devices))
    fds = tuple(-1 if not d.path else 20 + i for i, d in enumerate(cfg.disks))
    return cfg.argv(GuestFiles(disks=fds), incoming=False), list(cfg.disks)


def options(argv: list[str], flag: str) -> list[dict[str, object]]:
    """The JSON values of every ``flag`` (``-device``, ``-blockdev``) in ``argv``."""
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv)
            if a == flag and argv[i + 1].startswith("{")]


def device(argv: list[str], dev_id: str) -> dict[str, object]:
    found = [d for d in options(argv, "-device") if d.get("id") == dev_id]
    assert len(found) == 1, f"{dev_id}: {options(argv, '-device')}"
    return found[0]


def node(argv: list[str], name: str) -> dict[str, object]:
    found = [b for b in options(argv, "-blockdev") if b.get("node-name") == name]
    assert len(found) == 1, name
    return found[0]


def disk(storage: Path, target: str, bus: str = "", *, file: str = "a.img", device: str = "disk",
         driver: str = "", extra: str = "", source: bool = True) -> str:
    bus_attr = f" bus='{bus}'" if bus else ""
    src = f"<source file='{storage / file}'/>" if source else ""
    return (f"<disk type='file' device='{device}'>{driver}{src}"
            f"<target dev='{target}'{bus_attr}/>{extra}</disk>")


# --- the command line ----------------------------------------------------------------------------


def test_virtio_disk_attributes_reach_the_command_line(storage: Path) -> None:
    xml = disk(storage, "vda", "virtio", file="b.qcow2",
               driver="<driver name='qemu' type='qcow2' cache='none' discard='unmap' "
                      "io='native'/>",
               extra="<serial>WD-123_a.b+c</serial><boot order='2'/>")
    argv, disks = argv_of(xml, storage)
    line = " ".join(argv)
    assert "-add-fd fd=20,set=1,opaque=disk-vda" in line and str(storage) not in line
    proto, fmt = node(argv, "file-vda"), node(argv, "drive-vda")
    assert proto == {"driver": "file", "filename": "/dev/fdset/1", "node-name": "file-vda",
                     "read-only": False, "cache": {"direct": True, "no-flush": False},
                     "discard": "unmap", "aio": "native"}
    assert fmt == {"driver": "qcow2", "file": "file-vda", "node-name": "drive-vda",
                   "read-only": False, "cache": {"direct": True, "no-flush": False},
                   "discard": "unmap", "backing": None}
    assert device(argv, "virtio-vda") == {
        "driver": "virtio-blk-pci", "drive": "drive-vda", "id": "virtio-vda",
        "write-cache": "on", "serial": "WD-123_a.b+c", "bootindex": 2, "bus": "pci.0",
        "addr": "0x03"}
    assert disks[0].cache == "none" and disks[0].boot_order == 2


@pytest.mark.parametrize(("cache", "direct", "no_flush", "write_cache"), [
    ("none", True, False, "on"),
    ("writeback", False, False, "on"),
    ("writethrough", False, False, "off"),
    ("directsync", True, False, "off"),
    ("unsafe", False, True, "on"),
])
def test_cache_modes_map_as_libvirt_does(storage: Path, cache: str, direct: bool,
                                         no_flush: bool, write_cache: str) -> None:
    argv, _ = argv_of(disk(storage, "vda", driver=f"<driver cache='{cache}'/>"), storage)
    for name in ("file-vda", "drive-vda"):
        assert node(argv, name)["cache"] == {"direct": direct, "no-flush": no_flush}
    assert device(argv, "virtio-vda")["write-cache"] == write_cache


def test_no_cache_attribute_leaves_qemus_defaults(storage: Path) -> None:
    argv, _ = argv_of(disk(storage, "vda", extra="<readonly/><shareable/>"), storage)
    assert "cache" not in node(argv, "file-vda") and "discard" not in node(argv, "drive-vda")
    assert node(argv, "file-vda")["read-only"] is True
    assert device(argv, "virtio-vda") == {"driver": "virtio-blk-pci", "drive": "drive-vda",
                                          "id": "virtio-vda", "share-rw": True,
                                          "bus": "pci.0", "addr": "0x03"}


def test_sata_on_q35_uses_the_builtin_ahci(storage: Path) -> None:
    xml = (disk(storage, "sda", "sata") + disk(storage, "sdc", "sata", file="d.img")
           + disk(storage, "sdb", "sata", device="cdrom", file="c.iso"))
    argv, disks = argv_of(xml, storage, machine="q35")
    assert device(argv, "sata-sda") == {"driver": "ide-hd", "bus": "ide.0",
                                        "drive": "drive-sda", "id": "sata-sda"}
    assert device(argv, "sata-sdc")["bus"] == "ide.2"
    assert device(argv, "sata-sdb") == {"driver": "ide-cd", "bus": "ide.1",
                                        "drive": "drive-sdb", "id": "sata-sdb"}
    assert node(argv, "drive-sdb")["read-only"] is True  # a CD-ROM is read-only
    assert disks[2].readonly
    assert not [d for d in options(argv, "-device") if d["driver"] == "ich9-ahci"]


def test_sata_on_pc_adds_an_ahci_controller(storage: Path) -> None:
    xml = ("<controller type='sata' index='1'/>" + disk(storage, "sda", "sata")
           + disk(storage, "sdh", "sata", file="d.img"))  # index 7: controller 1, unit 1
    argv, _ = argv_of(xml, storage)
    ahci = [d for d in options(argv, "-device") if d["driver"] == "ich9-ahci"]
    # the declared controller and the default balloon (elements) are planned first, the
    # implicit controller gets the next slot
    assert ahci == [{"driver": "ich9-ahci", "id": "sata0", "bus": "pci.0", "addr": "0x05"},
                    {"driver": "ich9-ahci", "id": "sata1", "bus": "pci.0", "addr": "0x03"}]
    assert device(argv, "sata-sda")["bus"] == "sata0.0"
    assert device(argv, "sata-sdh")["bus"] == "sata1.1"
    # controllers come before the disks on their buses
    first_disk = argv.index(json.dumps(device(argv, "sata-sda"), separators=(",", ":")))
    assert max(i for i, a in enumerate(argv) if "ich9-ahci" in a) < first_disk


def test_ide_on_pc_with_an_empty_cdrom_tray(storage: Path) -> None:
    xml = ("<controller type='ide' index='0'/>" + disk(storage, "hda", "ide")
           + disk(storage, "hdc", "ide", device="cdrom", source=False,
                  extra="<readonly/><boot order='1'/>"))
    argv, disks = argv_of(xml, storage)
    assert device(argv, "ide-hda") == {"driver": "ide-hd", "bus": "ide.0", "unit": 0,
                                       "drive": "drive-hda", "id": "ide-hda"}
    # An empty tray: a device with no drive, no descriptor, no block node.
    assert device(argv, "ide-hdc") == {"driver": "ide-cd", "bus": "ide.1", "unit": 0,
                                       "id": "ide-hdc", "bootindex": 1}
    assert "drive-hdc" not in " ".join(argv) and " ".join(argv).count("-add-fd") == 1
    assert disks[1].path == "" and disks[1].readonly
    assert GuestFiles(disks=(20, -1)).fds == (20,)


def test_scsi_disks_get_a_virtio_scsi_controller(storage: Path) -> None:
    implicit, _ = argv_of(disk(storage, "sdb", "scsi")
                          + disk(storage, "sdi", "scsi", device="cdrom", file="c.iso"), storage)
    # 0x03: the default balloon (an element, planned first)
    assert [d for d in options(implicit, "-device") if d["driver"] == "virtio-scsi-pci"] == [
        {"driver": "virtio-scsi-pci", "id": "scsi0", "bus": "pci.0", "addr": "0x04"},
        {"driver": "virtio-scsi-pci", "id": "scsi1", "bus": "pci.0", "addr": "0x05"}]
    assert device(implicit, "scsi-sdb") == {
        "driver": "scsi-hd", "bus": "scsi0.0", "channel": 0, "scsi-id": 0, "lun": 1,
        "drive": "drive-sdb", "id": "scsi-sdb"}
    assert device(implicit, "scsi-sdi")["bus"] == "scsi1.0"  # index 8: controller 1, unit 1
    assert device(implicit, "scsi-sdi")["driver"] == "scsi-cd"
    explicit, _ = argv_of("<controller type='scsi' index='0' model='virtio-scsi'/>"
                          + disk(storage, "sda", extra="<address type='drive' controller='0' "
                                 "bus='0' target='3' unit='5'/>"), storage)  # sd: scsi
    assert device(explicit, "scsi-sda")["scsi-id"] == 3
    assert device(explicit, "scsi-sda")["lun"] == 5
    assert " ".join(explicit).count("virtio-scsi-pci") == 1


def test_block_devices_allowed_or_under_storage(storage: Path) -> None:
    xml = ("<disk type='block' device='disk'><driver cache='directsync'/>"
           f"<source dev='{LOOP}'/><target dev='vdb'/></disk>")
    with pytest.raises(ConfigUnsupported, match=f"source dev '{LOOP}' is neither under the "
                       "storage directories .* nor one of the allowed block devices"):
        argv_of(xml, storage)
    argv, disks = argv_of(xml, storage, block_devices=(LOOP,))
    assert node(argv, "file-vdb")["driver"] == "host_device"
    assert node(argv, "file-vdb")["filename"] == "/dev/fdset/1" and LOOP not in " ".join(argv)
    assert disks[0].kind == "block"
    cd = ("<disk type='block' device='cdrom'>"
          f"<source dev='{LOOP}'/><target dev='hdc' bus='ide'/></disk>")
    assert node(argv_of(cd, storage, block_devices=(LOOP,))[0], "file-hdc")["driver"] == \
        "host_cdrom"


def test_block_refusal_rules(storage: Path, tmp_path: Path) -> None:
    assert block_refusal("dev/sda", (str(storage),), ()) == "'dev/sda' is not an absolute path"
    assert "is not a block device" in block_refusal(str(storage / "a.img"), (str(storage),), ())
    assert block_refusal(LOOP, (), (LOOP,)) == ""
    link = tmp_path / "lv0"
    link.symlink_to(LOOP)  # an allowed device named through a symlink: the same device
    assert block_refusal(str(link), (), (LOOP,)) == ""
    assert "neither under" in block_refusal("/dev/loop1", (), (LOOP,))
    with pytest.raises(BackendError, match=f"<disk> '{storage}/a.img' is not a block device"):
        open_image("<disk>", str(storage / "a.img"), (str(storage),), writable=False,
                   block=True)
    with pytest.raises(BackendError, match="is not a regular file"):
        open_image("<disk>", LOOP, ("/dev",), writable=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a device node needs root")
def test_block_device_node_under_storage_is_opened_without_following_links(
        storage: Path) -> None:
    st = os.stat(LOOP)
    node_path = storage / "blk0"
    os.mknod(node_path, stat.S_IFBLK | 0o600, st.st_rdev)
    assert block_refusal(str(node_path), (str(storage),), ()) == ""
    fd = open_image("<disk>", str(node_path), (str(storage),), writable=False, block=True)
    try:
        assert os.fstat(fd).st_rdev == st.st_rdev
    finally:
        os.close(fd)
    fd = open_image("<disk>", LOOP, (), writable=False, block=True, block_devices=(LOOP,))
    os.close(fd)
    (storage / "sneaky").symlink_to(LOOP)  # a link out of the storage folder: refused
    with pytest.raises(BackendError, match="neither under"):
        open_image("<disk>", str(storage / "sneaky"), (str(storage),), writable=False,
                   block=True)


# --- refusals ------------------------------------------------------------------------------------

REFUSED = [
    ("disk-attr", "<disk type='file' device='disk' snapshot='no'>{src}<target dev='vda'/></disk>",
     "attribute snapshot"),
    ("lun", "<disk type='block' device='lun'><target dev='sda'/></disk>",
     "<disk device='lun'> (supported: disk, cdrom)"),
    ("network", "<disk type='network' device='disk'><target dev='vda'/></disk>",
     "<disk type='network'> (supported: file, block)"),
    ("child", "<disk type='file'>{src}<target dev='vda'/><iotune/></disk>", "element <iotune>"),
    ("alias", "<disk type='file'>{src}<target dev='vda'/><alias name='x'/></disk>",
     "element <alias>"),
    ("twice", "<disk type='file'>{src}<target dev='vda'/><serial>a</serial><serial>b</serial>"
              "</disk>", "element <serial> given twice"),
    ("driver-attr", "<disk type='file'><driver error_policy='stop'/>{src}<target dev='vda'/>"
                    "</disk>", "attribute error_policy of <driver>"),
    ("driver-name", "<disk type='file'><driver name='tap'/>{src}<target dev='vda'/></disk>",
     "<driver name='tap'>"),
    ("format", "<disk type='file'><driver type='vmdk'/>{src}<target dev='vda'/></disk>",
     "<driver type='vmdk'>"),
    ("cache", "<disk type='file'><driver cache='default'/>{src}<target dev='vda'/></disk>",
     "<driver cache='default'>"),
    ("discard", "<disk type='file'><driver discard='on'/>{src}<target dev='vda'/></disk>",
     "<driver discard='on'>"),
    ("io", "<disk type='file'><driver io='io_uring'/>{src}<target dev='vda'/></disk>",
     "<driver io='io_uring'>"),
    ("native-cached", "<disk type='file'><driver io='native' cache='writeback'/>{src}"
                      "<target dev='vda'/></disk>", "<driver io='native'> needs cache='none'"),
    ("source-attr", "<disk type='file'><source file='{img}' startupPolicy='optional'/>"
                    "<target dev='vda'/></disk>", "attribute startupPolicy of <source>"),
    ("source-child", "<disk type='file'><source file='{img}'><seclabel/></source>"
                     "<target dev='vda'/></disk>", "content of <source>"),
    ("source-kind", "<disk type='file'><source dev='/dev/loop0'/><target dev='vda'/></disk>",
     "<source dev=...> on a type='file' disk"),
    ("no-source", "<disk type='file'><target dev='vda'/></disk>",
     "a disk needs <source file=...>"),
    ("relative", "<disk type='file'><source file='a.img'/><target dev='vda'/></disk>",
     "source file 'a.img' is not an absolute path"),
    ("no-target", "<disk type='file'>{src}</disk>", "a <target dev='vdX|sdX|hdX'> is needed"),
    ("target-name", "<disk type='file'>{src}<target dev='xvda'/></disk>", "target dev='xvda'"),
    ("target-attr", "<disk type='file'>{src}<target dev='vda' tray='open'/></disk>",
     "attribute tray of <target>"),
    ("bus", "<disk type='file'>{src}<target dev='sda' bus='usb'/></disk>", "<target bus='usb'>"),
    ("prefix", "<disk type='file'>{src}<target dev='sda' bus='virtio'/></disk>",
     "target dev='sda' does not match bus='virtio' (virtio disks are vdX)"),
    ("prefix-ide", "<disk type='file'>{src}<target dev='vda' bus='ide'/></disk>",
     "does not match bus='ide' (ide disks are hdX)"),
    ("cdrom-virtio", "<disk type='file' device='cdrom'>{src}<target dev='vda'/></disk>",
     "disk type 'virtio' of 'vda' does not support ejectable media"),
    ("ro-sata", "<disk type='file'>{src}<target dev='sda' bus='sata'/><readonly/></disk>",
     "readonly sata disks are not supported"),
    ("ro-ide", "<disk type='file'>{src}<target dev='hda'/><readonly/></disk>",
     "readonly ide disks are not supported"),
    ("readonly-attr", "<disk type='file'>{src}<target dev='vda'/><readonly x='1'/></disk>",
     "attribute x of <readonly>"),
    ("shareable-qcow2", "<disk type='file'><driver type='qcow2' cache='none'/>{src}"
                        "<target dev='vda'/><shareable/></disk>",
     "shared access for disk 'vda' needs a raw image"),
    ("shareable-cached", "<disk type='file'>{src}<target dev='vda'/><shareable/></disk>",
     "with cache 'none' or 'directsync'"),
    ("serial-chars", "<disk type='file'>{src}<target dev='vda'/><serial>a,b</serial></disk>",
     "<serial>a,b</serial>"),
    ("serial-long", "<disk type='file'>{src}<target dev='vda'/><serial>" + "x" * 21
                    + "</serial></disk>", "(1 to 20 characters"),
    ("boot-no-order", "<disk type='file'>{src}<target dev='vda'/><boot/></disk>",
     "<boot> needs order='N'"),
    ("boot-order", "<disk type='file'>{src}<target dev='vda'/><boot order='0'/></disk>",
     "<boot order='0'> (an integer from 1 to 65535)"),
    ("boot-loadparm", "<disk type='file'>{src}<target dev='vda'/><boot order='1' loadparm='x'/>"
                      "</disk>", "attribute loadparm of <boot>"),
    ("virtio-address", "<disk type='file'>{src}<target dev='vda'/><address type='drive'/>"
                       "</disk>", "<address type='drive'> on a virtio disk (type='pci' only)"),
    ("address-type", "<disk type='file'>{src}<target dev='sda'/><address type='pci'/></disk>",
     "<address type='pci'> (type='drive' only)"),
    ("address-range", "<disk type='file'>{src}<target dev='hda'/><address type='drive' "
                      "bus='2'/></disk>", "<address bus='2'> (an integer from 0 to 1)"),
    ("ide-controller-1", "<disk type='file'>{src}<target dev='hde'/></disk>",
     "ide controller 1"),
    ("scsi-model", "<controller type='scsi' model='lsilogic'/>",
     "SCSI controller model 'lsilogic' (virtio-scsi only)"),
    ("controller-child", "<controller type='scsi'><driver queues='4'/></controller>",
     "element <devices><controller><driver>"),  # the honour-or-refuse table sees it first
    ("controller-attr", "<controller type='sata' index='0' ports='4'/>",
     "attribute 'ports' of <devices><controller>"),
    ("sata-model", "<controller type='sata' model='ahci'/>",
     "attribute model of a sata controller"),
    ("controller-twice", "<controller type='scsi' index='0'/><controller type='scsi' index='0'/>",
     "index 0 defined twice"),
]


@pytest.mark.parametrize(("devices", "message"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_disk_subtree_refusals_name_what(storage: Path, devices: str, message: str) -> None:
    img = storage / "a.img"
    xml = devices.replace("{src}", f"<source file='{img}'/>").replace("{img}", str(img))
    with pytest.raises(ConfigUnsupported) as info:
        parse_config(spec_of(xml), None, settings_for(storage))
    assert message in str(info.value)
    assert "for the qemu backend" in str(info.value)


Q35_REFUSED = [
    ("ide-disk", "<disk type='file'>{src}<target dev='hdc' bus='ide'/></disk>",
     "IDE controllers are unsupported for this QEMU binary or machine type 'q35'"),
    ("ide-controller", "<controller type='ide' index='0'/>",
     "IDE controllers are unsupported for this QEMU binary or machine type 'q35'"),
]


@pytest.mark.parametrize(("devices", "message"), [r[1:] for r in Q35_REFUSED],
                         ids=[r[0] for r in Q35_REFUSED])
def test_ide_on_q35_is_refused_as_libvirt_does(storage: Path, devices: str,
                                               message: str) -> None:
    xml = devices.replace("{src}", f"<source file='{storage / 'a.img'}'/>")
    with pytest.raises(ConfigUnsupported, match=message):
        parse_config(spec_of(xml, "q35"), None, settings_for(storage))


@pytest.mark.parametrize(("devices", "message"), [
    ("{a}<target dev='vda'/></disk>{b}<target dev='vda'/></disk>", "target dev='vda' used twice"),
    ("{a}<target dev='sda' bus='sata'/></disk>{b}<target dev='sdb' bus='sata'/>"
     "<address type='drive' unit='0'/></disk>",
     "drive address controller=0 bus=0 target=0 unit=0 is already used by 'sda'"),
    ("{a}<target dev='vda'/><boot order='1'/></disk>{b}<target dev='vdb'/><boot order='1'/>"
     "</disk>", "boot order 1 is already used by another device"),
])
def test_duplicates_are_refused(storage: Path, devices: str, message: str) -> None:
    xml = (devices.replace("{a}", f"<disk type='file'><source file='{storage / 'a.img'}'/>")
           .replace("{b}", f"<disk type='file'><source file='{storage / 'd.img'}'/>"))
    with pytest.raises(ConfigUnsupported, match=message):
        parse_config(spec_of(xml), None, settings_for(storage))


def test_default_bus_follows_the_name_as_libvirt(storage: Path) -> None:
    _, disks = argv_of(disk(storage, "hda") + disk(storage, "sdb", file="d.img")
                       + disk(storage, "vdc", file="b.qcow2"), storage)
    assert [d.bus for d in disks] == ["ide", "scsi", "virtio"]


# --- migration safety ----------------------------------------------------------------------------


def test_migration_unsafe_rule(storage: Path) -> None:
    def unsafe(xml: str) -> str:
        return migration_unsafe(parse_config(spec_of(xml), None, settings_for(storage)).disks)

    assert unsafe(disk(storage, "vda")) == UNSAFE_CACHE  # QEMU's default: writeback
    for mode in ("writeback", "writethrough", "unsafe"):
        assert unsafe(disk(storage, "vda", driver=f"<driver cache='{mode}'/>")) == UNSAFE_CACHE
    for mode in ("none", "directsync"):
        assert unsafe(disk(storage, "vda", driver=f"<driver cache='{mode}'/>")) == ""
    assert unsafe(disk(storage, "vda", extra="<readonly/>")) == ""
    assert unsafe(disk(storage, "hdc", device="cdrom", file="c.iso")) == ""
    assert unsafe(disk(storage, "hdc", device="cdrom", source=False)) == ""
    assert unsafe(disk(storage, "vda", driver="<driver cache='none'/>", extra="<shareable/>")) \
        == ""
    assert unsafe("") == ""
    assert QemuBackend(settings_for(storage)).migration_unsafe(spec_of(disk(storage, "vda"))) \
        == UNSAFE_CACHE


async def test_begin_refuses_an_unsafe_migration_without_the_flag(
        pair: tuple[Host, Host], monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon side of the rule (on the test backend, told its guest is unsafe)."""
    src, dst = pair
    await running_guest(src)
    monkeypatch.setattr(src.daemon.backend, "migration_unsafe", lambda spec: UNSAFE_CACHE)
    trace = Trace()
    with pytest.raises(MigrateUnsafe) as info:
        await migrate(src, dst, F.LIVE, trace=trace)
    assert str(info.value) == f"Unsafe migration: {UNSAFE_CACHE}"
    assert trace.calls == ["begin"]
    await assert_rolled_back(src, dst)
    await migrate(src, dst, F.LIVE | F.UNSAFE)  # the caller's override
    assert await dst.conn.lookup("vm1")


# --- read back from a running QEMU ---------------------------------------------------------------


def make_qcow2(path: Path, size: str = "16M") -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True,
                   timeout=60)


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    """A loop device over ``backing`` (root only), detached afterwards."""
    done = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, check=True, timeout=30)
    dev = done.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", dev], check=False, timeout=30)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, settings: QemuSettings, spec: GuestSpec,
                  ) -> AsyncIterator[QemuBackend]:
    backend = QemuBackend(settings)
    await within(backend.open(tmp_path / "host"))
    try:
        await within(backend.start(spec, paused=True))
        yield backend
    finally:
        for uuid in list(backend._guests):
            await within(backend.destroy(uuid))
        await within(backend.close())
        assert not kill_leftover_qemus(tmp_path), "a test left QEMU processes running"


def by_qdev(blocks: list[dict[str, Any]], dev_id: str) -> dict[str, Any]:
    found = [b for b in blocks if b.get("qdev") == dev_id  # its id, or the virtio backend's path
             or b.get("qdev", "").startswith(f"/machine/peripheral/{dev_id}/")]
    assert len(found) == 1, f"{dev_id}: {[b.get('qdev') for b in blocks]}"
    return found[0]


def pci_ids(buses: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(d["id"]["vendor"], d["id"]["device"]) for bus in buses for d in bus["devices"]]


@pytest.mark.qemu
@pytest.mark.skipif(os.geteuid() != 0, reason="a loop device for <disk type='block'> needs root")
async def test_disks_as_qemu_reports_them_pc(tmp_path: Path, storage: Path) -> None:
    """Every bus, cache mode, read-only, serial, boot order, the empty tray, a block device and
    the controllers, read back over QMP from a running QEMU (pc: AHCI added, IDE built in)."""
    qemu_binary_or_skip()
    make_qcow2(storage / "b.qcow2")
    (storage / "loop.img").write_bytes(b"\0" * MIB)
    with loop_device(storage / "loop.img") as loop:
        devices = (
            disk(storage, "vda", "virtio", file="b.qcow2",
                 driver="<driver name='qemu' type='qcow2' cache='none' discard='unmap' "
                        "io='native'/>", extra="<serial>VDA-0001</serial><boot order='2'/>")
            + f"<disk type='block' device='disk'><driver cache='directsync'/>"
              f"<source dev='{loop}'/><target dev='vdb'/><shareable/></disk>"
            + disk(storage, "sda", "sata", driver="<driver cache='writethrough'/>")
            + disk(storage, "hdc", "ide", device="cdrom", source=False, extra="<boot order='1'/>")
            + disk(storage, "sdb", "scsi", file="d.img", driver="<driver cache='unsafe'/>",
                   extra="<readonly/><serial>SCSI-B</serial>")
        )
        spec = spec_of(devices)
        settings = replace(qemu_settings(storage), block_devices=(loop,))
        async with running(tmp_path, settings, spec) as qemu:
            blocks = await qemu.query(spec.uuid, "query-block")
            vda = by_qdev(blocks, "virtio-vda")["inserted"]
            assert (vda["node-name"], vda["drv"], vda["ro"]) == ("drive-vda", "qcow2", False)
            assert vda["cache"] == {"writeback": True, "direct": True, "no-flush": False}
            vdb = by_qdev(blocks, "virtio-vdb")["inserted"]
            assert vdb["cache"] == {"writeback": False, "direct": True, "no-flush": False}
            assert vdb["file"].startswith("json:") or vdb["file"] == "/dev/fdset/2"
            sda = by_qdev(blocks, "sata-sda")["inserted"]
            assert sda["cache"] == {"writeback": False, "direct": False, "no-flush": False}
            sdb = by_qdev(blocks, "scsi-sdb")["inserted"]
            assert sdb["ro"] is True and sdb["drv"] == "raw"
            assert sdb["cache"] == {"writeback": True, "direct": False, "no-flush": True}
            hdc = by_qdev(blocks, "ide-hdc")
            assert "inserted" not in hdc and hdc["removable"] and not hdc["tray_open"]
            nodes = await qemu.query(spec.uuid, "query-named-block-nodes")
            assert {n["node-name"]: n["drv"] for n in nodes if n["node-name"].startswith(
                "file-")} == {"file-vda": "file", "file-vdb": "host_device",
                              "file-sda": "file", "file-sdb": "file"}

            async def prop(dev_id: str, name: str) -> Any:
                return await qemu.query(spec.uuid, "qom-get", {
                    "path": f"/machine/peripheral/{dev_id}", "property": name})

            assert await prop("virtio-vda", "bootindex") == 2
            assert await prop("ide-hdc", "bootindex") == 1
            assert await prop("virtio-vda", "serial") == "VDA-0001"
            assert await prop("scsi-sdb", "serial") == "SCSI-B"
            assert await prop("virtio-vdb", "share-rw") is True
            assert await prop("sata-sda", "write-cache") == "off"
            ids = pci_ids(await qemu.query(spec.uuid, "query-pci"))
            assert ids.count((0x1AF4, 0x1001)) == 2  # virtio-blk (transitional), vda and vdb
            assert (0x1AF4, 0x1004) in ids  # virtio-scsi (transitional)
            assert (0x8086, 0x2922) in ids  # ich9-ahci, added on pc
            assert (0x8086, 0x7010) in ids  # PIIX3 IDE, pc's own


@pytest.mark.qemu
async def test_sata_on_q35_is_the_builtin_ahci(tmp_path: Path, storage: Path) -> None:
    qemu_binary_or_skip()
    spec = spec_of(disk(storage, "sda", "sata") + disk(storage, "sdb", "sata", device="cdrom",
                                                       file="c.iso"), "q35")
    async with running(tmp_path, qemu_settings(storage), spec) as qemu:
        blocks = await qemu.query(spec.uuid, "query-block")
        assert by_qdev(blocks, "sata-sdb")["inserted"]["ro"] is True
        assert by_qdev(blocks, "sata-sda")["inserted"]["ro"] is False
        assert await qemu.query(spec.uuid, "qom-get", {
            "path": "/machine/peripheral/sata-sdb", "property": "unit"}) == 0
        ids = pci_ids(await qemu.query(spec.uuid, "query-pci"))
        assert ids.count((0x8086, 0x2922)) == 1  # only q35's own AHCI
