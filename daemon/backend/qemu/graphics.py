"""``<graphics>`` and ``<video>`` -> :class:`VncConfig`/:class:`VideoConfig` -> ``-vnc`` and
the video card's ``-device``; the VNC port in the live XML.

Concern: what the guest shows and where it can be watched from.  Each element's subtree is
checked against an explicit allow-list (anything else is refused naming it):

* ``<graphics type='vnc'>`` (one): ``autoport='yes'`` (the default without a port, or with
  ``port='-1'``) -> QEMU takes the first free port of ``vnc_port_min``-``vnc_port_max``
  (default 5900-65535, libvirt's range; ``-vnc HOST:D,to=D2``, QEMU binds, so two guests never
  race for one port) and the port it took (``query-vnc``) is written into the live XML
  (:func:`fill_vnc`); a port given with ``autoport='yes'`` (the source's, in a migration's XML)
  is output only and ignored: the destination takes its own.
  ``autoport='no' port='N'``: that port (5900-65535).  ``listen='ADDR'`` and/or
  ``<listen type='address' address='ADDR'>`` (an IP address; default ``127.0.0.1``): a
  non-loopback address only when the host's ``vnc_remote_listen`` setting allows it -- VNC
  is unencrypted and its password scheme weak, so by default only local users reach it.
  ``passwd='...'`` (1-8 printable ASCII characters: VNC's authentication uses 8 at most) ->
  ``password=on`` on ``-vnc`` and, once QEMU runs (on a migration's destination too: the
  migratable XML carries it, as libvirt's), ``set_password`` (:func:`password_commands`);
  ``passwdValidTo='YYYY-MM-DDTHH:MM:SS'`` (UTC) -> ``expire_password`` at that time (else
  ``never``).  The password is never logged, and ``dumpxml`` shows it only with
  ``--security-info`` (:func:`virtmig.daemon.domxml.format_domain_xml`).
  ``<listen type='socket'>`` (and/or libvirt's ``<graphics socket=>``): VNC on a unix socket,
  ``-vnc unix:vnc/vnc.sock`` relative to QEMU's working directory, the guest's folder.  QEMU
  binds that socket itself (``-vnc`` takes no descriptor), so at each start the daemon makes
  the folder ``vnc`` in the guest's folder, owned by QEMU's user, the one place of the guest's
  folder where QEMU may create anything (:func:`~.confine.make_qemu_dir`); the socket's path
  is written into the live XML (``<listen type='socket' socket=>``, :func:`fill_vnc`).  A
  ``socket=`` given must be such a path, ``.../UUID/vnc/vnc.sock`` for this guest (a migration's
  XML carries the source's: :func:`generated_socket`), and is never used as given; any other
  path is refused, as are a port or a listen address beside a socket.  Every other attribute
  is refused; ``type='spice'``, ``'sdl'``, ``'rdp'``, ``'desktop'``, ``'egl-headless'``,
  ``'dbus'`` are refused naming the type.
* ``<video><model type=>`` (one): ``vga`` -> ``VGA``, ``cirrus`` -> ``cirrus-vga``, ``virtio`` ->
  ``virtio-vga``, ``qxl`` -> ``qxl-vga``, ``none`` -> nothing; refused naming why when the
  emulator lacks the device (``-device help``, :mod:`.caps`).  ``vram`` (KiB, a power of two,
  1-256 MiB) -> ``vgamem_mb`` (``vram_size`` for qxl), ``heads='1'`` (``max_outputs`` for
  virtio: 1-16), ``primary='yes'``.  Its PCI slot: :mod:`.pci`.
"""

from __future__ import annotations

import calendar
import ipaddress
import time
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from lxml import etree

from virtmig.daemon.backend.qemu.caps import EmulatorCaps
from virtmig.daemon.backend.qemu.confine import VNC_SOCKET_DIR
from virtmig.daemon.backend.qemu.xmltable import unsupported_device as _refuse

__all__ = ["VIDEO_DEVICES", "VNC_BASE", "VNC_SOCKET", "VideoConfig", "VncConfig", "fill_vnc",
           "generated_socket", "parse_graphics", "parse_video", "password_commands"]

