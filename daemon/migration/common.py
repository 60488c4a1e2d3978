"""What every migration phase uses, on either host (``any_*``): the flags and params check run
before anything changes, the cookie a phase hands on and its statistics, and the job guards.

Names with a leading underscore are internal to the package (the phases' own checks).
"""

from __future__ import annotations

import dataclasses
import time

from virtmig.daemon import cookie as ck
from virtmig.daemon import jobctl
from virtmig.daemon.backend.base import MigrationProgress
from virtmig.daemon.core import Daemon
from virtmig.daemon.domxml import validate_name
from virtmig.daemon.job import AsyncJob, MigrationJob
from virtmig.daemon.registry import DomainObj
from virtmig.proto.compat import check_migration, compression_settings
from virtmig.proto.errors import OperationInvalid
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, Party, TypedParams, validate_migration_params


def any_check(daemon: Daemon, flags: int, params: TypedParams, function: str,
              party: Party = Party.SRC) -> MigrateFlags:
    """Flags and params checks every phase runs before it changes anything (a new name in
    ``destination_name`` must be a valid domain name on every host it passes)."""
    validate_migration_params(params, flags, party)
    dname = params.get_str(MigrateParam.DEST_NAME)
    if dname:
        validate_name(dname)
    f = check_migration(flags, params, function, daemon.backend.extra_flags)
    if f & MigrateFlags.COMPRESSED or params.get_all_str(MigrateParam.COMPRESSION):
        daemon.backend.check_compression(compression_settings(params, f))
    return f


TLS_FORCED = "this libvirtd instance allows migration only with VIR_MIGRATE_TLS flag"


def any_check_tls_force(daemon: Daemon, f: MigrateFlags) -> None:
    """``migrate_tls_force``: Begin and Prepare refuse a migration with neither TLS nor TUNNELLED
    (libvirt's check and message), before anything changes."""
    if daemon.config.migrate_tls_force and not f & (MigrateFlags.TLS | MigrateFlags.TUNNELLED):
        raise OperationInvalid(TLS_FORCED)


def any_cookie(daemon: Daemon, dom_name: str, uuid: str, **extra: object) -> bytes:
    return ck.build_cookie(
        ck.Cookie(
            name=dom_name,
            uuid=uuid,
            hostname=daemon.hostname,
            hostuuid=daemon.host_uuid,
            **extra,  # type: ignore[arg-type]
        )
    )


_COOKIE_STATS = frozenset(f.name for f in dataclasses.fields(ck.MigrationStats))


def any_stats(progress: MigrationProgress, started: float) -> ck.MigrationStats:
    """The cookie's <statistics>: libvirt's job stats (one mapping, jobctl's) plus timestamps."""
    now = int(time.time() * 1000)
    values = {p.name: int(p.value) for p in jobctl.job_stats(progress, progress.total_time_ms,
                                                             completed=True)
              if p.name in _COOKIE_STATS}
    return ck.MigrationStats(started=int(started * 1000), stopped=now, sent=now, **values)


def _job_of(dom: DomainObj, kind: AsyncJob) -> MigrationJob:
    job = dom.job
    if job is None or job.kind is not kind:
        if kind is AsyncJob.MIGRATION_IN:
            raise OperationInvalid(f"domain '{dom.name}' is not processing incoming migration")
        raise OperationInvalid(f"domain '{dom.name}' is not being migrated")
    return job


def _no_job(dom: DomainObj) -> None:
    if dom.job is not None:
        raise OperationInvalid(f"another migration job is already running for domain '{dom.name}'")


def _require_active(dom: DomainObj) -> None:
    if not dom.active:
        raise OperationInvalid("domain is not running")
