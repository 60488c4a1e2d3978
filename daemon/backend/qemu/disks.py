"""Disks on the ``qemu`` backend: ``<disk>`` and the disk controllers -> values -> command line.

Concern: the ``<disk>`` subtree and the ``sata``/``scsi``/``ide`` controllers of a domain, what
each becomes on QEMU's command line, and libvirt's migration safety rule for disks.  Pure values:
nothing here opens a file (:mod:`~virtmig.daemon.backend.qemu.confine` does, when QEMU starts).

Honour or refuse: every attribute and child of ``<disk>`` is on an explicit allow-list below and
honoured; anything else is refused with ``ConfigUnsupported`` naming the element and attribute.

* ``<disk type='file'|'block' device='disk'|'cdrom'>``: ``<source file=>`` (a file under
  ``storage_dirs``) or ``<source dev=>`` (a block device under ``storage_dirs`` or one of
  ``block_devices``); a CD-ROM without ``<source>`` is an empty tray.  QEMU gets a descriptor the
  daemon opened (``file`` or ``host_device`` node on ``/dev/fdset/N``), never the path.
* ``<driver name='qemu' type='raw'|'qcow2' cache= discard= io=>``: the format node; ``cache``
  (none, writeback, writethrough, directsync, unsafe) becomes ``cache.direct``/``cache.no-flush``
  on both nodes and the device's ``write-cache``, as libvirt maps it; ``discard`` (unmap, ignore)
  both nodes' ``discard``; ``io`` (native, threads) the protocol node's ``aio`` (native needs
  cache none or directsync: QEMU's rule, refused at define time).
* ``<target dev= bus=>``: virtio (``vdX``, ``virtio-blk-pci``), sata (``sdX``, ``ide-hd``/``ide-cd``
  on q35's built-in AHCI, or an ``ich9-ahci`` controller), ide (``hdX``, pc only, as libvirt:
  q35 has no IDE), scsi (``sdX``, ``scsi-hd``/``scsi-cd`` on a ``virtio-scsi-pci`` controller).
  The name's prefix must match the bus (no bus: the prefix's, as libvirt); a target used twice is
  refused.  A CD-ROM on virtio is refused (no ejectable media), as are read-only IDE/SATA disks.
* ``<address type='drive' controller= bus= target= unit=>``: honoured (default: libvirt's
  assignment from the name's index: IDE 2 buses x 2 units, SATA 6 units, SCSI 7 units per
  controller); two disks at one address are refused.
* ``<backingStore/>`` (empty only: the image has no backing chain, as QEMU is told),
  ``<readonly/>`` (implied for a CD-ROM), ``<shareable/>`` (QEMU's ``share-rw``; a writable one
  must be raw with cache none or directsync), ``<serial>`` (``[A-Za-z0-9_.+-]``, at most 20
  characters, 36 on SCSI), ``<boot order='N'/>`` (``bootindex``, unique).
* Controllers: ``<controller type='sata'>`` (q35's index 0 is the built-in AHCI; others
  ``ich9-ahci``), ``<controller type='scsi' model='virtio-scsi'>`` (no model: virtio-scsi),
  ``<controller type='ide' index='0'>`` (pc's built-in).  A SCSI or SATA disk on a controller
  nobody declared gets one (implicit, as libvirt adds them; an implicit SCSI controller is
  virtio-scsi here, where libvirt on x86 would pick lsilogic).

Migration safety (:func:`migration_unsafe`, applied by the source's Begin unless
``VIR_MIGRATE_UNSAFE``/``OFFLINE``): a disk with a source that is neither read-only nor
shareable must use cache none or directsync.  Images are on shared storage by design (every
``storage_dirs`` folder is one both hosts see at the same path, like libvirt's
``shared_filesystems``), so libvirt's "without shared storage" case does not arise.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

from virtmig.daemon.backend.qemu.confine import QemuSettings, block_refusal, image_refusal
from virtmig.daemon.backend.qemu.xmltable import unsupported_device as _refuse
from virtmig.proto.errors import ConfigUnsupported

__all__ = ["DiskConfig", "DiskController", "DriveAddress", "disks_argv", "migration_unsafe",
           "parse_disk", "parse_disk_controller", "resolve_controllers"]

UNSAFE_CACHE = ("Migration may lead to data corruption if disks use cache other than none or "
                "directsync")
BUSES = {"virtio": "vd", "sata": "sd", "scsi": "sd", "ide": "hd"}
_BUS_OF_PREFIX = {"vd": "virtio", "sd": "scsi", "hd": "ide"}  # libvirt's default bus
_TARGET_RE = re.compile(r"(vd|sd|hd)([a-z]{1,3})")
_SERIAL_RE = re.compile(r"[A-Za-z0-9_.+-]+")
# cache mode -> (cache.direct, cache.no-flush, the device's write-cache), libvirt's mapping.
CACHE_MODES = {
    "none": (True, False, True),
    "writeback": (False, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}
SAFE_CACHE = ("none", "directsync")
_UNITS = {"sata": 6, "scsi": 7}  # units per controller in libvirt's default assignment
_MAX_CONTROLLER = 3  # controller indexes 0-3 per type
_MAX_BOOT_ORDER = 65535

# The explicit allow-lists: attributes of each element of the subtree, and <disk>'s children.
_DISK_ATTRS = frozenset({"type", "device"})
_CHILD_ATTRS: dict[str, frozenset[str]] = {
    "driver": frozenset({"name", "type", "cache", "discard", "io"}),
    "source": frozenset({"file", "dev"}),
    "target": frozenset({"dev", "bus"}),
    "readonly": frozenset(),
    "shareable": frozenset(),
    "serial": frozenset(),
    "boot": frozenset({"order"}),
    # type='drive' (SATA/IDE/SCSI: controller bus target unit); type='pci' (virtio: pci.py)
    "address": frozenset({"type", "controller", "bus", "target", "unit", "domain", "slot",
                          "function"}),
    "backingStore": frozenset(),  # empty: no backing chain, which is what QEMU gets
}
_CONTROLLER_ATTRS = frozenset({"type", "index", "model"})


@dataclass(frozen=True)
class DriveAddress:
    """Where a SATA/IDE/SCSI disk sits: libvirt's ``<address type='drive'>``."""

    controller: int = 0
    bus: int = 0
    target: int = 0
    unit: int = 0