VNC_BASE = 5900  # display 0
VNC_PORT_MAX = 65535
VIDEO_DEVICES = {"vga": "VGA", "cirrus": "cirrus-vga", "virtio": "virtio-vga", "qxl": "qxl-vga"}
_GRAPHICS_ATTRS = frozenset({"type", "port", "autoport", "listen", "passwd", "passwdValidTo",
                             "socket"})
_SOCKET_LISTEN_ATTRS = frozenset({"type", "socket"})
VNC_SOCKET = "vnc.sock"  # in VNC_SOCKET_DIR, the folder of the guest's folder QEMU may write
VNC_PASSWORD_MAX = 8  # VNC's DES authentication uses the first 8 characters only
VALID_TO_FORMAT = "%Y-%m-%dT%H:%M:%S"  # libvirt's passwdValidTo, UTC
_LISTEN_ATTRS = frozenset({"type", "address"})
_MODEL_ATTRS = frozenset({"type", "vram", "heads", "primary"})


@dataclass(frozen=True)
class VncConfig:
    """A VNC server on ``listen``: at ``port``, or (0) the first free one of the host's range."""

    listen: str = "127.0.0.1"
    port: int = 0
    port_min: int = VNC_BASE  # the host's range for port 0
    port_max: int = VNC_PORT_MAX
    password: str = field(default="", repr=False)  # "": none; never in a repr or a log
    valid_to: int = 0  # the password expires then (seconds since the epoch; 0: never)
    socket: bool = False  # on the unix socket VNC_SOCKET_DIR/VNC_SOCKET, not on TCP

    def argv(self) -> list[str]:
        host = f"[{self.listen}]" if ":" in self.listen else self.listen
        auth = ",password=on" if self.password else ""  # set over QMP (password_commands)
        if self.socket:  # relative to QEMU's working directory, the guest's folder
            return ["-vnc", f"unix:{VNC_SOCKET_DIR}/{VNC_SOCKET}{auth}"]
        if self.port:
            return ["-vnc", f"{host}:{self.port - VNC_BASE}{auth}"]
        return ["-vnc", f"{host}:{self.port_min - VNC_BASE},to={self.port_max - VNC_BASE}"
                        f"{auth}"]


def password_commands(vnc: VncConfig | None) -> list[tuple[str, dict[str, object]]]:
    """The QMP commands that give a started QEMU the VNC password (none without one)."""
    if vnc is None or not vnc.password:
        return []
    return [("set_password", {"protocol": "vnc", "password": vnc.password}),
            ("expire_password", {"protocol": "vnc",
                                 "time": str(vnc.valid_to) if vnc.valid_to else "never"})]


@dataclass(frozen=True)
class VideoConfig:
    """The guest's video card."""

    model: str  # a key of VIDEO_DEVICES
    vram_kib: int = 0  # 0: QEMU's default
    heads: int = 1

    @property
    def device(self) -> str:
        return VIDEO_DEVICES[self.model]

    def argv(self) -> list[str]:
        spec = f"{self.device},id=video0"
        if self.vram_kib:
            spec += (f",vram_size={self.vram_kib * 1024}" if self.model == "qxl"
                     else f",vgamem_mb={self.vram_kib // 1024}")
        if self.model == "virtio" and self.heads != 1:
            spec += f",max_outputs={self.heads}"
        return ["-device", spec]


def _check_attrs(dev: etree._Element, el: etree._Element, allowed: frozenset[str],
                 tag: str) -> None:
    for key in el.attrib:
        name = key if isinstance(key, str) else key.decode()
        if name not in allowed:
            raise _refuse(dev, f"attribute '{name}' of <{tag}>")


def _children(dev: etree._Element, allowed: set[str]) -> list[etree._Element]:
    out = []
    for child in dev:
        if not isinstance(child.tag, str):
            continue
        qname = etree.QName(child)
        tag = qname.localname if qname.namespace is None else str(child.tag)
        if tag not in allowed:
            raise _refuse(dev, f"element <{tag}>")
        if len(child) or (child.text or "").strip():
            raise _refuse(dev, f"content of <{tag}>")
        out.append(child)
    return out


