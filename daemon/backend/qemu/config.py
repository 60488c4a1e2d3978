"""Domain XML -> :class:`QemuConfig` -> QEMU command line: what the ``qemu`` backend can run.

Concern: the supported subset of libvirt's domain XML, and the command line it becomes.  Pure
values: nothing here runs a process or opens a file.

Supported domain XML (anything else is refused by :func:`parse_config`, and so by
:meth:`QemuBackend.validate <virtmig.daemon.backend.qemu.backend.QemuBackend.validate>`, with
``ConfigUnsupported`` naming the element):

* ``<domain type='qemu'>`` (``-accel tcg``) or ``type='kvm'`` (``-accel kvm``); ``hvm``/x86_64;
  machine ``pc``/``q35`` or a versioned ``pc-*``/``pc-q35-*`` name the emulator knows (default
  ``pc``); ``<memory>``, ``<vcpu>``; ``<os>`` with ``<kernel>``, ``<initrd>``, ``<cmdline>``.
* ``<devices>``: ``<emulator>`` (one of the configured emulators; default: the first);
  ``<disk type='file' device='disk'>`` raw or qcow2 on ``<target bus='virtio' dev='vdX'>``
  (shared storage: both hosts see the same path); ``<serial>``/``<console>`` of ``type='pty'``
  or ``type='file'``, both written to ``serialN.log`` in the guest's folder (no pty is ever
  allocated; a file serial must name that file); the implicit USB and PCI root controllers, PS/2
  inputs, ``<memballoon model='none'>``, ``<video><model type='none'>`` (accepted, nothing
  added); ``<interface>`` of type ``user``, ``ethernet`` or ``bridge`` (parsed, with its
  allow-list, by :mod:`virtmig.daemon.backend.qemu.net`; taps are created by the daemon,
  :mod:`~virtmig.daemon.backend.qemu.tap`, and passed as descriptors).  No graphics: always
  ``-no-user-config -nodefaults -display none``.

What a definition may reach on the host (emulators, image folders, log files) is the concern of
:mod:`virtmig.daemon.backend.qemu.confine`; here its rules become refusals that name the element.
QEMU never gets a path to a host file: images and serial logs are descriptors the daemon opened
(:class:`GuestFiles`), disks and serial logs through fd sets (``-add-fd``, ``/dev/fdset/N``),
kernel and initrd as ``/proc/self/fd/N``.  QEMU runs with the guest's folder as its working
directory (see :mod:`virtmig.daemon.backend.qemu.guest`); without a monitor descriptor QMP
listens on the relative path ``qmp.sock``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtmig.daemon.backend.base import GuestSpec
from virtmig.daemon.backend.qemu.confine import (
    DEFAULT_BINARY,
    SANDBOX,
    QemuSettings,
    check_emulator,
    image_refusal,
    serial_path_refusal,
)
from virtmig.daemon.backend.qemu.guest import SOCKET_NAME
from virtmig.daemon.backend.qemu.net import NicConfig, parse_interface
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported, VirtmigError

__all__ = ["DEFAULT_BINARY", "DiskConfig", "GuestFiles", "NicConfig", "QemuConfig",
           "SerialConfig", "parse_config"]

_MACHINE_RE = re.compile(r"(pc|q35|pc-[A-Za-z0-9._-]+)")
_DISK_TARGET_RE = re.compile(r"vd[a-z]{1,3}")

# The machine types each emulator knows (None: not checked beyond the name form), or one set
# for whichever emulator runs.
Machines = frozenset[str] | Mapping[str, frozenset[str] | None] | None


@dataclass(frozen=True)
class DiskConfig:
    target: str  # vda, vdb, ...
    path: str  # as the definition names it (under storage_dirs)
    fmt: str  # raw | qcow2
    readonly: bool = False


@dataclass(frozen=True)
class SerialConfig:
    """A serial port; it writes to ``serialN.log`` in the guest's folder, whatever its type."""

    port: int
    append: bool = False


