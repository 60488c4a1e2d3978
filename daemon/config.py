"""Daemon settings: a TOML file (``virtmigd --config FILE``) with command-line flags on top.

Every key, its type, default and help is in :data:`virtmig.daemon.settings.SCHEMA`; the
annotated example is ``deploy/virtmigd.toml`` and README's table of settings.  A file is first
checked against the schema (an unknown key, a value of the wrong type: one clear error naming
it), then each value's range and the rules between keys are checked here, where
:class:`~virtmig.daemon.core.DaemonConfig` is built.  :func:`read_file` is also what a SIGHUP
reload reads (:mod:`virtmig.daemon.reload`).
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from virtmig.daemon import settings
from virtmig.daemon.core import VERSION, DaemonConfig
from virtmig.daemon.listeners import check_insecure
from virtmig.daemon.registry import MAX_DOMAINS
from virtmig.proto.errors import InvalidArgument
from virtmig.proto.flags import COMPLETION_ACTIONS
from virtmig.proto.params import check_max_downtime
from virtmig.proto.uri import default_socket_path, parse_listen

DEFAULT_STATE_DIR = str(settings.default("state_dir"))
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("plain", "json")


def parse_port_range(text: str) -> tuple[int, int]:
    try:
        lo_s, hi_s = text.split("-", 1)
        lo, hi = int(lo_s), int(hi_s)
    except ValueError as exc:
        raise InvalidArgument(f"invalid migration port range '{text}': expected MIN-MAX") from exc
    if not (0 < lo <= hi < 65536):
        raise InvalidArgument(f"invalid migration port range '{text}'")
    return lo, hi


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="virtmigd", description="virtmig migration daemon")
    p.add_argument("--version", action="version", version=f"%(prog)s {VERSION}")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--listen", action="append", metavar="URI",
                   help="unix:///path, tls://host:port, or tcp://host:port with "
                        "--allow-insecure (repeatable)")
    p.add_argument("--allow-insecure", action="store_true",
                   help="allow the plain tcp:// --listen URIs: no TLS, no authentication "
                        "(the config's listen_insecure_tcp)")
    p.add_argument("--readonly-socket", action="store_true",
                   help="also listen on virtmigd-ro.sock (0666) for read calls only")
    p.add_argument("--state-dir", metavar="DIR")
    p.add_argument("--backend", metavar="NAME", help="hypervisor backend: test (default), qemu")
    p.add_argument("--hostname", metavar="NAME", help="host name this daemon reports")
    p.add_argument("--migration-ports", metavar="MIN-MAX", help="default 49152-49215")
    p.add_argument("--migration-address", metavar="ADDR",
                   help="address incoming migration streams listen on")
    p.add_argument("--migration-host", metavar="HOST",
                   help="host name or address the source connects to")
    p.add_argument("--emulator", action="append", dest="emulators", metavar="PATH",
                   help="an emulator the qemu backend may run (repeatable)")
    p.add_argument("--storage-dir", action="append", dest="storage_dirs", metavar="DIR",
                   help="a folder guest images may lie in (repeatable)")
    p.add_argument("--block-device", action="append", dest="block_devices", metavar="PATH",
                   help="a block device a <disk type='block'> may name (repeatable)")
    p.add_argument("--qemu-user", metavar="USER", help="QEMU's user when the daemon is root")
    p.add_argument("--qemu-group", metavar="GROUP", help="QEMU's group when the daemon is root")
    p.add_argument("--ready-file", metavar="FILE",
                   help="write the bound addresses as JSON here once serving")
    p.add_argument("--log-level", choices=LOG_LEVELS,
                   help="the config's log_level (default: info)")
    p.add_argument("--log-format", choices=LOG_FORMATS,
                   help="the config's log_format: plain (default) or json lines")
    p.add_argument("--log-output", action="append", dest="log_outputs", metavar="OUTPUT",
                   help="stderr or file:/path (repeatable; the config's log_outputs)")
    return p


def read_file(path: str) -> dict[str, Any]:
    """The TOML file ``path``, checked against the schema."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read config file {path}: {exc}") from exc
    return settings.typed(data, path)


def _get(data: dict[str, Any], key: str) -> Any:
    return data[key] if key in data else settings.default(key)


_FLAGS = ("state_dir", "backend", "hostname", "migration_ports", "migration_address",
          "migration_host", "listen", "emulators", "storage_dirs", "block_devices", "qemu_user",
          "qemu_group", "log_level", "log_format", "log_outputs")


