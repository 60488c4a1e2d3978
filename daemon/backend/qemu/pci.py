"""PCI addresses: which devices of a domain take a PCI slot, and which slot each gets.

Concern: the guest's PCI layout, decided once and written into its definition, so that every
QEMU that runs it -- on the source and on the destination of a migration -- builds the same
device tree (QEMU refuses a migration stream whose devices sit elsewhere, or worse, the guest
finds its devices moved).  Pure values and tree edits; nothing here runs a process.

* :data:`REGISTRY` -- one line per kind of device element that takes a slot: which elements
  (a predicate on the element and the machine type) and the QEMU ``-device`` id its parser gives
  it: video cards, virtio disks, NICs, the virtio-scsi/virtio-serial/SATA controllers, and
  :mod:`.misc`'s small devices (virtio balloon, virtio RNG, the i6300esb watchdog, the USB
  controller).  Adding a device is one :class:`PciDevice` line here, plus its parser accepting
  the ``<address>`` child (:func:`check_address` checks it: the one place addresses are checked).
* ``<address type='pci' domain='0x0000' bus='0x00' slot='0xNN' function='0x0'/>`` -- honoured on
  the machine's root bus only (``pci.0`` on ``pc``, ``pcie.0`` on ``q35``), function 0 (no
  multifunction), slots 0x01-0x1f minus the chipset's (``pc``: 0x01, PIIX3; ``q35``: 0x1f, ICH9).
  Anything else, or two devices in one slot, is refused naming the device.
* One fixed address, as libvirt's: on ``pc`` the ``piix3-uhci`` USB controller is function 2 of
  the PIIX3 chipset, slot 0x01 function 0x2 (``addr=0x01.0x2``); another address on it is
  refused.  It takes no slot of its own, and the migratable XML, which leaves that controller
  out (:mod:`virtmig.daemon.domxml`), loses nothing: a destination adds it back at the same
  place.  (q35's default, ``qemu-xhci``, takes a slot of ``pcie.0`` like any device: libvirt
  would put it behind a ``pcie-root-port``, which is not modelled here.)
  On ``q35`` a ``piix3-uhci`` takes a slot like the others, and a given one must be the
  slot a destination gives it when it adds it back without an address (the lowest free one
  beside the other devices' written slots), else it is refused at define.
* :func:`plan` -- the given addresses, then a slot for each device without one: the primary
  video card at libvirt's slot (0x02 on ``pc``, 0x01 on ``q35``), the others at the lowest free
  slot, in document order (deterministic: the same definition gets the same layout anywhere).
  :func:`write_addresses` writes them into the definition at define time
  (:func:`~virtmig.daemon.backend.qemu.config.canonical_xml`), so the stored and migratable XML
  carry them.
* :func:`place` -- the command line with ``bus=pci.0,addr=0xNN`` on each planned ``-device``
  (found by id), and on any other PCI device the backend adds without an element of its own (an
  implicit controller), at the next free slot, so QEMU never picks a slot itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from lxml import etree

from virtmig.daemon.backend.qemu.xmltable import element_label
from virtmig.daemon.backend.qemu.xmltable import unsupported_device as _refuse
from virtmig.proto.errors import ConfigUnsupported

__all__ = [
    "PCI_DRIVERS",
    "PIIX3_USB",
    "REGISTRY",
    "PciDevice",
    "Placement",
    "check_address",
    "place",
    "placement",
    "plan",
    "root_bus",
    "write_addresses",
]

ADDRESS_ATTRS = frozenset({"type", "domain", "bus", "slot", "function"})
MAX_SLOT = 0x1F
_NUM_RE = re.compile(r"0x[0-9a-fA-F]{1,8}|[0-9]{1,10}")

#: QEMU devices that sit on a PCI bus, for devices added without an element of their own.
PCI_DRIVERS = frozenset({
    "virtio-blk-pci", "virtio-net-pci", "e1000", "rtl8139", "virtio-scsi-pci", "ich9-ahci",
    "virtio-serial-pci", "VGA", "cirrus-vga", "virtio-vga", "qxl-vga", "virtio-balloon-pci",
    "virtio-rng-pci", "i6300esb", "piix3-usb-uhci", "qemu-xhci", "nec-usb-xhci",
    "ich9-usb-ehci1",
})


def _is_q35(machine: str) -> bool:
    return "q35" in machine


def root_bus(machine: str) -> str:
    """The QEMU name of the machine's root bus."""
    return "pcie.0" if _is_q35(machine) else "pci.0"