@dataclass(frozen=True)
class GuestFiles:
    """The descriptors the daemon opened for one QEMU, in the order of :class:`QemuConfig`'s
    ``disks``, ``serials`` and ``nics`` (-1: no kernel, no initrd, a NIC without a tap)."""

    disks: tuple[int, ...] = ()
    serials: tuple[int, ...] = ()
    kernel: int = -1
    initrd: int = -1
    nics: tuple[int, ...] = ()  # the taps' descriptors

    @property
    def fds(self) -> tuple[int, ...]:
        """Every descriptor, for ``pass_fds``."""
        return tuple(fd for fd in (*self.disks, *self.serials, self.kernel, self.initrd,
                                   *self.nics) if fd >= 0)


@dataclass(frozen=True)
class QemuConfig:
    """The supported subset of a domain, ready to become a command line."""

    uuid: str
    name: str
    accel: str  # tcg | kvm
    machine: str
    memory_kib: int
    vcpus: int
    emulator: str = ""  # a configured emulator: what runs
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    disks: tuple[DiskConfig, ...] = ()
    serials: tuple[SerialConfig, ...] = ()
    nics: tuple[NicConfig, ...] = ()

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
            "-machine", self.machine,
            "-m", f"{self.memory_kib}k",
            "-smp", str(self.vcpus),
            *monitor,
        ]
        if self.kernel:
            args += ["-kernel", f"/proc/self/fd/{files.kernel}"]
        if self.initrd:
            args += ["-initrd", f"/proc/self/fd/{files.initrd}"]
        if self.cmdline:
            args += ["-append", self.cmdline]
        fdset = 0
        for disk, fd in zip(self.disks, files.disks, strict=True):
            fdset += 1
            proto, fmt = f"file-{disk.target}", f"drive-{disk.target}"
            # A qcow2 image never opens a backing file by the name in its header.
            backing: dict[str, object] = {"backing": None} if disk.fmt == "qcow2" else {}
            args += [
                "-add-fd", f"fd={fd},set={fdset},opaque=disk-{disk.target}",
                "-blockdev",
                _json({"driver": "file", "filename": f"/dev/fdset/{fdset}", "node-name": proto,
                       "read-only": disk.readonly}),
                "-blockdev",
                _json({"driver": disk.fmt, "file": proto, "node-name": fmt,
                       "read-only": disk.readonly, **backing}),
                "-device", f"virtio-blk-pci,drive={fmt},id=virtio-{disk.target}",
            ]
        for serial, fd in zip(self.serials, files.serials, strict=True):
            fdset += 1
            chardev = f"charserial{serial.port}"
            args += [
                "-add-fd", f"fd={fd},set={fdset},opaque=serial{serial.port}",
                "-chardev",
                f"file,id={chardev},path=/dev/fdset/{fdset}"
                + (",append=on" if serial.append else ""),
                "-device", f"isa-serial,chardev={chardev},id=serial{serial.port},"
                f"index={serial.port}",
            ]
        for nic, fd in zip(self.nics, files.nics, strict=True):
            args += nic.argv(fd)
        if incoming:
            args += ["-incoming", "defer"]
        args.append("-S")  # vCPUs start only on our "cont"
        return args


def _opt(value: str) -> str:
    """Escape a value for QEMU's key=value option syntax (a comma is doubled)."""
    return value.replace(",", ",,")


