"""``<interface>`` -> :class:`NicConfig` -> QEMU's ``-netdev``/``-device`` options.

Concern: the network interfaces the ``qemu`` backend runs, as pure values: what of libvirt's
``<interface>`` element is honoured, what is refused (naming it), and the command line it
becomes.  Creating a tap is :mod:`virtmig.daemon.backend.qemu.tap`'s.

Honoured (an explicit allow-list: any other attribute or child element anywhere in the
``<interface>`` subtree is refused with ``ConfigUnsupported`` naming it):

* ``<interface type=>``: ``user`` (QEMU's user-mode networking, ``-netdev user``: slirp inside
  QEMU, no host privilege), ``ethernet`` (a tap the daemon creates, brought up, attached to
  nothing) and ``bridge`` (that tap attached to the existing bridge ``<source bridge=>``).  A
  tap is opened by the daemon and handed to QEMU as a descriptor (``-netdev tap,fd=N``): QEMU,
  unprivileged and sandboxed, never creates or configures one.
* ``<target dev=>`` (``ethernet``/``bridge``): the tap's name; absent, or starting with
  ``vnet`` (libvirt's prefix for generated names), the kernel picks the next free ``vnetN``.
* ``<mac address=>``: the guest's MAC (a unicast address, six hex octets).  An interface without
  one gets a generated ``52:54:00:xx:xx:xx`` written into its definition at define time (as
  libvirt does: :func:`assign_macs`, called by
  :func:`~virtmig.daemon.backend.qemu.config.canonical_xml`), so it keeps it on every start and
  on the destination of a migration.  A configuration parsed without that step (no daemon) and
  without a MAC leaves the choice to QEMU (``52:54:00:12:34:56`` for the first NIC).
* ``<model type=>``: ``virtio`` (``virtio-net-pci``), ``e1000``, ``rtl8139``; absent:
  ``rtl8139`` (libvirt's default for x86 guests).
* ``<link state=>``: ``up`` (default) or ``down`` (set with QMP ``set_link`` before the vCPUs
  first run; a migrated guest brings its link state in its device state).
* ``<address type='pci'>``: the NIC's PCI slot (:mod:`.pci` checks and assigns it).
* ``<alias name=>`` is refused, as are ``<boot>``, ``<driver>``, ``<script>`` and everything
  else libvirt knows.

QEMU ids: ``-netdev ...,id=hostnetN`` and ``-device ...,id=netN`` for the N-th interface, as
libvirt names them.  On migration the definition travels; the destination's backend creates its
own tap (on its own bridge of the same name).
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from virtmig.daemon.backend.qemu.xmltable import unsupported_device as _refuse

__all__ = ["MODELS", "NicConfig", "assign_macs", "generate_mac", "parse_interface"]

# <model type=> -> QEMU device
MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}
DEFAULT_MODEL = "rtl8139"
KINDS = ("user", "ethernet", "bridge")
GENERATED_PREFIX = "vnet"  # libvirt's: such target names are generated, never asked for
GENERATED_TEMPLATE = "vnet%d"  # the kernel fills in the first free number
MAC_PREFIX = "52:54:00"  # QEMU's (and libvirt's) locally administered prefix
IFNAMSIZ = 16  # with the NUL: names up to 15 bytes

_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")

# The allow-list: per element of the subtree, its honoured attributes (children below).
_ATTRS = {
    "interface": {"type"},
    "mac": {"address"},
    "model": {"type"},
    "source": {"bridge"},
    "target": {"dev"},
    "link": {"state"},
    "address": {"type", "domain", "bus", "slot", "function"},  # its values: pci.check_address
}
_CHILDREN_BY_KIND = {
    "user": {"mac", "model", "link", "address"},
    "ethernet": {"mac", "model", "link", "target", "address"},
    "bridge": {"mac", "model", "link", "target", "source", "address"},
}


@dataclass(frozen=True)
class NicConfig:
    """One network interface of a guest, ready to become ``-netdev`` and ``-device``."""

    index: int  # the N of hostnetN / netN
    kind: str  # user | ethernet | bridge
    mac: str  # lower case, colon separated ("": QEMU's default)
    model: str = DEFAULT_MODEL  # a key of MODELS
    tap: str = ""  # the tap's name ("": generated, vnetN)
    bridge: str = ""  # kind bridge: the bridge the tap joins
    link_up: bool = True

    @property
    def id(self) -> str:
        """The ``-device`` id (``netN``), as ``set_link`` and ``qom-get`` name it."""
        return f"net{self.index}"

    @property
    def netdev(self) -> str:
        return f"hostnet{self.index}"

    @property
    def needs_tap(self) -> bool:
        return self.kind in ("ethernet", "bridge")

    @property
    def tap_name(self) -> str:
        """The name asked of the kernel (a template with ``%d`` when generated)."""
        return self.tap or GENERATED_TEMPLATE

    @property
    def vnet_hdr(self) -> bool:
        """Whether the tap carries virtio-net headers (offloads): for virtio only."""
        return self.model == "virtio"

    def argv(self, tap_fd: int = -1) -> list[str]:
        """``-netdev`` and ``-device``; ``tap_fd``: the tap's descriptor (taps only)."""
        if self.needs_tap:
            if tap_fd < 0:
                raise ValueError(f"interface {self.id} needs its tap's descriptor")
            backend = f"tap,id={self.netdev},fd={tap_fd}"
        else:
            backend = f"user,id={self.netdev}"
        device = f"{MODELS[self.model]},netdev={self.netdev},id={self.id}"
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", backend, "-device", device]