@dataclass(frozen=True)
class DiskConfig:
    target: str  # vda, sda, hdc, ...
    path: str  # as the definition names it; "": an empty CD-ROM tray
    fmt: str = "raw"  # raw | qcow2
    readonly: bool = False  # always for a CD-ROM
    kind: str = "file"  # file | block
    device: str = "disk"  # disk | cdrom
    bus: str = "virtio"  # virtio | sata | ide | scsi
    cache: str = ""  # "": QEMU's default (writeback, the device's write cache on)
    discard: str = ""  # "": QEMU's default (ignore)
    io: str = ""  # "": QEMU's default (threads)
    shareable: bool = False
    serial: str = ""
    boot_order: int = 0  # 0: none
    address: DriveAddress | None = None  # virtio: None

    @property
    def qemu_id(self) -> str:
        return f"{self.bus}-{self.target}"


@dataclass(frozen=True)
class DiskController:
    """A SATA, SCSI or IDE controller; ``builtin``: the machine has it (nothing is added)."""

    kind: str  # sata | scsi | ide
    index: int
    builtin: bool = False

    @property
    def qemu_id(self) -> str:
        """The QEMU id its buses are named after (``<id>.<n>``)."""
        return "ide" if self.builtin else f"{self.kind}{self.index}"


# --- parsing -------------------------------------------------------------------------------------


