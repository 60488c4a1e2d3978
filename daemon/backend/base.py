"""The hypervisor backend interface: plain typed values in, plain typed values out.

The daemon owns names, definitions, states with reasons, jobs and persistence; a backend only runs
guests and moves their memory.  No gRPC, XML-parsing or job types cross this boundary.

Migration, as a backend sees it::

    destination                                  source
    incoming_start(spec, addr) -> port           (guest running or paused)
       guest paused, listening                   outgoing(uuid, addr, tuning)
                                  ══ stream ══►     pre-copy iterations, then switchover:
    incoming_wait(uuid)  returns once the           source guest stopped, last pages, digest
       stream completed and the digest matched   returns final MigrationProgress (guest paused)

A failed or cancelled stream makes ``outgoing`` raise :class:`MigrationFailed` /
:class:`MigrationCancelled` with the source guest still alive (running, if it was), and makes
``incoming_wait`` raise :class:`MigrationFailed`.

Post-copy (``tuning.postcopy``)::

    destination                                  source
                                                 outgoing(...)  pre-copy as above, until
                                                 start_postcopy(uuid): the source guest stops,
                                                 outgoing returns progress POSTCOPY_ACTIVE
    resume(uuid): the guest runs, pages it        remaining pages stream in the background;
       touches before they arrived are pulled        pulled pages go first
    incoming_wait(uuid) returns once every page   outgoing_wait(uuid) returns the final progress
       arrived and the digest matched

Once switched, nothing can be rolled back: a broken stream raises :class:`PostcopyFailed` from
``incoming_wait`` and ``outgoing_wait``, and both guests are left paused (never resumed by the
backend).

What a guest does by itself -- powers off, dies, pauses on an I/O error -- a backend reports
through the listener the daemon installs (:meth:`Backend.set_listener`, one
:class:`GuestChange` per report); never what the daemon caused (a ``destroy``, a backend's own
stop).  The daemon applies it once no migration job owns the guest
(``virtmig.daemon.core.Daemon.guest_changed``).
"""

from __future__ import annotations

import abc
import enum
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from virtmig.proto.compat import Compression
from virtmig.proto.flags import NO_FLAGS, MigrateFlags


class GuestRunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    SHUTOFF = "shutoff"  # not running (never started, destroyed, or died)


class GuestChange(enum.Enum):
    """What a guest did by itself, outside any call of the daemon (see :meth:`Backend.report`)."""

    SHUTDOWN_GUEST = "shutdown-guest"  # it powered itself off, and its process ended
    SHUTDOWN_HOST = "shutdown-host"  # its process ended after a shutdown the host asked (signal)
    CRASHED = "crashed"  # its process ended without a shutdown (killed, crashed)
    PAUSED_IOERROR = "paused-ioerror"  # its vCPUs stopped on a disk error (error policy 'stop')
    PAUSED_WATCHDOG = "paused-watchdog"  # its vCPUs stopped by its watchdog (action 'pause')

    @property
    def ended(self) -> bool:
        """The guest's process ended (it is shut off)."""
        return self in (GuestChange.SHUTDOWN_GUEST, GuestChange.SHUTDOWN_HOST,
                        GuestChange.CRASHED)


#: The daemon's listener: ``(uuid, change)``, called in the event loop, must not block.
GuestListener = Callable[[str, GuestChange], None]


@dataclass(frozen=True)
class GuestSpec:
    """What a backend needs to run a guest."""

    uuid: str
    name: str
    memory_bytes: int
    vcpus: int
    # Backend options from the domain XML's <metadata><virtmig:BACKEND .../> element's attributes.
    options: Mapping[str, str] = field(default_factory=dict)
    # The full domain XML, for backends that build a command line from devices.
    xml: str = ""
    # ``<os><type machine=...>`` ("": the backend's default), for machine-dependent limits.
    machine: str = ""


#: The vCPU cap of a backend that names none (the test backend's default ``test_max_vcpus``).
DEFAULT_MAX_VCPUS = 4096


