"""SIGHUP: read the settings again and apply what can change while the daemon runs.

What can (the schema's ``reload`` keys, :data:`virtmig.daemon.settings.SCHEMA`): the log level
and format, the DN lists of the TLS listeners (the next call is authorized by the new lists),
the call limits (``max_clients``, ``max_calls_per_client``: calls in flight keep their slots),
the migration limits and timeouts read when a migration starts or is watched
(``max_outgoing_migrations``, ``stall_timeout``, ``max_downtime_ms``, ``peer_timeout``...).
Each change is logged at INFO (``reload: max_clients 512 -> 8``); a changed key that needs a
restart (listeners, state dir, backend...) is logged at WARNING and keeps its running value.  A
file that no longer passes the schema is refused whole, logged at ERROR, and nothing changes:
the daemon goes on with the settings it has.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from virtmig.daemon import logs, sdnotify
from virtmig.daemon.authz import Policy
from virtmig.daemon.core import DaemonConfig
from virtmig.daemon.settings import SCHEMA
from virtmig.proto import logsafe
from virtmig.proto.errors import VirtmigError

if TYPE_CHECKING:
    from virtmig.daemon.main import RunningDaemon

log = logsafe.logger(__name__)

# DaemonConfig's field(s) of each schema key, where its name differs.
_FIELDS: dict[str, tuple[str, ...]] = {
    "stall_timeout": ("stall_timeout_s",),
    "completion_timeout_per_gib": ("completion_timeout_per_gib_s",),
    "max_downtime_ms": ("default_max_downtime_ms",),
    "migration_ports": ("migration_port_min", "migration_port_max"),
}
# Decided at start from the settings, never reloaded (migrate_tls_force's default).
_RESOLVED = {"migrate_tls_force"}


def fields(key: str) -> tuple[str, ...]:
    return _FIELDS.get(key, (key,))


def _value(config: DaemonConfig, key: str) -> object:
    values = tuple(getattr(config, f) for f in fields(key))
    return values[0] if len(values) == 1 else values


def apply(running: RunningDaemon, new: DaemonConfig) -> list[str]:
    """Apply ``new``'s reloadable settings to ``running``; the changes, as logged."""
    daemon = running.daemon
    old = daemon.config
    changes: list[str] = []
    updates: dict[str, object] = {}
    for setting in SCHEMA:
        key = setting.key
        before, after = _value(old, key), _value(new, key)
        if before == after or key in _RESOLVED:
            continue
        if not setting.reload:
            log.warning("reload: %s changed, it takes effect at the next start", key)
            continue
        changes.append(f"{key} {_show(before)} -> {_show(after)}")
        updates.update({f: getattr(new, f) for f in fields(key)})
    if not updates:
        return changes
    daemon.config = dataclasses.replace(old, **updates)  # type: ignore[arg-type]
    config = daemon.config
    daemon.calls.max_clients = config.max_clients
    daemon.calls.max_calls_per_client = config.max_calls_per_client
    if running.gate is not None:
        running.gate.policy = Policy(allowed_dns=config.tls_allowed_dn_list,
                                     readonly_dns=config.tls_readonly_dn_list)
    logs.configure(config.log_level, config.log_format, config.log_outputs)
    for change in changes:
        log.info("reload: %s", change)
    return changes


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def on_sighup(running: RunningDaemon, load: Callable[[], DaemonConfig]) -> None:
    """The SIGHUP handler: ``load`` the settings again, then :func:`apply` them."""
    sdnotify.notify("RELOADING=1")
    try:
        new = load()
    except VirtmigError as exc:
        log.error("reload refused, the settings are unchanged: %s", exc)
    else:
        changes = apply(running, new)
        if not changes:
            log.info("reload: no setting that can change at run time changed")
    finally:
        sdnotify.notify("READY=1")