def _attr_names(el: etree._Element) -> list[str]:
    return [k if isinstance(k, str) else k.decode() for k in el.attrib]


def _check_allowed(disk: etree._Element) -> None:
    """Every attribute and child of ``<disk>`` on the allow-list, each child at most once."""
    for name in _attr_names(disk):
        if name not in _DISK_ATTRS:
            raise _refuse(disk, f"attribute {name}")
    seen: set[str] = set()
    for child in disk:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        qname = etree.QName(child)
        tag = qname.localname if qname.namespace is None else child.tag
        allowed = _CHILD_ATTRS.get(tag)
        if allowed is None:
            raise _refuse(disk, f"element <{tag}>")
        if tag in seen:
            raise _refuse(disk, f"element <{tag}> given twice")
        seen.add(tag)
        for name in _attr_names(child):
            if name not in allowed:
                raise _refuse(disk, f"attribute {name} of <{tag}>")
        if tag != "serial" and (len(child) or (child.text or "").strip()):
            raise _refuse(disk, f"content of <{tag}>")
        if tag == "serial" and len(child):
            raise _refuse(disk, "elements inside <serial>")


def _choice(el: etree._Element, disk: etree._Element, attr: str,
            allowed: Iterable[str], default: str = "") -> str:
    value = el.get(attr)
    if value is None:
        return default
    if value not in allowed:
        tag = etree.QName(el).localname
        raise _refuse(disk, f"<{tag} {attr}='{value}'> (supported: {', '.join(allowed)})")
    return value


def _int_attr(el: etree._Element, disk: etree._Element, attr: str, low: int, high: int,
              default: int) -> int:
    raw = el.get(attr)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        tag = etree.QName(el).localname
        raise _refuse(disk, f"<{tag} {attr}='{raw}'> (an integer from {low} to {high})")
    return value


def _index(letters: str) -> int:
    """libvirt's disk name index: ``a`` 0 ... ``z`` 25, ``aa`` 26, ..."""
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def parse_disk(el: etree._Element, seen: Sequence[DiskConfig], settings: QemuSettings,
               machine: str) -> DiskConfig:
    """One ``<disk>``; ``seen``: the disks before it (targets, addresses, boot orders)."""
    _check_allowed(el)
    kind = _choice(el, el, "type", ("file", "block"), "file")
    device = _choice(el, el, "device", ("disk", "cdrom"), "disk")
    target = el.find("target")
    dev = target.get("dev", "") if target is not None else ""
    m = _TARGET_RE.fullmatch(dev)
    if target is None or m is None:
        raise _refuse(el, f"target dev='{dev}' (a <target dev='vdX|sdX|hdX'> is needed)")
    bus = _choice(target, el, "bus", tuple(BUSES), _BUS_OF_PREFIX[m.group(1)])
    if BUSES[bus] != m.group(1):
        raise _refuse(el, f"target dev='{dev}' does not match bus='{bus}' "
                          f"({bus} disks are {BUSES[bus]}X)")
    if any(d.target == dev for d in seen):
        raise _refuse(el, f"target dev='{dev}' used twice")
    if bus == "ide" and "q35" in machine:
        raise _refuse(el, "IDE controllers are unsupported for this QEMU binary or machine "
                          f"type '{machine}' (use bus='sata')")
    if device == "cdrom" and bus == "virtio":
        raise _refuse(el, f"disk type 'virtio' of '{dev}' does not support ejectable media")
    readonly = device == "cdrom" or el.find("readonly") is not None
    if readonly and device == "disk" and bus in ("ide", "sata"):
        raise _refuse(el, f"readonly {bus} disks are not supported")
    fmt, cache, discard, io = _driver(el)
    path = _source(el, kind, device, settings)
    shareable = el.find("shareable") is not None
    if shareable and not readonly and (fmt != "raw" or cache not in SAFE_CACHE):
        raise _refuse(el, f"shared access for disk '{dev}' needs a raw image with cache "
                          "'none' or 'directsync'")
    return DiskConfig(
        target=dev, path=path, fmt=fmt, readonly=readonly, kind=kind, device=device, bus=bus,
        cache=cache, discard=discard, io=io, shareable=shareable,
        serial=_serial(el, bus), boot_order=_boot_order(el, seen),
        address=_address(el, bus, _index(m.group(2)), seen),
    )