@dataclass(frozen=True)
class GuestLimits:
    """The largest guest a backend can host; ``*_source`` says where a limit comes from (it is
    part of the error a definition beyond it gets)."""

    max_memory_bytes: int
    max_vcpus: int
    memory_source: str = "the host's RAM"
    vcpus_source: str = "the backend's limit"


def host_memory_bytes() -> int:
    """The host's physical RAM in bytes (``sysconf``); 0 when the system does not say."""
    try:
        return max(0, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError):
        return 0


@dataclass(frozen=True)
class StreamAddress:
    """Where the migration data stream goes: ``tcp`` host+port (``unix`` path reserved)."""

    host: str
    port: int
    transport: str = "tcp"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class StreamTls:
    """``VIR_MIGRATE_TLS``: the data stream is TLS 1.3, mutually authenticated with the host's PKI.

    The destination presents its server certificate, the source its client certificate (a host
    certificate from ``virtmig pki issue --host`` is both); each accepts only a peer whose
    certificate the CA in ``ca_cert`` signed.  The source also requires the destination's
    certificate to name ``hostname`` (DNS or IP SAN).  Paths, not bytes: the test backend loads
    them into an ``ssl.SSLContext``, the qemu backend hands QEMU a copy it may read.
    """

    ca_cert: Path
    cert: Path
    key: Path
    hostname: str = ""  # source only: the name the destination's certificate must carry


@dataclass(frozen=True)
class MigrationTuning:
    bandwidth_bytes_per_s: int = 0  # 0: unlimited
    max_downtime_ms: int = 300
    live: bool = True
    # Post-copy allowed (capability on both sides); the switch happens on start_postcopy().
    postcopy: bool = False
    postcopy_bandwidth_bytes_per_s: int = 0  # 0: unlimited
    # Auto-converge: throttle the guest's vCPUs (and so its dirty rate) when pre-copy does not
    # converge, starting at ``initial`` percent and adding ``increment`` per non-converging pass.
    auto_converge: bool = False
    auto_converge_initial: int = 20
    auto_converge_increment: int = 10
    # Multifd (PARALLEL): this many channels; 0: one plain stream.  Only for backends whose
    # ``extra_flags`` include PARALLEL; the destination gets the same value.
    parallel_connections: int = 0
    # COMPRESSED: methods and their settings (``compression.methods`` empty: none); only for
    # backends whose ``extra_flags`` include COMPRESSED.
    compression: Compression = field(default_factory=Compression)
    # TLS on the data stream (None: plain); only for backends whose ``extra_flags`` include TLS.
    # Both sides get it: the destination's server side, the source's client side.
    tls: StreamTls | None = None
    # The per-migration secret the destination's Prepare chose (carried to the source in the
    # cookie): a backend that can, binds its stream to it, so the destination accepts only the
    # source of the migration it prepared and the source streams only to that destination.
    # "": none (a peer that sent no token).
    stream_token: str = field(default="", repr=False)


