"""Domain XML -> :class:`QemuConfig` -> QEMU command line: what the ``qemu`` backend can run.

Concern: the supported subset of libvirt's domain XML, and the command line it becomes.  Pure
values: nothing here runs a process or opens a file.

Supported domain XML (anything else is refused by :func:`parse_config`, and so by
:meth:`QemuBackend.validate <virtmig.daemon.backend.qemu.backend.QemuBackend.validate>`, with
``ConfigUnsupported`` naming the element): :func:`parse_config` first walks the definition
against the honour-or-refuse table (:mod:`.xmltable`), then each part's parser checks values:

* ``<domain type='qemu'>`` (``-accel tcg``) or ``type='kvm'`` (``-accel kvm``); ``hvm``/x86_64;
  machine ``pc``/``q35`` or a versioned ``pc-*``/``pc-q35-*`` name the emulator knows (default
  ``pc``; :func:`canonical_xml` pins an alias to its concrete type at define time);
  ``<memory>``; ``<os>`` with ``<kernel>``, ``<initrd>``, ``<cmdline>``; the firmware
  (``<os firmware=>``, ``<loader>``, ``<nvram>``, ``<features><smm>``): :mod:`.firmware`.
* ``<vcpu>``, ``<cpu>`` and ``<features><hyperv>``: :mod:`.cpu`; ``<features>``, ``<clock>``,
  ``<os><boot>``, ``<on_*>``, ``<currentMemory>``, ``<seclabel>``: :mod:`.machine`.
* ``<devices>``: ``<emulator>`` (one of the configured emulators; default: the first);
  ``<disk>`` and the ``sata``/``scsi``/``ide`` controllers (:mod:`.disks`: file and block
  sources, raw and qcow2, disk and CD-ROM on virtio, SATA, IDE and SCSI; shared storage: both
  hosts see the same path); ``<serial>``/``<console>`` (pty, file, unix) and ``<channel>``
  (virtio-serial on a unix socket) and the virtio-serial controller (:mod:`.chardev`); the
  machine's built-in PCI root (and q35's SATA) controller; memory balloon, RNG, watchdog, USB
  controller and inputs (:mod:`.misc`; :func:`canonical_xml` writes libvirt's default balloon
  and USB controller into a definition without them); ``<graphics type='vnc'>`` and
  ``<video>`` (:mod:`.graphics`); ``<interface>`` of type ``user``, ``ethernet`` or ``bridge``
  (:mod:`.net`, with its own allow-list; taps are created by the daemon, :mod:`.tap`, and passed
  as descriptors).  Always ``-no-user-config -nodefaults -display none`` (VNC is ``-vnc``).
  Every PCI device's ``-device`` gets its slot (:mod:`.pci`, :func:`~.pci.place`).

At define time :func:`canonical_xml` also writes a generated MAC (``52:54:00:xx:xx:xx``) into
each ``<interface>`` that has none, so the guest keeps its MAC on every start and migration,
a socket path into each ``<channel>`` that has none, libvirt's default balloon and USB
controller, and then a PCI address into each device that takes a slot and has none (the
defaults included; :func:`parse_config` adds the defaults to its copy too, so an incoming
migratable XML, which leaves out the default USB controller, gets the same layout).

What a definition may reach on the host (emulators, image folders, log files) is the concern of
:mod:`virtmig.daemon.backend.qemu.confine`; here its rules become refusals that name the element.
QEMU never gets a path to a host file: images, serial logs and unix sockets are descriptors the
daemon opened (:class:`GuestFiles`), disks (block devices too) and serial logs through fd sets
(``-add-fd``,
``/dev/fdset/N``), kernel and initrd as ``/proc/self/fd/N``.  QEMU runs with the guest's folder
as its working directory (see :mod:`virtmig.daemon.backend.qemu.guest`); without a monitor
descriptor QMP listens on the relative path ``qmp.sock``.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from virtmig.daemon.backend.base import GuestSpec
from virtmig.daemon.backend.qemu.caps import Caps, EmulatorCaps, caps_for
from virtmig.daemon.backend.qemu.chardev import (
    ChannelConfig,
    SerialConfig,
    assign_sockets,
    channels_argv,
    check_virtio_serial,
    parse_channel,
    parse_serial,
    repoint_serials,
    serial_argv,
)
from virtmig.daemon.backend.qemu.confine import (
    DEFAULT_BINARY,
    SANDBOX,
    QemuSettings,
    check_emulator,
    image_refusal,
)
from virtmig.daemon.backend.qemu.cpu import CpuConfig, parse_cpu
from virtmig.daemon.backend.qemu.disks import (
    DiskConfig,
    DiskController,
    disks_argv,
    parse_disk,
    parse_disk_controller,
    resolve_controllers,
)
from virtmig.daemon.backend.qemu.firmware import Firmware, parse_firmware
from virtmig.daemon.backend.qemu.graphics import (
    VideoConfig,
    VncConfig,
    parse_graphics,
    parse_video,
)
from virtmig.daemon.backend.qemu.guest import SOCKET_NAME
from virtmig.daemon.backend.qemu.machine import MachineConfig, parse_machine, pin_machine
from virtmig.daemon.backend.qemu.misc import (
    DEFAULT_USB,
    MiscBuilder,
    MiscDevices,
    add_default_balloon,
    add_default_usb,
    default_usb,
    parse_misc_device,
)
from virtmig.daemon.backend.qemu.net import NicConfig, assign_macs, parse_interface
from virtmig.daemon.backend.qemu.pci import Placement, place, placement, write_addresses
from virtmig.daemon.backend.qemu.xmltable import check_tree, unsupported_device
from virtmig.daemon.domxml import DomainDef, parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported, VirtmigError

__all__ = ["DEFAULT_BINARY", "DiskConfig", "GuestFiles", "Machines", "NicConfig", "QemuConfig",
           "SerialConfig", "canonical_xml", "parse_config"]

_MACHINE_RE = re.compile(r"(pc|q35|pc-[A-Za-z0-9._-]+)")

# What each emulator offers (machine types, aliases, CPU models; None: not checked beyond the
# name form), or one EmulatorCaps (or set of machine types) for whichever emulator runs.
Machines = Caps


@dataclass(frozen=True)
class GuestFiles:
    """The descriptors the daemon opened for one QEMU, in the order of :class:`QemuConfig`'s
    ``disks``, ``serials`` and ``nics`` (-1: no kernel, no initrd, an empty CD-ROM tray, a NIC
    without a tap)."""

    disks: tuple[int, ...] = ()
    serials: tuple[int, ...] = ()
    kernel: int = -1
    initrd: int = -1
    nics: tuple[int, ...] = ()  # the taps' descriptors
    sockets: tuple[int, ...] = ()  # listening, in the order of QemuConfig.socket_names
    firmware: tuple[int, ...] = ()  # a SeaBIOS rom, or the OVMF code and NVRAM (firmware.py)

    @property
    def fds(self) -> tuple[int, ...]:
        """Every descriptor, for ``pass_fds``."""
        return tuple(fd for fd in (*self.disks, *self.serials, self.kernel, self.initrd,
                                   *self.nics, *self.sockets, *self.firmware) if fd >= 0)


@dataclass(frozen=True)
class QemuConfig:
    """The supported subset of a domain, ready to become a command line."""

    uuid: str
    name: str
    accel: str  # tcg | kvm
    machine: str
    memory_kib: int
    cpu: CpuConfig = field(default_factory=CpuConfig)  # -smp, -cpu
    emulator: str = ""  # a configured emulator: what runs
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    disks: tuple[DiskConfig, ...] = ()
    disk_controllers: tuple[DiskController, ...] = ()  # sata/scsi/ide (builtin: nothing added)
    serials: tuple[SerialConfig, ...] = ()
    nics: tuple[NicConfig, ...] = ()  # -netdev/-device per <interface>
    # -machine options, -rtc, -boot, -action
    machine_cfg: MachineConfig = field(default_factory=MachineConfig)
    channels: tuple[ChannelConfig, ...] = ()  # virtio-serial ports (chardev.py)
    virtio_serial: bool = False  # a declared virtio-serial controller
    vnc: VncConfig | None = None  # graphics.py
    video: VideoConfig | None = None
    misc: MiscDevices = field(default_factory=MiscDevices)  # balloon, RNG, watchdog, USB
    firmware: Firmware = field(default_factory=Firmware)  # SeaBIOS or OVMF
    pci: Placement = field(default_factory=Placement)  # the devices' PCI slots (pci.py)

    @property
    def socket_names(self) -> tuple[str, ...]:
        """The unix sockets the daemon binds in the guest's folder, for :class:`GuestFiles`."""
        return (*(s.socket for s in self.serials if s.kind == "unix"),
                *(c.socket for c in self.channels))

    def argv(self, files: GuestFiles, *, incoming: bool, monitor_fd: int | None = None,
             sandbox: bool = True) -> list[str]:
        """The command line, with ``files`` (inherited by QEMU) for the guest's host files.

        The QMP monitor listens on ``monitor_fd`` when given (a unix socket the caller bound and
        listens on, as libvirt does: it can connect at once, with no polling for the socket),
        else on the relative path ``qmp.sock``.  ``sandbox``: QEMU's seccomp sandbox on.
        """
        monitor = (
            ["-chardev", f"socket,id=monitor,fd={monitor_fd},server=on,wait=off",
             "-mon", "chardev=monitor,mode=control"] if monitor_fd is not None
            else ["-qmp", f"unix:{SOCKET_NAME},server=on,wait=off"]
        )
        args = [
            self.emulator,
            "-name", f"guest={_opt(self.name)},debug-threads=on",
            "-uuid", self.uuid,
            "-no-user-config", "-nodefaults", "-display", "none",
            *(["-sandbox", SANDBOX] if sandbox else []),
            "-msg", "timestamp=on",
            "-accel", self.accel,
            "-machine", self.machine + self.machine_cfg.machine_options()
            + self.firmware.machine_options(),
            "-m", f"{self.memory_kib}k",
            *self.cpu.argv(),
            *self.machine_cfg.argv(),
            *monitor,
        ]
        if self.kernel:
            args += ["-kernel", f"/proc/self/fd/{files.kernel}"]
        if self.initrd:
            args += ["-initrd", f"/proc/self/fd/{files.initrd}"]
        if self.cmdline:
            args += ["-append", self.cmdline]
        firmware, fdset = self.firmware.argv(files.firmware, 0)
        storage, fdset = disks_argv(self.disks, self.disk_controllers, files.disks, fdset)
        args += firmware + storage
        sockets = iter(files.sockets)
        for serial, fd in zip(self.serials, files.serials, strict=True):
            fdset += 1
            args += serial_argv(serial, fd, fdset,
                                next(sockets) if serial.kind == "unix" else -1)
        args += channels_argv(self.channels, tuple(sockets), self.virtio_serial)
        for nic, fd in zip(self.nics, files.nics, strict=True):
            args += nic.argv(fd)
        if self.video is not None:
            args += self.video.argv()
        if self.vnc is not None:
            args += self.vnc.argv()
        args += self.misc.argv()
        if incoming:
            args += ["-incoming", "defer"]
        args.append("-S")  # vCPUs start only on our "cont"
        return place(args, self.pci, self.machine)