def _source(el: etree._Element, kind: str, device: str, settings: QemuSettings) -> str:
    """The source path (``""``: an empty CD-ROM), checked against the host's rules."""
    source = el.find("source")
    attr = "file" if kind == "file" else "dev"
    other = "dev" if kind == "file" else "file"
    if source is not None and source.get(other) is not None:
        raise _refuse(el, f"<source {other}=...> on a type='{kind}' disk")
    path = source.get(attr, "") if source is not None else ""
    if not path:
        if device == "cdrom":
            return ""  # an empty tray
        raise _refuse(el, f"a disk needs <source {attr}=...>")
    why = (image_refusal(path, settings.storage_dirs) if kind == "file"
           else block_refusal(path, settings.storage_dirs, settings.block_devices))
    if why:
        raise _refuse(el, f"source {attr} {why}")
    return path


def _driver(el: etree._Element) -> tuple[str, str, str, str]:
    """``<driver>``: format, cache, discard and io modes."""
    driver = el.find("driver")
    if driver is None:
        return "raw", "", "", ""
    _choice(driver, el, "name", ("qemu",))
    fmt = _choice(driver, el, "type", ("raw", "qcow2"), "raw")
    cache = _choice(driver, el, "cache", tuple(CACHE_MODES))
    discard = _choice(driver, el, "discard", ("unmap", "ignore"))
    io = _choice(driver, el, "io", ("native", "threads"))
    if io == "native" and cache not in SAFE_CACHE:
        raise _refuse(el, "<driver io='native'> needs cache='none' or 'directsync' (QEMU's "
                          "native AIO needs O_DIRECT)")
    return fmt, cache, discard, io


def _serial(el: etree._Element, bus: str) -> str:
    node = el.find("serial")
    if node is None:
        return ""
    text = (node.text or "").strip()
    limit = 36 if bus == "scsi" else 20
    if not _SERIAL_RE.fullmatch(text) or len(text) > limit:
        raise _refuse(el, f"<serial>{text}</serial> (1 to {limit} characters of "
                          "A-Z a-z 0-9 _ . + -)")
    return text


def _boot_order(el: etree._Element, seen: Sequence[DiskConfig]) -> int:
    boot = el.find("boot")
    if boot is None:
        return 0
    if boot.get("order") is None:
        raise _refuse(el, "<boot> needs order='N'")
    order = _int_attr(boot, el, "order", 1, _MAX_BOOT_ORDER, 0)
    if any(d.boot_order == order for d in seen):
        raise _refuse(el, f"boot order {order} is already used by another device")
    return order


