"""The ``qemu`` backend: real QEMU guests (``qemu-system-x86_64``) controlled over QMP.

Concern: run guests described by libvirt domain XML as QEMU processes, and move them between
hosts with QEMU's own live migration, behind the :class:`~virtmig.daemon.backend.base.Backend`
interface.  The daemon keeps names, states, jobs and the v3 protocol; this module only turns a
definition into a command line, starts, stops and watches processes, and drives QMP.

Supported domain XML (anything else is refused by :meth:`QemuBackend.validate` with
``ConfigUnsupported`` naming the element):

* ``<domain type='qemu'>`` (``-accel tcg``) or ``type='kvm'`` (``-accel kvm``); ``hvm``/x86_64;
  machine ``pc``/``q35`` or a versioned ``pc-*``/``pc-q35-*`` name the emulator knows (default
  ``pc``); ``<memory>``, ``<vcpu>``; ``<os>`` with ``<kernel>``, ``<initrd>``, ``<cmdline>``.
* ``<devices>``: ``<emulator>`` (the binary to run); ``<disk type='file' device='disk'>`` raw or
  qcow2 on ``<target bus='virtio' dev='vdX'>`` (shared storage: both hosts see the same path);
  ``<serial>``/``<console>`` of ``type='file'`` (``<source path= append=>``) or ``type='pty'``
  (mapped to a log file in the guest's folder: no pty is ever allocated); the implicit USB and
  PCI root controllers, PS/2 inputs, ``<memballoon model='none'>``, ``<video><model
  type='none'>`` (accepted, nothing added).  No graphics: always ``-no-user-config -nodefaults
  -display none``.

Files, per guest, in ``<state_dir>/<uuid>/``: ``pid`` (written by the backend), ``qmp.sock``
(QEMU runs with that folder as its working directory and listens on the relative path, so the
108-byte socket path limit never bites; the backend connects through ``/proc/self/fd`` when the
absolute path is too long), ``qemu.log`` (QEMU's stdout and stderr, appended, one header line
per start) and ``serialN.log`` for ``pty`` serials.

Processes: QEMU is started with :func:`asyncio.create_subprocess_exec` in its own session (a
signal to the daemon's process group does not reach it) and is always reaped by the daemon
(``await proc.wait()``; PID 1 on these machines reaps orphans slowly).  :meth:`QemuBackend.close`
disconnects QMP and leaves guests running; a later :meth:`QemuBackend.open` on the same folder
finds them (pid file, live process whose working directory is the guest folder, connectable QMP
socket) and takes them over.  A taken-over guest is watched with a pidfd (polled if pidfds are
unavailable) and reaped with ``os.waitpid`` only if it happens to be this process's child.

Migration follows QEMU 7.2's QMP flow: the destination starts with ``-incoming defer -S``, turns
on the ``events`` capability and listens with ``migrate-incoming`` (port 0: QEMU's choice, read
back from ``query-migrate``; a port in use gives ``OSError(EADDRINUSE)`` and that QEMU is
stopped); the source sets its capabilities (``events``, ``auto-converge``, ``return-path``: QEMU
then reports ``completed`` only once the destination has loaded the whole stream, which matters
when a tunnel sits in between) and parameters
(``max-bandwidth`` -- QEMU's 128 MiB/s default is raised to libvirt's "unlimited" --
``downtime-limit``, CPU throttling), issues ``migrate`` and follows ``MIGRATION`` events; it
re-reads ``query-migrate`` every 250 ms and at every event (``MIGRATION_PASS``: a new dirty-sync
pass) for :meth:`QemuBackend.progress`, and re-reads a completed migration's statistics until
``total-time`` is filled in.  :meth:`QemuBackend.set_tuning` changes the limits mid-stream.  On
completion the source is left in ``postmigrate`` (paused) and is never resumed by the backend;
on failure or cancel it runs again if it ran before (QEMU usually restarts it itself; the backend
sends ``cont`` only when it did not).  A destination QEMU whose incoming migration fails exits by
itself; :meth:`QemuBackend.incoming_wait` then raises ``MigrationFailed`` with QEMU's own message
from ``qemu.log``.

Post-copy: every incoming QEMU gets the ``postcopy-ram`` capability before ``migrate-incoming``
(the destination cannot know whether the source will switch; a pre-copy stream does not use it;
without userfaultfd QEMU refuses it, which is logged and otherwise ignored); the source gets it,
and ``max-postcopy-bandwidth``, when ``tuning.postcopy``.  :meth:`QemuBackend.start_postcopy`
sends ``migrate-start-postcopy`` (QEMU switches at its next iteration, mid-pass, unless the
migration completes as pre-copy first).  At the source's ``MIGRATION postcopy-active`` event
``outgoing`` returns a progress with status ``POSTCOPY_ACTIVE`` (the source is stopped,
``finish-migrate``) and a follower task waits for ``completed``
(:meth:`QemuBackend.outgoing_wait`).  The destination's progress says ``POSTCOPY_ACTIVE`` from
its own ``postcopy-active`` event on, and ``resume`` works from then (a ``cont`` before QEMU ran
the device state just sets autostart).  A source that switched is never resumed.  Nothing is
cancelled once the switch was requested (``cancel`` refuses: a ``migrate_cancel`` that lands after
the switch would restart the source).  A broken stream leaves QEMU in ``postcopy-paused`` (no
recovery is attempted), the destination's vCPUs are stopped (KVM only: see
``_incoming_postcopy_failed``), ``outgoing_wait`` and ``incoming_wait`` raise ``PostcopyFailed``,
and neither QEMU is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import shlex
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO

from lxml import etree
from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, Message, QMPClient, QMPError

from virtmig.daemon.backend.base import (
    Backend,
    BackendError,
    GuestRunState,
    GuestSpec,
    MigrationCancelled,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    PostcopyFailed,
    StreamAddress,
    XbzrleStats,
)
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported, VirtmigError
from virtmig.proto.flags import MAX_BANDWIDTH_MIB, MigrateFlags

log = logging.getLogger(__name__)

DEFAULT_BINARY = "qemu-system-x86_64"
SOCKET_NAME = "qmp.sock"
PID_NAME = "pid"
LOG_NAME = "qemu.log"

#: libvirt's "unlimited" migration bandwidth (QEMU_DOMAIN_MIG_BANDWIDTH_MAX MiB/s, in bytes/s).
UNLIMITED_BANDWIDTH = MAX_BANDWIDTH_MIB * 1024 * 1024
MAX_DOWNTIME_LIMIT_MS = 2_000_000  # QEMU's upper bound for downtime-limit

START_TIMEOUT = 30.0  # spawn until QMP answers
RECONNECT_TIMEOUT = 5.0
QMP_TIMEOUT = 30.0  # any single QMP command
QUIT_GRACE = 3.0  # after "quit", before SIGKILL
KILL_TIMEOUT = 10.0
PROGRESS_INTERVAL = 0.25  # query-migrate while a migration runs
FINAL_STATS_RETRIES = 50  # re-query a completed migration until total-time is filled in
CANCEL_TIMEOUT = 10.0
POSTCOPY_STOP_TIMEOUT = 5.0  # "stop" on a destination whose post-copy stream broke
EXIT_REASON_WAIT = 3.0  # a failed incoming QEMU exits by itself: wait that long for its message
POLL_INTERVAL = 0.2  # liveness polling of a taken-over guest when pidfds are unavailable

_SUN_PATH_MAX = 107  # sockaddr_un.sun_path minus the terminating NUL
_MACHINE_RE = re.compile(r"(pc|q35|pc-[A-Za-z0-9._-]+)")
_DISK_TARGET_RE = re.compile(r"vd[a-z]{1,3}")
_EMULATOR_RE = re.compile(r"qemu-system-x86_64|qemu-kvm|kvm")
_TERMINAL = frozenset({"completed", "failed", "cancelled"})
# After the switch to post-copy: the stream broke (QEMU waits for a recovery that never comes).
_POSTCOPY_BROKEN = frozenset({"failed", "cancelled", "postcopy-paused", "postcopy-recover"})
_POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
_STATUS_MAP = {
    "none": MigrationStatus.NONE,
    "setup": MigrationStatus.SETUP,
    "active": MigrationStatus.ACTIVE,
    "cancelling": MigrationStatus.ACTIVE,
    "pre-switchover": MigrationStatus.ACTIVE,
    "device": MigrationStatus.ACTIVE,
    "wait-unplug": MigrationStatus.ACTIVE,
    "colo": MigrationStatus.ACTIVE,
    "postcopy-active": MigrationStatus.POSTCOPY_ACTIVE,
    "postcopy-paused": MigrationStatus.POSTCOPY_ACTIVE,
    "postcopy-recover": MigrationStatus.POSTCOPY_ACTIVE,
    "completed": MigrationStatus.COMPLETED,
    "failed": MigrationStatus.FAILED,
    "cancelled": MigrationStatus.CANCELLED,
}
_LOG_PREFIX_RE = re.compile(r"^(\d{4}-\d\d-\d\dT[0-9:.]+Z\s+)?(\S*qemu-system-\S+?:\s+)?")


# --- domain XML -> QEMU configuration ------------------------------------------------------------


@dataclass(frozen=True)
class DiskConfig:
    target: str  # vda, vdb, ...
    path: str
    fmt: str  # raw | qcow2
    readonly: bool = False


@dataclass(frozen=True)
class SerialConfig:
    port: int
    path: str  # absolute path, or "" for a pty mapped to serialN.log in the guest folder
    append: bool = False


@dataclass(frozen=True)
class QemuConfig:
    """The supported subset of a domain, ready to become a command line."""

    uuid: str
    name: str
    accel: str  # tcg | kvm
    machine: str
    memory_kib: int
    vcpus: int
    emulator: str = ""
    kernel: str = ""
    initrd: str = ""
    cmdline: str = ""
    disks: tuple[DiskConfig, ...] = ()
    serials: tuple[SerialConfig, ...] = ()

    def argv(self, binary: str, guest_dir: Path, *, incoming: bool,
             monitor_fd: int | None = None) -> list[str]:
        """The command line; QEMU runs in ``guest_dir``.

        The QMP monitor listens on ``monitor_fd`` when given (a unix socket the caller bound and
        listens on, as libvirt does: it can connect at once, with no polling for the socket),
        else on the relative path ``qmp.sock``.
        """
        monitor = (
            ["-chardev", f"socket,id=monitor,fd={monitor_fd},server=on,wait=off",
             "-mon", "chardev=monitor,mode=control"] if monitor_fd is not None
            else ["-qmp", f"unix:{SOCKET_NAME},server=on,wait=off"]
        )
        args = [
            self.emulator or binary,
            "-name", f"guest={_opt(self.name)},debug-threads=on",
            "-uuid", self.uuid,
            "-no-user-config", "-nodefaults", "-display", "none",
            "-msg", "timestamp=on",
            "-accel", self.accel,
            "-machine", self.machine,
            "-m", f"{self.memory_kib}k",
            "-smp", str(self.vcpus),
            *monitor,
        ]
        if self.kernel:
            args += ["-kernel", self.kernel]
        if self.initrd:
            args += ["-initrd", self.initrd]
        if self.cmdline:
            args += ["-append", self.cmdline]
        for disk in self.disks:
            proto, fmt = f"file-{disk.target}", f"drive-{disk.target}"
            args += [
                "-blockdev",
                _json({"driver": "file", "filename": disk.path, "node-name": proto,
                       "read-only": disk.readonly}),
                "-blockdev",
                _json({"driver": disk.fmt, "file": proto, "node-name": fmt,
                       "read-only": disk.readonly}),
                "-device", f"virtio-blk-pci,drive={fmt},id=virtio-{disk.target}",
            ]
        for serial in self.serials:
            path = serial.path or str(guest_dir / f"serial{serial.port}.log")
            chardev = f"charserial{serial.port}"
            args += [
                "-chardev",
                f"file,id={chardev},path={_opt(path)}" + (",append=on" if serial.append else ""),
                "-device", f"isa-serial,chardev={chardev},id=serial{serial.port},"
                f"index={serial.port}",
            ]
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


def parse_config(spec: GuestSpec, machines: frozenset[str] | None = None) -> QemuConfig:
    """The QEMU configuration of ``spec``; ``ConfigUnsupported`` names what cannot be run.

    ``machines``: the machine types the emulator knows (None: not checked beyond the name form).
    """
    if not spec.xml:  # a bare spec (no XML): an empty pc guest
        return QemuConfig(uuid=spec.uuid, name=spec.name, accel="tcg", machine="pc",
                          memory_kib=max(1, -(-spec.memory_bytes // 1024)), vcpus=spec.vcpus)
    try:
        d = parse_domain_xml(spec.xml)
    except VirtmigError as exc:
        raise ConfigUnsupported(str(exc)) from None
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
    if not _MACHINE_RE.fullmatch(machine) or (machines is not None and machine not in machines):
        raise ConfigUnsupported(
            f"machine type '{machine}' is not supported by the qemu backend"
            + (" (not known to the emulator)" if _MACHINE_RE.fullmatch(machine) else "")
        )
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    root = etree.fromstring(d.xml.encode("utf-8"), parser)
    kernel = initrd = cmdline = ""
    os_el = root.find("os")
    if os_el is not None:
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
    emulator = ""
    disks: list[DiskConfig] = []
    serials: dict[int, SerialConfig] = {}
    consoles: list[etree._Element] = []
    devices = root.find("devices")
    for el in devices if devices is not None else ():
        if not isinstance(el.tag, str):
            continue  # comments, processing instructions
        tag = etree.QName(el).localname if etree.QName(el).namespace is None else ""
        if tag == "emulator":
            emulator = _text(el)
            if not os.path.isabs(emulator) or not _EMULATOR_RE.fullmatch(
                os.path.basename(emulator)
            ):
                raise ConfigUnsupported(
                    f"unsupported emulator '{emulator}' for the qemu backend (an absolute path "
                    "to qemu-system-x86_64 or qemu-kvm)"
                )
        elif tag == "disk":
            disks.append(_parse_disk(el, disks))
        elif tag == "serial":
            serial = _parse_serial(el, port_default=len(serials))
            if serial.port in serials:
                raise _unsupported(el, f"serial port {serial.port} defined twice")
            serials[serial.port] = serial
        elif tag == "console":
            consoles.append(el)
        elif tag == "controller":
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
    for el in consoles:
        target = el.find("target")
        if target is not None and target.get("type", "serial") != "serial":
            raise _unsupported(el, f"console target type '{target.get('type')}'")
        port = int(target.get("port", "0")) if target is not None and target.get("port") else 0
        if port not in serials:  # a console on a serial port nobody declared: that port
            serials[port] = _parse_serial(el, port_default=port)
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
        disks=tuple(disks),
        serials=tuple(serials[p] for p in sorted(serials)),
    )


def _parse_disk(el: etree._Element, seen: list[DiskConfig]) -> DiskConfig:
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
    return DiskConfig(target=dev, path=path, fmt=fmt, readonly=el.find("readonly") is not None)


def _parse_serial(el: etree._Element, port_default: int) -> SerialConfig:
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
        return SerialConfig(port=port, path="")
    if kind != "file":
        raise _unsupported(el)
    source = el.find("source")
    path = source.get("path", "") if source is not None else ""
    if not path or not os.path.isabs(path):
        raise _unsupported(el, "a file serial needs an absolute <source path=...>")
    append = source is not None and source.get("append") == "on"
    return SerialConfig(port=port, path=path, append=append)


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


class _Monitor(QMPClient):
    """qemu.qmp's client, minus the cost of logging every message when nobody listens.

    qemu.qmp 0.0.x pretty-prints each message (``json.dumps(indent=2)``) for a debug log line
    before the logger decides to drop it: about 50 messages, 6 ms of CPU per migration, taken
    from the QEMU threads that do the migrating on a small host.  These hooks format lazily.
    """

    def _cb_outbound(self, msg: Message) -> Message:
        self.logger.debug("--> %s", msg)
        return msg

    def _cb_inbound(self, msg: Message) -> Message:
        self.logger.debug("<-- %s", msg)
        return msg


# --- processes -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _socket_path(path: Path) -> Iterator[str]:
    """A path that reaches the unix socket ``path`` even when it is longer than sun_path."""
    if len(os.fsencode(path)) <= _SUN_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _proc_state(pid: int) -> str:
    """The process's state letter from /proc (``""``: no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return ""
    close = stat.rfind(b")")
    return stat[close + 2 : close + 3].decode() if close > 0 else ""


