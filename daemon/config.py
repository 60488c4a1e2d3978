"""Daemon settings: a TOML file (``virtmigd --config FILE``) with command-line flags on top.

Example (all keys optional)::

    listen = ["unix:///run/virtmig/virtmigd.sock", "tls://0.0.0.0:16614"]
    pki_dir = "/etc/pki/virtmig"       # cacert.pem, servercert.pem, private/serverkey.pem, ...
    tls_allowed_dn_list = ["O=virtmig,CN=*"]   # full access ([] or unset: any the CA signed)
    tls_readonly_dn_list = ["O=virtmig,CN=monitor-*"]  # read calls only
    readonly_socket = false            # virtmigd-ro.sock (0666) beside the main socket
    migrate_tls_force = true           # refuse migrations without --tls (or --tunnelled);
                                       # default: true for qemu listening on TLS only
    listen_insecure_tcp = false        # allow tcp:// listeners: no TLS, no authentication
    state_dir = "/var/lib/virtmig"
    backend = "test"
    hostname = "host-a.example"
    migration_ports = "49152-49215"
    migration_address = "0.0.0.0"      # where incoming migration streams bind
    migration_host = "10.1.2.3"        # what the source connects to (default: hostname)
    job_wait_timeout = 30              # seconds a state change waits for a migration job
    incoming_job_timeout = 60          # s before a job no caller's session owns is rolled back
    max_downtime_ms = 300
    stall_timeout = 0                  # s without progress that fail a migration (0: off)
    completion_timeout_per_gib = 0     # s per GiB of guest memory (0: off) ...
    completion_timeout_action = "abort"  # ... then: abort, suspend or postcopy
    max_outgoing_migrations = 0        # concurrent migrations accepted (0: no limit)
    max_incoming_migrations = 0
    max_domains = 10000                # domains held at most (define/prepare refused beyond)
    test_max_memory_mib = 0            # test backend: largest guest memory (0: the host's RAM)
    test_max_vcpus = 0                 # test backend: most vCPUs of a guest (0: 4096)
    max_clients = 512                  # clients (connections) with calls in flight, in all
    max_calls_per_client = 32          # calls in flight on one connection (streams included)
    peer_timeout = 10                  # s to connect to and ask a peer daemon where a guest is
    settle_retry_min = 1               # s before the first retry to settle an unknown outcome,
    settle_retry_max = 60              # doubling up to this,
    settle_attempts = 100              # at most this many tries (then migrate-resolve)
    migration_protocols = [2, 3]       # migration protocols spoken (e.g. [2]: an older peer)
    migration_params = true            # the extensible-parameter RPCs (*Params; needs 3)
    # The qemu backend's confinement (see virtmig.daemon.backend.qemu.confine):
    emulators = ["/usr/bin/qemu-system-x86_64"]   # default: qemu-system-x86_64 on PATH
    storage_dirs = ["/var/lib/virtmig/images"]    # disk images, kernels and initrds
    block_devices = []                 # block devices a <disk type='block'> may name
    qemu_user = "virtmig-qemu"         # QEMU's user when the daemon is root ("root": opt out)
    qemu_group = ""                    # default: qemu_user's primary group
    qemu_sandbox = true                # QEMU's seccomp sandbox
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path
from typing import Any

from virtmig.daemon.core import VERSION, DaemonConfig
from virtmig.daemon.limits import DEFAULT_MAX_CALLS_PER_CLIENT, DEFAULT_MAX_CLIENTS
from virtmig.daemon.listeners import check_insecure
from virtmig.daemon.registry import MAX_DOMAINS
from virtmig.proto.errors import InvalidArgument
from virtmig.proto.flags import COMPLETION_ACTIONS
from virtmig.proto.params import check_max_downtime
from virtmig.proto.uri import default_socket_path, parse_listen

DEFAULT_STATE_DIR = "/var/lib/virtmig"

_KEYS = {
    "listen", "state_dir", "backend", "hostname", "migration_ports", "migration_address",
    "migration_host", "job_wait_timeout", "max_downtime_ms", "stall_timeout",
    "incoming_job_timeout",
    "completion_timeout_per_gib", "completion_timeout_action", "max_outgoing_migrations",
    "max_incoming_migrations", "pki_dir", "tls_allowed_dn_list", "tls_readonly_dn_list",
    "listen_insecure_tcp", "readonly_socket", "max_domains", "test_max_memory_mib",
    "test_max_vcpus", "max_clients", "max_calls_per_client", "migrate_tls_force",
    "peer_timeout", "settle_retry_min", "settle_retry_max", "settle_attempts",
    "migration_protocols", "migration_params",
}
_QEMU_KEYS = {"emulators", "storage_dirs", "block_devices", "qemu_user", "qemu_group",
              "qemu_sandbox"}


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
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def load_config(args: argparse.Namespace) -> DaemonConfig:
    data: dict[str, Any] = {}
    if args.config:
        try:
            data = tomllib.loads(Path(args.config).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise InvalidArgument(f"cannot read config file {args.config}: {exc}") from exc
        unknown = set(data) - _KEYS - _QEMU_KEYS
        if unknown:
            raise InvalidArgument(
                f"unknown setting(s) in {args.config}: {', '.join(sorted(unknown))}"
            )
    for key in ("state_dir", "backend", "hostname", "migration_ports", "migration_address",
                "migration_host", "listen", *sorted(_QEMU_KEYS)):
        value = getattr(args, key, None)
        if value:
            data[key] = value
    listen = data.get("listen") or [f"unix://{default_socket_path()}"]
    if isinstance(listen, str):
        listen = [listen]
    for uri in listen:
        parse_listen(uri)
    # --allow-insecure vouches for the --listen URIs beside it, not for a config file's.
    insecure = _bool(data, "listen_insecure_tcp") or bool(
        getattr(args, "allow_insecure", False) and getattr(args, "listen", None))
    check_insecure(listen, insecure)
    lo, hi = parse_port_range(str(data.get("migration_ports", "49152-49215")))
    return DaemonConfig(
        state_dir=str(data.get("state_dir", DEFAULT_STATE_DIR)),
        listen=tuple(listen),
        backend=str(data.get("backend", "test")),
        hostname=str(data.get("hostname", "")),
        migration_port_min=lo,
        migration_port_max=hi,
        migration_address=str(data.get("migration_address", "0.0.0.0")),
        migration_host=str(data.get("migration_host", "")),
        job_wait_timeout=float(data.get("job_wait_timeout", 30.0)),
        incoming_job_timeout=_positive(data, "incoming_job_timeout", 60.0),
        default_max_downtime_ms=_max_downtime(data),
        stall_timeout_s=float(data.get("stall_timeout", 0)),
        completion_timeout_per_gib_s=float(data.get("completion_timeout_per_gib", 0)),
        completion_timeout_action=_action(str(data.get("completion_timeout_action", "abort"))),
        max_outgoing_migrations=int(data.get("max_outgoing_migrations", 0)),
        max_incoming_migrations=int(data.get("max_incoming_migrations", 0)),
        **_bounds(data),
        max_clients=_limit(data, "max_clients", DEFAULT_MAX_CLIENTS),
        max_calls_per_client=_limit(data, "max_calls_per_client", DEFAULT_MAX_CALLS_PER_CLIENT),
        pki_dir=str(data.get("pki_dir", "")),
        tls_allowed_dn_list=_strings(data, "tls_allowed_dn_list"),
        tls_readonly_dn_list=_strings(data, "tls_readonly_dn_list"),
        listen_insecure_tcp=insecure,
        readonly_socket=(_bool(data, "readonly_socket")
                         or bool(getattr(args, "readonly_socket", False))),
        migrate_tls_force=_bool(data, "migrate_tls_force") if "migrate_tls_force" in data
        else None,
        migration_protocols=_protocols(data),
        migration_params=_bool(data, "migration_params") if "migration_params" in data
        else True,
        **_qemu_settings(data),
        **_settle_settings(data),
    )


def _settle_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The one-place check's peer timeout and settling retries (virtmig.daemon.locate)."""
    lo = _positive(data, "settle_retry_min", 1.0)
    hi = _positive(data, "settle_retry_max", 60.0)
    if hi < lo:
        raise InvalidArgument(f"invalid settle_retry_max {hi:g}: less than settle_retry_min")
    return {"peer_timeout": _positive(data, "peer_timeout", 10.0), "settle_retry_min": lo,
            "settle_retry_max": hi, "settle_attempts": _limit(data, "settle_attempts", 100)}