def load_config(args: argparse.Namespace) -> DaemonConfig:
    data: dict[str, Any] = read_file(args.config) if args.config else {}
    for key in _FLAGS:
        value = getattr(args, key, None)
        if value:
            data[key] = value
    listen = data.get("listen") or [f"unix://{default_socket_path()}"]
    for uri in listen:
        parse_listen(uri)
    # --allow-insecure vouches for the --listen URIs beside it, not for a config file's.
    insecure = _get(data, "listen_insecure_tcp") or bool(
        getattr(args, "allow_insecure", False) and getattr(args, "listen", None))
    check_insecure(listen, insecure)
    lo, hi = parse_port_range(_get(data, "migration_ports"))
    return DaemonConfig(
        state_dir=_get(data, "state_dir"),
        listen=tuple(listen),
        backend=_get(data, "backend"),
        hostname=_get(data, "hostname"),
        migration_port_min=lo,
        migration_port_max=hi,
        migration_address=_get(data, "migration_address"),
        migration_host=_get(data, "migration_host"),
        migration_port_wait=_seconds(data, "migration_port_wait"),
        job_wait_timeout=_seconds(data, "job_wait_timeout"),
        incoming_job_timeout=_positive(data, "incoming_job_timeout"),
        default_max_downtime_ms=_max_downtime(data),
        stall_timeout_s=_seconds(data, "stall_timeout"),
        completion_timeout_per_gib_s=_seconds(data, "completion_timeout_per_gib"),
        completion_timeout_action=_action(_get(data, "completion_timeout_action")),
        max_outgoing_migrations=_count(data, "max_outgoing_migrations"),
        max_incoming_migrations=_count(data, "max_incoming_migrations"),
        **_bounds(data),
        max_clients=_limit(data, "max_clients"),
        max_calls_per_client=_limit(data, "max_calls_per_client"),
        pki_dir=_get(data, "pki_dir"),
        tls_allowed_dn_list=tuple(_get(data, "tls_allowed_dn_list")),
        tls_readonly_dn_list=tuple(_get(data, "tls_readonly_dn_list")),
        listen_insecure_tcp=insecure,
        readonly_socket=(_get(data, "readonly_socket")
                         or bool(getattr(args, "readonly_socket", False))),
        migrate_tls_force=_get(data, "migrate_tls_force"),
        migration_protocols=_protocols(data),
        migration_params=_get(data, "migration_params"),
        **_qemu_settings(data),
        **_settle_settings(data),
        **_log_settings(data),
        history_max_bytes=_history_bytes(data),
        metrics_listen=_metrics_listen(data, listen),
        event_loop=_event_loop(data),
    )


def _event_loop(data: dict[str, Any]) -> str:
    from virtmig.daemon.eventloop import LOOPS, check

    value: str = _get(data, "event_loop")
    if value not in LOOPS:
        raise InvalidArgument(f"invalid event_loop '{value}': expected {' or '.join(LOOPS)}")
    check(value)
    return value


def _metrics_listen(data: dict[str, Any], listen: list[str]) -> str:
    """``metrics_listen``, checked against the listeners (loopback only without TLS)."""
    from virtmig.daemon.metrics_http import check

    value: str = _get(data, "metrics_listen")
    if value:
        check(value, any(parse_listen(uri).transport == "tls" for uri in listen))
    return value


def _history_bytes(data: dict[str, Any]) -> int:
    value: int = _get(data, "history_max_bytes")
    if not 4096 <= value <= 1 << 40:
        raise InvalidArgument(f"invalid history_max_bytes {value}: expected 4096 to 2^40")
    return value


def _log_settings(data: dict[str, Any]) -> dict[str, Any]:
    """``log_level``, ``log_format`` and ``log_outputs`` (virtmig.daemon.logs)."""
    level, fmt = _get(data, "log_level"), _get(data, "log_format")
    if level not in LOG_LEVELS:
        raise InvalidArgument(f"invalid log_level '{level}': expected {', '.join(LOG_LEVELS)}")
    if fmt not in LOG_FORMATS:
        raise InvalidArgument(f"invalid log_format '{fmt}': expected plain or json")
    outputs = _get(data, "log_outputs")
    for out in outputs:
        if out != "stderr" and not (out.startswith("file:/") and len(out) > 6):
            raise InvalidArgument(f"invalid log output '{out}': expected stderr or "
                                  "file:/absolute/path")
    if not outputs:
        raise InvalidArgument("invalid log_outputs []: expected at least one output")
    return {"log_level": level, "log_format": fmt, "log_outputs": tuple(outputs)}


