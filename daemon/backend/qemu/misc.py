"""The qemu backend's small devices: memory balloon, RNG, watchdog, USB controller and USB inputs.

Concern: ``<memballoon>``, ``<rng>``, ``<watchdog>``, ``<controller type='usb'>`` and
``<input>`` of libvirt's domain XML -> :class:`MiscDevices` -> their ``-object``/``-device``/
``-action`` arguments.  Pure values.  Which attributes and children reach these parsers is
:mod:`.xmltable`'s allow-list; here values are checked, each refusal naming the device.

* ``<memballoon model='virtio'>`` -> ``virtio-balloon-pci,id=balloon0`` (``autodeflate='on'`` ->
  ``deflate-on-oom=on``); ``model='none'``: no balloon.  Absent: a virtio balloon, as libvirt
  adds one (:func:`add_default_balloon` writes it into the stored definition at define time).
* ``<rng model='virtio'>`` with ``<backend model='random'>/dev/urandom</backend>`` (or
  ``/dev/random``; QEMU opens it, nothing else on the host may be named) or
  ``<backend model='builtin'/>`` -> ``-object rng-random|rng-builtin,id=objrngN`` and
  ``virtio-rng-pci,rng=objrngN,id=rngN``; ``<rate bytes= period=>`` -> ``max-bytes=,period=``.
* ``<watchdog model='i6300esb'|'ib700' action=...>`` -> ``-device i6300esb|ib700,id=watchdog0``
  and ``-action watchdog=`` (reset, the default, shutdown, poweroff, pause, none, inject-nmi;
  ``dump`` is refused: the daemon takes no core dumps).  One watchdog.
* ``<controller type='usb' index='0' model='qemu-xhci'|'piix3-uhci'|'ich9-ehci1'|'none'>``
  -> ``-device qemu-xhci|piix3-usb-uhci|ich9-usb-ehci1,id=usb``; one USB controller.
  ``model='none'``: no USB.  At define (and only there) a guest without a USB controller gets
  libvirt's default for its machine written into its stored definition, and a controller
  without a model gets that model (:func:`add_default_usb`, :func:`default_usb`):
  ``qemu-xhci`` on q35, ``piix3-uhci`` on pc.  Anywhere else -- a migration's destination, a
  definition stored before this default -- a missing controller, or one without a model, is
  ``piix3-uhci`` (:data:`DEFAULT_USB`): the migratable XML leaves out exactly that controller
  (as libvirt's does, :mod:`virtmig.daemon.domxml`), so the destination adds back the same one,
  and a stored definition that names its controller keeps it.
* ``<input type='tablet'|'mouse'|'keyboard' bus='usb'>`` -> ``usb-tablet``/``usb-mouse``/
  ``usb-kbd`` on the USB controller (refused without one); ``type='mouse'|'keyboard'
  bus='ps2'``: the PS/2 devices every pc/q35 machine has built in (accepted, nothing added).
* PCI slots: the PCI devices here (virtio balloon, virtio RNG, i6300esb, the USB controller)
  are :mod:`.pci`'s like every other -- one :class:`~.pci.PciDevice` line each in its
  registry, an ``<address type='pci'>`` written at define when they have none, a given one
  checked there, ``bus=,addr=`` added to their ``-device`` by id (``balloon0``, ``rngN``,
  ``watchdog0``, ``usb``).  On ``pc`` the ``piix3-uhci`` controller sits where libvirt puts it,
  the PIIX3's function 2 (slot 0x01 function 0x2).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtmig.daemon.backend.qemu.xmltable import unsupported_device

__all__ = ["MiscBuilder", "MiscDevices", "add_default_balloon", "add_default_usb",
           "default_usb", "parse_misc_device"]

RNG_SOURCES = ("/dev/urandom", "/dev/random")
WATCHDOG_ACTIONS = ("reset", "shutdown", "poweroff", "pause", "none", "inject-nmi")
USB_MODELS = {"qemu-xhci": "qemu-xhci", "piix3-uhci": "piix3-usb-uhci",
              "ich9-ehci1": "ich9-usb-ehci1"}  # libvirt's model -> QEMU's device
DEFAULT_USB = "piix3-uhci"  # no <controller type='usb'>, or one without a model, after define
Q35_DEFAULT_USB = "qemu-xhci"  # libvirt's default on q35, written at define
_USB_INPUTS = {"tablet": "usb-tablet", "mouse": "usb-mouse", "keyboard": "usb-kbd"}
_MAX_RATE = 2**31 - 1


@dataclass(frozen=True)
class Rng:
    index: int
    backend: str  # random | builtin
    source: str = ""  # random: /dev/urandom or /dev/random
    max_bytes: int = 0  # 0: no rate limit
    period_ms: int = 0

    def argv(self) -> list[str]:
        obj = f"rng-{self.backend},id=objrng{self.index}"
        if self.source:
            obj += f",filename={self.source}"
        dev = f"virtio-rng-pci,rng=objrng{self.index},id=rng{self.index}"
        if self.max_bytes:
            dev += f",max-bytes={self.max_bytes},period={self.period_ms}"
        return ["-object", obj, "-device", dev]


@dataclass(frozen=True)
class MiscDevices:
    """The guest's balloon, RNGs, watchdog, USB controller and USB inputs."""

    balloon: bool = False
    balloon_deflate: bool = False
    rngs: tuple[Rng, ...] = ()
    watchdog: str = ""  # i6300esb | ib700 | "" (none)
    watchdog_action: str = "reset"
    usb: str = ""  # the USB controller's QEMU model ("": none)
    usb_inputs: tuple[str, ...] = ()  # usb-tablet | usb-mouse | usb-kbd

    def argv(self) -> list[str]:
        args: list[str] = []
        if self.usb:
            args += ["-device", f"{self.usb},id=usb"]
        for i, dev in enumerate(self.usb_inputs):
            args += ["-device", f"{dev},id=input{i},bus=usb.0,port={i + 1}"]
        if self.balloon:
            args += ["-device", "virtio-balloon-pci,id=balloon0"
                     + (",deflate-on-oom=on" if self.balloon_deflate else "")]
        for rng in self.rngs:
            args += rng.argv()
        if self.watchdog:
            args += ["-device", f"{self.watchdog},id=watchdog0",
                     "-action", f"watchdog={self.watchdog_action}"]
        return args


