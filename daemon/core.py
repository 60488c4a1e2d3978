"""The daemon's shared context: identity, configuration, registry, backend, migration ports,
the limits on clients' calls, and what it shows operators (the health status, the migration
audit with its history, the Prometheus metrics).

Every service and phase receives one :class:`Daemon`; nothing is global.  :class:`HostInfo` is
what the daemon tells callers about its host.
"""

from __future__ import annotations

import asyncio
import collections
import os
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtmig.daemon.audit import Audit
from virtmig.daemon.backend.base import Backend, GuestRunState, GuestSpec
from virtmig.daemon.domxml import DomainDef, parse_domain_xml
from virtmig.daemon.events import EventBus, lifecycle_for
from virtmig.daemon.health import Health
from virtmig.daemon.history import DEFAULT_MAX_BYTES as DEFAULT_HISTORY_BYTES
from virtmig.daemon.history import History
from virtmig.daemon.job import AsyncJob, JobRecord, Phase
from virtmig.daemon.limits import DEFAULT_MAX_CALLS_PER_CLIENT, DEFAULT_MAX_CLIENTS, CallLimits
from virtmig.daemon.metrics import Metrics
from virtmig.daemon.placement import Away, Peer, PlacementStore
from virtmig.daemon.registry import DEFAULT_MAX_DOMAINS, DomainObj, Registry, job_from_status
from virtmig.daemon.state import StateDir
from virtmig.proto import logsafe
from virtmig.proto.errors import ConfigUnsupported, NoSupport, ResourceExhausted
from virtmig.proto.flags import DomainState, Feature, ShutoffReason, protocol_features

log = logsafe.logger(__name__)

VERSION = "0.1.0"


@dataclass(frozen=True)
class DaemonConfig:
    """Settings, from the TOML file and command-line flags (see ``virtmig.daemon.config``)."""

    state_dir: str
    listen: tuple[str, ...] = ()
    backend: str = "test"
    hostname: str = ""
    migration_port_min: int = 49152
    migration_port_max: int = 49215
    # Address the incoming migration stream binds to (libvirt's migration_address).
    migration_address: str = "0.0.0.0"
    # Host name or address put in Prepare's URI (libvirt's migration_host); default: hostname.
    migration_host: str = ""
    # Seconds a Prepare waits for a migration port when every port of the range is held by
    # another migration (0: it fails at once).
    migration_port_wait: float = 30.0
    job_wait_timeout: float = 30.0
    # A migration job that no caller's session owns (none was opened, or it ended) is rolled
    # back by the daemon once it has been idle this long (virtmig.daemon.migration.owner).
    incoming_job_timeout: float = 60.0
    default_max_downtime_ms: int = 300
    # Stall watchdog: no progress for this many seconds fails the migration (0: off).
    stall_timeout_s: float = 0.0
    # Completion timeout: seconds per GiB of guest memory (0: off), and what to do then.
    completion_timeout_per_gib_s: float = 0.0
    completion_timeout_action: str = "abort"
    # Concurrent migrations this daemon accepts (0: no limit).
    max_outgoing_migrations: int = 0
    max_incoming_migrations: int = 0
    # Domains this daemon holds at most (defined, running or incoming; ``registry.MAX_DOMAINS``
    # at most: a bound on the daemon's memory).
    max_domains: int = DEFAULT_MAX_DOMAINS
    # The test backend's guest limits (0: the host's RAM / test.guest.MAX_VCPUS).
    test_max_memory_mib: int = 0
    test_max_vcpus: int = 0
    # Clients with calls in flight, and calls in flight per client (virtmig.daemon.limits).
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_calls_per_client: int = DEFAULT_MAX_CALLS_PER_CLIENT
    # Mutual TLS: the PKI dir ("": $VIRTMIG_PKI_DIR, else the default dir), and the client
    # certificate DNs with full and with read-only access (libvirt's wildcards; see
    # virtmig.daemon.authz).  An empty full list admits every certificate the CA signed.
    pki_dir: str = ""
    tls_allowed_dn_list: tuple[str, ...] = ()
    tls_readonly_dn_list: tuple[str, ...] = ()
    # Plain tcp:// listeners are refused unless this says so.
    listen_insecure_tcp: bool = False
    # virtmigd-ro.sock (0666, read calls only) beside the main unix socket.
    readonly_socket: bool = False
    # Refuse a migration with neither VIR_MIGRATE_TLS nor TUNNELLED (libvirt's migrate_tls_force).
    # None: resolved at start (virtmig.daemon.main): true for the qemu backend when every network
    # listener is TLS, else false; a Daemon built without that step treats None as false.
    migrate_tls_force: bool | None = None
    # The qemu backend's confinement (virtmig.daemon.backend.qemu.confine owns the defaults).
    emulators: tuple[str, ...] = ()  # (): the qemu-system-x86_64 on PATH at start
    storage_dirs: tuple[str, ...] | None = None  # None: /var/lib/virtmig/images
    block_devices: tuple[str, ...] = ()  # block devices a <disk type='block'> may name
    qemu_user: str = ""  # "": virtmig-qemu (used when the daemon runs as root)
    qemu_group: str = ""  # "": qemu_user's primary group
    qemu_sandbox: bool = True
    vnc_port_min: int = 5900  # the qemu backend's VNC port range (autoport)
    vnc_port_max: int = 65535
    vnc_remote_listen: bool = False  # VNC on a non-loopback address allowed
    # A guest runs in one place (virtmig.daemon.locate): seconds to connect to and ask a peer
    # daemon, and the retries that settle a migration whose outcome is unknown (backoff from
    # settle_retry_min to settle_retry_max seconds, at most settle_attempts tries).
    peer_timeout: float = 10.0
    settle_retry_min: float = 1.0
    settle_retry_max: float = 60.0
    settle_attempts: int = 100
    features: tuple[str, ...] = (
        Feature.MIGRATION_PARAMS.value, Feature.V3.value, Feature.V2.value, Feature.P2P.value,
        Feature.OFFLINE.value, Feature.CHANGE_PROTECTION.value,
    )
    # The migration protocols this daemon speaks (2, 3) and whether it takes the extensible
    # parameter RPCs (*Params, with 3): what it advertises is ``features`` restricted to them
    # (``Daemon.features``), and it refuses the RPCs of the others, as an older daemon would.
    migration_protocols: tuple[int, ...] = (2, 3)
    migration_params: bool = True
    # Logging (virtmig.daemon.logs): level, plain or json lines, and where they go.
    log_level: str = "info"
    log_format: str = "plain"
    log_outputs: tuple[str, ...] = ("stderr",)
    # The migration history (virtmig.daemon.history): its file's size before it is rotated.
    history_max_bytes: int = DEFAULT_HISTORY_BYTES
    # The Prometheus endpoint, "HOST:PORT" ("": off; virtmig.daemon.metrics_http).
    metrics_listen: str = ""


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