def _qemu_settings(data: dict[str, Any]) -> dict[str, Any]:
    """The qemu backend's keys, checked (unset ones keep the backend's defaults)."""
    out: dict[str, Any] = {}
    for key in ("emulators", "storage_dirs", "block_devices"):
        if key in data:
            value = data[key]
            paths = [value] if isinstance(value, str) else value
            if not isinstance(paths, list) or not all(
                isinstance(p, str) and p.startswith("/") for p in paths
            ):
                raise InvalidArgument(f"invalid {key}: expected a list of absolute paths")
            out[key] = tuple(paths)
    for key in ("qemu_user", "qemu_group"):
        if key in data:
            if not isinstance(data[key], str) or (key == "qemu_user" and not data[key]):
                raise InvalidArgument(f"invalid {key} '{data[key]}': expected a name")
            out[key] = data[key]
    if "qemu_sandbox" in data:
        if not isinstance(data["qemu_sandbox"], bool):
            raise InvalidArgument("invalid qemu_sandbox: expected true or false")
        out["qemu_sandbox"] = data["qemu_sandbox"]
    return out


def _protocols(data: dict[str, Any]) -> tuple[int, ...]:
    """``migration_protocols``: a non-empty list of the protocol versions 2 and 3."""
    value = data.get("migration_protocols", [2, 3])
    if (not isinstance(value, list) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v in (2, 3)
                       for v in value)):
        raise InvalidArgument(f"invalid migration_protocols {value!r}: expected a non-empty "
                              "list of the protocol versions 2 and 3")
    return tuple(sorted(set(value)))


