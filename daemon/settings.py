"""The daemon's settings schema: every TOML key, its type, its default and its help, in one place.

:data:`SCHEMA` is the one list of what ``virtmigd --config FILE`` accepts.  :func:`typed` checks a
parsed TOML table against it before anything reads a value: an unknown key or a value of the
wrong type (``job_wait_timeout = "abc"``) is :class:`~virtmig.proto.errors.InvalidArgument`
naming the key, the value and the type expected.  Ranges and cross-key rules are checked after,
by :mod:`virtmig.daemon.config`, which reads every default from here (:func:`default`); so do
:class:`~virtmig.daemon.core.DaemonConfig` (a daemon built in-process, by tests or a library
user, gets the same defaults as ``virtmigd``), the call limits, the history and the qemu backend's
settings (:func:`held`).

``reload``: whether SIGHUP applies a change of the key while the daemon runs
(:mod:`virtmig.daemon.reload`); a change of any other key is logged as taking effect at the next
start.  README's table of settings and ``deploy/virtmigd.toml`` name every key of the schema
and no other (a test compares them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from virtmig.proto import logsafe
from virtmig.proto.errors import InvalidArgument

Kind = Literal["string", "bool", "int", "number", "strings", "ints", "paths"]

EXPECTED: Final[Mapping[Kind, str]] = {
    "string": "a string",
    "bool": "true or false",
    "int": "a whole number",
    "number": "a number",
    "strings": "a list of strings",
    "ints": "a list of whole numbers",
    "paths": "a list of absolute paths",
}


@dataclass(frozen=True)
class Setting:
    """One TOML key.  ``default`` None: decided at start (``help`` says how)."""

    key: str
    kind: Kind
    default: Any
    help: str
    reload: bool = False


def _s(key: str, kind: Kind, default: Any, help: str, reload: bool = False) -> Setting:
    return Setting(key, kind, default, help, reload)


SCHEMA: Final[tuple[Setting, ...]] = (
    _s("listen", "strings", None, "unix:///path, tls://host:port or tcp://host:port (a string or "
       "a list); default: the run dir's virtmigd.sock"),
    _s("pki_dir", "string", "", "the TLS listeners' and peer connections' PKI dir ('': "
       "$VIRTMIG_PKI_DIR, else the default dir)"),
    _s("tls_allowed_dn_list", "strings", [], "client DNs with full access ([]: any the CA "
       "signed)", reload=True),
    _s("tls_readonly_dn_list", "strings", [], "client DNs with read calls only", reload=True),
    _s("readonly_socket", "bool", False, "also virtmigd-ro.sock (0666), read calls only"),
    _s("listen_insecure_tcp", "bool", False, "allow plain tcp:// listeners"),
    _s("migrate_tls_force", "bool", None, "refuse migrations without --tls or --tunnelled; "
       "default: true for qemu listening on TLS only"),
    _s("state_dir", "string", "/var/lib/virtmig", "definitions, live status, host UUID"),
    _s("backend", "string", "test", "hypervisor backend: test or qemu"),
    _s("hostname", "string", "", "the host name this daemon reports ('': the system's)"),
    _s("migration_ports", "string", "49152-49215", "ports of incoming migration streams, MIN-MAX"),
    _s("migration_address", "string", "0.0.0.0", "address incoming migration streams bind to"),
    _s("migration_host", "string", "", "host the source connects to ('': the hostname)"),
    _s("migration_port_wait", "number", 30.0, "seconds a Prepare waits for a free migration "
       "port when all are taken (0: fail at once)", reload=True),
    _s("job_wait_timeout", "number", 30.0, "seconds a state change waits for a migration job"),
    _s("incoming_job_timeout", "number", 60.0, "seconds before a job no caller's session owns "
       "is rolled back (> 0)", reload=True),
    _s("stall_timeout", "number", 0.0, "seconds without progress that fail a migration (0: off)",
       reload=True),
    _s("completion_timeout_per_gib", "number", 0.0, "seconds per GiB of guest memory (0: off)",
       reload=True),
    _s("completion_timeout_action", "string", "abort", "then: abort, suspend or postcopy",
       reload=True),
    _s("max_outgoing_migrations", "int", 0, "concurrent outgoing migrations (0: no limit)",
       reload=True),
    _s("max_incoming_migrations", "int", 0, "concurrent incoming migrations (0: no limit)",
       reload=True),
    _s("max_domains", "int", 100000, "domains held at most (1..1000000)"),
    _s("test_max_memory_mib", "int", 0, "test backend: largest guest memory (0: the host's RAM)"),
    _s("test_max_vcpus", "int", 0, "test backend: most vCPUs of a guest (0: 4096)"),
    _s("test_stream_threads", "int", 256, "test backend: migration stream threads at most, two "
       "per stream, half for outgoing and half for incoming streams; a stream beyond waits "
       "(4..65536)"),
    _s("max_downtime_ms", "int", 300, "default maximum downtime at switchover (1..2000000)",
       reload=True),
    _s("max_clients", "int", 512, "clients with calls in flight (at least 1)", reload=True),
    _s("max_calls_per_client", "int", 32, "calls in flight on one connection (at least 1)",
       reload=True),
    _s("peer_timeout", "number", 10.0, "seconds to connect to and ask a peer daemon",
       reload=True),
    _s("settle_retry_min", "number", 1.0, "seconds before the first retry to settle an "
       "unknown outcome"),
    _s("settle_retry_max", "number", 60.0, "longest wait between those retries"),
    _s("settle_attempts", "int", 100, "tries at most (then migrate-resolve)"),
    _s("migration_protocols", "ints", [2, 3], "migration protocols spoken: [2, 3], [3] or [2]"),
    _s("migration_params", "bool", True, "the extensible-parameter RPCs (*Params; with 3)"),
    _s("emulators", "paths", None, "emulators the qemu backend runs (default: "
       "qemu-system-x86_64 on PATH)"),
    _s("storage_dirs", "paths", None, "folders guest images may lie in (default: "
       "/var/lib/virtmig/images)"),
    _s("block_devices", "paths", [], "block devices a <disk type='block'> may name"),
    _s("qemu_user", "string", "virtmig-qemu", "QEMU's user when the daemon is root"),
    _s("qemu_group", "string", "", "QEMU's group ('': qemu_user's primary group)"),
    _s("qemu_sandbox", "bool", True, "QEMU's seccomp sandbox"),
    _s("vnc_port_min", "int", 5900, "autoport VNC servers take the first free port from here"),
    _s("vnc_port_max", "int", 65535, "... to here (5900-65535)"),
    _s("vnc_remote_listen", "bool", False, "VNC (no password) on a non-loopback address allowed"),
    _s("metrics_listen", "string", "", "HOST:PORT of the Prometheus endpoint ('': off; "
       "loopback only without a tls:// listener)"),
    _s("history_max_bytes", "int", 1 << 20, "size of the migration history file before it is "
       "rotated (at least 4096)"),
    _s("log_level", "string", "info", "debug, info, warning or error", reload=True),
    _s("log_format", "string", "plain", "log lines as plain text or json", reload=True),
    _s("log_outputs", "strings", ["stderr"], "where log lines go: stderr and/or file:/path"),
    _s("event_loop", "string", "asyncio", "the daemon's event loop: asyncio (the standard "
       "library's) or uvloop (libuv's)"),
)

BY_KEY: Final[Mapping[str, Setting]] = {s.key: s for s in SCHEMA}
# Keys a string may stand for a one-element list of.
_ONE_OR_MORE = {"listen", "emulators", "storage_dirs", "block_devices", "log_outputs"}


def default(key: str) -> Any:
    """``key``'s default (a fresh list for list kinds)."""
    value = BY_KEY[key].default
    return list(value) if isinstance(value, list) else value