def _reserved(machine: str) -> dict[int, str]:
    """Slots the chipset takes, and what sits there."""
    chip = {0x1F: "the ICH9 chipset"} if _is_q35(machine) else {0x01: "the PIIX3 chipset"}
    return {0x00: "the host bridge", **chip}


def _video_slot(machine: str) -> int:
    return 0x01 if _is_q35(machine) else 0x02


# --- the registry --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PciDevice:
    """A kind of device element that takes a PCI slot."""

    tag: str  # the element below <devices>
    wants: Callable[[etree._Element, str], bool]  # (element, machine type) -> takes a slot
    qemu_id: Callable[[etree._Element, int], str]  # (element, its index among its tag) -> id
    #: (element, machine type) -> the (slot, function) it must have (None: any free slot)
    fixed: Callable[[etree._Element, str], tuple[int, int] | None] = lambda el, machine: None


def _always(el: etree._Element, machine: str) -> bool:
    return True


def _virtio_disk(el: etree._Element, machine: str) -> bool:
    target = el.find("target")
    if target is None:
        return False
    bus = target.get("bus") or ("virtio" if target.get("dev", "").startswith("vd") else "")
    return bus == "virtio"


def _disk_id(el: etree._Element, n: int) -> str:
    target = el.find("target")
    return f"virtio-{target.get('dev', '') if target is not None else ''}"


def _pci_controller(el: etree._Element, machine: str) -> bool:
    kind = el.get("type")
    if kind == "scsi" or kind == "virtio-serial":
        return True
    return kind == "sata" and not (_is_q35(machine) and el.get("index", "0") == "0")


def _controller_id(el: etree._Element, n: int) -> str:
    return f"{el.get('type')}{el.get('index', '0')}"


def _video(el: etree._Element, machine: str) -> bool:
    model = el.find("model")
    return model is None or model.get("type") != "none"


PIIX3_USB = (0x01, 0x2)  # (slot, function) of pc's piix3-uhci, as libvirt places it


def _usb(el: etree._Element, machine: str) -> bool:
    return el.get("type") == "usb" and el.get("model") != "none"


def _piix3_usb(el: etree._Element, machine: str) -> tuple[int, int] | None:
    """pc's piix3-uhci (libvirt's default, so also no model) is the PIIX3's function 2."""
    if _is_q35(machine) or el.get("model", "piix3-uhci") != "piix3-uhci":
        return None
    return PIIX3_USB


#: Each kind of element that takes a slot; the ids are those its parser gives the -device.
REGISTRY: tuple[PciDevice, ...] = (
    PciDevice("video", _video, lambda el, n: f"video{n}"),
    PciDevice("disk", _virtio_disk, _disk_id),
    PciDevice("interface", _always, lambda el, n: f"net{n}"),
    PciDevice("controller", _pci_controller, _controller_id),
    PciDevice("controller", _usb, lambda el, n: "usb", _piix3_usb),  # misc.py
    PciDevice("memballoon", lambda el, m: el.get("model") != "none", lambda el, n: "balloon0"),
    PciDevice("rng", _always, lambda el, n: f"rng{n}"),
    PciDevice("watchdog", lambda el, m: el.get("model") == "i6300esb",
              lambda el, n: "watchdog0"),
)


# --- addresses -----------------------------------------------------------------------------------


def _number(device: etree._Element, attr: str, raw: str | None) -> int:
    if raw is None:
        return 0
    if not _NUM_RE.fullmatch(raw):
        raise _refuse(device, f"<address {attr}='{raw}'> is not a number")
    return int(raw, 16) if raw.startswith("0x") else int(raw)