def parse_graphics(el: etree._Element, remote_ok: bool,
                   ports: tuple[int, int] = (VNC_BASE, VNC_PORT_MAX),
                   uuid: str = "") -> VncConfig:
    """A ``<graphics>``; ``remote_ok``: a non-loopback listen address is allowed; ``ports``: the
    host's range for an automatic port; ``uuid``: the guest's (a socket path names it)."""
    kind = el.get("type", "")
    if kind != "vnc":
        raise _refuse(el, f"graphics type '{kind}' (vnc only)")
    _check_attrs(el, el, _GRAPHICS_ATTRS, "graphics")
    listens = _children(el, {"listen"})
    if len(listens) > 1:
        raise _refuse(el, "one <listen> only")
    lst = listens[0] if listens else None
    password, valid_to = _password(el)
    if el.get("socket") is not None or (lst is not None and lst.get("type") == "socket"):
        _check_socket(el, lst, uuid)
        return VncConfig(socket=True, password=password, valid_to=valid_to)
    address = el.get("listen")
    if lst is not None:
        ltype = lst.get("type", "address")
        if ltype != "address":
            raise _refuse(el, f"<listen type='{ltype}'> (type='address' or 'socket')")
        _check_attrs(el, lst, _LISTEN_ATTRS, "listen")
        if address is not None and lst.get("address") not in (None, address):
            raise _refuse(el, f"listen '{address}' and <listen address='{lst.get('address')}'> "
                              "differ")
        address = lst.get("address", address)
    address = address or "127.0.0.1"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise _refuse(el, f"listen '{address}' is not an IP address") from None
    if not ip.is_loopback and not remote_ok:
        raise _refuse(el, f"listen '{address}' is not a loopback address (VNC is unencrypted; "
                          "the host's vnc_remote_listen setting allows other addresses)")
    return VncConfig(listen=str(ip), port=_port(el), port_min=ports[0], port_max=ports[1],
                     password=password, valid_to=valid_to)


def _check_socket(el: etree._Element, lst: etree._Element | None, uuid: str) -> None:
    """VNC on a unix socket: ``<listen type='socket'>`` and/or ``<graphics socket=>``, no port
    or address; a path given must be the daemon's own (:func:`generated_socket`)."""
    for attr in ("port", "listen"):
        if el.get(attr) is not None and not (attr == "port" and el.get(attr) == "-1"):
            raise _refuse(el, f"attribute '{attr}' with a unix socket")
    if el.get("autoport") not in (None, "yes"):
        raise _refuse(el, "autoport='no' with a unix socket")
    if lst is not None:
        _check_attrs(el, lst, _SOCKET_LISTEN_ATTRS, "listen")
        if lst.get("type", "address") != "socket":
            raise _refuse(el, f"<listen type='{lst.get('type')}'> and a socket")
    paths = {p for p in (el.get("socket"), lst.get("socket") if lst is not None else None)
             if p is not None}
    if len(paths) > 1:
        raise _refuse(el, "socket and <listen socket=> differ")
    for path in paths:
        if not generated_socket(path, uuid):
            raise _refuse(el, f"socket '{path}' (only the daemon's own, {VNC_SOCKET_DIR}/"
                              f"{VNC_SOCKET} in the guest's folder, which QEMU may create: "
                              "leave socket out)")


def generated_socket(path: str, uuid: str) -> bool:
    """Whether ``path`` is the VNC socket the daemon gives guest ``uuid`` (on any host:
    ``.../UUID/vnc/vnc.sock``, as a migration's XML carries the source's): it is re-pointed to
    this host's guest folder, never used as given."""
    parts = PurePosixPath(path).parts
    return (bool(uuid) and PurePosixPath(path).is_absolute() and len(parts) >= 4
            and parts[-3:] == (uuid, VNC_SOCKET_DIR, VNC_SOCKET) and ".." not in parts)


