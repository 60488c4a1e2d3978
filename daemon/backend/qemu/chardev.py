"""Serial ports, consoles and channels -> :class:`SerialConfig`/:class:`ChannelConfig` -> QEMU's
``-chardev``/``-device`` options; the unix sockets the daemon binds for them; their runtime
paths in the live XML.

Concern: the character devices of a guest.  Each element's whole subtree is checked here
against an explicit allow-list (any other attribute or child is refused naming it):

* ``<serial type=>`` (``isa-serial``, target ports 0-3) of type
  ``pty`` -- a real pty (``-chardev pty``); the path QEMU allocated (``query-chardev``) is
  written into the live XML's ``<source path=>`` (:func:`fill_ptys`), as libvirt does, and is
  what ``virtmig ttyconsole`` prints (the console's ``tty=``); a ``<source path=>`` or ``tty=``
  given with a pty is output only and ignored: the migratable XML carries the source's, as
  libvirt's does, and the destination allocates its own pty and writes its path instead;
  ``file`` -- ``<source path=>`` must be the port's own ``serialN.log`` in the guest's folder
  (:func:`~virtmig.daemon.backend.qemu.confine.serial_path_refusal`), ``append='on'`` honoured;
  ``unix`` -- ``<source mode='bind' path=>``, a socket in the guest's own folder
  (:func:`socket_name`), which the daemon binds and QEMU gets as a listening descriptor
  (``-chardev socket,fd=N,server=on``: QEMU creates nothing in the guest's folder).
  Every serial port also logs what the guest writes to ``serialN.log`` in the guest's folder
  (``logfile=`` on a pty or a socket), a descriptor the daemon opened.
* ``<console type='pty'|'file'|'unix'>`` with ``<target type='serial'>``: serial port N's
  console (libvirt's alias of ``serial0``); without that serial port it is that port.
* ``<channel type='unix'>`` with ``<target type='virtio' name=>`` (the QEMU guest agent's
  ``org.qemu.guest_agent.0``, or another name): a ``virtserialport`` on the virtio-serial
  controller ``virtio-serial0`` (``-device virtio-serial-pci``, declared by
  ``<controller type='virtio-serial' index='0'>`` or added), its socket in the guest's folder;
  ``<address type='virtio-serial' controller='0' bus='0' port=>`` honoured.  At define time
  (:func:`assign_sockets`) a channel without a path gets ``channelN.sock`` in the guest's folder
  and the controller is declared, as libvirt does; such a generated path is re-pointed to the
  guest's folder of whichever host defines or receives the guest.
* On a migration's destination a ``file`` or ``unix`` serial port's or console's path in the
  source's folder of this guest (its UUID's) is re-pointed to the destination's own folder
  (:func:`repoint_serials`): each host's guest folder is its own, so the source's path could
  never be this host's.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.backend.qemu.confine import serial_path_refusal
from virtmig.daemon.backend.qemu.monitor import _socket_path
from virtmig.daemon.backend.qemu.xmltable import unsupported_device as _refuse

__all__ = ["ChannelConfig", "SerialConfig", "assign_sockets", "bind_guest_socket",
           "channels_argv", "fill_ptys", "parse_channel", "parse_serial", "repoint_serials",
           "serial_argv", "socket_name"]

SOCKET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,58}\.sock")
GENERATED_RE = re.compile(r"(channel[0-9]{1,3}|vnc)\.sock")  # names the daemon generates
RESERVED_SOCKETS = frozenset({"qmp.sock"})
CHANNEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
CONTROLLER_ID = "virtio-serial0"
SERIAL_KINDS = ("pty", "file", "unix")

# The allow-lists: per element, its attributes; per device, its children.
_ATTRS: dict[str, dict[str, frozenset[str]]] = {
    # tty= (a pty's path, as libvirt's live XML shows it): output only, ignored
    "serial": {"serial": frozenset({"type", "tty"}),
               "source": frozenset({"path", "append", "mode"}),
               "target": frozenset({"type", "port"}), "model": frozenset({"name"})},
    "console": {"console": frozenset({"type", "tty"}),
                "source": frozenset({"path", "append", "mode"}),
                "target": frozenset({"type", "port"})},
    "channel": {"channel": frozenset({"type"}), "source": frozenset({"path", "mode"}),
                "target": frozenset({"type", "name"}),
                "address": frozenset({"type", "controller", "bus", "port"})},
}


@dataclass(frozen=True)
class SerialConfig:
    """A serial port: a pty, its log file, or a unix socket; it always logs to ``serialN.log``
    in the guest's folder (the file itself for ``kind='file'``)."""

    port: int
    append: bool = False
    kind: str = "pty"  # pty | file | unix
    socket: str = ""  # unix: the socket's name in the guest's folder

    @property
    def chardev(self) -> str:
        return f"charserial{self.port}"