class PortAllocator:
    """Migration ports from the configured range; a port is held from before it is bound until
    released.

    When every port is held, a Prepare may wait for one (:meth:`wait`): a released port goes
    straight to the longest waiter (it stays held), so waiters are served in arrival order and a
    Prepare arriving later cannot take it first.  A port that could not be bound because another
    process holds it is :meth:`drop`-ped: freed without waking anyone.
    """

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        self._used: set[int] = set()
        self._waiters: collections.deque[asyncio.Future[int]] = collections.deque()

    def exhausted(self) -> ResourceExhausted:
        return ResourceExhausted(
            f"Unable to find an unused port in range 'migration' ({self.lo}-{self.hi})")

    def candidates(self) -> list[int]:
        """The ports nobody holds, lowest first; none: RESOURCE_EXHAUSTED naming the range."""
        free = [p for p in range(self.lo, self.hi + 1) if p not in self._used]
        if not free:
            raise self.exhausted()
        return free

    def free_after(self, port: int) -> int | None:
        """The lowest port of the range above ``port`` nobody holds (None: none)."""
        return next((p for p in range(max(port + 1, self.lo), self.hi + 1)
                     if p not in self._used), None)

    def take(self, port: int) -> None:
        self._used.add(port)

    def release(self, port: int) -> None:
        """Give ``port`` back: to the longest waiter if there is one, else to the range."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(port)
                return
        self._used.discard(port)

    def drop(self, port: int) -> None:
        """Free ``port`` without handing it to a waiter (another process has it bound)."""
        self._used.discard(port)

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
        doms = list(self.registry)
        active = sum(1 for x in doms if x.active)
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
            inactive_domains=len(doms) - active,
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
        await self.backend.close()

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
        await self.registry.end_job(dom, record)
        if not existed:
            dom.config = None
        self.mark_inactive(dom, ShutoffReason.FAILED)

    def mark_inactive(self, dom: DomainObj, reason: ShutoffReason) -> None:
        """The guest stopped: shut off with ``reason``; a transient domain disappears."""
        for event, detail in lifecycle_for(dom.state, DomainState.SHUTOFF, int(reason)):
            self.events.lifecycle(dom.name, dom.uuid, event, detail)
        dom.state = DomainState.SHUTOFF
        dom.reason = int(reason)
        dom.id = -1
        dom.live = None
        if dom.persistent:
            self.registry.save_status(dom)
        else:
            self.registry.remove(dom)