def _json(obj: dict[str, object]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _element_label(el: etree._Element) -> str:
    """``<tag type='x' device='y'>``: how an element is named in a refusal."""
    tag = etree.QName(el).localname
    attrs = "".join(f" {k}='{el.get(k)}'" for k in ("type", "device", "model") if el.get(k))
    return f"<{tag}{attrs}>"


def _unsupported(el: etree._Element, why: str = "") -> ConfigUnsupported:
    detail = f": {why}" if why else ""
    return ConfigUnsupported(
        f"unsupported device {_element_label(el)} for the qemu backend{detail}"
    )


def _text(el: etree._Element | None) -> str:
    return "" if el is None else "".join(str(t) for t in el.itertext()).strip()


def parse_config(spec: GuestSpec, machines: Machines = None,
                 settings: QemuSettings | None = None,
                 guests_dir: Path | None = None) -> QemuConfig:
    """The QEMU configuration of ``spec``; ``ConfigUnsupported`` names what cannot be run.

    ``machines``: the machine types the emulator knows (see :data:`Machines`).  ``settings``:
    what the host allows (default: :class:`QemuSettings`' defaults).  ``guests_dir``: the folder
    of the guests' folders (the backend's), where file serial ports must write (None: refused).
    """
    settings = settings or QemuSettings().resolved()
    if not spec.xml:  # a bare spec (no XML): an empty pc guest
        return QemuConfig(uuid=spec.uuid, name=spec.name, accel="tcg", machine="pc",
                          memory_kib=max(1, -(-spec.memory_bytes // 1024)), vcpus=spec.vcpus,
                          emulator=_emulator("", settings))
    try:
        d = parse_domain_xml(spec.xml)
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
    machine = d.machine or "pc"
    if not _MACHINE_RE.fullmatch(machine):
        raise ConfigUnsupported(f"machine type '{machine}' is not supported by the qemu backend")
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    root = etree.fromstring(d.xml.encode("utf-8"), parser)
    kernel, initrd, cmdline = _parse_os(root.find("os"), settings)
    log_dir = guests_dir / d.uuid if guests_dir is not None else None
    emulator, disks, serials, nics = _parse_devices(root.find("devices"), machine, settings,
                                                    log_dir)
    emulator = _emulator(emulator, settings)
    known = machines.get(emulator) if isinstance(machines, Mapping) else machines
    if known is not None and machine not in known:
        raise ConfigUnsupported(
            f"machine type '{machine}' is not supported by the qemu backend (not known to the "
            "emulator)"
        )
    return QemuConfig(
        uuid=d.uuid,
        name=d.name,
        accel="kvm" if d.domain_type == "kvm" else "tcg",
        machine=machine,
        memory_kib=d.memory_kib,
        vcpus=d.vcpus,
        emulator=emulator,
        kernel=kernel,
        initrd=initrd,
        cmdline=cmdline,
        disks=disks,
        serials=serials,
        nics=nics,
    )


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
    for el in os_el:
        if not isinstance(el.tag, str):
            continue
        if el.tag in ("loader", "nvram", "dtb", "initarg", "initenv", "acpi"):
            raise ConfigUnsupported(
                f"unsupported element <os><{el.tag}> for the qemu backend"
            )
    kernel, initrd, cmdline = (_text(os_el.find(t)) for t in ("kernel", "initrd", "cmdline"))
    if (initrd or cmdline) and not kernel:
        raise ConfigUnsupported("<os><initrd>/<cmdline> need <os><kernel>")
    for tag, path in (("kernel", kernel), ("initrd", initrd)):
        why = image_refusal(path, settings.storage_dirs) if path else ""
        if why:
            raise ConfigUnsupported(f"unsupported <os><{tag}> for the qemu backend: {why}")
    return kernel, initrd, cmdline


def _parse_devices(
    devices: etree._Element | None, machine: str, settings: QemuSettings, log_dir: Path | None
) -> tuple[str, tuple[DiskConfig, ...], tuple[SerialConfig, ...], tuple[NicConfig, ...]]:
    """``<devices>``: the emulator named (``""``: none), the disks, the serial ports
    (consoles included) and the network interfaces."""
    emulator = ""
    disks: list[DiskConfig] = []
    nics: list[NicConfig] = []
    serials: dict[int, SerialConfig] = {}
    consoles: list[etree._Element] = []
    for el in devices if devices is not None else ():
        if not isinstance(el.tag, str):
            continue  # comments, processing instructions
        tag = etree.QName(el).localname if etree.QName(el).namespace is None else ""
        if tag == "emulator":
            emulator = _text(el)
        elif tag == "disk":
            disks.append(_parse_disk(el, disks, settings))
        elif tag == "serial":
            serial = _parse_serial(el, len(serials), log_dir)
            if serial.port in serials:
                raise _unsupported(el, f"serial port {serial.port} defined twice")
            serials[serial.port] = serial
        elif tag == "console":
            consoles.append(el)
        elif tag == "interface":
            nics.append(parse_interface(el, len(nics), nics))
        else:
            _check_other_device(el, tag, machine)
    for el in consoles:
        target = el.find("target")
        if target is not None and target.get("type", "serial") != "serial":
            raise _unsupported(el, f"console target type '{target.get('type')}'")
        port = int(target.get("port", "0")) if target is not None and target.get("port") else 0
        console = _parse_serial(el, port, log_dir)  # checked even when the port is declared
        if port not in serials:  # a console on a serial port nobody declared: that port
            serials[port] = console
    return emulator, tuple(disks), tuple(serials[p] for p in sorted(serials)), tuple(nics)


def _check_other_device(el: etree._Element, tag: str, machine: str) -> None:
    """A device that adds nothing to the command line: accepted, or refused by name."""
    if tag == "controller":
        _check_controller(el, machine)
    elif tag == "input":
        if el.get("bus", "ps2") != "ps2" or el.get("type") not in ("mouse", "keyboard"):
            raise _unsupported(el)
    elif tag == "memballoon":
        if el.get("model") != "none":
            raise _unsupported(el)
    elif tag == "video":
        model = el.find("model")
        if model is None or model.get("type") != "none":
            raise _unsupported(el if model is None else model)
    else:
        raise _unsupported(el)


def _parse_disk(el: etree._Element, seen: list[DiskConfig],
                settings: QemuSettings) -> DiskConfig:
    if el.get("type", "file") != "file" or el.get("device", "disk") != "disk":
        raise _unsupported(el)
    source, target, driver = el.find("source"), el.find("target"), el.find("driver")
    path = source.get("file", "") if source is not None else ""
    if not path:
        raise _unsupported(el, "a disk needs <source file=...>")
    if not os.path.isabs(path):
        raise _unsupported(el, f"disk source '{path}' is not an absolute path")
    dev = target.get("dev", "") if target is not None else ""
    bus = target.get("bus", "virtio") if target is not None else "virtio"
    if bus != "virtio" or not _DISK_TARGET_RE.fullmatch(dev):
        raise _unsupported(el, f"target dev='{dev}' bus='{bus}' (only virtio vdX disks)")
    if any(d.target == dev for d in seen):
        raise _unsupported(el, f"target dev='{dev}' used twice")
    fmt = driver.get("type", "raw") if driver is not None else "raw"
    if fmt not in ("raw", "qcow2"):
        raise _unsupported(el, f"disk format '{fmt}' (raw or qcow2 only)")
    if driver is not None and driver.get("name", "qemu") != "qemu":
        raise _unsupported(el, f"driver name '{driver.get('name')}'")
    why = image_refusal(path, settings.storage_dirs)
    if why:
        raise _unsupported(el, f"source file {why}")
    return DiskConfig(target=dev, path=path, fmt=fmt, readonly=el.find("readonly") is not None)


def _parse_serial(el: etree._Element, port_default: int, log_dir: Path | None) -> SerialConfig:
    kind = el.get("type", "pty")
    target = el.find("target")
    raw_port = target.get("port") if target is not None else None
    try:
        port = int(raw_port) if raw_port is not None else port_default
    except ValueError:
        raise _unsupported(el, f"target port '{raw_port}'") from None
    if not 0 <= port <= 3:
        raise _unsupported(el, f"target port {port} (0-3 only)")
    if target is not None and target.get("type", "isa-serial") not in ("isa-serial", "serial"):
        raise _unsupported(el, f"target type '{target.get('type')}'")
    if kind == "pty":
        return SerialConfig(port=port)
    if kind != "file":
        raise _unsupported(el)
    source = el.find("source")
    path = source.get("path", "") if source is not None else ""
    if not path:
        raise _unsupported(el, "a file serial needs <source path=...>")
    why = serial_path_refusal(path, log_dir, port)
    if why:
        raise _unsupported(el, why)
    return SerialConfig(port=port, append=source is not None and source.get("append") == "on")


def _check_controller(el: etree._Element, machine: str) -> None:
    """Only the implicit controllers (nothing is added for them)."""
    kind, index, model = el.get("type"), el.get("index", "0"), el.get("model")
    q35 = "q35" in machine
    if kind == "usb" and index == "0" and model in (None, "none", "piix3-uhci", "qemu-xhci"):
        return
    if kind == "pci" and index == "0" and model == ("pcie-root" if q35 else "pci-root"):
        return
    if kind == "sata" and index == "0" and q35 and not el.findall("*[@type]"):
        return  # q35's built-in AHCI
    raise _unsupported(el)

