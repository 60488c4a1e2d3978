"""``virtmigd``: serve the virtmig gRPC services until SIGTERM/SIGINT, then shut down gracefully.

The start refuses bad settings and busy ports before the state dir is touched (one
``virtmigd: error: ...`` line, exit 1), marks the health service SERVING once every listener
(and the metrics endpoint, ``metrics_listen``) serves, and tells systemd (``READY=1``); SIGHUP
reloads the settings (:mod:`virtmig.daemon.reload`); the stop marks it NOT_SERVING first.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from virtmig.daemon import (
    eventloop,
    jobctl,
    listeners,
    locate,
    logs,
    metrics_http,
    recovery,
    reload,
    sdnotify,
    stall,
)
from virtmig.daemon.authz import Policy
from virtmig.daemon.backend.base import Backend
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.core import Daemon, DaemonConfig
from virtmig.daemon.interceptor import StatusInterceptor
from virtmig.daemon.metrics_http import MetricsServer
from virtmig.daemon.migration import any_reap_unowned
from virtmig.daemon.server import make_server
from virtmig.proto import logsafe
from virtmig.proto.errors import InvalidArgument, VirtmigError

if TYPE_CHECKING:
    from virtmig.daemon.backend.qemu import QemuSettings

log = logsafe.logger("virtmigd")


def make_backend(name: str, config: DaemonConfig | None = None) -> Backend:
    if name == "test":
        from virtmig.daemon.backend.test import TestBackend

        if config is None:
            return TestBackend()
        return TestBackend(max_memory_bytes=config.test_max_memory_mib * 1024 * 1024,
                           max_vcpus=config.test_max_vcpus,
                           stream_threads=config.test_stream_threads)
    if name == "qemu":
        from virtmig.daemon.backend.qemu import QemuBackend

        return QemuBackend(qemu_settings(config) if config is not None else None)
    raise InvalidArgument(f"unknown backend '{name}' (available: test, qemu)")


def qemu_settings(config: DaemonConfig) -> QemuSettings:
    """The qemu backend's confinement settings (its defaults where ``config`` has none)."""
    from virtmig.daemon.backend.qemu import QemuSettings

    default = QemuSettings()
    return QemuSettings(
        emulators=config.emulators,
        storage_dirs=default.storage_dirs if config.storage_dirs is None
        else config.storage_dirs,
        block_devices=config.block_devices,
        user=config.qemu_user or default.user,
        group=config.qemu_group,
        sandbox=config.qemu_sandbox,
        vnc_port_min=config.vnc_port_min,
        vnc_port_max=config.vnc_port_max,
        vnc_remote_listen=config.vnc_remote_listen,
    )


# Keepalive pings find a caller that vanished without closing its connection (a partition), so
# that its session, and the migration jobs it owns, end within about 15 s.  Clients ping every
# 5 s (virtmig.client.rpc); the server accepts a ping every 4 s even when no data flows
# (gRPC's default is 5 min: after two early pings it sends GOAWAY "too_many_pings", which ends
# every stream on the connection, sessions included).  gRPC's C name of that argument is
# GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS; its string is the one below.
SERVER_OPTIONS = [
    ("grpc.so_reuseport", 0),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 4_000),
]


@dataclass
class RunningDaemon:
    daemon: Daemon
    # One server per trust level (virtmig.daemon.interceptor): the main one, then the
    # read-only socket's if configured.
    servers: list[grpc.aio.Server]
    # Bound addresses, in the order of config.listen (then the read-only socket's):
    # "unix:/path" or "host:port".
    addresses: list[str] = field(default_factory=list)
    # The reaper of jobs no caller's session owns (virtmig.daemon.migration.owner).
    reaper: asyncio.Task[None] | None = None
    # The main server's interceptor: a SIGHUP reload gives it the new DN lists.
    gate: StatusInterceptor | None = None
    # The Prometheus endpoint (metrics_listen), if any; its bound address ("host:port").
    metrics: MetricsServer | None = None

    @property
    def metrics_address(self) -> str:
        return self.metrics.address if self.metrics is not None else ""

    @property
    def server(self) -> grpc.aio.Server:
        """The main server (TLS, the main unix socket, plain TCP)."""
        return self.servers[0]

    @property
    def tcp_port(self) -> int:
        for a in self.addresses:
            if not a.startswith("unix:"):
                return int(a.rsplit(":", 1)[1])
        raise LookupError("daemon has no tcp listener")

    async def stop(self, grace: float = 2.0) -> None:
        # Health checkers see NOT_SERVING before the listeners close (their Watch is told now).
        self.daemon.health.set_serving(False)
        await asyncio.sleep(0)
        await asyncio.gather(*(server.stop(grace) for server in self.servers))
        if self.reaper is not None:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper
        if self.metrics is not None:
            await self.metrics.stop()
        await locate.stop_settling(self.daemon)
        await self.daemon.close()