def _opt(value: str) -> str:
    """Escape a value for QEMU's key=value option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def _unsupported(el: etree._Element, why: str = "") -> ConfigUnsupported:
    """The refusal of device ``el`` (or a part of it), naming it (see :mod:`.xmltable`)."""
    return unsupported_device(el, why)


def _text(el: etree._Element | None) -> str:
    return "" if el is None else "".join(str(t) for t in el.itertext()).strip()


def parse_config(spec: GuestSpec, machines: Machines = None,
                 settings: QemuSettings | None = None,
                 guests_dir: Path | None = None) -> QemuConfig:
    """The QEMU configuration of ``spec``; ``ConfigUnsupported`` names what cannot be run.

    ``machines``: what the emulators offer (see :data:`Machines`).  ``settings``: what the host
    allows (default: :class:`QemuSettings`' defaults).  ``guests_dir``: the folder of the
    guests' folders (the backend's), where file serial ports must write (None: refused).
    Every element and attribute is honoured or refused as :mod:`.xmltable` says.
    """
    settings = settings or QemuSettings().resolved()
    if not spec.xml:  # a bare spec (no XML): an empty pc guest
        return QemuConfig(uuid=spec.uuid, name=spec.name, accel="tcg", machine="pc",
                          memory_kib=max(1, -(-spec.memory_bytes // 1024)),
                          cpu=CpuConfig(vcpus=spec.vcpus, max_vcpus=spec.vcpus),
                          emulator=_emulator("", settings))
    d, root = _parse_domain(spec.xml)
    check_tree(root)
    add_default_usb(root)  # as define writes them (a migratable XML leaves the USB one out),
    add_default_balloon(root)  # so that pci.py places them like the others
    machine = d.machine or "pc"
    if not _MACHINE_RE.fullmatch(machine):
        raise ConfigUnsupported(f"machine type '{machine}' is not supported by the qemu backend")
    accel = "kvm" if d.domain_type == "kvm" else "tcg"
    kernel, initrd, cmdline = _parse_os(root.find("os"), settings)
    guest_dir = guests_dir / d.uuid if guests_dir is not None else None
    emulator = _emulator(_text(root.find("devices/emulator")), settings)
    caps = caps_for(machines, emulator)
    if caps is not None and machine not in caps.machines:
        raise ConfigUnsupported(
            f"machine type '{machine}' is not supported by the qemu backend (not known to the "
            "emulator)"
        )
    devs = _parse_devices(root.find("devices"), machine, settings, guest_dir, caps, d.uuid)
    return QemuConfig(
        uuid=d.uuid,
        name=d.name,
        accel=accel,
        machine=machine,
        memory_kib=d.memory_kib,
        cpu=parse_cpu(root, d.vcpus, accel, caps),
        emulator=emulator,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        disks=tuple(devs.disks),
        disk_controllers=resolve_controllers(devs.disks, devs.controllers, machine),
        serials=tuple(devs.serials[p] for p in sorted(devs.serials)),
        nics=tuple(devs.nics),
        machine_cfg=parse_machine(root, accel, d.memory_kib, d.current_memory_kib),
        channels=tuple(devs.channels),
        virtio_serial=devs.virtio_serial,
        vnc=devs.vnc,
        video=devs.video,
        misc=devs.misc.result(),
        firmware=parse_firmware(root, machine),
        pci=placement(root, machine),
    )


def _parse_domain(xml: str) -> tuple[DomainDef, etree._Element]:
    """The definition (refused unless a qemu/kvm x86_64 hvm domain) and its element tree."""
    try:
        d = parse_domain_xml(xml)
    except VirtmigError as exc:
        raise ConfigUnsupported(exc.detail) from None
    if d.domain_type not in ("qemu", "kvm"):
        raise ConfigUnsupported(
            f"domain type '{d.domain_type}' is not supported by the qemu backend "
            "(supported: qemu, kvm)"
        )
    if d.os_type != "hvm":
        raise ConfigUnsupported(f"OS type '{d.os_type}' is not supported by the qemu backend")
    if d.arch != "x86_64":
        raise ConfigUnsupported(f"architecture '{d.arch}' is not supported by the qemu backend")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    return d, etree.fromstring(d.xml.encode("utf-8"), parser)


def canonical_xml(spec: GuestSpec, machines: Machines = None,
                  settings: QemuSettings | None = None, guests_dir: Path | None = None, *,
                  define: bool = False) -> str:
    """``spec``'s XML as the daemon should store it: each ``<interface>`` without a MAC given
    a generated ``52:54:00:xx:xx:xx`` one (random, unique within the domain, as libvirt does),
    each ``<channel>`` without a socket path given one in the guest's folder under
    ``guests_dir`` (:func:`~.chardev.assign_sockets`; not at ``define``, a file or unix serial
    port's path in another host's folder of this guest re-pointed to this host's,
    :func:`~.chardev.repoint_serials`), each PCI device without an address
    given its slot (:func:`~.pci.write_addresses`), and its machine type pinned to the concrete
    versioned type the emulator's alias stands for (``pc`` -> ``pc-i440fx-7.2``; no
    ``machine=``: ``pc``'s).  libvirt's default balloon and USB controller are written in when
    missing: at ``define`` (a definition the user gives) the USB controller is the machine's
    default (:func:`~.misc.default_usb`: ``qemu-xhci`` on q35) and a USB controller without a
    model gets it; otherwise (a migration's XML, which leaves out a ``piix3-uhci``) it is
    ``piix3-uhci``.  Unchanged when nothing is to fill in, or the definition is not one this
    backend runs (validation says why); the machine is left as it is when the emulator's
    aliases are unknown."""
    if not spec.xml:
        return spec.xml
    try:
        d, root = _parse_domain(spec.xml)
        named = root.find("devices/emulator")
        emulator = _emulator(_text(named), settings or QemuSettings().resolved())
    except ConfigUnsupported:
        return spec.xml
    xml = d.xml
    changed = assign_macs(root)
    gdir = guests_dir / d.uuid if guests_dir else None
    changed = assign_sockets(root, gdir) or changed
    if not define:  # a migration's XML: serial files and sockets in the source's folder
        changed = repoint_serials(root, gdir) or changed
    usb = default_usb(d.machine or "pc") if define else DEFAULT_USB
    changed = add_default_usb(root, usb, define=define) | add_default_balloon(root) | changed
    with contextlib.suppress(ConfigUnsupported):  # a refused address: validation says which
        changed = write_addresses(root, d.machine or "pc") or changed
    if changed:
        xml = etree.tostring(root.getroottree(), encoding="unicode")  # comments kept
    caps = caps_for(machines, emulator)
    if caps is None:
        return xml
    concrete = caps.concrete_machine(d.machine or "pc")
    return xml if concrete == d.machine else pin_machine(xml, concrete)


def _emulator(named: str, settings: QemuSettings) -> str:
    """The configured emulator that runs: the one ``<emulator>`` names, else the first."""
    if not named:
        if not settings.emulators:
            raise ConfigUnsupported(
                f"no emulator for the qemu backend: none is configured (emulators) and "
                f"{DEFAULT_BINARY} is not on PATH"
            )
        return settings.emulators[0]
    try:
        return check_emulator(named, settings.emulators)
    except ValueError as exc:
        raise ConfigUnsupported(
            f"unsupported emulator <emulator>{named}</emulator> for the qemu backend: {exc}"
        ) from None


def _parse_os(os_el: etree._Element | None, settings: QemuSettings) -> tuple[str, str, str]:
    """``<os>``: kernel, initrd and kernel command line (all ``""`` without ``<os>``)."""
    if os_el is None:
        return "", "", ""
    kernel, initrd, cmdline = (_text(os_el.find(t)) for t in ("kernel", "initrd", "cmdline"))
    if (initrd or cmdline) and not kernel:
        raise ConfigUnsupported("<os><initrd>/<cmdline> need <os><kernel>")
    for tag, path in (("kernel", kernel), ("initrd", initrd)):
        why = image_refusal(path, settings.storage_dirs) if path else ""
        if why:
            raise ConfigUnsupported(f"unsupported <os><{tag}> for the qemu backend: {why}")
    return kernel, initrd, cmdline


@dataclass
class _Devices:
    """What ``<devices>`` holds, as :func:`_parse_devices` collects it."""

    emulator: str = ""
    disks: list[DiskConfig] = field(default_factory=list)
    controllers: list[DiskController] = field(default_factory=list)
    nics: list[NicConfig] = field(default_factory=list)
    serials: dict[int, SerialConfig] = field(default_factory=dict)
    channels: list[ChannelConfig] = field(default_factory=list)
    virtio_serial: bool = False
    vnc: VncConfig | None = None
    video: VideoConfig | None = None
    misc: MiscBuilder = field(default_factory=MiscBuilder)  # the small devices (misc.py)


def _parse_devices(devices: etree._Element | None, machine: str, settings: QemuSettings,
                   guest_dir: Path | None, caps: EmulatorCaps | None, uuid: str) -> _Devices:
    """``<devices>``: the emulator named (``""``: none), the disks and their controllers, the
    serial ports (consoles included), channels, network interfaces, graphics and video; the
    small devices go to ``out.misc`` (:mod:`.misc`)."""
    out = _Devices()
    consoles: list[etree._Element] = []
    seen: set[str] = set()
    for el in devices if devices is not None else ():
        if not isinstance(el.tag, str):
            continue  # comments, processing instructions
        tag = etree.QName(el).localname if etree.QName(el).namespace is None else ""
        if tag in ("graphics", "video") and tag in seen:
            raise _unsupported(el, f"one <{tag}> only")
        seen.add(tag)
        if tag == "emulator":
            out.emulator = _text(el)
        elif tag == "disk":
            out.disks.append(parse_disk(el, out.disks, settings, machine))
        elif tag == "controller" and el.get("type") in ("sata", "scsi", "ide"):
            out.controllers.append(parse_disk_controller(el, machine))
        elif tag == "controller" and el.get("type") == "virtio-serial":
            check_virtio_serial(el)
            out.virtio_serial = True
        elif tag == "serial":
            serial = parse_serial(el, len(out.serials), guest_dir)
            if serial.port in out.serials:
                raise _unsupported(el, f"serial port {serial.port} defined twice")
            out.serials[serial.port] = serial
        elif tag == "console":
            consoles.append(el)
        elif tag == "channel":
            out.channels.append(parse_channel(el, len(out.channels), guest_dir, out.channels))
        elif tag == "interface":
            out.nics.append(parse_interface(el, len(out.nics), out.nics))
        elif tag == "graphics":
            out.vnc = parse_graphics(el, settings.vnc_remote_listen,
                                     (settings.vnc_port_min, settings.vnc_port_max), uuid)
        elif tag == "video":
            out.video = parse_video(el, caps)
        elif parse_misc_device(out.misc, el, tag):
            continue
        else:
            _check_other_device(el, tag, machine)
    for el in consoles:
        target = el.find("target")
        raw = target.get("port") if target is not None else None
        port = int(raw) if raw is not None and raw.isascii() and raw.isdigit() else 0
        console = parse_serial(el, port, guest_dir)  # checked even when the port is declared
        if console.port not in out.serials:  # a console on a serial port nobody declared
            out.serials[console.port] = console
    return out


def _check_other_device(el: etree._Element, tag: str, machine: str) -> None:
    """A device that adds nothing to the command line: accepted, or refused by name."""
    if tag == "controller":
        _check_controller(el, machine)
    else:
        raise _unsupported(el)


def _check_controller(el: etree._Element, machine: str) -> None:
    """Only the PCI root controller the machine type has built in (nothing is added); USB
    controllers are :mod:`.misc`'s, disk controllers :mod:`.disks`'."""
    kind, index, model = el.get("type"), el.get("index", "0"), el.get("model")
    q35 = "q35" in machine
    if kind == "pci" and index == "0" and model == ("pcie-root" if q35 else "pci-root"):
        return
    raise _unsupported(el)