def _positive(data: dict[str, Any], key: str, default: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1e9:
        raise InvalidArgument(f"invalid {key} {value!r}: expected a positive number of seconds")
    return float(value)


def _bounds(data: dict[str, Any]) -> dict[str, Any]:
    """``max_domains`` (1..MAX_DOMAINS) and the test backend's guest limits (0: default)."""
    ranges = {"max_domains": (1, MAX_DOMAINS), "test_max_memory_mib": (0, 2**43),
              "test_max_vcpus": (0, 2**32 - 1)}
    out: dict[str, Any] = {}
    for key, (lo, hi) in ranges.items():
        if key in data:
            value = data[key]
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise InvalidArgument(f"invalid {key} {value!r}: expected an integer in {lo}..{hi}")
            out[key] = value
    return out


def _bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"invalid {key} {value!r}: expected true or false")
    return value


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"invalid {key} {value!r}: expected a list of strings")
    return tuple(value)


def _limit(data: dict[str, Any], key: str, default: int) -> int:
    """A limit on clients or calls: a whole number, at least 1 (there is no "unlimited")."""
    value = data.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidArgument(f"invalid {key} {value!r}: expected a whole number of at least 1")
    return value


def _max_downtime(data: dict[str, Any]) -> int:
    """``max_downtime_ms``, in the range ``SetMaxDowntime`` takes (one check for both)."""
    value = data.get("max_downtime_ms", 300)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"invalid max_downtime_ms {value!r}: expected a number of ms")
    try:
        return check_max_downtime(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid max_downtime_ms: {exc.detail}") from exc


def _action(value: str) -> str:
    if value not in COMPLETION_ACTIONS:
        raise InvalidArgument(f"invalid completion_timeout_action '{value}': expected "
                              f"{', '.join(COMPLETION_ACTIONS[:-1])} or {COMPLETION_ACTIONS[-1]}")
    return value