def held(key: str) -> Any:
    """``key``'s default as a frozen value holds it (a list as a tuple): the defaults of
    :class:`~virtmig.daemon.core.DaemonConfig`, the call limits, the history and the qemu
    backend's settings are read from here, so that each default is written once."""
    value = BY_KEY[key].default
    return tuple(value) if isinstance(value, list) else value


def _fits(kind: Kind, value: Any) -> bool:
    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if kind == "string":
        return isinstance(value, str)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return whole(value)
    if kind == "number":
        return whole(value) or isinstance(value, float)
    if kind == "ints":
        return isinstance(value, list) and all(whole(v) for v in value)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return False
    return kind == "strings" or all(v.startswith("/") for v in value)


def typed(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``data`` (a parsed TOML table from ``source``) checked against :data:`SCHEMA`: every key
    known, every value of its key's type (a lone string stands for a list where a key takes
    several)."""
    unknown = sorted(set(data) - set(BY_KEY))
    if unknown:
        raise InvalidArgument(f"unknown setting(s) in {source}: {', '.join(unknown)}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        setting = BY_KEY[key]
        if key in _ONE_OR_MORE and isinstance(value, str):
            value = [value]
        if not _fits(setting.kind, value):
            raise InvalidArgument(f"invalid {key} {logsafe.safe(repr(value), 80)} in {source}: "
                                  f"expected {EXPECTED[setting.kind]}")
        out[key] = value
    return out