def _settle_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The one-place check's peer timeout and settling retries (virtmig.daemon.locate)."""
    lo = _positive(data, "settle_retry_min")
    hi = _positive(data, "settle_retry_max")
    if hi < lo:
        raise InvalidArgument(f"invalid settle_retry_max {hi:g}: less than settle_retry_min")
    return {"peer_timeout": _positive(data, "peer_timeout"), "settle_retry_min": lo,
            "settle_retry_max": hi, "settle_attempts": _limit(data, "settle_attempts")}


def _qemu_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The qemu backend's keys (types checked by the schema; unset ones keep the backend's
    defaults)."""
    out: dict[str, Any] = {}
    for key in ("emulators", "storage_dirs", "block_devices"):
        if _get(data, key) is not None:
            out[key] = tuple(_get(data, key))
    if not _get(data, "qemu_user"):
        raise InvalidArgument("invalid qemu_user '': expected a name")
    for key in ("qemu_user", "qemu_group", "qemu_sandbox", "vnc_remote_listen"):
        out[key] = _get(data, key)
    for key in ("vnc_port_min", "vnc_port_max"):
        if not 5900 <= _get(data, key) <= 65535:
            raise InvalidArgument(f"invalid {key} '{_get(data, key)}': expected a port 5900-65535")
        out[key] = _get(data, key)
    if out["vnc_port_min"] > out["vnc_port_max"]:
        raise InvalidArgument(f"invalid vnc_port_min {out['vnc_port_min']}: above vnc_port_max "
                              f"{out['vnc_port_max']}")
    return out


def _protocols(data: dict[str, Any]) -> tuple[int, ...]:
    """``migration_protocols``: a non-empty list of the protocol versions 2 and 3."""
    value = _get(data, "migration_protocols")
    if not value or not all(v in (2, 3) for v in value):
        raise InvalidArgument(f"invalid migration_protocols {value!r}: expected a non-empty "
                              "list of the protocol versions 2 and 3")
    return tuple(sorted(set(value)))


def _seconds(data: dict[str, Any], key: str) -> float:
    """A duration in seconds, 0 or more (0: off, where the key has an off)."""
    value = float(_get(data, key))
    if not 0 <= value < 1e9:
        raise InvalidArgument(f"invalid {key} {value:g}: expected a number of seconds >= 0")
    return value


def _positive(data: dict[str, Any], key: str) -> float:
    value = float(_get(data, key))
    if not 0 < value < 1e9:
        raise InvalidArgument(f"invalid {key} {value:g}: expected a positive number of seconds")
    return value


def _count(data: dict[str, Any], key: str) -> int:
    """A limit on migrations: 0 (none) or more."""
    value: int = _get(data, key)
    if value < 0:
        raise InvalidArgument(f"invalid {key} {value}: expected 0 (no limit) or more")
    return value


def _bounds(data: dict[str, Any]) -> dict[str, Any]:
    """``max_domains`` (1..MAX_DOMAINS), the test backend's guest limits (0: default) and its
    stream threads (at least 4)."""
    ranges = {"max_domains": (1, MAX_DOMAINS), "test_max_memory_mib": (0, 2**43),
              "test_max_vcpus": (0, 2**32 - 1), "test_stream_threads": (4, 65536)}
    out: dict[str, Any] = {}
    for key, (lo, hi) in ranges.items():
        if key in data:
            value = data[key]
            if not lo <= value <= hi:
                raise InvalidArgument(f"invalid {key} {value!r}: expected an integer in {lo}..{hi}")
            out[key] = value
    return out


def _limit(data: dict[str, Any], key: str) -> int:
    """A limit on clients or calls: a whole number, at least 1 (there is no "unlimited")."""
    value: int = _get(data, key)
    if value < 1:
        raise InvalidArgument(f"invalid {key} {value!r}: expected a whole number of at least 1")
    return value


def _max_downtime(data: dict[str, Any]) -> int:
    """``max_downtime_ms``, in the range ``SetMaxDowntime`` takes (one check for both)."""
    try:
        return check_max_downtime(_get(data, "max_downtime_ms"))
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid max_downtime_ms: {exc.detail}") from exc


def _action(value: str) -> str:
    if value not in COMPLETION_ACTIONS:
        raise InvalidArgument(f"invalid completion_timeout_action '{value}': expected "
                              f"{', '.join(COMPLETION_ACTIONS[:-1])} or {COMPLETION_ACTIONS[-1]}")
    return value
