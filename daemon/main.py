"""``virtmigd``: serve the virtmig gRPC services until SIGTERM/SIGINT, then shut down gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from virtmig.daemon import jobctl, listeners, locate, recovery, stall
from virtmig.daemon.authz import Policy
from virtmig.daemon.backend.base import Backend
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.core import Daemon, DaemonConfig
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
                           max_vcpus=config.test_max_vcpus)
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
        await asyncio.gather(*(server.stop(grace) for server in self.servers))
        if self.reaper is not None:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper
        await locate.stop_settling(self.daemon)
        await self.daemon.close()


async def start_daemon(config: DaemonConfig, backend: Backend | None = None) -> RunningDaemon:
    # Everything the settings can get wrong is refused before the daemon touches its state.
    planned = listeners.plan(config)
    listeners.prepare_run_dirs(planned)
    tls = listeners.server_credentials(config, planned)
    backend = backend or make_backend(config.backend, config)
    config = _resolve_tls_force(config, backend.name, planned)
    daemon = Daemon(config, backend)
    daemon.registry.on_job_end = lambda dom, rec: daemon.events.publish(jobctl.job_event(dom, rec))
    await recovery.recover(daemon, await daemon.open())
    main = make_server(daemon, SERVER_OPTIONS, Policy(
        allowed_dns=config.tls_allowed_dn_list, readonly_dns=config.tls_readonly_dn_list))
    servers = [main]
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
    log.info("virtmigd serving on %s (host %s, uuid %s, backend %s)", ", ".join(addresses),
             daemon.hostname, daemon.host_uuid, daemon.backend.name)
    if stall.POINT:
        log.warning("TEST ONLY: %s stops this daemon at %s (never set it in production)",
                    stall.ENV, stall.POINT)
    reaper = asyncio.get_running_loop().create_task(any_reap_unowned(daemon))
    # Outcomes left unknown before a restart are settled in the background: a peer that does
    # not answer never holds up the start or the other guests (virtmig.daemon.locate).
    locate.resume_settling(daemon)
    return RunningDaemon(daemon, servers, addresses, reaper)


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


def write_ready_file(path: Path, addresses: list[str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "addresses": addresses}))
    tmp.rename(path)


async def serve(config: DaemonConfig, ready_file: str | None) -> None:
    running = await start_daemon(config)
    if ready_file:
        write_ready_file(Path(ready_file), running.addresses)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await running.stop()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = load_config(args)
        asyncio.run(serve(config, args.ready_file))
    except VirtmigError as exc:
        print(f"virtmigd: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"virtmigd: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