class MigrationStatus(enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class MigrationProgress:
    status: MigrationStatus = MigrationStatus.NONE
    total_bytes: int = 0
    processed_bytes: int = 0
    remaining_bytes: int = 0
    iteration: int = 0
    dirty_rate_pages_per_s: int = 0
    bandwidth_bytes_per_s: int = 0
    expected_downtime_ms: int = 0
    downtime_ms: int = 0
    setup_time_ms: int = 0
    total_time_ms: int = 0
    page_size: int = 4096
    normal_pages: int = 0
    postcopy_requests: int = 0
    throttle_percent: int = 0  # auto-converge CPU throttle in force
    xbzrle: XbzrleStats | None = None  # with xbzrle compression only
    error: str = ""
    # Outgoing: the source's vCPUs were stopped by this migration (its switchover began).  A
    # backend that cannot tell says True; a failed live migration that never stopped the guest
    # leaves it as it was (libvirt's ``running (booted)``), one that did resumes it as
    # ``running (migration canceled)``.
    source_stopped: bool = True


@dataclass(frozen=True)
class XbzrleStats:
    """The xbzrle (delta) compression cache's work, as libvirt's ``compression_*`` stats."""

    cache_bytes: int = 0
    compressed_bytes: int = 0
    pages: int = 0
    cache_misses: int = 0
    overflows: int = 0


class BackendError(Exception):
    """A backend operation failed; ``str()`` says why in the backend's words."""


class MigrationFailed(BackendError):
    pass


class MigrationCancelled(BackendError):
    pass


class PostcopyFailed(MigrationFailed):
    """The stream broke after the switch to post-copy: neither side can be resumed safely."""


class Backend(abc.ABC):
    """One hypervisor.  Guests are keyed by UUID (canonical lowercase string)."""

    name: str = ""
    # Which of ``compat.BACKEND_FLAGS`` this backend acts on (the daemon refuses the others).
    extra_flags: MigrateFlags = NO_FLAGS
    _listener: GuestListener | None = None

    def set_listener(self, listener: GuestListener | None) -> None:
        """Install (None: remove) the daemon's listener for what guests do by themselves."""
        self._listener = listener

    def report(self, uuid: str, change: GuestChange) -> None:
        """Tell the daemon's listener (if any) that guest ``uuid`` did ``change`` by itself.  A
        backend never reports what the daemon caused (``destroy``, its own stop of a guest);
        one whose guests cannot act by themselves (the test backend) never calls it."""
        if self._listener is not None:
            self._listener(uuid, change)

    async def open(self, state_dir: Path) -> None:  # noqa: B027 - optional hook
        """Called once before use; ``state_dir`` is the backend's own folder."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Called once at daemon shutdown."""

    def validate(self, spec: GuestSpec) -> None:  # noqa: B027 - optional hook
        """Refuse (``ConfigUnsupported``) what this backend cannot run, at define time."""

    def canonicalize(self, spec: GuestSpec, *, define: bool = False) -> str:
        """``spec``'s domain XML as the daemon stores it (at define and Prepare, before
        ``validate``): a backend pins there what must be the same on every host (the qemu
        backend: the concrete machine type).  ``define``: a definition the user gives (define,
        create), where new defaults may apply (libvirt's ABI update; the qemu backend: q35's
        default USB controller), not a migration's.  Default: unchanged."""
        del define
        return spec.xml

    def live_xml(self, uuid: str, xml: str) -> str:
        """The live definition of guest ``uuid``, just started (or started for an incoming
        migration) from ``xml``: what the backend chose at start written in (the qemu backend:
        a pty's path, the VNC port), as libvirt's live XML shows it.  Default: unchanged."""
        del uuid
        return xml

    async def expand(self, spec: GuestSpec) -> str:
        """``spec``'s domain XML as it runs (before each start and incoming migration, after
        ``canonicalize``): what depends on the host is made concrete there (the qemu backend:
        ``<cpu mode='host-model'>`` expanded to a named model), and it becomes the running
        guest's XML -- and so what a migration's destination is sent.  Default: unchanged."""
        return spec.xml

    def check_compression(self, compression: Compression) -> None:  # noqa: B027 - optional hook
        """Refuse (``ArgumentUnsupported``) compression this backend will not run, before any
        migration phase changes anything (only called for backends whose ``extra_flags`` include
        COMPRESSED)."""

    def host_cpu(self, spec: GuestSpec) -> str:
        """A digest of this host's CPU (64 hex digits) when ``spec`` runs on the host's own CPU
        and so may only move to a host with the same one (``host-passthrough``), else ``""``:
        the source's Begin sends it in cookie A.  Default: ``""``."""
        del spec
        return ""

    def check_host_cpu(self, spec: GuestSpec, source: str) -> None:  # noqa: B027
        """Refuse (``OperationInvalid``) an incoming ``spec`` whose source host's CPU
        (``source``: :meth:`host_cpu` there, ``""`` when the source sent none) is not one it can
        run on here; called by Prepare before anything starts.  Default: accept."""

    def migration_unsafe(self, spec: GuestSpec) -> str:
        """Why migrating ``spec`` may corrupt its data (``""``: it may not): libvirt's safety
        check, which the source's Begin applies unless ``VIR_MIGRATE_UNSAFE`` or ``OFFLINE``."""
        del spec
        return ""

    def cpu_time_ns(self, uuid: str) -> int:
        """The CPU time the running guest ``uuid`` has used, in ns (``dominfo``'s ``CPU time:``;
        0: not known, or not running).  Default: 0."""
        del uuid
        return 0

    def limits(self, spec: GuestSpec) -> GuestLimits:
        """The largest guest this backend hosts (``spec``: for machine-dependent limits).

        The daemon refuses a bigger one at define, start and Prepare
        (``Daemon.validate``).  Default: the host's RAM and :data:`DEFAULT_MAX_VCPUS`.
        """
        return GuestLimits(host_memory_bytes() or 2**63 - 1, DEFAULT_MAX_VCPUS)

    @abc.abstractmethod
    async def start(self, spec: GuestSpec, *, paused: bool) -> None: ...

    @abc.abstractmethod
    async def destroy(self, uuid: str) -> None:
        """Stop the guest at once.  No error when it is not running."""

    async def retire(self, uuid: str) -> None:
        """Stop a guest that migrated away and runs on its destination (Confirm): as
        :meth:`destroy`, except that a backend may return once the guest let go of everything
        a user or another guest could use (its images, network devices, sockets), while the
        rest of its end (a process's memory freed, its reaping) finishes meanwhile; the same
        guest started again here, and :meth:`close`, wait for that.  Default: :meth:`destroy`."""
        await self.destroy(uuid)

    @abc.abstractmethod
    async def pause(self, uuid: str) -> None: ...

    @abc.abstractmethod
    async def resume(self, uuid: str) -> None: ...

    @abc.abstractmethod
    def state(self, uuid: str) -> GuestRunState: ...

    @abc.abstractmethod
    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress,
                             tuning: MigrationTuning | None = None) -> int:
        """Start ``spec`` paused and waiting for a stream on ``listen``; return the bound port.

        ``tuning``: what the destination must know before the stream starts (multifd channels,
        compression); the rest is the source's.
        Raises ``OSError`` (errno EADDRINUSE) when the port is taken, so the caller can retry.
        """

    @abc.abstractmethod
    async def incoming_wait(self, uuid: str) -> MigrationProgress:
        """Wait until the incoming stream completed and was verified; raise MigrationFailed."""

    @abc.abstractmethod
    async def outgoing(
        self, uuid: str, dest: StreamAddress, tuning: MigrationTuning
    ) -> MigrationProgress:
        """Migrate to ``dest``; return the final progress with the guest paused."""

    @abc.abstractmethod
    def progress(self, uuid: str) -> MigrationProgress: ...

    @abc.abstractmethod
    async def cancel(self, uuid: str) -> None:
        """Cancel a running outgoing migration; ``outgoing`` then raises MigrationCancelled."""

    # --- job control (optional: the defaults say the backend cannot) ---------------------------

    async def set_tuning(
        self,
        uuid: str,
        *,
        bandwidth_bytes_per_s: int | None = None,
        max_downtime_ms: int | None = None,
    ) -> None:
        """Change the limits of a running outgoing migration; ``None`` leaves one unchanged."""
        raise BackendError(f"the {self.name} backend cannot tune a running migration")

    async def start_postcopy(self, uuid: str) -> None:
        """Switch a running outgoing migration started with ``tuning.postcopy`` to post-copy."""
        raise BackendError(f"the {self.name} backend does not support post-copy")

    # --- the xbzrle compression cache (backends whose ``extra_flags`` include COMPRESSED) ---

    async def get_compression_cache(self, uuid: str) -> int:
        """The xbzrle cache size of running guest ``uuid``, in bytes: what its next migrations
        use, unless one sets its own (``tuning.compression.xbzrle_cache``)."""
        raise BackendError(f"the {self.name} backend has no compression cache")

    async def set_compression_cache(self, uuid: str, size: int) -> None:
        """Set that size (checked by the daemon: a power of two, at least 4096)."""
        raise BackendError(f"the {self.name} backend has no compression cache")

    async def outgoing_wait(self, uuid: str) -> MigrationProgress:
        """After ``outgoing`` returned in post-copy: wait for the last page; raise PostcopyFailed.

        After a pre-copy completion it returns the final progress at once.
        """
        return self.progress(uuid)