def parse_interface(el: etree._Element, index: int,
                    seen: Iterable[NicConfig] = ()) -> NicConfig:
    """The ``index``-th ``<interface>``; ``ConfigUnsupported`` names what cannot be honoured.

    ``seen``: the interfaces before it (a MAC or tap name used twice is refused).
    """
    kind = el.get("type", "")
    if kind not in KINDS:
        raise _refuse(el, f"type '{kind}' (supported: {', '.join(KINDS)})" if kind
                      else "an interface needs a type")
    _check_subtree(el, kind)
    mac_el, model_el, link_el = el.find("mac"), el.find("model"), el.find("link")
    mac = _mac(el, mac_el)
    model = model_el.get("type", "") if model_el is not None else DEFAULT_MODEL
    if model not in MODELS:
        raise _refuse(el, f"<model type='{model}'> (supported: {', '.join(MODELS)})")
    state = link_el.get("state", "up") if link_el is not None else "up"
    if state not in ("up", "down"):
        raise _refuse(el, f"<link state='{state}'> (up or down)")
    tap = _tap_name(el) if kind != "user" else ""
    bridge = _bridge(el) if kind == "bridge" else ""
    for other in seen:
        if mac and other.mac == mac:
            raise _refuse(el, f"<mac address='{mac}'> used twice")
        if tap and other.tap == tap:
            raise _refuse(el, f"<target dev='{tap}'> used twice")
    return NicConfig(index=index, kind=kind, mac=mac, model=model, tap=tap, bridge=bridge,
                     link_up=state == "up")


def _check_subtree(el: etree._Element, kind: str) -> None:
    """Refuse any attribute or element of the subtree that is not on the allow-list."""
    _check_attrs(el, el, "interface")
    if (el.text or "").strip() or any((c.tail or "").strip() for c in el):
        raise _refuse(el, "text in <interface>")
    for child in el:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        tag = _local(child)
        if tag not in _CHILDREN_BY_KIND[kind]:
            raise _refuse(el, f"element <{tag}>" + (f" (not for type '{kind}')"
                                                    if tag in _ATTRS else ""))
        if len(el.findall(tag)) > 1:
            raise _refuse(el, f"element <{tag}> given twice")
        _check_attrs(el, child, tag)
        for grandchild in child:
            if isinstance(grandchild.tag, str):
                raise _refuse(el, f"element <{tag}><{_local(grandchild)}>")
        if (child.text or "").strip():
            raise _refuse(el, f"text in <{tag}>")


def _check_attrs(iface: etree._Element, el: etree._Element, tag: str) -> None:
    for name in el.attrib:
        if str(name) not in _ATTRS[tag]:
            raise _refuse(iface, f"attribute '{_attr_name(str(name))}' of <{tag}>")


def _mac(el: etree._Element, mac_el: etree._Element | None) -> str:
    if mac_el is None:
        return ""  # the daemon writes a generated one at define (canonical_xml)
    address = mac_el.get("address", "")
    if not _MAC_RE.fullmatch(address):
        raise _refuse(el, f"<mac address='{address}'> is not a MAC address")
    mac = address.lower()
    if int(mac[:2], 16) & 1:
        raise _refuse(el, f"<mac address='{address}'> is a multicast address")
    if mac == "00:00:00:00:00:00":
        raise _refuse(el, f"<mac address='{address}'> is all zeros")
    return mac


def _tap_name(el: etree._Element) -> str:
    target = el.find("target")
    name = target.get("dev", "") if target is not None else ""
    if not name or name.startswith(GENERATED_PREFIX):
        return ""  # generated (as libvirt does with vnet names)
    if not _IFNAME_RE.fullmatch(name):
        raise _refuse(el, f"<target dev='{name}'> is not an interface name (up to "
                      f"{IFNAMSIZ - 1} of A-Z a-z 0-9 _ . -)")
    return name


def _bridge(el: etree._Element) -> str:
    source = el.find("source")
    name = source.get("bridge", "") if source is not None else ""
    if not name:
        raise _refuse(el, "a bridge interface needs <source bridge=...>")
    if not _IFNAME_RE.fullmatch(name):
        raise _refuse(el, f"<source bridge='{name}'> is not an interface name")
    return name


def _local(el: etree._Element) -> str:
    qname = etree.QName(el)
    return qname.localname if qname.namespace is None else str(el.tag)


def _attr_name(name: str) -> str:
    qname = etree.QName(name)
    return qname.localname if qname.namespace is None else name


# --- MAC generation (for a define-time hook) -----------------------------------------------------


def generate_mac(taken: Iterable[str] = (), rng: random.Random | None = None) -> str:
    """A random ``52:54:00:xx:xx:xx`` not in ``taken`` (as libvirt generates them)."""
    rng = rng or random.SystemRandom()
    used = {m.lower() for m in taken}
    while True:
        mac = MAC_PREFIX + "".join(f":{rng.randrange(256):02x}" for _ in range(3))
        if mac not in used:
            return mac


def assign_macs(root: etree._Element, rng: random.Random | None = None) -> bool:
    """Give each ``<devices><interface>`` of the domain ``root`` without a MAC a generated one
    (a ``<mac address=>`` child written into the definition); whether anything changed."""
    interfaces = root.findall("devices/interface")
    taken = [m.get("address", "") for m in root.findall("devices/interface/mac")]
    changed = False
    for iface in interfaces:
        mac_el = iface.find("mac")
        if mac_el is not None and mac_el.get("address"):
            continue
        mac = generate_mac(taken, rng)
        taken.append(mac)
        if mac_el is None:
            mac_el = etree.Element("mac")
            mac_el.tail = iface.text
            iface.insert(0, mac_el)
        mac_el.set("address", mac)
        changed = True
    return changed