@dataclass(frozen=True)
class ChannelConfig:
    """A virtio-serial port on a unix socket in the guest's folder."""

    index: int
    name: str  # the port's name the guest sees (org.qemu.guest_agent.0)
    socket: str
    nr: int  # the port number on the controller (1-30)


# --- parsing -------------------------------------------------------------------------------------


def _local(el: etree._Element) -> str:
    qname = etree.QName(el)
    return qname.localname if qname.namespace is None else str(el.tag)


def _check_subtree(el: etree._Element) -> None:
    """Refuse any attribute or element of ``el``'s subtree not on its allow-list."""
    allowed = _ATTRS[_local(el)]
    _check_attrs(el, el, allowed[_local(el)], _local(el))
    for child in el:
        if not isinstance(child.tag, str):
            continue
        tag = _local(child)
        if tag not in allowed or tag == _local(el) or tag == "model":
            raise _refuse(el, f"element <{tag}>")
        if len(el.findall(tag)) > 1:
            raise _refuse(el, f"element <{tag}> given twice")
        _check_attrs(el, child, allowed[tag], tag)
        for grand in child:
            if not isinstance(grand.tag, str):
                continue
            if not (tag == "target" and _local(grand) == "model" and "model" in allowed):
                raise _refuse(el, f"element <{tag}><{_local(grand)}>")
            _check_attrs(el, grand, allowed["model"], "model")


def _check_attrs(dev: etree._Element, el: etree._Element, allowed: frozenset[str],
                 tag: str) -> None:
    for key in el.attrib:
        name = key if isinstance(key, str) else key.decode()
        if name not in allowed:
            raise _refuse(dev, f"attribute '{name}' of <{tag}>")


def socket_name(dev: etree._Element, path: str, guest_dir: Path | None) -> str:
    """The name of the socket ``path`` in the guest's folder ``guest_dir``; anything else is
    refused (the daemon binds only there, never elsewhere on the host)."""
    if guest_dir is None:
        raise _refuse(dev, f"socket '{path}': the qemu backend is not open")
    name = os.path.basename(path)
    if not os.path.isabs(path) or os.path.dirname(os.path.normpath(path)) != \
            os.path.normpath(guest_dir) or os.path.normpath(path) != path:
        raise _refuse(dev, f"socket '{path}' is not in this guest's folder '{guest_dir}' (the "
                           "qemu backend binds sockets only there)")
    if not SOCKET_RE.fullmatch(name) or name in RESERVED_SOCKETS:
        raise _refuse(dev, f"socket name '{name}' (a name ending in .sock, of A-Z a-z 0-9 _ . -,"
                           f" not {', '.join(sorted(RESERVED_SOCKETS))})")
    return name


def parse_serial(el: etree._Element, port_default: int, guest_dir: Path | None) -> SerialConfig:
    """A ``<serial>`` or ``<console>`` (``port_default``: its port when none is given)."""
    kind = el.get("type", "pty")
    if kind not in SERIAL_KINDS:
        raise _refuse(el, f"type '{kind}' (supported: {', '.join(SERIAL_KINDS)})")
    _check_subtree(el)
    target = el.find("target")
    raw_port = target.get("port") if target is not None else None
    try:
        port = int(raw_port) if raw_port is not None else port_default
    except ValueError:
        raise _refuse(el, f"target port '{raw_port}'") from None
    if not 0 <= port <= 3:
        raise _refuse(el, f"target port {port} (0-3 only)")
    default_type = "serial" if _local(el) == "console" else "isa-serial"
    ttype = target.get("type", default_type) if target is not None else default_type
    if ttype not in ("isa-serial", "serial"):
        raise _refuse(el, f"target type '{ttype}'")
    model = target.find("model") if target is not None else None
    if model is not None and model.get("name") != "isa-serial":
        raise _refuse(el, f"target model '{model.get('name')}' (isa-serial only)")
    source = el.find("source")
    path = source.get("path", "") if source is not None else ""
    mode = source.get("mode") if source is not None else None
    append = source is not None and source.get("append") == "on"
    if source is not None and source.get("append") not in (None, "on", "off"):
        raise _refuse(el, f"append '{source.get('append')}' (on or off)")
    if kind != "unix" and mode is not None:
        raise _refuse(el, f"source mode '{mode}' (for type 'unix' only)")
    if kind == "pty":  # a path here is the output of an earlier run: ignored
        return SerialConfig(port=port)
    if not path:
        raise _refuse(el, f"a {kind} serial port needs <source path=...>")
    if kind == "file":
        why = serial_path_refusal(path, guest_dir, port)
        if why:
            raise _refuse(el, why)
        return SerialConfig(port=port, append=append, kind="file")
    if mode != "bind":
        raise _refuse(el, f"source mode '{mode}' (mode='bind' only: QEMU connects nowhere)")
    if append:
        raise _refuse(el, "append (for type 'file' only)")
    return SerialConfig(port=port, kind="unix", socket=socket_name(el, path, guest_dir))


