"""The daemon's shared context: identity, configuration, registry, backend, migration ports,
the limits on clients' calls, and what it shows operators (the health status, the migration
audit with its history, the Prometheus metrics).

Every service and phase receives one :class:`Daemon`; nothing is global.  :class:`HostInfo` is
what the daemon tells callers about its host.

What a guest does by itself (the backend's :class:`~virtmig.daemon.backend.base.GuestChange`
reports: it powered off, its QEMU died, it paused on a disk error) the daemon follows as
libvirt's QEMU driver does (:meth:`Daemon.guest_changed`): ``shutoff (shutdown)`` with the
Shutdown and Stopped (Shutdown) events, ``shutoff (crashed)`` with Stopped (Failed), a transient
domain removed; ``paused (ioerror)`` / ``paused (watchdog)`` with Suspended.  Never while a
migration job owns the domain: the job's own handling wins, and what is left when it ends
is applied then (if the domain still runs here and its guest is still gone).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtmig.daemon.audit import Audit
from virtmig.daemon.backend.base import Backend, GuestChange, GuestRunState, GuestSpec
from virtmig.daemon.domxml import DomainDef, parse_domain_xml
from virtmig.daemon.events import (
    STOPPED_FAILED,
    EventBus,
    Lifecycle,
    ShutdownDetail,
    lifecycle_for,
)
from virtmig.daemon.health import Health
from virtmig.daemon.history import History
from virtmig.daemon.job import AsyncJob, JobRecord, Phase
from virtmig.daemon.limits import CallLimits
from virtmig.daemon.metrics import Metrics
from virtmig.daemon.placement import Away, Peer, PlacementStore
from virtmig.daemon.registry import DomainObj, Registry
from virtmig.daemon.settings import held
from virtmig.daemon.state import StateDir
from virtmig.daemon.statusxml import job_from_status
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.errors import ConfigUnsupported, NoSupport, PortsExhausted
from virtmig.proto.flags import (
    DomainState,
    Feature,
    PausedReason,
    ShutoffReason,
    protocol_features,
)

log = logsafe.logger(__name__)

VERSION = "0.1.0"

# While a job owns a domain whose guest changed, how often the follower looks again (a safety
# net: the end of a job wakes it at once).
_JOB_RECHECK_S = 5.0
_PAUSES = {GuestChange.PAUSED_IOERROR: PausedReason.IOERROR,
           GuestChange.PAUSED_WATCHDOG: PausedReason.WATCHDOG}


# migration_ports' default, "MIN-MAX".
_PORTS = tuple(int(p) for p in held("migration_ports").split("-"))


@dataclass(frozen=True)
class DaemonConfig:
    """Settings, from the TOML file and command-line flags (see ``virtmig.daemon.config``).

    Each default is the settings schema's (:data:`virtmig.daemon.settings.SCHEMA`, read with
    :func:`~virtmig.daemon.settings.held`): a daemon built from a ``DaemonConfig`` in-process
    gets the defaults ``virtmigd`` has.  The exceptions the schema leaves to the start:
    ``state_dir`` (required here), ``listen`` (``()``: nothing, where ``virtmigd`` takes the run
    dir's socket) and ``emulators`` (``()``: qemu-system-x86_64 on PATH).
    """

    state_dir: str
    listen: tuple[str, ...] = ()
    backend: str = held("backend")
    hostname: str = held("hostname")
    migration_port_min: int = _PORTS[0]
    migration_port_max: int = _PORTS[1]
    # Address the incoming migration stream binds to (libvirt's migration_address).
    migration_address: str = held("migration_address")
    # Host name or address put in Prepare's URI (libvirt's migration_host); default: hostname.
    migration_host: str = held("migration_host")
    # Seconds a Prepare waits for a migration port when every port of the range is held by
    # another migration (0: it fails at once).
    migration_port_wait: float = held("migration_port_wait")
    job_wait_timeout: float = held("job_wait_timeout")
    # A migration job that no caller's session owns (none was opened, or it ended) is rolled
    # back by the daemon once it has been idle this long (virtmig.daemon.migration.owner).
    incoming_job_timeout: float = held("incoming_job_timeout")
    default_max_downtime_ms: int = held("max_downtime_ms")
    # Stall watchdog: no progress for this many seconds fails the migration (0: off).
    stall_timeout_s: float = held("stall_timeout")
    # Completion timeout: seconds per GiB of guest memory (0: off), and what to do then.
    completion_timeout_per_gib_s: float = held("completion_timeout_per_gib")
    completion_timeout_action: str = held("completion_timeout_action")
    # Concurrent migrations this daemon accepts (0: no limit).
    max_outgoing_migrations: int = held("max_outgoing_migrations")
    max_incoming_migrations: int = held("max_incoming_migrations")
    # Domains this daemon holds at most (defined, running or incoming; ``registry.MAX_DOMAINS``
    # at most: a bound on the daemon's memory).
    max_domains: int = held("max_domains")
    # The test backend's guest limits (0: the host's RAM / test.guest.MAX_VCPUS) and its
    # migration streams' threads at most (TestBackend's stream_threads).
    test_max_memory_mib: int = held("test_max_memory_mib")
    test_max_vcpus: int = held("test_max_vcpus")
    test_stream_threads: int = held("test_stream_threads")
    # Clients with calls in flight, and calls in flight per client (virtmig.daemon.limits).
    max_clients: int = held("max_clients")
    max_calls_per_client: int = held("max_calls_per_client")
    # Mutual TLS: the PKI dir ("": $VIRTMIG_PKI_DIR, else the default dir), and the client
    # certificate DNs with full and with read-only access (libvirt's wildcards; see
    # virtmig.daemon.authz).  An empty full list admits every certificate the CA signed.
    pki_dir: str = held("pki_dir")
    tls_allowed_dn_list: tuple[str, ...] = held("tls_allowed_dn_list")
    tls_readonly_dn_list: tuple[str, ...] = held("tls_readonly_dn_list")
    # Plain tcp:// listeners are refused unless this says so.
    listen_insecure_tcp: bool = held("listen_insecure_tcp")
    # virtmigd-ro.sock (0666, read calls only) beside the main unix socket.
    readonly_socket: bool = held("readonly_socket")
    # Refuse a migration with neither VIR_MIGRATE_TLS nor TUNNELLED (libvirt's migrate_tls_force).
    # None: resolved at start (virtmig.daemon.main): true for the qemu backend when every network
    # listener is TLS, else false; a Daemon built without that step treats None as false.
    migrate_tls_force: bool | None = held("migrate_tls_force")
    # The qemu backend's confinement (virtmig.daemon.backend.qemu.confine owns the defaults).
    emulators: tuple[str, ...] = ()  # (): the qemu-system-x86_64 on PATH at start
    storage_dirs: tuple[str, ...] | None = held("storage_dirs")  # None: /var/lib/virtmig/images
    block_devices: tuple[str, ...] = held("block_devices")  # what a <disk type='block'> may name
    qemu_user: str = held("qemu_user")  # used when the daemon runs as root
    qemu_group: str = held("qemu_group")  # "": qemu_user's primary group
    qemu_sandbox: bool = held("qemu_sandbox")
    vnc_port_min: int = held("vnc_port_min")  # the qemu backend's VNC port range (autoport)
    vnc_port_max: int = held("vnc_port_max")
    vnc_remote_listen: bool = held("vnc_remote_listen")  # VNC on a non-loopback address allowed
    # A guest runs in one place (virtmig.daemon.locate): seconds to connect to and ask a peer
    # daemon, and the retries that settle a migration whose outcome is unknown (backoff from
    # settle_retry_min to settle_retry_max seconds, at most settle_attempts tries).
    peer_timeout: float = held("peer_timeout")
    settle_retry_min: float = held("settle_retry_min")
    settle_retry_max: float = held("settle_retry_max")
    settle_attempts: int = held("settle_attempts")
    features: tuple[str, ...] = (
        Feature.MIGRATION_PARAMS.value, Feature.V3.value, Feature.V2.value, Feature.P2P.value,
        Feature.OFFLINE.value, Feature.CHANGE_PROTECTION.value,
    )
    # The migration protocols this daemon speaks (2, 3) and whether it takes the extensible
    # parameter RPCs (*Params, with 3): what it advertises is ``features`` restricted to them
    # (``Daemon.features``), and it refuses the RPCs of the others, as an older daemon would.
    migration_protocols: tuple[int, ...] = held("migration_protocols")
    migration_params: bool = held("migration_params")
    # Logging (virtmig.daemon.logs): level, plain or json lines, and where they go.
    log_level: str = held("log_level")
    log_format: str = held("log_format")
    log_outputs: tuple[str, ...] = held("log_outputs")
    # The event loop virtmigd runs on (virtmig.daemon.eventloop): "asyncio" or "uvloop".
    event_loop: str = held("event_loop")
    # The migration history (virtmig.daemon.history): its file's size before it is rotated.
    history_max_bytes: int = held("history_max_bytes")
    # The Prometheus endpoint, "HOST:PORT" ("": off; virtmig.daemon.metrics_http).
    metrics_listen: str = held("metrics_listen")


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    host_uuid: str
    version: str
    backend: str
    features: tuple[str, ...]  # sorted
    cpus: int
    memory_kib: int
    arch: str
    active_domains: int
    inactive_domains: int


def _memory_kib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


ELSEWHERE_S = 30.0  # seconds a migration port found bound by another process is passed over


class PortAllocator:
    """Migration ports from the configured range; a port is held from before it is bound until
    released.

    When every port is held, a Prepare may wait for one (:meth:`wait`): a released port goes
    straight to the longest waiter (it stays held), so waiters are served in arrival order and a
    Prepare arriving later cannot take it first.  A port that could not be bound because another
    process holds it is :meth:`drop`-ped: freed without waking anyone, and passed over for
    :data:`ELSEWHERE_S` seconds (the range lies in Linux's ephemeral ports: a long-lived
    connection of any process may hold one; handed out again at once, it failed every Prepare
    that got it while the others were held -- 264 of 400 migrations in one run of
    bench/control_plane.py).
    """

    def __init__(self, lo: int, hi: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lo, self.hi = lo, hi
        self._clock = clock
        self._used: set[int] = set()
        self._elsewhere: dict[int, float] = {}  # port -> until when it is passed over
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    def _free(self, port: int) -> bool:
        """Nobody here holds ``port``, and it is not one found bound elsewhere lately."""
        if port in self._used:
            return False
        until = self._elsewhere.get(port)
        if until is None:
            return True
        if until > self._clock():
            return False
        del self._elsewhere[port]
        return True

    def exhausted(self) -> PortsExhausted:
        return PortsExhausted(
            f"Unable to find an unused port in range 'migration' ({self.lo}-{self.hi})")

    def candidates(self) -> list[int]:
        """The ports nobody holds, lowest first; none: RESOURCE_EXHAUSTED naming the range."""
        free = [p for p in range(self.lo, self.hi + 1) if p not in self._used]
        if not free:
            raise self.exhausted()
        return free

    def free_after(self, port: int) -> int | None:
        """The lowest port of the range above ``port`` nobody holds and none was found bound
        elsewhere lately (None: none): the port to take."""
        return next((p for p in range(max(port + 1, self.lo), self.hi + 1)
                     if self._free(p)), None)

    def held(self) -> bool:
        """Some port is held here (its release may go to a waiter)."""
        return bool(self._used)

    def take(self, port: int) -> None:
        self._used.add(port)

    def release(self, port: int) -> None:
        """Give ``port`` back: to the longest waiter if there is one, else to the range."""
        self._elsewhere.pop(port, None)  # (it was bound here)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(port)
                return
        self._used.discard(port)

    def drop(self, port: int) -> None:
        """Free ``port`` without handing it to a waiter (another process has it bound), and
        pass it over for :data:`ELSEWHERE_S` seconds."""
        self._used.discard(port)
        self._elsewhere[port] = self._clock() + ELSEWHERE_S

    async def wait(self, timeout: float, stop: asyncio.Event) -> int | None:
        """A port released within ``timeout`` seconds, now held by the caller; None if none
        came or ``stop`` was set first."""
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        stopped = asyncio.ensure_future(stop.wait())
        kept = False
        try:
            await asyncio.wait((waiter, stopped), timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            kept = waiter.done() and not stop.is_set()
            return waiter.result() if kept else None
        finally:
            stopped.cancel()
            if not waiter.done():
                waiter.cancel()
                self._waiters.remove(waiter)
            elif not kept:  # handed a port, but stopped (or cancelled) anyway: pass it on
                self.release(waiter.result())


class Daemon:
    def __init__(self, config: DaemonConfig, backend: Backend) -> None:
        self.config = config
        self.files = StateDir(Path(config.state_dir))
        self.host_uuid = self.files.host_uuid()
        self.hostname = config.hostname or os.uname().nodename
        self.backend = backend
        self.registry = Registry(self.files, job_wait_timeout=config.job_wait_timeout,
                                 max_domains=config.max_domains)
        self.ports = PortAllocator(config.migration_port_min, config.migration_port_max)
        self.sessions: set[str] = set()
        self.events = EventBus()
        # Where each guest went (virtmig.daemon.placement), and the settling of unknown outcomes.
        self.placement = PlacementStore(self.files.root / "placement")
        # Shared by every server of the daemon (the read-only socket's too).
        self.calls = CallLimits(config.max_clients, config.max_calls_per_client)
        # The gRPC health service's status, shared by the daemon's servers (NOT_SERVING until
        # virtmig.daemon.main has started every listener, and again once it stops).
        self.health = Health()
        # Phase changes and finished migrations: logs, history, metrics (virtmig.daemon.audit).
        self.history = History(Path(config.state_dir) / "history", config.history_max_bytes)
        self.audit = Audit(self.hostname, self.history)
        self.registry.observer = self.audit
        # Prometheus metrics (served when metrics_listen is set: virtmig.daemon.metrics_http).
        self.metrics = Metrics(self.registry)
        self.audit.sinks.append(self.metrics)
        # What guests do by themselves (guest_changed), followed by these tasks.
        self._following: set[asyncio.Task[None]] = set()
        backend.set_listener(self.guest_changed)

    @property
    def features(self) -> frozenset[str]:
        """What this daemon advertises: its features, restricted to the migration protocols
        it is configured to speak (``migration_protocols``, ``migration_params``)."""
        speaks = protocol_features(self.config.migration_protocols, self.config.migration_params)
        return frozenset(self.config.features) & frozenset(f.value for f in speaks)

    def speaks(self, feature: Feature, function: str) -> None:
        """Refuse an RPC of a protocol this daemon does not speak, as a daemon without it would
        (libvirt's "this function is not supported by the connection driver")."""
        if feature.value not in self.features:
            raise NoSupport(function)

    def host_info(self) -> HostInfo:
        active = self.registry.active_count()
        return HostInfo(
            hostname=self.hostname,
            host_uuid=self.host_uuid,
            version=VERSION,
            backend=self.backend.name,
            features=tuple(sorted(self.features)),
            cpus=os.cpu_count() or 1,
            memory_kib=_memory_kib(),
            arch=os.uname().machine,
            active_domains=active,
            inactive_domains=len(self.registry) - active,
        )

    async def open(self) -> list[tuple[DomainObj, etree._Element]]:
        """Load the state dir; return the domains whose guests outlived the daemon, with their
        status, for recovery (``virtmig.daemon.recovery``)."""
        await self.backend.open(self.files.backend_dir(self.backend.name))
        survivors = []
        for dom, status in self.registry.load():
            # The test backend's guests live in the daemon process: after a restart they are gone.
            # Backends whose guests outlive the daemon report them as still running.
            run = self.backend.state(dom.uuid)
            if run is not GuestRunState.SHUTOFF:
                survivors.append((dom, status))
            else:
                log.info("domain %s did not survive the daemon restart", dom.name)
                self._remember_departure(dom, status)
                self.set_state(dom, DomainState.SHUTOFF, ShutoffReason.DAEMON)
                dom.live = None
                dom.id = -1
                if not dom.persistent:
                    self.registry.remove(dom)
                else:
                    self.registry.save_status(dom)
        return survivors

    def _remember_departure(self, dom: DomainObj, status: etree._Element) -> None:
        """A guest gone with the daemon while it was being migrated away: it may run on the
        destination, so its start asks there first (an outcome not yet confirmed is settled
        when the destination answers: virtmig.daemon.locate)."""
        job = job_from_status(status)
        if job is None or job.kind is not AsyncJob.MIGRATION_OUT or not job.migration_id \
                or not (Phase.PERFORM3 <= job.phase <= Phase.CONFIRM3 or job.asks_in_perform2):
            return
        pre = "paused" if job.pre_state is DomainState.PAUSED else "running"
        self.placement.departed(dom.uuid, Away(
            Peer(job.peer_hostuuid, job.peer_hostname, job.dest_uri), job.migration_id,
            uncertain=job.phase is not Phase.CONFIRM3, pre_state=pre))

    async def close(self) -> None:
        self.backend.set_listener(None)
        for task in list(self._following):
            task.cancel()
        if self._following:
            await asyncio.wait(list(self._following))
        await self.backend.close()

    # --- what guests do by themselves ------------------------------------------------------

    def guest_changed(self, uuid: str, change: GuestChange) -> None:
        """The backend's listener: guest ``uuid`` did ``change`` by itself; followed in a task
        (the backend must not wait for the daemon)."""
        task = asyncio.get_running_loop().create_task(self._follow(uuid, change))
        self._following.add(task)
        task.add_done_callback(self._following.discard)

    async def _follow(self, uuid: str, change: GuestChange) -> None:
        """Apply ``change`` once no migration job owns the domain (a job's own handling wins:
        it ends the domain or puts it back first), under the domain's lock."""
        while True:
            dom = self.registry.find_uuid(uuid)
            if dom is None:
                return
            async with dom.job_changed:
                while dom.job is not None:
                    with contextlib.suppress(TimeoutError):
                        await within(dom.job_changed.wait(), _JOB_RECHECK_S)
            async with dom.lock:
                if dom.job is not None or self.registry.find_uuid(uuid) is not dom:
                    continue
                self._apply(dom, change)
                return

    def _apply(self, dom: DomainObj, change: GuestChange) -> None:
        """Change ``dom`` as libvirt's QEMU driver does for ``change`` (nothing awaited: no
        other call can act on the domain in between), unless it no longer applies."""
        if not dom.active:
            return  # the daemon already stopped it (destroy, a migration's end)
        if change.ended:
            if self.backend.state(dom.uuid) is not GuestRunState.SHUTOFF:
                return  # a later guest runs (the domain was stopped and started again)
            log.info("domain %s: %s", dom.name, change.value)
            if change is GuestChange.CRASHED:
                self.mark_inactive(dom, ShutoffReason.CRASHED, detail=STOPPED_FAILED)
                return
            self.events.lifecycle(dom.name, dom.uuid, Lifecycle.SHUTDOWN,
                                  ShutdownDetail.GUEST if change is GuestChange.SHUTDOWN_GUEST
                                  else ShutdownDetail.HOST)
            self.mark_inactive(dom, ShutoffReason.SHUTDOWN)
        elif dom.state is DomainState.RUNNING and \
                self.backend.state(dom.uuid) is GuestRunState.PAUSED:  # (not run again since)
            log.info("domain %s: %s", dom.name, change.value)
            self.set_state(dom, DomainState.PAUSED, _PAUSES[change])

    def spec(self, d: DomainDef) -> GuestSpec:
        return GuestSpec(
            uuid=d.uuid,
            name=d.name,
            memory_bytes=d.memory_kib * 1024,
            vcpus=d.vcpus,
            options=dict(d.options),
            xml=d.xml,
            machine=d.machine,
        )

    def canonical(self, d: DomainDef, *, define: bool = False) -> DomainDef:
        """``d`` as the backend pins it (:meth:`Backend.canonicalize`), at define (``define``)
        and Prepare (and for a migration's destination XML, so that it compares with the stored
        one)."""
        xml = self.backend.canonicalize(self.spec(d), define=define)
        return d if xml == d.xml else parse_domain_xml(xml)

    def live(self, d: DomainDef) -> DomainDef:
        """``d`` as it runs: what the backend chose at start written in
        (:meth:`Backend.live_xml`: a pty's path, a VNC port)."""
        xml = self.backend.live_xml(d.uuid, d.xml)
        return d if xml == d.xml else parse_domain_xml(xml)

    async def expanded(self, d: DomainDef) -> DomainDef:
        """``d`` as it runs (:meth:`Backend.expand`), before a start or an incoming migration:
        the running guest's definition (``host-model`` CPU expanded, say)."""
        xml = await self.backend.expand(self.spec(d))
        return d if xml == d.xml else parse_domain_xml(xml)

    def validate(self, d: DomainDef) -> GuestSpec:
        """The one check of a guest against the backend, at define, start and Prepare: its
        memory and vCPUs within the backend's limits, then the backend's own checks."""
        spec = self.spec(d)
        limits = self.backend.limits(spec)
        if spec.memory_bytes > limits.max_memory_bytes:
            raise ConfigUnsupported(
                f"Maximum memory {d.memory_kib} KiB greater than the {self.backend.name} "
                f"backend's limit of {limits.max_memory_bytes // 1024} KiB "
                f"({limits.memory_source})"
            )
        if spec.vcpus > limits.max_vcpus:
            raise ConfigUnsupported(
                f"Maximum CPUs {spec.vcpus} greater than the {self.backend.name} backend's "
                f"limit of {limits.max_vcpus} ({limits.vcpus_source})"
            )
        self.backend.validate(spec)
        return spec

    def session_alive(self, session: str) -> bool:
        return bool(session) and session in self.sessions

    def set_state(
        self, dom: DomainObj, state: DomainState, reason: int, *, save: bool = True
    ) -> None:
        """The one place a domain's state changes; it writes the status and emits the event.

        ``save=False`` when the caller writes the status itself right after, with nothing
        awaited in between (one write instead of two on the migration's critical path).
        """
        old = dom.state
        dom.state = state
        dom.reason = int(reason)
        if save:
            self.registry.save_status(dom)
        for event, detail in lifecycle_for(old, state, int(reason)):
            self.events.lifecycle(dom.name, dom.uuid, event, detail)

    async def discard_incoming(self, dom: DomainObj, *, existed: bool, record: JobRecord) -> None:
        """Undo an incoming domain: kill its guest (if any), free its port, end its job, and
        drop the object (or, if it was defined before Prepare, deactivate it)."""
        job = dom.job
        await self.backend.destroy(dom.uuid)
        if job is not None and job.port:
            self.ports.release(job.port)
        if not existed:
            dom.config = None
        # Shut off (or gone) before the job ends: whoever sees the job over (a client asking
        # whether a cancelled Finish ran the guest here) must never see the guest still
        # active, and the job's end waits for its status write.
        self.mark_inactive(dom, ShutoffReason.FAILED)
        await self.registry.end_job(dom, record)

    def mark_inactive(self, dom: DomainObj, reason: ShutoffReason, *,
                      detail: int | None = None) -> None:
        """The guest stopped: shut off with ``reason``; a transient domain disappears.
        ``detail``: the Stopped event's, when it is not the one ``reason`` implies (libvirt's
        Stopped (Failed) for a QEMU that died: ``shutoff (crashed)``)."""
        for event, implied in lifecycle_for(dom.state, DomainState.SHUTOFF, int(reason)):
            self.events.lifecycle(dom.name, dom.uuid, event,
                                  implied if detail is None else detail)
        dom.state = DomainState.SHUTOFF
        dom.reason = int(reason)
        dom.id = -1
        dom.live = None
        if dom.persistent:
            self.registry.save_status(dom)
        else:
            self.registry.remove(dom)