def _password(el: etree._Element) -> tuple[str, int]:
    """``passwd`` and ``passwdValidTo`` (seconds since the epoch, 0: never); a refusal never
    quotes the password."""
    password, raw_to = el.get("passwd"), el.get("passwdValidTo")
    if password is None:
        if raw_to is not None:
            raise _refuse(el, "passwdValidTo without passwd")
        return "", 0
    if not 1 <= len(password) <= VNC_PASSWORD_MAX:
        raise _refuse(el, f"passwd of {len(password)} characters (1-{VNC_PASSWORD_MAX}: VNC's "
                          "authentication uses 8 at most)")
    if not all(" " <= c <= "~" for c in password):
        raise _refuse(el, "passwd with a character that is not printable ASCII")
    if raw_to is None:
        return password, 0
    try:
        valid_to = calendar.timegm(time.strptime(raw_to, VALID_TO_FORMAT))
    except (ValueError, OverflowError):
        raise _refuse(el, f"passwdValidTo '{raw_to}' (YYYY-MM-DDTHH:MM:SS, UTC)") from None
    if valid_to <= 0:
        raise _refuse(el, f"passwdValidTo '{raw_to}' is not after 1970")
    return password, valid_to



def _port(el: etree._Element) -> int:
    raw_auto, raw_port = el.get("autoport"), el.get("port")
    if raw_auto not in (None, "yes", "no"):
        raise _refuse(el, f"autoport '{raw_auto}' (yes or no)")
    auto = raw_auto == "yes" or (raw_auto is None and raw_port in (None, "-1"))
    if auto:
        return 0  # a port given with autoport='yes' is an earlier run's: ignored
    if raw_port is None or not raw_port.isascii() or not raw_port.isdigit() or \
            not VNC_BASE <= int(raw_port) <= VNC_PORT_MAX:
        raise _refuse(el, f"port '{raw_port}' ({VNC_BASE}-{VNC_PORT_MAX} with autoport='no')")
    return int(raw_port)


def parse_video(el: etree._Element, caps: EmulatorCaps | None) -> VideoConfig | None:
    """A ``<video>`` (None: ``model type='none'``); its ``<address>`` is :mod:`.pci`'s."""
    _check_attrs(el, el, frozenset(), "video")
    children = _children(el, {"model", "address"})
    models = [c for c in children if etree.QName(c).localname == "model"]
    if len(models) != 1:
        raise _refuse(el, "a <video> needs one <model type=...>")
    model = models[0]
    _check_attrs(el, model, _MODEL_ATTRS, "model")
    kind = model.get("type", "")
    if kind == "none":
        return None
    if kind not in VIDEO_DEVICES:
        raise _refuse(el, f"model type '{kind}' (supported: {', '.join(VIDEO_DEVICES)}, none)")
    device = VIDEO_DEVICES[kind]
    if caps is not None and caps.devices and device not in caps.devices:
        raise _refuse(el, f"model type '{kind}': this QEMU has no device '{device}'")
    if model.get("primary", "yes") != "yes":
        raise _refuse(el, "primary='no' (one video card, the primary)")
    vram = _number(el, model, "vram", 0)
    if vram and (vram < 1024 or vram > 262144 or vram & (vram - 1)):
        raise _refuse(el, f"vram '{vram}' (KiB: a power of two from 1024 to 262144)")
    heads = _number(el, model, "heads", 1)
    if not 1 <= heads <= (16 if kind == "virtio" else 1):
        raise _refuse(el, f"heads '{heads}' ({'1-16' if kind == 'virtio' else '1'})")
    return VideoConfig(model=kind, vram_kib=vram, heads=heads)


def _number(dev: etree._Element, el: etree._Element, attr: str, default: int) -> int:
    raw = el.get(attr)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9:
        raise _refuse(dev, f"{attr} '{raw}' is not a number")
    return int(raw)


def fill_vnc(root: etree._Element, port: int, socket: str = "") -> bool:
    """Write the port QEMU's VNC server took, or the path of its unix ``socket``, into the live
    definition ``root``."""
    el = root.find("devices/graphics")
    if el is None:
        return False
    if socket:
        lst = el.find("listen")
        if lst is None:
            lst = etree.SubElement(el, "listen", type="socket")
        lst.set("socket", socket)
        if el.get("socket") is not None:
            el.set("socket", socket)
        return True
    if port <= 0:
        return False
    if el.get("autoport") is None:
        el.set("autoport", "yes" if el.get("port") in (None, "-1") else "no")
    el.set("port", str(port))
    return True