def _alive(pid: int) -> bool:
    state = _proc_state(pid)
    return bool(state) and state not in ("Z", "X")


def _try_reap(pid: int) -> int | None:
    """Reap ``pid`` if it is our exited child: its exit status (negative: signal), else None."""
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    if got == 0:
        return None
    return os.waitstatus_to_exitcode(status)


def _release(proc: asyncio.subprocess.Process) -> None:
    """Let a running QEMU outlive this backend (and this daemon).

    asyncio kills a child whose subprocess transport is closed, or garbage-collected unclosed,
    while the child runs (``BaseSubprocessTransport.close()``).  Marking the transport closed
    skips that kill; nothing else is attached to it (no pipes).  While this process lives,
    asyncio's child watcher still reaps the QEMU when it exits.
    """
    transport = getattr(proc, "_transport", None)
    if transport is not None and proc.returncode is None and hasattr(transport, "_closed"):
        transport._closed = True


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "QEMU exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"QEMU was killed by {name}"
    return f"QEMU exited with status {code}"


# --- guests ---------------------------------------------------------------------------------------


class QmpCommandFailed(BackendError):
    """QEMU answered a command with an error; ``desc`` is QEMU's message."""

    def __init__(self, command: str, desc: str, error_class: str = "") -> None:
        super().__init__(f"{command}: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


@dataclass(eq=False)
class _Outgoing:
    tuning: MigrationTuning
    was_running: bool
    started: float = field(default_factory=time.monotonic)
    last: MigrationProgress = field(
        default_factory=lambda: MigrationProgress(status=MigrationStatus.SETUP)
    )
    final: MigrationProgress | None = None
    issued: bool = False  # "migrate" was sent
    cancel_requested: bool = False
    abort_reason: str = ""  # the backend is closing: fail with this
    postcopy_requested: bool = False  # start_postcopy() was called
    switched: bool = False  # QEMU reported postcopy-active: no way back
    follower: asyncio.Task[None] | None = None  # _follow_postcopy, after the switch
    # Set once the migration ended for good: completed, failed or cancelled (in post-copy, after
    # ``outgoing`` returned at the switch, when the last page arrived or the stream broke).
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def snapshot(self) -> MigrationProgress:
        return self.final or self.last


@dataclass(eq=False)
class _Incoming:
    started: float = field(default_factory=time.monotonic)
    status: MigrationStatus = MigrationStatus.SETUP
    active_at: float = 0.0
    error: str = ""
    final: MigrationProgress | None = None
    postcopy: bool = False  # the postcopy-ram capability is on
    switched: bool = False  # QEMU reported postcopy-active: the guest may run here

    def snapshot(self) -> MigrationProgress:
        if self.final is not None:
            return self.final
        now = time.monotonic()
        return MigrationProgress(
            status=self.status,
            setup_time_ms=_ms((self.active_at or now) - self.started),
            total_time_ms=_ms(now - self.started),
            error=self.error,
        )


@dataclass(eq=False)
class _Guest:
    uuid: str
    dir: Path
    pid: int
    proc: asyncio.subprocess.Process | None = None  # our child, started by this instance
    pidfd: int = -1  # a taken-over guest's pidfd (-1: none)
    qmp: QMPClient | None = None
    log_offset: int = 0  # where this QEMU's output starts in qemu.log
    status: str = "prelaunch"  # QEMU's run status (query-status / STOP / RESUME)
    status_events: int = 0  # run-status events seen (STOP, RESUME, SHUTDOWN)
    exited: bool = False
    exit_code: int | None = None
    exit_reason: str = ""
    mig_status: str = "none"  # last MIGRATION event
    outgoing: _Outgoing | None = None
    incoming: _Incoming | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    exit_task: asyncio.Task[None] | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    def changed(self) -> asyncio.Event:
        """An event set at the next change (event, exit): take it *before* checking state."""
        return self._changed

    def notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def socket(self) -> Path:
        return self.dir / SOCKET_NAME

    def run_state(self) -> GuestRunState:
        if self.exited or self.status == "shutdown":
            return GuestRunState.SHUTOFF
        return GuestRunState.RUNNING if self.status == "running" else GuestRunState.PAUSED

    def log_tail(self, lines: int = 2) -> str:
        """QEMU's last messages of this run, without timestamps and program name."""
        try:
            with open(self.dir / LOG_NAME, "rb") as f:
                f.seek(self.log_offset)
                data = f.read()[-16384:]
        except OSError:
            return ""
        out = []
        for raw in data.decode("utf-8", "replace").splitlines():
            line = _LOG_PREFIX_RE.sub("", raw.strip(), count=1).strip()
            if line and not line.startswith("virtmig:"):
                out.append(line)
        return "; ".join(out[-lines:])


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key, 0)
    return int(v) if isinstance(v, int | float) else 0