class MiscBuilder:
    """What :func:`parse_misc_device` has seen so far of one definition; :meth:`result` is the
    :class:`MiscDevices`."""

    def __init__(self) -> None:
        self.balloon: tuple[bool, bool] | None = None  # (present, deflate-on-oom)
        self.rngs: list[Rng] = []
        self.watchdog: tuple[str, str] | None = None  # (model, action)
        self.usb: str | None = None  # QEMU's model ("": none)
        self.inputs: list[tuple[etree._Element, str]] = []

    def result(self) -> MiscDevices:
        usb = USB_MODELS[DEFAULT_USB] if self.usb is None else self.usb
        for el, _dev in self.inputs:
            if not usb:
                raise unsupported_device(el, "a USB input needs a USB controller "
                                             "(<controller type='usb'>)")
        balloon, deflate = self.balloon or (True, False)
        watchdog, action = self.watchdog or ("", "reset")
        return MiscDevices(balloon=balloon, balloon_deflate=deflate, rngs=tuple(self.rngs),
                           watchdog=watchdog, watchdog_action=action, usb=usb,
                           usb_inputs=tuple(dev for _el, dev in self.inputs))


def parse_misc_device(b: MiscBuilder, el: etree._Element, tag: str) -> bool:
    """Take ``el`` (a ``<devices>`` child named ``tag``) if it is one of this module's devices;
    False when it is not (the caller decides)."""
    if tag == "memballoon":
        _balloon(b, el)
    elif tag == "rng":
        _rng(b, el)
    elif tag == "watchdog":
        _watchdog(b, el)
    elif tag == "controller" and el.get("type") == "usb":
        _usb(b, el)
    elif tag == "input":
        _input(b, el)
    else:
        return False
    return True


def _balloon(b: MiscBuilder, el: etree._Element) -> None:
    model = el.get("model", "")
    if b.balloon is not None:
        raise unsupported_device(el, "one <memballoon> only")
    if model == "none":
        if el.find("address") is not None or el.get("autodeflate") is not None:
            raise unsupported_device(el, "model='none' takes no address or autodeflate")
        b.balloon = (False, False)
        return
    if model != "virtio":
        raise unsupported_device(el, "model 'virtio' or 'none'")
    deflate = el.get("autodeflate", "off")
    if deflate not in ("on", "off"):
        raise unsupported_device(el, f"autodeflate='{deflate}' (on or off)")
    b.balloon = (True, deflate == "on")