def _address(el: etree._Element, bus: str, index: int,
             seen: Sequence[DiskConfig]) -> DriveAddress | None:
    """The drive address: the given one (checked), else libvirt's default for ``index``."""
    node = el.find("address")
    if bus == "virtio":
        if node is not None and node.get("type") != "pci":
            raise _refuse(el, f"<address type='{node.get('type')}'> on a virtio disk "
                              "(type='pci' only)")
        return None  # its PCI slot: pci.py

    if bus == "ide":
        default = DriveAddress(index // 4, (index % 4) // 2, 0, index % 2)
    else:
        per = _UNITS[bus]
        default = DriveAddress(index // per, 0, 0, index % per)
    if node is None:
        addr = default
    else:
        if node.get("type") != "drive":
            raise _refuse(el, f"<address type='{node.get('type')}'> (type='drive' only)")
        for attr in ("domain", "slot", "function"):
            if node.get(attr) is not None:
                raise _refuse(el, f"attribute {attr} of <address type='drive'>")
        units, targets = {"ide": (1, 0), "sata": (5, 0), "scsi": (16383, 255)}[bus]
        addr = DriveAddress(
            controller=_int_attr(node, el, "controller", 0, _MAX_CONTROLLER, default.controller),
            bus=_int_attr(node, el, "bus", 0, 1 if bus == "ide" else 0, default.bus),
            target=_int_attr(node, el, "target", 0, targets, default.target),
            unit=_int_attr(node, el, "unit", 0, units, default.unit),
        )
    if addr.controller > (0 if bus == "ide" else _MAX_CONTROLLER):
        raise _refuse(el, f"{bus} controller {addr.controller} (pc has one IDE controller, "
                          f"index 0; other buses up to {_MAX_CONTROLLER})")
    for other in seen:
        if other.bus == bus and other.address == addr:
            raise _refuse(el, f"drive address {_fmt_addr(addr)} is already used by "
                              f"'{other.target}'")
    return addr


def _fmt_addr(a: DriveAddress) -> str:
    return f"controller={a.controller} bus={a.bus} target={a.target} unit={a.unit}"


def parse_disk_controller(el: etree._Element, machine: str) -> DiskController:
    """A ``<controller type='sata'|'scsi'|'ide'>`` (other types are config.py's)."""
    for name in _attr_names(el):
        if name not in _CONTROLLER_ATTRS:
            raise _refuse(el, f"attribute {name}")
    for child in el:  # <address type='pci'>: pci.py checks it (and refuses it where no slot is)
        if isinstance(child.tag, str) and etree.QName(child).localname != "address":
            raise _refuse(el, f"element <{etree.QName(child).localname}>")
    kind = el.get("type", "")
    index = _int_attr(el, el, "index", 0, _MAX_CONTROLLER, 0)
    model = el.get("model")
    q35 = "q35" in machine
    if kind == "scsi":
        if model not in (None, "virtio-scsi"):
            raise _refuse(el, f"SCSI controller model '{model}' (virtio-scsi only)")
        return DiskController("scsi", index)
    if model is not None:
        raise _refuse(el, f"attribute model of a {kind} controller")
    if kind == "ide":
        if q35 or index != 0:
            raise _refuse(el, "IDE controllers are unsupported for this QEMU binary or machine "
                              f"type '{machine}'" if q35 else "pc has one IDE controller")
        return DiskController("ide", 0, builtin=True)
    if kind == "sata":
        return DiskController("sata", index, builtin=q35 and index == 0)
    raise _refuse(el)


def resolve_controllers(disks: Sequence[DiskConfig], declared: Sequence[DiskController],
                        machine: str) -> tuple[DiskController, ...]:
    """The declared controllers (each index once) plus those the disks need; pc's IDE and
    q35's AHCI are built in and listed only when declared."""
    out: dict[tuple[str, int], DiskController] = {}
    for c in declared:
        if (c.kind, c.index) in out:
            raise ConfigUnsupported(f"unsupported device <controller type='{c.kind}'> for the "
                                    f"qemu backend: index {c.index} defined twice")
        out[c.kind, c.index] = c
    q35 = "q35" in machine
    for d in disks:
        if d.address is None or d.bus == "ide":
            continue
        key = (d.bus, d.address.controller)
        if key not in out:
            out[key] = DiskController(d.bus, d.address.controller,
                                      builtin=d.bus == "sata" and q35 and key[1] == 0)
    return tuple(out[k] for k in sorted(out))


# --- the command line ----------------------------------------------------------------------------


def _json(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def disks_argv(disks: Sequence[DiskConfig], controllers: Sequence[DiskController],
               fds: Sequence[int], fdset: int) -> tuple[list[str], int]:
    """The controllers' and disks' arguments, disk ``i``'s descriptor ``fds[i]`` (-1: an empty
    tray) in fd set ``fdset + 1`` onwards; returns them and the last fd set used."""
    args: list[str] = []
    for c in controllers:
        if not c.builtin:
            driver = "virtio-scsi-pci" if c.kind == "scsi" else "ich9-ahci"
            args += ["-device", _json({"driver": driver, "id": c.qemu_id})]
    for disk, fd in zip(disks, fds, strict=True):
        drive = ""
        if disk.path:
            fdset += 1
            drive = f"drive-{disk.target}"
            args += ["-add-fd", f"fd={fd},set={fdset},opaque=disk-{disk.target}",
                     *_blockdevs(disk, fdset)]
        args += ["-device", _json(_device(disk, drive, controllers))]
    return args, fdset


def _blockdevs(disk: DiskConfig, fdset: int) -> list[str]:
    proto, fmt = f"file-{disk.target}", f"drive-{disk.target}"
    common: dict[str, object] = {"read-only": disk.readonly}
    if disk.cache:
        direct, no_flush, _ = CACHE_MODES[disk.cache]
        common["cache"] = {"direct": direct, "no-flush": no_flush}
    if disk.discard:
        common["discard"] = disk.discard
    driver = "file" if disk.kind == "file" else ("host_cdrom" if disk.device == "cdrom"
                                                  else "host_device")
    protocol: dict[str, object] = {"driver": driver, "filename": f"/dev/fdset/{fdset}",
                                   "node-name": proto, **common}
    if disk.io:
        protocol["aio"] = disk.io
    # A qcow2 image never opens a backing file by the name in its header.
    backing: dict[str, object] = {"backing": None} if disk.fmt == "qcow2" else {}
    return ["-blockdev", _json(protocol),
            "-blockdev", _json({"driver": disk.fmt, "file": proto, "node-name": fmt, **common,
                                **backing})]


def _device(disk: DiskConfig, drive: str,
            controllers: Sequence[DiskController]) -> dict[str, object]:
    dev: dict[str, object]
    if disk.bus == "virtio":
        dev = {"driver": "virtio-blk-pci"}
    else:
        addr = disk.address or DriveAddress()
        kind = "ide" if disk.bus == "ide" else disk.bus
        ctrl = next((c for c in controllers if c.kind == kind and c.index == addr.controller),
                    DiskController(kind, addr.controller, builtin=True))
        suffix = "cd" if disk.device == "cdrom" else "hd"
        if disk.bus == "scsi":
            dev = {"driver": f"scsi-{suffix}", "bus": f"{ctrl.qemu_id}.0", "channel": 0,
                   "scsi-id": addr.target, "lun": addr.unit}
        elif disk.bus == "sata":
            dev = {"driver": f"ide-{suffix}", "bus": f"{ctrl.qemu_id}.{addr.unit}"}
        else:
            dev = {"driver": f"ide-{suffix}", "bus": f"ide.{addr.bus}", "unit": addr.unit}
    if drive:
        dev["drive"] = drive
    dev["id"] = disk.qemu_id
    if disk.cache and drive:
        dev["write-cache"] = "on" if CACHE_MODES[disk.cache][2] else "off"
    if disk.shareable:
        dev["share-rw"] = True
    if disk.serial:
        dev["serial"] = disk.serial
    if disk.boot_order:
        dev["bootindex"] = disk.boot_order
    return dev


# --- migration safety ----------------------------------------------------------------------------


def migration_unsafe(disks: Iterable[DiskConfig]) -> str:
    """libvirt's Begin check: why migrating these disks may corrupt data (``""``: safe).

    Empty CD-ROMs, read-only and shareable disks are exempt; the others must not be cached by
    the host (cache none or directsync).
    """
    for d in disks:
        if not d.path or d.readonly or d.shareable or d.cache in SAFE_CACHE:
            continue
        return UNSAFE_CACHE
    return ""
