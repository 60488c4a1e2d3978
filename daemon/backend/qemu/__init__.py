"""The ``qemu`` backend: real QEMU guests (``qemu-system-x86_64``) controlled over QMP.

Concern: run guests described by libvirt domain XML as QEMU processes, and move them between
hosts with QEMU's own live migration, behind the :class:`~virtmig.daemon.backend.base.Backend`
interface.  The daemon keeps names, states, jobs and the v3 protocol; this package only turns a
definition into a command line, starts, stops and watches processes, and drives QMP.

Modules, one concern each, from the bottom up (a module imports only those above it):

* :mod:`.migration` -- QEMU's migration as values: capabilities and parameters from a
  :class:`MigrationTuning`, ``query-migrate`` -> :class:`MigrationProgress`, the statuses, the
  per-migration records (``_Outgoing``, ``_Incoming``); the whole migration story is told there.
* :mod:`.guest` -- the ``_Guest`` record (one QEMU: folder, pid, monitor, run and migration
  status, watcher tasks), how QMP events change it, and the guest folder's files.
* :mod:`.confine` -- what the host allows (:class:`QemuSettings`: emulators, storage folders,
  QEMU's user and group, the sandbox), those rules as checks, and the acts that apply them:
  opening a guest's images and logs for QEMU, knowing whom QEMU runs as, KVM's availability.
* :mod:`.caps` -- what an emulator offers (machine types and aliases, CPU models and flags).
* :mod:`.xmltable` -- the honour-or-refuse table every definition is walked against.
* :mod:`.cpu` -- ``<vcpu>``/``<cpu>`` -> ``-smp``/``-cpu``; :mod:`.machine` -- clock, boot,
  features, lifecycle actions -> ``-machine`` options, ``-rtc``, ``-boot``, ``-action``, and
  machine type pinning.
* :mod:`.disks` -- ``<disk>`` and the disk controllers -> values -> command line, and
  libvirt's disk migration safety rule.
* :mod:`.firmware` -- SeaBIOS or OVMF (``<loader>``, ``<nvram>``) -> pflash drives, and the
  guest's NVRAM file made from its template; :mod:`.misc` -- balloon, RNG, watchdog, USB
  controller and inputs -> ``-device``/``-object``; :mod:`.hostcpu` -- ``host-model`` expanded to
  a named CPU model plus features, probed from QEMU.
* :mod:`.net` -- ``<interface>`` -> :class:`NicConfig` -> ``-netdev``/``-device`` (pure values);
  :mod:`.tap` -- the taps the daemon creates for them and hands to QEMU as descriptors.
* :mod:`.chardev` -- serial ports, consoles, virtio-serial channels (pty, file, unix sockets the
  daemon binds); :mod:`.graphics` -- VNC and the video card; :mod:`.pci` -- the devices' PCI
  slots, assigned at define time and put on the command line.
* :mod:`.config` -- domain XML -> :class:`QemuConfig` -> command line; the supported subset.
* :mod:`.monitor` -- QMP: the socket, the connection, one command (:class:`QmpCommandFailed`,
  :class:`QmpNoAnswer`; in band or out of band), the event pump, ``query-status`` and ``cont``.
* :mod:`.tls` -- TLS on the migration stream (``--tls``): the ``tls-creds-x509`` object each
  side's QEMU gets and drops, and why a plain stream cannot be bound to its migration.
* :mod:`.runtime` -- what QEMU chose at start (pty paths, the VNC port), read over QMP, for the
  live XML.
* :mod:`.process` -- the QEMU process: start (confined), log and pid files, exit and reaping,
  stop and SIGKILL, letting go at ``close``, taking a guest over after a restart.
* :mod:`.outgoing` -- the source's flow (``src_*``; a cancel is bounded: ``migrate_cancel``, then
  the out-of-band ``yank``); :mod:`.incoming` -- the destination's (``dst_*``).  Both are
  functions over a guest and its migration record, given the backend's QMP path.
* :mod:`.backend` -- :class:`QemuBackend`: the guests and migrations by uuid, and the interface.

Names with a leading underscore are internal to the package (used across its modules; tests
import a few from their modules); this module re-exports the public ones.
"""

from __future__ import annotations

from virtmig.daemon.backend.qemu.backend import QemuBackend
from virtmig.daemon.backend.qemu.config import (
    DEFAULT_BINARY,
    DiskConfig,
    GuestFiles,
    NicConfig,
    QemuConfig,
    SerialConfig,
    parse_config,
)
from virtmig.daemon.backend.qemu.confine import QemuSettings
from virtmig.daemon.backend.qemu.guest import LOG_NAME, PID_NAME, SOCKET_NAME
from virtmig.daemon.backend.qemu.migration import UNLIMITED_BANDWIDTH, progress_from_query
from virtmig.daemon.backend.qemu.monitor import QmpCommandFailed, QmpNoAnswer

__all__ = [
    "DEFAULT_BINARY",
    "LOG_NAME",
    "PID_NAME",
    "SOCKET_NAME",
    "UNLIMITED_BANDWIDTH",
    "DiskConfig",
    "GuestFiles",
    "NicConfig",
    "QemuBackend",
    "QemuConfig",
    "QemuSettings",
    "QmpCommandFailed",
    "QmpNoAnswer",
    "SerialConfig",
    "parse_config",
    "progress_from_query",
]