def progress_from_query(info: dict[str, Any]) -> MigrationProgress:
    """``query-migrate``'s answer as a MigrationProgress."""
    ram = info.get("ram")
    ram = ram if isinstance(ram, dict) else {}
    mbps = ram.get("mbps", 0)
    downtime, total_time = _int(info, "downtime"), _int(info, "total-time")
    if downtime > total_time:
        # Seen after post-copy with QEMU 7.2 (about 1 run in 40): the host's uptime in ms, as if
        # the stop had happened at boot.  Unknown, then.
        downtime = 0
    return MigrationProgress(
        status=_STATUS_MAP.get(str(info.get("status", "none")), MigrationStatus.ACTIVE),
        total_bytes=_int(ram, "total"),
        processed_bytes=_int(ram, "transferred"),
        remaining_bytes=_int(ram, "remaining"),
        iteration=_int(ram, "dirty-sync-count"),
        dirty_rate_pages_per_s=_int(ram, "dirty-pages-rate"),
        bandwidth_bytes_per_s=round(float(mbps) * 1e6 / 8) if isinstance(mbps, int | float)
        else 0,
        expected_downtime_ms=_int(info, "expected-downtime"),
        downtime_ms=downtime,
        setup_time_ms=_int(info, "setup-time"),
        total_time_ms=total_time,
        page_size=_int(ram, "page-size") or 4096,
        normal_pages=_int(ram, "normal"),
        postcopy_requests=_int(ram, "postcopy-requests"),
        throttle_percent=_int(info, "cpu-throttle-percentage"),
        xbzrle=_xbzrle(info.get("xbzrle-cache")),
        error=str(info.get("error-desc", "")),
    )


def _xbzrle(cache: object) -> XbzrleStats | None:
    """``query-migrate``'s ``xbzrle-cache`` (present only with the xbzrle capability)."""
    if not isinstance(cache, dict):
        return None
    return XbzrleStats(cache_bytes=_int(cache, "cache-size"), compressed_bytes=_int(cache, "bytes"),
                       pages=_int(cache, "pages"), cache_misses=_int(cache, "cache-miss"),
                       overflows=_int(cache, "overflow"))


# --- the backend ----------------------------------------------------------------------------------