def check_address(device: etree._Element, machine: str,
                  fixed: tuple[int, int] | None = None) -> int | None:
    """The slot ``device``'s ``<address type='pci'>`` names (None: it has none); anything
    this backend cannot honour is refused naming the device.  ``fixed``: the (slot, function)
    the device must have (:data:`PIIX3_USB`), the only address it may name."""
    addr = device.find("address")
    if addr is None:
        return None
    for key in addr.attrib:
        name = key if isinstance(key, str) else key.decode()
        if name not in ADDRESS_ATTRS:
            raise _refuse(device, f"attribute '{name}' of <address>")
    if len(addr) or (addr.text or "").strip():
        raise _refuse(device, "content in <address>")
    if addr.get("type") != "pci":
        raise _refuse(device, f"<address type='{addr.get('type')}'> (type='pci' only)")
    domain, bus = (_number(device, a, addr.get(a)) for a in ("domain", "bus"))
    function = _number(device, "function", addr.get("function"))
    raw_slot = addr.get("slot")
    if raw_slot is None:
        raise _refuse(device, "<address type='pci'> needs a slot")
    slot = _number(device, "slot", raw_slot)
    if domain != 0 or bus != 0:
        raise _refuse(device, f"PCI domain {domain:#06x} bus {bus:#04x} (only the root bus "
                              f"{root_bus(machine)}, domain 0x0000 bus 0x00, is supported)")
    if fixed is not None:
        if (slot, function) != fixed:
            raise _refuse(device, f"PCI slot {slot:#04x} function {function:#x} (on this "
                                  f"machine it is part of the chipset: slot {fixed[0]:#04x} "
                                  f"function {fixed[1]:#x} only)")
        return slot
    if function != 0:
        raise _refuse(device, f"PCI function {function:#x} (function 0x0 only)")
    if not 0 <= slot <= MAX_SLOT:
        raise _refuse(device, f"PCI slot {slot:#04x} (0x01-0x1f)")
    taken = _reserved(machine).get(slot)
    if taken:
        raise _refuse(device, f"PCI slot {slot:#04x} is taken by {taken}")
    return slot


@dataclass(frozen=True)
class _Dev:
    """One element that takes a slot, as :func:`plan` sees it."""

    el: etree._Element
    qid: str
    primary: bool  # the first video card
    fixed: tuple[int, int] | None


def _devices(root: etree._Element, machine: str) -> list[_Dev]:
    """Each element that takes a slot, in document order."""
    out: list[_Dev] = []
    devices = root.find("devices")
    if devices is None:
        return out
    seen: dict[str, int] = {}  # tag -> how many of it so far
    for el in devices:
        if not isinstance(el.tag, str):
            continue
        n = seen.get(el.tag, 0)
        seen[el.tag] = n + 1
        entries = [e for e in REGISTRY if e.tag == el.tag and e.wants(el, machine)]
        if entries:
            entry = entries[0]
            out.append(_Dev(el, entry.qemu_id(el, n), entry.tag == "video" and n == 0,
                            entry.fixed(el, machine)))
        elif (any(e.tag == el.tag for e in REGISTRY)
              and el.find("address[@type='pci']") is not None):
            raise _refuse(el, "<address type='pci'> on a device that takes no PCI slot")
    return out


def plan(root: etree._Element, machine: str) -> list[tuple[etree._Element, str, int, int]]:
    """Every device of the domain ``root`` that takes a slot, its QEMU id, its slot and
    function: the given one (checked, clashes refused naming both devices), else one
    assigned."""
    planned = _plan(root, machine)
    _check_left_out_usb(machine, planned)
    return planned


def _left_out_usb(el: etree._Element) -> bool:
    """The USB controller a migratable XML leaves out (as libvirt's, :mod:`.domxml`)."""
    return (el.tag == "controller" and el.get("type") == "usb" and el.get("index", "0") == "0"
            and el.get("model", "piix3-uhci") == "piix3-uhci")


def _check_left_out_usb(machine: str,
                        planned: list[tuple[etree._Element, str, int, int]]) -> None:
    """A given slot on q35's ``piix3-uhci`` must be the one it gets without it: a migration's
    destination adds that controller back (the migratable XML leaves it out) with no address.
    (On pc it is the PIIX3's function 2 wherever it comes from.)"""
    given = [(el, slot) for el, _qid, slot, _f in planned
             if _left_out_usb(el) and el.find("address") is not None]
    if not given or not _is_q35(machine):
        return
    el, slot = given[0]
    others = {s for e, _q, s, _f in planned if e is not el}  # written at define: kept there
    expected = _free_slot(others, machine, el)
    if slot != expected:
        raise _refuse(el, f"PCI slot {slot:#04x} (a migration's destination puts this "
                          f"controller, which the migratable XML leaves out, at {expected:#04x}:"
                          " give that slot, none, or another USB model)")