async def start_daemon(config: DaemonConfig, backend: Backend | None = None) -> RunningDaemon:
    # Everything the settings can get wrong is refused before the daemon touches its state.
    planned = listeners.plan(config)
    listeners.check_free(planned)
    listeners.prepare_run_dirs(planned)
    tls = listeners.server_credentials(config, planned)
    metrics_plan = plan_metrics(config, planned)
    backend = backend or make_backend(config.backend, config)
    config = _resolve_tls_force(config, backend.name, planned)
    daemon = Daemon(config, backend)
    daemon.registry.on_job_end = lambda dom, rec: daemon.events.publish(jobctl.job_event(dom, rec))
    servers: list[grpc.aio.Server] = []
    metrics: MetricsServer | None = None
    try:
        await recovery.recover(daemon, await daemon.open())
        gate = StatusInterceptor(Policy(allowed_dns=config.tls_allowed_dn_list,
                                        readonly_dns=config.tls_readonly_dn_list), daemon.calls,
                                 daemon.metrics)
        main = make_server(daemon, SERVER_OPTIONS, interceptor=gate)
        servers.append(main)
        addresses = []
        for lst in planned:
            server = main
            if lst.read_only:
                server = make_server(daemon, SERVER_OPTIONS, Policy(read_only=True))
                servers.append(server)
            addresses.append(listeners.bind(server, lst, tls))
            if lst.insecure:
                log.warning("listening on %s without TLS: whoever reaches it has full access "
                            "(listen_insecure_tcp)", lst.uri)
        for server in servers:
            await server.start()
        if metrics_plan is not None:
            metrics = MetricsServer(daemon, *metrics_plan)
            await metrics.start()
    except BaseException:
        # Nothing half-done: a listener that cannot bind (a port in use) stops what started.
        await asyncio.gather(*(server.stop(0) for server in servers))
        await daemon.close()
        raise
    log.info("virtmigd serving on %s (host %s, uuid %s, backend %s)", ", ".join(addresses),
             daemon.hostname, daemon.host_uuid, daemon.backend.name)
    if stall.POINT:
        log.warning("TEST ONLY: %s stops this daemon at %s (never set it in production)",
                    stall.ENV, stall.POINT)
    reaper = asyncio.get_running_loop().create_task(any_reap_unowned(daemon))
    # Outcomes left unknown before a restart are settled in the background: a peer that does
    # not answer never holds up the start or the other guests (virtmig.daemon.locate).
    locate.resume_settling(daemon)
    daemon.health.set_serving(True)
    return RunningDaemon(daemon, servers, addresses, reaper, gate, metrics)


def plan_metrics(config: DaemonConfig, planned: list[listeners.Listener]
                 ) -> tuple[metrics_http.Endpoint, ssl.SSLContext | None] | None:
    """Where the Prometheus endpoint (``metrics_listen``) listens, and its TLS (the daemon's
    PKI when it listens on TLS; else plain HTTP, on loopback only); None when it is off.
    Checked before the daemon touches its state (virtmig.daemon.metrics_http)."""
    if not config.metrics_listen:
        return None
    tls = any(lst.address.transport == "tls" for lst in planned)
    endpoint = metrics_http.check(config.metrics_listen, tls)
    return endpoint, metrics_http.server_context(config.pki_dir) if tls else None


def _resolve_tls_force(config: DaemonConfig, backend: str,
                       planned: list[listeners.Listener]) -> DaemonConfig:
    """``config`` with ``migrate_tls_force`` decided (its default: see
    :func:`listeners.tls_force_default`), logged once."""
    force = config.migrate_tls_force
    origin = "config"
    if force is None:
        force = listeners.tls_force_default(backend, planned)
        origin = f"default for the {backend} backend and these listeners"
    log.info("migrate_tls_force = %s (%s): migrations without VIR_MIGRATE_TLS or TUNNELLED are %s",
             str(force).lower(), origin, "refused" if force else "accepted")
    return dataclasses.replace(config, migrate_tls_force=force)


def write_ready_file(path: Path, addresses: list[str], metrics: str = "") -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "addresses": addresses, "metrics": metrics}))
    tmp.rename(path)


async def serve(config: DaemonConfig, ready_file: str | None,
                reload_config: Callable[[], DaemonConfig] | None = None) -> None:
    """Run the daemon until SIGTERM or SIGINT; SIGHUP calls ``reload_config`` and applies what
    it may (:mod:`virtmig.daemon.reload`)."""
    # Handled before anything starts: a SIGTERM during the start stops the daemon once started.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("SIGHUP during start: ignored"))
    running = await start_daemon(config)
    if reload_config is not None:
        loop.add_signal_handler(signal.SIGHUP, reload.on_sighup, running, reload_config)
    if ready_file:
        write_ready_file(Path(ready_file), running.addresses, running.metrics_address)
    sdnotify.notify("READY=1", f"MAINPID={os.getpid()}",
                    f"STATUS=serving on {', '.join(running.addresses)}")
    await stop.wait()
    log.info("shutting down")
    sdnotify.notify("STOPPING=1")
    await running.stop()


def main(argv: list[str] | None = None) -> int:
    """``virtmigd``: 0 after a graceful stop; 1, with one ``virtmigd: error: ...`` line on
    stderr and no traceback, when the settings or the start fail."""
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
        logs.configure(config.log_level, config.log_format, config.log_outputs)
        with asyncio.Runner(loop_factory=eventloop.factory(config.event_loop)) as runner:
            runner.run(serve(config, args.ready_file, lambda: load_config(args)))
    except (VirtmigError, OSError) as exc:
        print(f"virtmigd: error: {exc}", file=sys.stderr)
        return 1
    finally:
        logs.reset()
    return 0


if __name__ == "__main__":
    sys.exit(main())