class QemuBackend(Backend):
    """QEMU guests over QMP (see the module docstring)."""

    name = "qemu"
    extra_flags = MigrateFlags.PARALLEL | MigrateFlags.COMPRESSED

    def __init__(self, binary: str | None = None) -> None:
        self.binary = binary or DEFAULT_BINARY
        self._dir: Path | None = None
        self._guests: dict[str, _Guest] = {}
        self._progress: dict[str, _Outgoing | _Incoming] = {}
        self._machines: frozenset[str] | None = None

    # -- setup --

    async def open(self, state_dir: Path) -> None:
        self._dir = state_dir
        self._machines = await self._probe_machines()
        for child in _guest_dirs(state_dir):
            try:
                await self._take_over(child)
            except Exception:
                log.exception("qemu backend: cannot take over the guest in %s", child)

    async def close(self) -> None:
        guests = list(self._guests.values())
        for guest in guests:  # a migration nobody will finish: stop it, the guest stays
            mig = guest.outgoing
            if mig is not None and not mig.done.is_set() and not guest.exited:
                mig.abort_reason = "migration aborted: daemon shutting down"
                if mig.switched or mig.postcopy_requested:
                    # Post-copy cannot be cancelled: QEMU finishes it without us (after the
                    # switch; _detach ends our follower).
                    mig.abort_reason = ("post-copy migration no longer followed: daemon "
                                        "shutting down")
                    if not mig.switched:
                        await self._wait_switch_or_end(guest, mig, CANCEL_TIMEOUT)
                else:
                    with contextlib.suppress(BackendError):
                        await self.cancel(guest.uuid)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(mig.done.wait(), CANCEL_TIMEOUT)
            inc = guest.incoming
            if inc is not None and inc.final is None and not guest.exited and not inc.switched:
                await self._stop_process(guest)  # an incoming guest cannot finish without us
        for guest in guests:
            await self._detach(guest)
        self._guests.clear()

    async def _probe_machines(self) -> frozenset[str] | None:
        """The machine types (and aliases) the default emulator knows; None if it cannot say."""
        try:
            proc = await asyncio.create_subprocess_exec(
                self.binary, "-machine", "help",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:
            log.warning("qemu backend: cannot run %s: %s", self.binary, exc)
            return None
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return None
        if proc.returncode != 0:
            return None
        names = {line.split()[0] for line in out.decode().splitlines()[1:] if line.strip()}
        return frozenset(names) or None

    def _state_dir(self) -> Path:
        if self._dir is None:
            raise BackendError("the qemu backend is not open")
        return self._dir

    def validate(self, spec: GuestSpec) -> None:
        parse_config(spec, self._machines)

    def _config(self, spec: GuestSpec) -> QemuConfig:
        try:
            return parse_config(spec, self._machines)
        except ConfigUnsupported as exc:
            raise BackendError(str(exc)) from None

    # -- processes --

    def _check_free(self, uuid: str) -> None:
        guest = self._guests.get(uuid)
        if guest is not None:
            if not guest.exited:
                raise BackendError(f"guest {uuid} is already running")
            del self._guests[uuid]

    async def _spawn(self, cfg: QemuConfig, *, incoming: bool) -> _Guest:
        """Start QEMU (vCPUs stopped) and connect to its QMP socket."""
        gdir = self._state_dir() / cfg.uuid
        _prepare_dir(gdir)
        with _listen_unix(gdir / SOCKET_NAME) as monitor:
            argv = cfg.argv(self.binary, gdir, incoming=incoming, monitor_fd=monitor.fileno())
            with _open_log(gdir, argv) as logf:
                offset = logf.tell()
                try:
                    proc = await asyncio.create_subprocess_exec(
                        *argv, cwd=gdir, stdin=asyncio.subprocess.DEVNULL, stdout=logf,
                        stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                        pass_fds=(monitor.fileno(),),
                    )
                except OSError as exc:
                    with contextlib.suppress(FileNotFoundError):
                        (gdir / SOCKET_NAME).unlink()
                    raise BackendError(f"cannot run {argv[0]}: {exc.strerror or exc}") from None
        guest = _Guest(uuid=cfg.uuid, dir=gdir, pid=proc.pid, proc=proc, log_offset=offset)
        guest.exit_task = asyncio.get_running_loop().create_task(self._watch_exit(guest))
        self._guests[cfg.uuid] = guest
        try:
            _write_pid(gdir / PID_NAME, proc.pid)
            await self._connect(guest, START_TIMEOUT)
        except BaseException:
            await self._stop_process(guest)
            self._forget(guest)
            raise
        return guest

    async def _connect(self, guest: _Guest, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            changed = guest.changed()
            if guest.exited:
                raise BackendError(
                    f"{guest.exit_reason}" + (f": {tail}" if (tail := guest.log_tail()) else "")
                )
            if guest.socket.exists():
                qmp = _Monitor(f"qemu-{guest.uuid[:8]}")
                try:
                    with _socket_path(guest.socket) as path:
                        await asyncio.wait_for(qmp.connect(path), max(0.1, deadline -
                                                                       time.monotonic()))
                except (ConnectError, OSError, TimeoutError) as exc:
                    if time.monotonic() >= deadline:
                        raise BackendError(
                            f"cannot connect to QEMU's monitor {guest.socket}: {exc}"
                        ) from None
                else:
                    guest.qmp = qmp
                    break
            elif time.monotonic() >= deadline:
                raise BackendError(f"QEMU did not open its monitor {guest.socket} in {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), 0.01)
        self._spawn_task(guest, self._pump(guest, qmp))
        await self._refresh_status(guest)

    def _spawn_task(self, guest: _Guest, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        guest.tasks.add(task)
        task.add_done_callback(guest.tasks.discard)
        return task

    async def _watch_exit(self, guest: _Guest) -> None:
        """Wait for the QEMU process to end, reap it, and settle everything that waits on it."""
        if guest.proc is not None:
            code: int | None = await guest.proc.wait()
        else:
            code = await self._wait_foreign(guest)
        guest.exited = True
        guest.exit_code = code
        guest.exit_reason = _describe_exit(code)
        guest.status = "shutdown"
        inc = guest.incoming
        if inc is not None and inc.final is None:
            tail = guest.log_tail()
            inc.error = inc.error or (f"{guest.exit_reason}: {tail}" if tail
                                      else guest.exit_reason)
            inc.status = MigrationStatus.FAILED
            inc.final = replace(inc.snapshot(), status=MigrationStatus.FAILED, error=inc.error)
        for path in (guest.dir / PID_NAME, guest.socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if guest.pidfd >= 0:
            os.close(guest.pidfd)
            guest.pidfd = -1
        guest.notify()
        for task in list(guest.tasks):
            task.cancel()
        if guest.qmp is not None:
            with contextlib.suppress(Exception):
                await guest.qmp.disconnect()
        log.info("qemu backend: guest %s (pid %d): %s", guest.uuid, guest.pid, guest.exit_reason)

    async def _wait_foreign(self, guest: _Guest) -> int | None:
        """Wait for a taken-over QEMU (maybe not our child) to end; reap it if it is ours."""
        if guest.pidfd >= 0:
            loop = asyncio.get_running_loop()
            ready: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(guest.pidfd, readable)
            try:
                await ready
            finally:
                loop.remove_reader(guest.pidfd)
        else:
            while _alive(guest.pid):
                code = _try_reap(guest.pid)
                if code is not None:
                    return code
                await asyncio.sleep(POLL_INTERVAL)
        for _ in range(50):  # a zombie of ours: reap it (another waiter may have been first)
            code = _try_reap(guest.pid)
            if code is not None or not _proc_state(guest.pid):
                return code
            await asyncio.sleep(0.01)
        return None

    async def _pump(self, guest: _Guest, qmp: QMPClient) -> None:
        """Follow QMP events: run status and migration status."""
        async for event in qmp.events:
            try:
                self._on_event(guest, event)
            except Exception:  # a bug: keep following events
                log.exception("qemu backend: guest %s: cannot handle event %s", guest.uuid,
                              event)
            guest.notify()

    @staticmethod
    def _on_event(guest: _Guest, event: Any) -> None:
        name = event.get("event")
        data = event.get("data")
        data = data if isinstance(data, dict) else {}
        if name in ("STOP", "RESUME", "SHUTDOWN"):
            guest.status_events += 1
        if name == "STOP":
            if guest.status == "running":
                guest.status = "paused"
        elif name == "RESUME":
            guest.status = "running"
        elif name == "SHUTDOWN":
            guest.status = "shutdown"
        elif name == "MIGRATION":
            status = str(data.get("status", ""))
            guest.mig_status = status
            inc = guest.incoming
            if inc is not None and inc.final is None:
                if status == "active" and not inc.active_at:
                    inc.active_at = time.monotonic()
                if status == "postcopy-active":
                    inc.switched = True
                inc.status = _STATUS_MAP.get(status, inc.status)
            mig = guest.outgoing
            if mig is not None and status == "postcopy-active" and not mig.done.is_set():
                mig.switched = True

    async def _exec(
        self, guest: _Guest, command: str, args: dict[str, object] | None = None,
        timeout: float = QMP_TIMEOUT,
    ) -> dict[str, Any]:
        result = await self._exec_any(guest, command, args, timeout)
        return result if isinstance(result, dict) else {}

    async def _exec_any(
        self, guest: _Guest, command: str, args: dict[str, object] | None = None,
        timeout: float = QMP_TIMEOUT,
    ) -> object:
        """One QMP command; its result as QEMU gave it (a dict, a list...)."""
        if guest.exited or guest.qmp is None:
            why = guest.exit_reason or "no monitor connection"
            raise BackendError(f"guest {guest.uuid} is not running ({why})")
        try:
            result = await asyncio.wait_for(guest.qmp.execute(command, args), timeout)
        except ExecuteError as exc:
            raise QmpCommandFailed(command, str(exc), exc.error_class) from None
        except TimeoutError:
            raise BackendError(f"{command}: QEMU did not answer in {timeout} s") from None
        except (ExecInterruptedError, QMPError, EOFError, OSError) as exc:
            raise BackendError(
                f"{command}: lost the monitor connection to QEMU ({exc or type(exc).__name__})"
            ) from None
        return result

    async def _cont(self, guest: _Guest) -> None:
        """Run the vCPUs.  QEMU answers once they run (the RESUME event follows), so no
        ``query-status`` round trip: under TCG it waits behind the starting vCPU for a while."""
        seen = guest.status_events
        await self._exec(guest, "cont")
        if guest.status_events == seen:  # else the events (RESUME, maybe more) already tell
            guest.status = "running"

    async def _refresh_status(self, guest: _Guest) -> str:
        info = await self._exec(guest, "query-status")
        guest.status = str(info.get("status", guest.status))
        return guest.status

    async def _stop_process(self, guest: _Guest) -> None:
        """``quit``, then SIGKILL after a grace period; returns once the process is reaped."""
        if not guest.exited and guest.qmp is not None:
            with contextlib.suppress(BackendError):
                await self._exec(guest, "quit", timeout=1.0)
        if not await self._wait_exit(guest, QUIT_GRACE):
            self._kill(guest)
            if not await self._wait_exit(guest, KILL_TIMEOUT):
                log.error("qemu backend: guest %s (pid %d) survives SIGKILL", guest.uuid,
                          guest.pid)

    async def _wait_exit(self, guest: _Guest, timeout: float) -> bool:
        task = guest.exit_task
        if task is None:
            return guest.exited
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        return task.done()

    def _kill(self, guest: _Guest) -> None:
        if guest.exited:
            return
        try:
            if guest.proc is not None:
                guest.proc.kill()
            elif guest.pidfd >= 0:
                signal.pidfd_send_signal(guest.pidfd, signal.SIGKILL)
            else:
                os.kill(guest.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _forget(self, guest: _Guest) -> None:
        if self._guests.get(guest.uuid) is guest:
            del self._guests[guest.uuid]

    async def _detach(self, guest: _Guest) -> None:
        """Stop watching the guest but leave its QEMU running (``close``)."""
        tasks = [*guest.tasks, *([guest.exit_task] if guest.exit_task else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if guest.qmp is not None:
            with contextlib.suppress(Exception):
                await guest.qmp.disconnect()
            guest.qmp = None
        guest.notify()
        if guest.proc is not None and guest.proc.returncode is None:
            _release(guest.proc)
        if guest.pidfd >= 0:
            os.close(guest.pidfd)
            guest.pidfd = -1

    async def _take_over(self, gdir: Path) -> None:
        """A guest left running by an earlier instance: check it is QEMU and reconnect."""
        uuid = gdir.name
        try:
            pid = int((gdir / PID_NAME).read_text().strip())
        except (OSError, ValueError):
            pid = 0
        pidfd = -1
        with contextlib.suppress(AttributeError, OSError):
            pidfd = os.pidfd_open(pid) if pid > 0 else -1  # first: no pid reuse after the check
        if not _runs_in(pid, gdir):
            log.info("qemu backend: guest %s is gone (stale pid file)", uuid)
            if pidfd >= 0:
                os.close(pidfd)
            for name in (PID_NAME, SOCKET_NAME):
                with contextlib.suppress(FileNotFoundError):
                    (gdir / name).unlink()
            return
        guest = _Guest(uuid=uuid, dir=gdir, pid=pid, pidfd=pidfd)
        try:
            guest.log_offset = (gdir / LOG_NAME).stat().st_size
        except OSError:
            guest.log_offset = 0
        guest.exit_task = asyncio.get_running_loop().create_task(self._watch_exit(guest))
        self._guests[uuid] = guest
        try:
            await self._connect(guest, RECONNECT_TIMEOUT)
            info = await self._exec(guest, "query-migrate")
        except BackendError as exc:
            log.error("qemu backend: guest %s (pid %d) does not answer on its monitor (%s): "
                      "killing it", uuid, pid, exc)
            await self._stop_process(guest)
            self._forget(guest)
            return
        status = str(info.get("status", "none"))
        if status in _POSTCOPY_STATES:
            # Past the switch to post-copy nothing can be rolled back: a cancel would restart a
            # source whose destination may run, and this guest may hold the only current copy.
            log.warning("qemu backend: guest %s is in a post-copy migration (%s): left as it is",
                        uuid, status)
        elif guest.status == "inmigrate":
            log.warning("qemu backend: guest %s was waiting for an incoming migration: "
                        "destroying it", uuid)
            await self._stop_process(guest)
            self._forget(guest)
            return
        elif status not in _TERMINAL and status != "none":
            log.warning("qemu backend: guest %s had a migration in progress (%s): cancelling",
                        uuid, status)
            with contextlib.suppress(BackendError):
                await self._exec(guest, "migrate_cancel")
        log.info("qemu backend: took over guest %s (pid %d, %s)", uuid, pid, guest.status)

    def _guest(self, uuid: str) -> _Guest:
        guest = self._guests.get(uuid)
        if guest is None or guest.exited:
            raise BackendError(f"guest {uuid} is not running")
        return guest

    # -- lifecycle --

    async def start(self, spec: GuestSpec, *, paused: bool) -> None:
        cfg = self._config(spec)
        self._check_free(spec.uuid)
        guest = await self._spawn(cfg, incoming=False)
        if not paused:
            try:
                await self._cont(guest)
            except BaseException:
                await self._stop_process(guest)
                self._forget(guest)
                raise

    async def destroy(self, uuid: str) -> None:
        guest = self._guests.get(uuid)
        if guest is None:
            return
        await self._stop_process(guest)
        self._forget(guest)

    async def pause(self, uuid: str) -> None:
        guest = self._guest(uuid)
        await self._exec(guest, "stop")
        await self._refresh_status(guest)

    async def resume(self, uuid: str) -> None:
        guest = self._guest(uuid)
        inc = guest.incoming
        if inc is not None and inc.final is None and not inc.switched:
            raise BackendError(f"guest {uuid} is waiting for its incoming migration")
        if inc is not None and inc.final is not None and inc.switched and \
                inc.final.status is not MigrationStatus.COMPLETED:
            raise BackendError(f"guest {uuid} cannot run: its post-copy migration failed before "
                               "all of its memory arrived")
        if guest.outgoing is not None and guest.outgoing.switched:
            raise BackendError(f"guest {uuid} cannot run here: it was migrated in post-copy mode "
                               "and its destination has the newest state")
        await self._cont(guest)

    def state(self, uuid: str) -> GuestRunState:
        guest = self._guests.get(uuid)
        return GuestRunState.SHUTOFF if guest is None else guest.run_state()

    def pid(self, uuid: str) -> int:
        """The QEMU process id of a running guest (for tests and diagnostics)."""
        return self._guest(uuid).pid

    async def query(self, uuid: str, command: str,
                    args: dict[str, object] | None = None) -> Any:
        """Run one QMP command on a guest (for tests and diagnostics): QEMU's result as is."""
        return await self._exec_any(self._guest(uuid), command, args)

    # -- progress / tuning / cancel --

    def progress(self, uuid: str) -> MigrationProgress:
        mig = self._progress.get(uuid)
        return MigrationProgress() if mig is None else mig.snapshot()

    async def cancel(self, uuid: str) -> None:
        """Cancel the guest's outgoing migration; no-op when none is running."""
        guest = self._guests.get(uuid)
        if guest is None or guest.exited:
            return
        mig = guest.outgoing
        if mig is None or mig.done.is_set():
            return
        if mig.switched:
            raise BackendError("cannot cancel migration in post-copy mode")
        if mig.postcopy_requested:
            # QEMU may switch at any moment, and a cancel after the switch restarts the source
            # while the destination holds the newest state.
            raise BackendError("cannot cancel migration: the switch to post-copy was requested")
        mig.cancel_requested = True
        if mig.issued:
            await self._exec(guest, "migrate_cancel")

    async def set_tuning(
        self,
        uuid: str,
        *,
        bandwidth_bytes_per_s: int | None = None,
        max_downtime_ms: int | None = None,
    ) -> None:
        guest = self._guest(uuid)
        params: dict[str, object] = {}
        if bandwidth_bytes_per_s is not None:
            params["max-bandwidth"] = _bandwidth(bandwidth_bytes_per_s)
        if max_downtime_ms is not None:
            params["downtime-limit"] = _downtime(max_downtime_ms)
        if params:
            await self._exec(guest, "migrate-set-parameters", params)

    async def start_postcopy(self, uuid: str) -> None:
        """``migrate-start-postcopy``: QEMU switches at its next iteration; ``outgoing`` returns."""
        guest = self._guest(uuid)
        mig = guest.outgoing
        if mig is None or mig.done.is_set() or mig.final is not None:
            raise BackendError(f"no outgoing migration is running for guest {uuid}")
        if not mig.tuning.postcopy:
            raise BackendError("migration was not started with post-copy enabled")
        if mig.cancel_requested:
            raise BackendError("the migration is being cancelled")
        if mig.switched or mig.postcopy_requested:
            return
        mig.postcopy_requested = True
        if mig.issued:  # else _run_outgoing asks right after "migrate"
            await self._exec(guest, "migrate-start-postcopy")

    async def outgoing_wait(self, uuid: str) -> MigrationProgress:
        """After a switch to post-copy: wait until the last page was sent."""
        mig = self._progress.get(uuid)
        if not isinstance(mig, _Outgoing):
            raise BackendError(f"no outgoing migration for guest {uuid}")
        if not mig.switched:
            return mig.snapshot()
        await mig.done.wait()
        final = mig.snapshot()
        if final.status is MigrationStatus.COMPLETED:
            return final
        raise PostcopyFailed(final.error or "post-copy migration failed")

    # -- incoming --

    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress,
                             tuning: MigrationTuning | None = None) -> int:
        if listen.transport != "tcp":
            raise BackendError(f"qemu backend: unsupported migration transport {listen.transport}")
        tuning = tuning or MigrationTuning()
        cfg = self._config(spec)
        self._check_free(spec.uuid)
        guest = await self._spawn(cfg, incoming=True)
        inc = _Incoming()
        guest.incoming = inc
        try:
            caps, params = _stream_settings(tuning, incoming=True)
            await self._exec(guest, "migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}, *caps]})
            if params:
                await self._exec(guest, "migrate-set-parameters", params)
            # A plain stream may switch to post-copy (QEMU needs the capability on this side
            # before it starts; unused, it costs nothing): allow it unless the stream has
            # channels or compression and post-copy was not asked for.  Without userfaultfd
            # QEMU refuses: go on.
            if tuning.postcopy or not caps:
                try:
                    await self._exec(guest, "migrate-set-capabilities", {"capabilities": [
                        {"capability": "postcopy-ram", "state": True}]})
                    inc.postcopy = True
                except QmpCommandFailed as exc:
                    log.warning("qemu backend: guest %s: incoming post-copy unavailable: %s",
                                spec.uuid, exc.desc)
            try:
                await self._exec(guest, "migrate-incoming", {"uri": str(listen)})
            except QmpCommandFailed as exc:
                if "Address already in use" in exc.desc:
                    raise OSError(errno.EADDRINUSE, f"{exc.desc} ({listen})") from None
                raise
            port = listen.port or await self._incoming_port(guest)
        except BaseException:
            await self._stop_process(guest)
            self._forget(guest)
            raise
        self._progress[spec.uuid] = inc
        return port

    async def _incoming_port(self, guest: _Guest) -> int:
        info = await self._exec(guest, "query-migrate")
        for addr in info.get("socket-address") or ():
            if isinstance(addr, dict) and addr.get("port"):
                return int(addr["port"])
        raise BackendError("QEMU did not report the port it listens on")

    async def incoming_wait(self, uuid: str) -> MigrationProgress:
        guest = self._guests.get(uuid)
        inc = guest.incoming if guest is not None else None
        if guest is None or inc is None:
            raise MigrationFailed(f"no incoming migration for guest {uuid}")
        failed_at = 0.0
        while True:
            changed = guest.changed()
            if inc.final is not None:
                if inc.final.status is MigrationStatus.COMPLETED:
                    return inc.final
                if inc.switched:
                    raise PostcopyFailed(inc.final.error or "post-copy migration failed")
                raise MigrationFailed(inc.final.error or "incoming migration failed")
            if guest.mig_status == "completed":
                return await self._incoming_completed(guest, inc)
            if inc.switched and guest.mig_status in _POSTCOPY_BROKEN:
                await self._incoming_postcopy_failed(guest, inc)
                continue
            timeout: float | None = None
            if guest.mig_status in ("failed", "cancelled"):
                # QEMU exits by itself after a failed incoming migration: wait for its message.
                failed_at = failed_at or time.monotonic()
                timeout = failed_at + EXIT_REASON_WAIT - time.monotonic()
                if timeout <= 0:
                    inc.error = inc.error or f"incoming migration {guest.mig_status}"
                    inc.status = MigrationStatus.FAILED
                    inc.final = replace(inc.snapshot(), status=MigrationStatus.FAILED,
                                        error=inc.error)
                    continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), timeout)

    async def _incoming_postcopy_failed(self, guest: _Guest, inc: _Incoming) -> None:
        """The stream broke after the switch: keep the guest, never resumed, and its memory.

        QEMU waits in ``postcopy-paused`` for a recovery.  Under KVM the vCPUs are stopped, as
        libvirt does, so that the guest does not hang on a page that will never come.  Under TCG
        they are left as they are: a vCPU blocked on a missing page cannot leave its fault, and
        ``stop`` would wait for it forever with the monitor wedged (measured with QEMU 7.2), so
        QEMU still says ``running`` while the guest is frozen at its first missing page.
        """
        status = guest.mig_status
        error = f"post-copy migration broke (QEMU: {status})"
        with contextlib.suppress(BackendError):  # (a QEMU in this state may answer slowly)
            info = await self._exec(guest, "query-migrate", timeout=POSTCOPY_STOP_TIMEOUT)
            if info.get("error-desc"):
                error += f": {info['error-desc']}"
        if tail := guest.log_tail():
            error += f": {tail}"
        if not guest.exited:
            try:
                kvm = await self._exec(guest, "query-kvm", timeout=POSTCOPY_STOP_TIMEOUT)
                if kvm.get("enabled") and await self._refresh_status(guest) == "running":
                    await self._exec(guest, "stop", timeout=POSTCOPY_STOP_TIMEOUT)
                    await self._refresh_status(guest)
            except BackendError as exc:
                log.error("qemu backend: cannot pause guest %s after its post-copy migration "
                          "failed: %s", guest.uuid, exc)
        if inc.final is None:  # (the guest may have exited meanwhile)
            log.error("qemu backend: guest %s: %s", guest.uuid, error)
            inc.error = error
            inc.status = MigrationStatus.FAILED
            inc.final = replace(inc.snapshot(), status=MigrationStatus.FAILED, error=error)

    async def _incoming_completed(self, guest: _Guest, inc: _Incoming) -> MigrationProgress:
        now = time.monotonic()
        try:
            info = await self._exec(guest, "query-migrate")
            await self._refresh_status(guest)
        except BackendError:
            info = {}
        base = progress_from_query(info)
        inc.status = MigrationStatus.COMPLETED
        inc.final = replace(
            base,
            status=MigrationStatus.COMPLETED,
            remaining_bytes=0,
            setup_time_ms=base.setup_time_ms or _ms((inc.active_at or now) - inc.started),
            total_time_ms=base.total_time_ms or _ms(now - inc.started),
            error="",
        )
        return inc.final

    # -- outgoing --

    async def outgoing(
        self, uuid: str, dest: StreamAddress, tuning: MigrationTuning
    ) -> MigrationProgress:
        guest = self._guest(uuid)
        if guest.incoming is not None and guest.incoming.final is None:
            raise BackendError(f"guest {uuid} is waiting for its incoming migration")
        if guest.outgoing is not None and not guest.outgoing.done.is_set():
            raise BackendError(f"guest {uuid} is already being migrated")
        if dest.transport != "tcp":
            raise BackendError(f"qemu backend: unsupported migration transport {dest.transport}")
        mig = _Outgoing(tuning=tuning, was_running=guest.status == "running")
        guest.outgoing = mig
        self._progress[uuid] = mig
        try:
            return await self._run_outgoing(guest, mig, dest)
        except asyncio.CancelledError:
            # Our caller gave up: stop the migration too, and put the source back -- unless
            # post-copy was asked for: QEMU may switch at any moment, and a cancel after the
            # switch would restart the source.  Then the migration goes on by itself.
            if mig.postcopy_requested and not mig.switched:
                await self._wait_switch_or_end(guest, mig, CANCEL_TIMEOUT)
            if mig.switched:
                self._ensure_follower(guest, mig)
                raise
            if mig.postcopy_requested and guest.mig_status not in _TERMINAL:
                mig.final = replace(mig.last, status=MigrationStatus.FAILED,
                                    error="migration no longer followed")
                raise
            if mig.issued:
                with contextlib.suppress(BackendError):
                    await self._cancel_and_wait(guest, mig)
            await self._settle_failed(guest, mig, MigrationCancelled("migration cancelled"))
            raise
        finally:
            if mig.switched:
                self._ensure_follower(guest, mig)  # it sets ``done`` at the very end
            else:
                mig.done.set()

    async def _run_outgoing(
        self, guest: _Guest, mig: _Outgoing, dest: StreamAddress
    ) -> MigrationProgress:
        tuning = mig.tuning
        try:
            stream_caps, stream_params = _stream_settings(tuning, incoming=False)
            await self._exec(guest, "migrate-set-capabilities", {"capabilities": [
                *stream_caps,
                {"capability": "events", "state": True},
                {"capability": "auto-converge", "state": tuning.auto_converge},
                # Both sides need it before the stream starts (the destination always has it).
                {"capability": "postcopy-ram", "state": tuning.postcopy},
                # The destination reports back when it has loaded everything: "completed" then
                # means the stream arrived, not that it left (a tunnel may still hold data).
                {"capability": "return-path", "state": True},
            ]})
            params: dict[str, object] = {
                "max-bandwidth": _bandwidth(tuning.bandwidth_bytes_per_s),
                "downtime-limit": _downtime(tuning.max_downtime_ms),
                **stream_params,
            }
            if tuning.auto_converge:
                params["cpu-throttle-initial"] = min(99, max(1, tuning.auto_converge_initial))
                params["cpu-throttle-increment"] = min(99, max(1, tuning.auto_converge_increment))
            if tuning.postcopy:  # QEMU: 0 is unlimited, as ours
                params["max-postcopy-bandwidth"] = max(0, min(
                    tuning.postcopy_bandwidth_bytes_per_s, UNLIMITED_BANDWIDTH))
            await self._exec(guest, "migrate-set-parameters", params)
            if not mig.cancel_requested:
                guest.mig_status = "setup"
                mig.issued = True
                await self._exec(guest, "migrate", {"uri": str(dest)})
                if mig.cancel_requested:  # cancel() came while "migrate" was on its way
                    await self._exec(guest, "migrate_cancel")
                elif mig.postcopy_requested:  # start_postcopy() came before "migrate"
                    try:
                        await self._exec(guest, "migrate-start-postcopy")
                    except QmpCommandFailed as exc:  # it goes on as pre-copy
                        log.error("qemu backend: guest %s: cannot switch to post-copy: %s",
                                  guest.uuid, exc)
        except BackendError as exc:
            if mig.switched:  # (a command failed after the switch: never roll back)
                return await self._outgoing_switched(guest, mig)
            raise await self._settle_failed(guest, mig, MigrationFailed(str(exc))) from None
        if not mig.issued:  # cancelled before it started
            raise await self._settle_failed(guest, mig, MigrationCancelled("migration cancelled"))
        poller = self._spawn_task(guest, self._poll_progress(guest, mig))
        try:
            while True:
                changed = guest.changed()
                if mig.switched:
                    return await self._outgoing_switched(guest, mig)
                if guest.exited:
                    quit_error = MigrationFailed(f"guest unexpectedly quit: {guest.exit_reason}")
                    raise await self._settle_failed(guest, mig, quit_error)
                if guest.mig_status in _TERMINAL:
                    break
                await changed.wait()
        finally:
            if not mig.switched:
                poller.cancel()  # (after the switch it keeps progress() fresh until the end)
        if guest.mig_status == "completed":
            return await self._outgoing_completed(guest, mig)
        try:
            info = await self._exec(guest, "query-migrate")
        except BackendError:
            info = {}
        mig.last = replace(progress_from_query(info), status=_STATUS_MAP[guest.mig_status])
        error: MigrationFailed | MigrationCancelled
        if mig.abort_reason:
            error = MigrationFailed(mig.abort_reason)
        elif guest.mig_status == "cancelled" or mig.cancel_requested:
            # A cancel that finds the stream blocked in a write ends as "failed" ("Unable to
            # write to socket: Broken pipe": the cancel shut the socket down); we asked for it.
            error = MigrationCancelled("migration cancelled")
        else:
            error = MigrationFailed(mig.last.error or "migration failed")
        raise await self._settle_failed(guest, mig, error)

    async def _outgoing_switched(self, guest: _Guest, mig: _Outgoing) -> MigrationProgress:
        """QEMU switched to post-copy: the source is stopped for good; the rest streams on."""
        with contextlib.suppress(BackendError):
            await self._refresh_status(guest)
        with contextlib.suppress(BackendError):
            info = await self._exec(guest, "query-migrate")
            if mig.final is None:
                mig.last = progress_from_query(info)
        switched = replace(mig.last, status=MigrationStatus.POSTCOPY_ACTIVE)
        if mig.final is None and mig.last.status not in (MigrationStatus.COMPLETED,
                                                         MigrationStatus.FAILED):
            mig.last = switched
        self._ensure_follower(guest, mig)
        return switched

    def _ensure_follower(self, guest: _Guest, mig: _Outgoing) -> None:
        if mig.follower is None and not mig.done.is_set():
            mig.follower = self._spawn_task(guest, self._follow_postcopy(guest, mig))

    async def _wait_switch_or_end(self, guest: _Guest, mig: _Outgoing, timeout: float) -> None:
        """Post-copy was asked for: wait (bounded) until QEMU switched or the migration ended."""
        await _wait_guest(guest, timeout, lambda: mig.switched or guest.mig_status in _TERMINAL
                          or guest.exited or guest.qmp is None)

    async def _follow_postcopy(self, guest: _Guest, mig: _Outgoing) -> None:
        """After the switch: wait for the last page, or for the stream to break.

        The source is never resumed here: past the switch the destination holds the newest state.
        A broken stream leaves QEMU in ``postcopy-paused`` (a recovery could follow, but virtmig
        does not attempt one) and the source paused.
        """
        try:
            while True:
                changed = guest.changed()
                if guest.mig_status == "completed" and not guest.exited:
                    await self._outgoing_completed(guest, mig)
                    return
                if guest.exited:
                    error = f"guest unexpectedly quit: {guest.exit_reason}"
                    break
                if guest.mig_status in _POSTCOPY_BROKEN:
                    error = f"post-copy migration broke (QEMU: {guest.mig_status})"
                    with contextlib.suppress(BackendError):
                        info = await self._exec(guest, "query-migrate")
                        mig.last = progress_from_query(info)
                        if info.get("error-desc"):
                            error += f": {info['error-desc']}"
                    if tail := guest.log_tail():
                        error += f": {tail}"
                    with contextlib.suppress(BackendError):
                        await self._refresh_status(guest)
                    break
                await changed.wait()
            log.error("qemu backend: guest %s: %s", guest.uuid, error)
            mig.final = replace(mig.last, status=MigrationStatus.FAILED, error=error)
        finally:
            if mig.final is None:  # cancelled: the guest quit, or the backend closed
                error = (f"guest unexpectedly quit: {guest.exit_reason}" if guest.exited
                         else mig.abort_reason or "post-copy migration no longer followed")
                mig.final = replace(mig.last, status=MigrationStatus.FAILED, error=error)
            mig.done.set()

    async def _poll_progress(self, guest: _Guest, mig: _Outgoing) -> None:
        """Keep ``mig.last`` fresh: every PROGRESS_INTERVAL and at every QMP event."""
        while not mig.done.is_set():
            changed = guest.changed()
            try:
                info = await self._exec(guest, "query-migrate")
            except BackendError:
                return
            if mig.final is None:
                mig.last = progress_from_query(info)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), PROGRESS_INTERVAL)

    async def _outgoing_completed(self, guest: _Guest, mig: _Outgoing) -> MigrationProgress:
        """The stream completed: final statistics; the source stays paused (postmigrate)."""
        info: dict[str, Any] = {}
        for _ in range(FINAL_STATS_RETRIES):
            try:
                info = await self._exec(guest, "query-migrate")
            except BackendError:
                break
            if _int(info, "total-time") > 0:
                break
            await asyncio.sleep(0.01)
        with contextlib.suppress(BackendError):
            await self._refresh_status(guest)
        if guest.status == "running":  # never expected: QEMU leaves it in postmigrate
            log.error("qemu backend: guest %s still runs after its migration completed",
                      guest.uuid)
        final = replace(progress_from_query(info), status=MigrationStatus.COMPLETED,
                        remaining_bytes=0, error="")
        mig.final = final
        return final

    async def _settle_failed(
        self, guest: _Guest, mig: _Outgoing, error: MigrationFailed | MigrationCancelled
    ) -> MigrationFailed | MigrationCancelled:
        """The migration failed or was cancelled: the source runs again if it ran before."""
        if not guest.exited:
            try:
                status = await self._refresh_status(guest)
                if mig.was_running and status != "running":
                    # QEMU restarts a guest it stopped itself; this covers the rest (never a
                    # completed migration: that path does not come here).
                    await self._exec(guest, "cont")
                    await self._refresh_status(guest)
            except BackendError as exc:
                log.error("qemu backend: cannot restore guest %s after a failed migration: %s",
                          guest.uuid, exc)
        outcome = (MigrationStatus.CANCELLED if isinstance(error, MigrationCancelled)
                   else MigrationStatus.FAILED)
        mig.final = replace(mig.last, status=outcome, error=str(error))
        return error

    async def _cancel_and_wait(self, guest: _Guest, mig: _Outgoing) -> None:
        mig.cancel_requested = True
        await self._exec(guest, "migrate_cancel")
        await _wait_guest(guest, CANCEL_TIMEOUT,
                          lambda: guest.mig_status in _TERMINAL or guest.exited)


async def _wait_guest(guest: _Guest, timeout: float, done: Callable[[], bool]) -> None:
    """Wait until ``done()``, re-checked at each change of the guest, for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while not done():
        changed = guest.changed()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), remaining)


def _stream_settings(
    tuning: MigrationTuning, *, incoming: bool
) -> tuple[list[dict[str, object]], dict[str, object]]:
    """QEMU capabilities and parameters for multifd channels and compression, on one side.

    Capabilities are set on both sides (the destination must expect channels and compressed
    pages before the stream starts); levels and compression threads are the source's,
    decompression threads the destination's.  Capabilities that are off are left out: QEMU's
    defaults are off, and a QEMU without one of them still runs plain migrations.
    """
    caps: list[dict[str, object]] = []
    params: dict[str, object] = {}
    comp = tuning.compression
    if tuning.parallel_connections:
        caps.append({"capability": "multifd", "state": True})
        params["multifd-channels"] = tuning.parallel_connections
        if comp.multifd_method:
            params["multifd-compression"] = comp.multifd_method
        if not incoming and comp.zlib_level is not None:
            params["multifd-zlib-level"] = comp.zlib_level
        if not incoming and comp.zstd_level is not None:
            params["multifd-zstd-level"] = comp.zstd_level
    if "xbzrle" in comp.methods:
        caps.append({"capability": "xbzrle", "state": True})
        if not incoming and comp.xbzrle_cache is not None:
            params["xbzrle-cache-size"] = comp.xbzrle_cache
    if "mt" in comp.methods:
        caps.append({"capability": "compress", "state": True})
        if incoming and comp.mt_dthreads is not None:
            params["decompress-threads"] = comp.mt_dthreads
        if not incoming and comp.mt_threads is not None:
            params["compress-threads"] = comp.mt_threads
        if not incoming and comp.mt_level is not None:
            params["compress-level"] = comp.mt_level
    return caps, params


def _bandwidth(bytes_per_s: int) -> int:
    return UNLIMITED_BANDWIDTH if bytes_per_s <= 0 else min(bytes_per_s, UNLIMITED_BANDWIDTH)


def _downtime(ms: int) -> int:
    return min(MAX_DOWNTIME_LIMIT_MS, max(1, ms))


def _guest_dirs(state_dir: Path) -> list[Path]:
    """The guest folders with a pid file (creating ``state_dir`` if needed)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    return [c for c in sorted(state_dir.iterdir()) if c.is_dir() and (c / PID_NAME).exists()]


def _prepare_dir(gdir: Path) -> None:
    """The guest folder exists, without a stale monitor socket."""
    gdir.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        (gdir / SOCKET_NAME).unlink()


@contextlib.contextmanager
def _listen_unix(path: Path) -> Iterator[socket.socket]:
    """A unix socket listening at ``path``, for QEMU to inherit; closed here once it has."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_path(path) as reachable:
            sock.bind(reachable)
        sock.listen(4)
        yield sock
    except OSError as exc:
        raise BackendError(f"cannot create QEMU's monitor socket {path}: {exc}") from None
    finally:
        sock.close()


def _open_log(gdir: Path, argv: list[str]) -> BinaryIO:
    """Open the guest folder's qemu.log for appending, with a header for this start."""
    logf = open(gdir / LOG_NAME, "ab")  # noqa: SIM115 - the caller closes it
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    logf.write(f"virtmig: {stamp} starting: {shlex.join(argv)}\n".encode())
    logf.flush()
    return logf


def _runs_in(pid: int, gdir: Path) -> bool:
    """Whether ``pid`` is a live process whose working directory is ``gdir`` (our QEMU)."""
    if pid <= 0 or not _alive(pid):
        return False
    try:
        return os.readlink(f"/proc/{pid}/cwd") == str(gdir.resolve())
    except OSError:
        return False


def _write_pid(path: Path, pid: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{pid}\n")
    tmp.replace(path)
