"""What QEMU chose when a guest started -- its ptys' paths, its VNC port -- read over QMP, and
written into the guest's live XML, with the path of its VNC unix socket (in this host's guest
folder).

Concern: the values a definition leaves to the host (``<serial type='pty'>``: QEMU allocates a
pty; ``<graphics type='vnc' autoport='yes'>``: QEMU takes a free port of the host's range).
:func:`read_runtime` asks QEMU once it runs (``query-chardev``, ``query-vnc``), on a source and
on a migration's destination alike (each host chooses its own); :meth:`Runtime.apply` writes
them into the live definition (``<source path='/dev/pts/N'>``, ``port='5901'``), which
``dumpxml`` and ``virtmig ttyconsole`` show.  The persistent XML never carries them; the
migratable XML carries the source's, as libvirt's does, and the destination ignores them (they
are output only: :mod:`.chardev`, :mod:`.graphics`) and writes its own.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from lxml import etree

from virtmig.daemon.backend.qemu.chardev import fill_ptys
from virtmig.daemon.backend.qemu.config import QemuConfig
from virtmig.daemon.backend.qemu.confine import VNC_SOCKET_DIR
from virtmig.daemon.backend.qemu.graphics import VNC_SOCKET, fill_vnc
from virtmig.daemon.backend.qemu.guest import _Guest

__all__ = ["Runtime", "read_runtime"]

_PTY_PREFIX = "pty:"

ExecAny = Callable[..., Coroutine[Any, Any, object]]


@dataclass(frozen=True)
class Runtime:
    """One running QEMU's choices: serial port -> pty path, the VNC port (0: none) or socket."""

    ptys: tuple[tuple[int, str], ...] = ()
    vnc_port: int = 0
    vnc_socket: str = ""  # the path of the VNC unix socket ("": none)

    def apply(self, xml: str) -> str:
        """``xml`` (a definition) with these choices written in; unchanged when none apply."""
        parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                                 huge_tree=False)
        root = etree.fromstring(xml.encode("utf-8"), parser)
        changed = fill_ptys(root, dict(self.ptys))
        changed = fill_vnc(root, self.vnc_port, self.vnc_socket) or changed
        return etree.tostring(root.getroottree(), encoding="unicode") if changed else xml


async def read_runtime(exec_any: ExecAny, guest: _Guest, cfg: QemuConfig) -> Runtime:
    """Ask the guest's QEMU what it chose (only what ``cfg`` left to it)."""
    ptys: list[tuple[int, str]] = []
    wanted = {s.chardev: s.port for s in cfg.serials if s.kind == "pty"}
    if wanted:
        chardevs = await exec_any(guest, "query-chardev")
        for dev in chardevs if isinstance(chardevs, list) else ():
            port = wanted.get(str(dev.get("label", "")))
            filename = str(dev.get("filename", ""))
            if port is not None and filename.startswith(_PTY_PREFIX):
                ptys.append((port, filename[len(_PTY_PREFIX):]))
    vnc_port, vnc_socket = 0, ""
    if cfg.vnc is not None and cfg.vnc.socket:
        vnc_socket = str(guest.dir / VNC_SOCKET_DIR / VNC_SOCKET)  # where QEMU bound it
    elif cfg.vnc is not None:
        vnc = await exec_any(guest, "query-vnc")
        service = str(vnc.get("service", "")) if isinstance(vnc, dict) else ""
        vnc_port = int(service) if service.isdigit() else 0
    return Runtime(ptys=tuple(sorted(ptys)), vnc_port=vnc_port, vnc_socket=vnc_socket)