def _rng(b: MiscBuilder, el: etree._Element) -> None:
    if el.get("model") != "virtio":
        raise unsupported_device(el, "model 'virtio' only")
    backend = el.find("backend")
    if backend is None or len(el.findall("backend")) != 1:
        raise unsupported_device(el, "one <backend> is needed")
    kind = backend.get("model", "")
    source = "".join(str(t) for t in backend.itertext()).strip()
    if kind == "random":
        if source not in RNG_SOURCES:
            raise unsupported_device(el, f"<backend model='random'>{source}</backend>: "
                                         f"{' or '.join(RNG_SOURCES)} only")
    elif kind == "builtin":
        if source:
            raise unsupported_device(el, "<backend model='builtin'> names no source")
    else:
        raise unsupported_device(el, f"<backend model='{kind}'> (random or builtin)")
    max_bytes = period = 0
    rate = el.find("rate")
    if rate is not None:
        max_bytes = _positive(el, rate.get("bytes"), "rate bytes")
        period = _positive(el, rate.get("period", "1000"), "rate period")
    b.rngs.append(Rng(index=len(b.rngs), backend=kind, source=source if kind == "random"
                      else "", max_bytes=max_bytes, period_ms=period))


def _positive(el: etree._Element, raw: str | None, what: str) -> int:
    if raw is None or not raw.isascii() or not raw.isdigit() or not 0 < int(raw) <= _MAX_RATE:
        raise unsupported_device(el, f"{what} '{raw}' (1-{_MAX_RATE})")
    return int(raw)


def _watchdog(b: MiscBuilder, el: etree._Element) -> None:
    model, action = el.get("model", ""), el.get("action", "reset")
    if b.watchdog is not None:
        raise unsupported_device(el, "one <watchdog> only")
    if model not in ("i6300esb", "ib700"):
        raise unsupported_device(el, "model 'i6300esb' or 'ib700'")
    if action not in WATCHDOG_ACTIONS:
        raise unsupported_device(el, f"action '{action}' (supported: "
                                     f"{', '.join(WATCHDOG_ACTIONS)})")
    if model == "ib700" and el.find("address") is not None:
        raise unsupported_device(el, "ib700 is an ISA device: no PCI address")
    b.watchdog = (model, action)


def _usb(b: MiscBuilder, el: etree._Element) -> None:
    index = el.get("index", "0")
    if index != "0":
        raise unsupported_device(el, f"index '{index}' (one USB controller, index 0)")
    if b.usb is not None:
        raise unsupported_device(el, "one USB controller only")
    model = el.get("model") or DEFAULT_USB
    if model == "none":
        if el.find("address") is not None:
            raise unsupported_device(el, "model='none' takes no address")
        b.usb = ""
        return
    if model not in USB_MODELS:
        raise unsupported_device(el, f"USB model '{model}' (supported: "
                                     f"{', '.join(USB_MODELS)}, none)")
    b.usb = USB_MODELS[model]


def _input(b: MiscBuilder, el: etree._Element) -> None:
    kind, bus = el.get("type", ""), el.get("bus", "ps2" if el.get("type") != "tablet" else "usb")
    if bus == "ps2" and kind in ("mouse", "keyboard"):
        return  # built into every pc/q35 machine
    if bus != "usb" or kind not in _USB_INPUTS:
        raise unsupported_device(el, f"bus '{bus}' (usb tablet, mouse, keyboard; ps2 mouse, "
                                     "keyboard)")
    b.inputs.append((el, _USB_INPUTS[kind]))


def default_usb(machine: str) -> str:
    """libvirt's default USB controller model for a guest defined on ``machine``."""
    return Q35_DEFAULT_USB if "q35" in machine else DEFAULT_USB


def add_default_usb(root: etree._Element, model: str = DEFAULT_USB, *,
                    define: bool = False) -> bool:
    """Write ``<controller type='usb' index='0' model=MODEL/>`` into a definition that has no
    USB controller; at ``define`` also ``model`` into a USB controller without one, as
    libvirt's define does.  Whether anything changed.  At define ``model`` is
    :func:`default_usb`'s; anywhere else the default ``piix3-uhci``, the controller a
    migratable XML leaves out."""
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    usb = [c for c in devices.iterfind("controller") if c.get("type") == "usb"]
    if not usb:
        etree.SubElement(devices, "controller", type="usb", index="0", model=model)
        return True
    unnamed = [el for el in usb if define and not el.get("model")]
    for el in unnamed:
        el.set("model", model)
    return bool(unnamed)


def add_default_balloon(root: etree._Element) -> bool:
    """Write libvirt's default ``<memballoon model='virtio'/>`` into a definition that has no
    ``<memballoon>`` (a ``<devices>`` is added if missing); whether anything changed."""
    devices = root.find("devices")
    if devices is None:
        devices = etree.SubElement(root, "devices")
    if devices.find("memballoon") is not None:
        return False
    etree.SubElement(devices, "memballoon", model="virtio")
    return True
