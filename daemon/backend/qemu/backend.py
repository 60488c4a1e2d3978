""":class:`QemuBackend`: the :class:`~virtmig.daemon.backend.base.Backend` interface over QEMU.

Concern: the backend's own state -- its folder, the guests by uuid, the migration records by
uuid -- and the interface's calls, each a lookup and a check, then the module that does the work
(:mod:`~virtmig.daemon.backend.qemu.config`, :mod:`~virtmig.daemon.backend.qemu.process`,
:mod:`~virtmig.daemon.backend.qemu.monitor`, :mod:`~virtmig.daemon.backend.qemu.outgoing`,
:mod:`~virtmig.daemon.backend.qemu.incoming`).

Every QMP command passes through :meth:`QemuBackend._exec` (and ``_exec_any``): the flows are
handed ``self._exec``, so a test can watch or refuse commands on one backend there.

:meth:`QemuBackend.close` stops the migrations nobody will finish (an outgoing pre-copy stream is
cancelled, a post-copy one is left to QEMU; an incoming guest that has not switched is stopped)
and leaves the other guests running; :meth:`QemuBackend.open` takes them over.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import psutil

from virtmig.daemon.backend.base import (
    Backend,
    BackendError,
    GuestLimits,
    GuestRunState,
    GuestSpec,
    MigrationFailed,
    MigrationProgress,
    MigrationStatus,
    MigrationTuning,
    StreamAddress,
    host_memory_bytes,
)
from virtmig.daemon.backend.qemu.caps import EmulatorCaps, probe_emulator
from virtmig.daemon.backend.qemu.config import QemuConfig, canonical_xml, parse_config
from virtmig.daemon.backend.qemu.confine import (
    QemuSettings,
    RunAs,
    check_settings,
    kvm_refusal,
    postcopy_refusal,
    run_as,
)
from virtmig.daemon.backend.qemu.disks import migration_unsafe
from virtmig.daemon.backend.qemu.graphics import password_commands
from virtmig.daemon.backend.qemu.guest import PID_NAME, _Guest
from virtmig.daemon.backend.qemu.hostcpu import (
    CPUINFO,
    HostModel,
    ProbeError,
    host_cpu_digest,
    host_model_xml,
    probe_host_model,
)
from virtmig.daemon.backend.qemu.incoming import dst_listen, dst_wait
from virtmig.daemon.backend.qemu.migration import _Incoming, _Outgoing, refuse_mt_compression
from virtmig.daemon.backend.qemu.monitor import (
    QMP_TIMEOUT,
    connect,
    cont,
    execute,
    refresh_status,
)
from virtmig.daemon.backend.qemu.outgoing import (
    CANCEL_TIMEOUT,
    STOP_TIMEOUT,
    src_cancel,
    src_drop_tls,
    src_migrate,
    src_set_tuning,
    src_start_postcopy,
    src_wait,
    src_wait_switch_or_end,
)
from virtmig.daemon.backend.qemu.process import (
    QUIT_GRACE,
    START_TIMEOUT,
    _guest_dirs,
    _write_pid,
    adopt,
    detach,
    launch,
    monitor_closed,
    stop_process,
    take_over,
)
from virtmig.daemon.backend.qemu.runtime import Runtime, read_runtime
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.compat import Compression
from virtmig.proto.errors import ConfigUnsupported, OperationInvalid
from virtmig.proto.flags import MigrateFlags

log = logsafe.logger("virtmig.daemon.backend.qemu")

RESTART_MARKER = "on-poweroff-restart"  # in a guest's folder: <on_poweroff>restart
QEMU_MAX_VCPUS_PC = 255  # the pc (i440fx) machine's max_cpus
QEMU_MAX_VCPUS_Q35 = 288  # the q35 machine's max_cpus


class QemuBackend(Backend):
    """QEMU guests over QMP (see the package docstring)."""

    name = "qemu"
    extra_flags = MigrateFlags.PARALLEL | MigrateFlags.COMPRESSED | MigrateFlags.TLS

    def __init__(self, settings: QemuSettings | None = None) -> None:
        self.settings = (settings or QemuSettings()).resolved()
        self._dir: Path | None = None
        self._owner: RunAs | None = None  # whom QEMU runs as (None: as the daemon)
        self._guests: dict[str, _Guest] = {}
        self._progress: dict[str, _Outgoing | _Incoming] = {}
        self._caps: dict[str, EmulatorCaps | None] = {}  # by emulator
        self._runtime: dict[str, Runtime] = {}  # by uuid: what QEMU chose at its start
        self._host_models: dict[tuple[str, str], HostModel] = {}  # by (emulator, accel)
        self._cpu_digest = ""  # this host's CPU (hostcpu.host_cpu_digest), read once
        # by uuid: guests retired (``retire``) whose process is still ending; reaped by the task
        self._retiring: dict[str, asyncio.Task[None]] = {}

    # -- setup --

    async def open(self, state_dir: Path) -> None:
        """Check the settings (``InvalidArgument`` naming one that cannot work), then take over
        the guests an earlier instance left running in ``state_dir``."""
        check_settings(self.settings)
        self._owner = run_as(self.settings)
        self._dir = state_dir
        self._caps = {e: await probe_emulator(e) for e in self.settings.emulators}
        why = postcopy_refusal(self._owner)
        if why:
            log.warning("qemu backend: %s", why)
        for child in _guest_dirs(state_dir):
            try:
                await self._take_over(child)
            except Exception:
                log.exception("qemu backend: cannot take over the guest in %s", child)

    async def close(self) -> None:
        for uuid in list(self._retiring):  # quitting already: reaped, not left behind
            await self._retired(uuid)
        guests = list(self._guests.values())
        for guest in guests:  # a migration nobody will finish: stop it, the guest stays
            mig = guest.outgoing
            if mig is not None and not mig.done.is_set() and not guest.exited:
                await self._abandon_outgoing(guest, mig)
            inc = guest.incoming
            if inc is not None and inc.final is None and not guest.exited and not inc.switched:
                # an incoming guest cannot finish without us
                await stop_process(self._exec, guest)
        for guest in guests:
            await detach(guest)
        self._guests.clear()

    async def _abandon_outgoing(self, guest: _Guest, mig: _Outgoing) -> None:
        """``close`` with an outgoing migration running: cancel it, unless post-copy."""
        mig.abort_reason = "migration aborted: daemon shutting down"
        if mig.switched or mig.postcopy_requested:
            # Post-copy cannot be cancelled: QEMU finishes it without us (after the
            # switch; detach ends our follower).
            mig.abort_reason = ("post-copy migration no longer followed: daemon "
                                "shutting down")
            if not mig.switched:
                await src_wait_switch_or_end(guest, mig, CANCEL_TIMEOUT)
        else:
            with contextlib.suppress(BackendError):
                await self.cancel(guest.uuid)
            with contextlib.suppress(TimeoutError):  # (a cancel ends the flow within)
                await within(mig.done.wait(), STOP_TIMEOUT)

    def _state_dir(self) -> Path:
        if self._dir is None:
            raise BackendError("the qemu backend is not open")
        return self._dir

    def check_compression(self, compression: Compression) -> None:
        refuse_mt_compression(compression)

    def canonicalize(self, spec: GuestSpec, *, define: bool = False) -> str:
        """The machine type pinned (``pc`` -> the emulator's ``pc-i440fx-7.2``), MACs, PCI
        addresses, default devices and channel sockets assigned (:func:`canonical_xml`)."""
        return canonical_xml(spec, self._caps, self.settings, self._dir, define=define)

    def live_xml(self, uuid: str, xml: str) -> str:
        """``xml`` with the paths of the guest's ptys and its VNC port, as QEMU chose them."""
        runtime = self._runtime.get(uuid)
        return xml if runtime is None else runtime.apply(xml)

    def validate(self, spec: GuestSpec) -> None:
        parse_config(spec, self._caps, self.settings, self._dir)

    async def expand(self, spec: GuestSpec) -> str:
        """A ``<cpu mode='host-model'>`` expanded to the emulator's host CPU (probed once per
        emulator and accelerator, :mod:`~virtmig.daemon.backend.qemu.hostcpu`)."""
        try:
            return await host_model_xml(spec, self._host_model)
        except ProbeError as exc:
            raise BackendError(f"cannot expand <cpu mode='host-model'>: {exc}") from None
        except ConfigUnsupported as exc:
            raise BackendError(exc.detail) from None

    async def _host_model(self, spec: GuestSpec) -> HostModel:
        cfg = parse_config(spec, self._caps, self.settings, self._dir)
        key = (cfg.emulator, cfg.accel)
        if key not in self._host_models:
            self._host_models[key] = await probe_host_model(cfg.emulator, cfg.accel)
        return self._host_models[key]

    def _passthrough(self, spec: GuestSpec) -> bool:
        try:
            return parse_config(spec, self._caps, self.settings, self._dir).cpu.model == "host"
        except ConfigUnsupported:
            return False  # validation says why

    def _host_cpu_digest(self) -> str:
        if not self._cpu_digest:
            self._cpu_digest = host_cpu_digest(CPUINFO.read_text(errors="replace"))
        return self._cpu_digest

    def host_cpu(self, spec: GuestSpec) -> str:
        """This host's CPU digest for a ``host-passthrough`` guest (:mod:`.hostcpu`)."""
        return self._host_cpu_digest() if self._passthrough(spec) else ""

    def check_host_cpu(self, spec: GuestSpec, source: str) -> None:
        """A ``host-passthrough`` guest comes only from a host with this host's CPU: the guest
        sees the CPU itself, and on another one it would find its CPU changed under it."""
        if not self._passthrough(spec):
            return
        if not source:
            raise OperationInvalid(
                "guest CPU mode 'host-passthrough' migrates only between hosts with the same "
                "CPU, and the source host did not say which it has (protocol 2, or a peer "
                "without this check)")
        if source != self._host_cpu_digest():
            raise OperationInvalid(
                "guest CPU mode 'host-passthrough' migrates only between hosts with the same "
                "CPU: this host's CPU differs from the source host's (vendor, family, model, "
                "stepping, microcode or flags)")

    def migration_unsafe(self, spec: GuestSpec) -> str:
        """A disk the host caches (cache other than none or directsync) that is neither read-only
        nor shareable (:func:`~virtmig.daemon.backend.qemu.disks.migration_unsafe`)."""
        return migration_unsafe(parse_config(spec, self._caps, self.settings, self._dir).disks)

    def limits(self, spec: GuestSpec) -> GuestLimits:
        """The host's RAM, and QEMU's vCPU limit for the machine type (``max_cpus`` of QEMU
        7.2's machines: 288 for q35, 255 for pc/i440fx)."""
        machine = spec.machine or "pc"
        return GuestLimits(
            host_memory_bytes() or 2**63 - 1,
            QEMU_MAX_VCPUS_Q35 if "q35" in machine else QEMU_MAX_VCPUS_PC,
            vcpus_source=f"QEMU's limit for machine type '{machine}'",
        )

    def _config(self, spec: GuestSpec) -> QemuConfig:
        try:
            cfg = parse_config(spec, self._caps, self.settings, self._state_dir())
        except ConfigUnsupported as exc:
            raise BackendError(exc.detail) from None
        if cfg.cpu.host_model:
            raise BackendError("<cpu mode='host-model'> must be expanded before the guest runs")
        if cfg.accel == "kvm":
            why = kvm_refusal(self._owner)
            if why:
                raise BackendError(why)
        return cfg

    # -- guests and their QMP --

    def _check_free(self, uuid: str) -> None:
        guest = self._guests.get(uuid)
        if guest is not None:
            if not guest.exited:
                raise BackendError(f"guest {uuid} is already running")
            del self._guests[uuid]

    async def _spawn(self, cfg: QemuConfig, *, incoming: bool) -> _Guest:
        """Start QEMU (vCPUs stopped) and connect to its QMP socket."""
        guest = await launch(cfg, self._state_dir() / cfg.uuid, incoming=incoming,
                             settings=self.settings, owner=self._owner)
        self._guests[cfg.uuid] = guest
        self._follow(guest)
        marker = guest.dir / RESTART_MARKER  # for the backend that takes the guest over
        if cfg.machine_cfg.poweroff_restarts:
            guest.on_guest_poweroff = lambda: self._restart_after_poweroff(guest)
            marker.touch(mode=0o600)
        else:
            marker.unlink(missing_ok=True)
        try:
            _write_pid(guest.dir / PID_NAME, guest.pid)
            await connect(self._exec, guest, START_TIMEOUT)
            for nic in cfg.nics:  # (a migrated NIC's link state also comes in its state)
                if not nic.link_up:
                    await self._exec(guest, "set_link", {"name": nic.id, "up": False})
            for command, args in password_commands(cfg.vnc):  # (never logged)
                await self._exec(guest, command, args)
            self._runtime[cfg.uuid] = await read_runtime(self._exec_any, guest, cfg)
        except BaseException:
            await stop_process(self._exec, guest)
            self._forget(guest)
            raise
        return guest

    def _follow(self, guest: _Guest) -> None:
        """What ``guest`` does by itself (powers off, dies, pauses on an error) goes to the
        daemon (:meth:`Backend.report`); what the backend does to it does not."""
        guest.on_change = lambda change: self.report(guest.uuid, change)

    async def _restart_after_poweroff(self, guest: _Guest) -> None:
        """``<on_poweroff>restart``: the guest powered off and QEMU stopped it; reset it and run
        it again (libvirt's "fake reboot")."""
        try:
            await self._exec(guest, "system_reset")
            await cont(self._exec, guest)
        except BackendError as exc:
            log.warning("qemu backend: guest %s: cannot restart it after its poweroff: %s",
                        guest.uuid, exc)
        else:
            log.info("qemu backend: guest %s powered off and was restarted (on_poweroff)",
                     guest.uuid)

    async def _take_over(self, gdir: Path) -> None:
        """A guest left running by an earlier instance: check it is QEMU and reconnect."""
        guest = adopt(gdir)
        if guest is None:
            return
        self._guests[guest.uuid] = guest
        self._follow(guest)
        if (gdir / RESTART_MARKER).exists():  # <on_poweroff>restart: it runs with shutdown=pause
            guest.on_guest_poweroff = lambda: self._restart_after_poweroff(guest)
        if not await take_over(self._exec, guest):
            self._forget(guest)

    async def _exec(
        self, guest: _Guest, command: str, args: dict[str, object] | None = None,
        timeout: float = QMP_TIMEOUT, *, oob: bool = False,
    ) -> dict[str, Any]:
        """One QMP command whose result is an object (``{}`` if QEMU gave another kind)."""
        result = await self._exec_any(guest, command, args, timeout, oob=oob)
        return result if isinstance(result, dict) else {}

    async def _exec_any(
        self, guest: _Guest, command: str, args: dict[str, object] | None = None,
        timeout: float = QMP_TIMEOUT, *, oob: bool = False,
    ) -> object:
        """One QMP command (``oob``: out of band); its result as QEMU gave it."""
        return await execute(guest, command, args, timeout, oob=oob)

    def _forget(self, guest: _Guest) -> None:
        if self._guests.get(guest.uuid) is guest:
            del self._guests[guest.uuid]
            self._runtime.pop(guest.uuid, None)

    def _guest(self, uuid: str) -> _Guest:
        guest = self._guests.get(uuid)
        if guest is None or guest.exited:
            raise BackendError(f"guest {uuid} is not running")
        return guest

    # -- lifecycle --

    async def start(self, spec: GuestSpec, *, paused: bool) -> None:
        cfg = self._config(spec)
        await self._retired(spec.uuid)
        self._check_free(spec.uuid)
        guest = await self._spawn(cfg, incoming=False)
        if not paused:
            try:
                await cont(self._exec, guest)
            except BaseException:
                await stop_process(self._exec, guest)
                self._forget(guest)
                raise

    async def destroy(self, uuid: str) -> None:
        guest = self._guests.get(uuid)
        if guest is None:
            return
        await stop_process(self._exec, guest)
        self._forget(guest)

    async def retire(self, uuid: str) -> None:
        """``quit``, and return once QEMU closed its monitor: it does so at the end of its own
        clean-up, after closing its images and network backends (QEMU 7.2's
        ``qemu_cleanup``), so that the guest's disks and taps are free.  What follows, the
        kernel freeing QEMU's memory and VM (~5 ms for 256 MiB under TCG, ~20 ms under this
        machine's nested KVM) and the reaping, goes on in a task that a start of the same
        guest and :meth:`close` wait for.  A QEMU that does not close its monitor within
        ``QUIT_GRACE`` is stopped as :meth:`destroy` stops it (SIGKILL, then reaped)."""
        guest = self._guests.get(uuid)
        if guest is None:
            return
        client, exit_task = guest.qmp, guest.exit_task
        if guest.exited or client is None or exit_task is None:
            await self.destroy(uuid)
            return
        guest.stopping = True
        try:
            await self._exec(guest, "quit", timeout=1.0)
            closed = await monitor_closed(client, asyncio.shield(exit_task), QUIT_GRACE)
        except BackendError:
            closed = False
        if not closed:
            await self.destroy(uuid)
            return
        self._forget(guest)
        self._retiring[uuid] = asyncio.get_running_loop().create_task(
            stop_process(self._exec, guest, ask=False), name=f"qemu-retire-{uuid[:8]}")

    async def _retired(self, uuid: str) -> None:
        """Wait until the retired guest ``uuid`` (if any) is reaped."""
        task = self._retiring.get(uuid)
        if task is None:
            return
        try:
            await asyncio.shield(task)
        finally:
            if self._retiring.get(uuid) is task and task.done():
                del self._retiring[uuid]

    async def pause(self, uuid: str) -> None:
        guest = self._guest(uuid)
        await self._exec(guest, "stop")
        await refresh_status(self._exec, guest)

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
        await cont(self._exec, guest)

    def state(self, uuid: str) -> GuestRunState:
        guest = self._guests.get(uuid)
        return GuestRunState.SHUTOFF if guest is None else guest.run_state()

    def cpu_time_ns(self, uuid: str) -> int:
        """The QEMU process's user and system CPU time (what libvirt reads from /proc)."""
        guest = self._guests.get(uuid)
        if guest is None:
            return 0
        try:
            times = psutil.Process(guest.pid).cpu_times()
        except psutil.Error:
            return 0
        return int((times.user + times.system) * 1e9)

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
        await src_cancel(self._exec, guest, mig)

    async def set_tuning(
        self,
        uuid: str,
        *,
        bandwidth_bytes_per_s: int | None = None,
        max_downtime_ms: int | None = None,
    ) -> None:
        await src_set_tuning(self._exec, self._guest(uuid), bandwidth_bytes_per_s,
                             max_downtime_ms)

    async def start_postcopy(self, uuid: str) -> None:
        """``migrate-start-postcopy``: QEMU switches at its next iteration; ``outgoing`` returns."""
        guest = self._guest(uuid)
        mig = guest.outgoing
        if mig is None or mig.done.is_set() or mig.final is not None:
            raise BackendError(f"no outgoing migration is running for guest {uuid}")
        await src_start_postcopy(self._exec, guest, mig)

    async def get_compression_cache(self, uuid: str) -> int:
        """QEMU's ``xbzrle-cache-size`` parameter (QEMU keeps it for the process's life; a
        migration's ``xbzrle-cache-size`` sets it anew)."""
        size = (await self._exec(self._guest(uuid), "query-migrate-parameters")).get(
            "xbzrle-cache-size")
        if not isinstance(size, int) or isinstance(size, bool):
            raise BackendError("QEMU did not report its xbzrle-cache-size")
        return size

    async def set_compression_cache(self, uuid: str, size: int) -> None:
        await self._exec(self._guest(uuid), "migrate-set-parameters", {"xbzrle-cache-size": size})

    async def outgoing_wait(self, uuid: str) -> MigrationProgress:
        """After a switch to post-copy: wait until the last page was sent."""
        mig = self._progress.get(uuid)
        if not isinstance(mig, _Outgoing):
            raise BackendError(f"no outgoing migration for guest {uuid}")
        return await src_wait(mig)

    # -- incoming --

    async def incoming_start(self, spec: GuestSpec, listen: StreamAddress,
                             tuning: MigrationTuning | None = None) -> int:
        if listen.transport != "tcp":
            raise BackendError(f"qemu backend: unsupported migration transport {listen.transport}")
        tuning = tuning or MigrationTuning()
        cfg = self._config(spec)
        await self._retired(spec.uuid)
        self._check_free(spec.uuid)
        guest = await self._spawn(cfg, incoming=True)
        inc = _Incoming()
        guest.incoming = inc
        try:
            port = await dst_listen(self._exec, guest, inc, listen, tuning, owner=self._owner)
        except BaseException:
            await stop_process(self._exec, guest)
            self._forget(guest)
            raise
        self._progress[spec.uuid] = inc
        return port

    async def incoming_wait(self, uuid: str) -> MigrationProgress:
        guest = self._guests.get(uuid)
        inc = guest.incoming if guest is not None else None
        if guest is None or inc is None:
            raise MigrationFailed(f"no incoming migration for guest {uuid}")
        return await dst_wait(self._exec, guest, inc)

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
            return await src_migrate(self._exec, guest, mig, dest, owner=self._owner)
        finally:
            if tuning.tls is not None:
                guest.start_task(src_drop_tls(self._exec, guest, mig))