def parse_channel(el: etree._Element, index: int, guest_dir: Path | None,
                  seen: list[ChannelConfig]) -> ChannelConfig:
    """The ``index``-th ``<channel>``; ``seen``: those before it."""
    if el.get("type") != "unix":
        raise _refuse(el, f"type '{el.get('type')}' (unix only)")
    _check_subtree(el)
    target = el.find("target")
    if target is None or target.get("type") != "virtio":
        raise _refuse(el, "a channel needs <target type='virtio' name=...>")
    name = target.get("name", "")
    if not CHANNEL_NAME_RE.fullmatch(name):
        raise _refuse(el, f"target name '{name}' (A-Z a-z 0-9 _ . -)")
    source = el.find("source")
    if source is None or not source.get("path"):
        raise _refuse(el, "a channel needs <source path=...> (given at define time)")
    if source.get("mode", "bind") != "bind":
        raise _refuse(el, f"source mode '{source.get('mode')}' (mode='bind' only)")
    sock = socket_name(el, source.get("path", ""), guest_dir)
    nr = _channel_port(el, index)
    for other in seen:
        if other.name == name:
            raise _refuse(el, f"target name '{name}' used twice")
        if other.socket == sock:
            raise _refuse(el, f"socket '{sock}' used twice")
        if other.nr == nr:
            raise _refuse(el, f"virtio-serial port {nr} used twice")
    return ChannelConfig(index=index, name=name, socket=sock, nr=nr)


def _channel_port(el: etree._Element, index: int) -> int:
    addr = el.find("address")
    if addr is None:
        return index + 1
    if addr.get("type") != "virtio-serial":
        raise _refuse(el, f"<address type='{addr.get('type')}'> (type='virtio-serial' only)")
    if addr.get("controller", "0") != "0" or addr.get("bus", "0") != "0":
        raise _refuse(el, "virtio-serial controller 0, bus 0 only")
    raw = addr.get("port", str(index + 1))
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 30:
        raise _refuse(el, f"virtio-serial port '{raw}' (1-30)")
    return int(raw)


def check_virtio_serial(el: etree._Element) -> None:
    """``<controller type='virtio-serial' index='0'>`` (its ``<address>``: :mod:`.pci`)."""
    if el.get("index", "0") != "0" or el.get("model") is not None:
        raise _refuse(el, "one virtio-serial controller, index 0, no model")


# --- the command line ----------------------------------------------------------------------------


def serial_argv(serial: SerialConfig, log_fd: int, fdset: int, sock_fd: int = -1) -> list[str]:
    """One serial port: its log in fd set ``fdset`` (``log_fd``), a unix one's socket."""
    chardev = serial.chardev
    add_fd = f"fd={log_fd},set={fdset},opaque=serial{serial.port}"
    log = f"logfile=/dev/fdset/{fdset},logappend=on"
    if serial.kind == "file":
        spec = f"file,id={chardev},path=/dev/fdset/{fdset}" + (",append=on" if serial.append
                                                             else "")
    elif serial.kind == "pty":
        spec = f"pty,id={chardev},{log}"
    else:
        if sock_fd < 0:
            raise ValueError(f"serial port {serial.port} needs its socket's descriptor")
        spec = f"socket,id={chardev},fd={sock_fd},server=on,wait=off,{log}"
    return ["-add-fd", add_fd, "-chardev", spec, "-device",
            f"isa-serial,chardev={chardev},id=serial{serial.port},index={serial.port}"]