def _plan(root: etree._Element, machine: str) -> list[tuple[etree._Element, str, int, int]]:
    devices = _devices(root, machine)
    used: dict[int, etree._Element] = {}
    slots: dict[int, int] = {}  # id(element) -> slot
    for dev in devices:
        slot = check_address(dev.el, machine, dev.fixed)
        if dev.fixed is not None:
            slots[id(dev.el)] = dev.fixed[0]  # in a chipset slot: takes none of the pool
            continue
        if slot is None:
            continue
        other = used.get(slot)
        if other is not None:
            raise _refuse(dev.el, f"PCI slot {slot:#04x} is already used by "
                                  f"{element_label(other)}")
        used[slot] = dev.el
        slots[id(dev.el)] = slot
    for dev in devices:  # the primary video card first, at libvirt's slot
        if dev.primary and id(dev.el) not in slots and _video_slot(machine) not in used:
            used[_video_slot(machine)] = dev.el
            slots[id(dev.el)] = _video_slot(machine)
    for dev in devices:
        if id(dev.el) not in slots:
            slot = _free_slot(used.keys(), machine, dev.el)
            used[slot] = dev.el
            slots[id(dev.el)] = slot
    return [(dev.el, dev.qid, slots[id(dev.el)], dev.fixed[1] if dev.fixed else 0)
            for dev in devices]


def _free_slot(used: Iterable[int], machine: str, el: etree._Element | None = None) -> int:
    taken = set(used) | set(_reserved(machine))
    taken.add(_video_slot(machine))  # kept for a video card (libvirt's layout)
    for slot in range(1, MAX_SLOT + 1):
        if slot not in taken:
            return slot
    why = "no free PCI slot on the root bus (31 at most, less the chipset's)"
    if el is None:
        raise ConfigUnsupported(f"unsupported domain for the qemu backend: {why}")
    raise _refuse(el, why)


def write_addresses(root: etree._Element, machine: str) -> bool:
    """Write the planned ``<address type='pci'>`` into each device of ``root`` without one;
    whether anything changed."""
    changed = False
    for el, _qid, slot, function in plan(root, machine):
        if el.find("address") is not None:
            continue
        addr = etree.SubElement(el, "address", {
            "type": "pci", "domain": "0x0000", "bus": "0x00", "slot": f"{slot:#04x}",
            "function": f"{function:#x}"})
        prev = addr.getprevious()
        if prev is not None:  # indent like its siblings
            addr.tail, prev.tail = prev.tail, (el.text or prev.tail)
        changed = True
    return changed


# --- the command line ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """The slots of a guest's devices by QEMU id, on the machine's root bus."""

    bus: str = "pci.0"
    slots: tuple[tuple[str, int], ...] = ()
    functions: tuple[tuple[str, int], ...] = ()  # the devices not at function 0 (by id)

    @property
    def by_id(self) -> dict[str, int]:
        return dict(self.slots)

    def addr(self, qid: str, slot: int) -> str:
        """QEMU's ``addr=`` of device ``qid`` at ``slot``: ``0xNN``, or ``0xNN.0xF``."""
        function = dict(self.functions).get(qid, 0)
        return f"{slot:#04x}" + (f".{function:#x}" if function else "")


def placement(root: etree._Element, machine: str) -> Placement:
    """The planned slots of the domain ``root`` as a value (see :func:`plan`), in slot order:
    the same layout is the same value, whatever the order of the elements."""
    planned = sorted(plan(root, machine), key=lambda p: (p[2], p[3], p[1]))
    return Placement(root_bus(machine), tuple((qid, slot) for _el, qid, slot, _f in planned),
                     tuple((qid, f) for _el, qid, _slot, f in planned if f))


def _driver_and_id(spec: str) -> tuple[str, str, dict[str, object] | None]:
    if spec.startswith("{"):
        obj = json.loads(spec)
        return str(obj.get("driver", "")), str(obj.get("id", "")), obj
    parts = spec.split(",")
    ids = [p[3:] for p in parts[1:] if p.startswith("id=")]
    return parts[0], ids[0] if ids else "", None


def place(args: Sequence[str], where: Placement, machine: str) -> list[str]:
    """``args`` with each PCI ``-device`` on ``where``'s bus at its planned slot (by id), and
    any other PCI device at the next free slot."""
    slots = where.by_id
    used = set(slots.values())
    out = list(args)
    for i in range(len(out) - 1):
        if out[i] != "-device":
            continue
        driver, qid, obj = _driver_and_id(out[i + 1])
        slot = slots.get(qid) if qid else None
        if slot is None:
            if driver not in PCI_DRIVERS:
                continue
            slot = _free_slot(used, machine)
            used.add(slot)
        if obj is not None:
            obj["bus"], obj["addr"] = where.bus, where.addr(qid, slot)
            out[i + 1] = json.dumps(obj, separators=(",", ":"))
        else:
            out[i + 1] += f",bus={where.bus},addr={where.addr(qid, slot)}"
    return out