def channels_argv(channels: tuple[ChannelConfig, ...], fds: tuple[int, ...],
                  controller: bool) -> list[str]:
    """The virtio-serial controller (when ``controller`` or a channel needs it) and the
    channels, channel ``i`` on the listening socket ``fds[i]``."""
    args: list[str] = []
    if controller or channels:
        args += ["-device", f"virtio-serial-pci,id={CONTROLLER_ID}"]
    for ch, fd in zip(channels, fds, strict=True):
        chardev = f"charchannel{ch.index}"
        args += ["-chardev", f"socket,id={chardev},fd={fd},server=on,wait=off",
                 "-device", f"virtserialport,bus={CONTROLLER_ID}.0,nr={ch.nr},"
                 f"chardev={chardev},id=channel{ch.index},name={ch.name}"]
    return args


# --- the daemon's acts: define-time paths, sockets, runtime paths --------------------------------


def assign_sockets(root: etree._Element, guest_dir: Path | None) -> bool:
    """At define (and on a migration's destination): each ``<channel>`` without a source path
    gets ``channelN.sock`` in the guest's folder ``guest_dir``, a generated path pointing into
    another host's guest folder is re-pointed here, and the virtio-serial controller is
    declared when channels need it.  Whether anything changed."""
    devices = root.find("devices")
    if devices is None or guest_dir is None:
        return False
    changed = False
    channels = devices.findall("channel")
    for n, ch in enumerate(channels):
        if ch.get("type") != "unix":
            continue
        source = ch.find("source")
        path = source.get("path", "") if source is not None else ""
        base = os.path.basename(path)
        uuid_dir = os.path.basename(os.path.dirname(path))
        if path and not (GENERATED_RE.fullmatch(base) and uuid_dir == guest_dir.name):
            continue
        wanted = str(guest_dir / (base if path else f"channel{n}.sock"))
        if path == wanted:
            continue
        if source is None:
            source = etree.Element("source")
            ch.insert(0, source)
        source.set("mode", "bind")
        source.set("path", wanted)
        changed = True
    if channels and not any(c.get("type") == "virtio-serial"
                            for c in devices.findall("controller")):
        ctrl = etree.Element("controller", {"type": "virtio-serial", "index": "0"})
        channels[0].addprevious(ctrl)
        changed = True
    return changed


def repoint_serials(root: etree._Element, guest_dir: Path | None) -> bool:
    """On a migration's destination: each ``<serial>``/``<console>`` of type ``file`` or
    ``unix`` whose source path lies in another host's folder of this guest (a folder named
    after its UUID, as the source's migratable XML carries it) is re-pointed to the same name in
    ``guest_dir``; the parsers then check it as at define.  Whether anything changed.  (Never
    at define: a path given there is the user's, and refused unless it is in the guest's
    folder.)"""
    if guest_dir is None:
        return False
    changed = False
    for el in (*root.findall("devices/serial"), *root.findall("devices/console")):
        source = el.find("source")
        if el.get("type") not in ("file", "unix") or source is None:
            continue
        path = source.get("path", "")
        folder = os.path.dirname(path)
        if (not os.path.isabs(path) or os.path.normpath(path) != path
                or os.path.basename(folder) != guest_dir.name or folder == str(guest_dir)):
            continue
        source.set("path", str(guest_dir / os.path.basename(path)))
        changed = True
    return changed


def bind_guest_socket(gdir: Path, name: str) -> int:
    """Bind and listen on the unix socket ``name`` in the guest's folder ``gdir`` (a stale
    socket there is replaced; anything else in the way is refused); its descriptor, for QEMU."""
    path = gdir / name
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BackendError(f"socket '{path}': something else is in the way")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_path(path) as where:
            sock.bind(where)
        sock.listen(4)
        os.chmod(path, 0o660)
    except OSError as exc:
        sock.close()
        raise BackendError(f"socket '{path}': cannot listen: {exc.strerror or exc}") from None
    return sock.detach()


def fill_ptys(root: etree._Element, ptys: Mapping[int, str]) -> bool:
    """Write each pty serial port's path (``ptys``: port -> ``/dev/pts/N``) into the live
    definition ``root``: ``<source path=>`` of its ``<serial>`` and ``<console>``, and the
    console's ``tty=``, as libvirt's live XML has them."""
    changed = False
    for el in (*root.findall("devices/serial"), *root.findall("devices/console")):
        target = el.find("target")
        raw = target.get("port") if target is not None else None
        port = int(raw) if raw is not None and raw.isdigit() else 0
        if el.get("type", "pty") != "pty" or port not in ptys:
            continue
        source = el.find("source")
        if source is None:
            source = etree.Element("source")
            el.insert(0, source)
        source.set("path", ptys[port])
        if _local(el) == "console":
            el.set("tty", ptys[port])  # what virsh ttyconsole reads
        changed = True
    return changed
