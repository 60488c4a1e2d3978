"""The fleet in containers: live migrations of the heartbeat guest between host-a and host-b.

Each host is a container running ``virtmigd`` (qemu backend, TCG) from ``deploy/Containerfile``;
the CLI runs in a third.  Mutual TLS on the control channel (every ``virtmig+tls://``) and on
the migration stream (``--tls``: QEMU's own TLS with the hosts' certificates; tunnelled: inside
the daemons' mutual-TLS connection).  A guest is migrated with ``--persistent
--undefinesource``: afterwards exactly one host has it.  It has moved when its heartbeat, read
from the destination's serial console, goes on counting past the last one the source printed,
with its memory checks intact.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from tests.containers.fleet import HOSTS, INTRUDER_PKI, SOCKET, Fleet, Guest, migrate_args
from virtmig.testing import wait_until_sync

pytestmark = pytest.mark.containers

MODES = {
    "regular": (),
    "p2p": ("--p2p",),
    "tunnelled": ("--p2p", "--tunnelled"),
}


def other(host: str) -> str:
    return HOSTS[1] if host == HOSTS[0] else HOSTS[0]


def assert_only_on(fleet: Fleet, guest: Guest, host: str) -> None:
    """``guest`` runs on ``host``, the other host has neither it nor a QEMU."""
    assert fleet.domains(host).get(guest.name) == "running"
    assert guest.name not in fleet.domains(other(host))
    assert fleet.qemus(other(host)) == []


def migrate(fleet: Fleet, guest: Guest, src: str, extra: Sequence[str] = ()) -> None:
    """Migrate ``guest`` from ``src`` to the other host; its heartbeat goes on there."""
    dst = other(src)
    before = fleet.last_heartbeat(src, guest)
    fleet.virtmig(src, *migrate_args(guest.name, dst, extra))
    after = fleet.wait_heartbeat(dst, guest, before)
    fleet.wait_heartbeat(dst, guest, after)  # and keeps counting
    assert all(ok for _, ok in fleet.heartbeats(dst, guest)), "memory check failed"
    assert_only_on(fleet, guest, dst)


@pytest.mark.parametrize("mode", list(MODES))
def test_live_migration(fleet: Fleet, mode: str) -> None:
    guest = fleet.boot("host-a", f"live-{mode}")
    fleet.wait_heartbeat("host-a", guest, 1)  # dirtying memory for a while already
    migrate(fleet, guest, "host-a", MODES[mode])
    fleet.remove_guest(guest)
    assert fleet.qemus("host-b") == []


def test_client_not_allowed_is_refused(fleet: Fleet) -> None:
    """A certificate the fleet's CA signed, whose DN the daemons do not allow, gets nothing."""
    for host in HOSTS:
        assert fleet.virtmig(host, "hostname").stdout.decode().strip() == host
        refused = fleet.virtmig(host, "list", "--all", pki=INTRUDER_PKI, check=False)
        assert refused.returncode == 1
        err = refused.stderr.decode()
        assert "O=virtmig,CN=intruder" in err and "tls_allowed_dn_list" in err, err


def test_daemon_restarted_between_migrations(fleet: Fleet) -> None:
    """host-a's container (daemon and state volume) is stopped and started again while its
    guest is away; the guest comes back to it and leaves again."""
    guest = fleet.boot("host-a", "restart")
    migrate(fleet, guest, "host-a", ("--p2p",))
    uuid_before = fleet.virtmig("host-a", "nodeinfo").stdout
    fleet.stop_host("host-a")
    try:
        assert fleet.virtmig("host-b", "dominfo", guest.name).returncode == 0
    finally:
        fleet.start_host("host-a")
        fleet.wait_ready("host-a")
    assert fleet.virtmig("host-a", "nodeinfo").stdout == uuid_before
    migrate(fleet, guest, "host-b", ("--p2p",))
    migrate(fleet, guest, "host-a")
    fleet.remove_guest(guest)


def test_back_and_forth_ten_times(fleet: Fleet) -> None:
    guest = fleet.boot("host-a", "pingpong", memory_mib=128, dirty_mb=32, dirty_rate=2)
    src = "host-a"
    for _ in range(10):
        migrate(fleet, guest, src)
        src = other(src)
    fleet.remove_guest(guest)


def test_five_guests_at_once(fleet: Fleet) -> None:
    guests = [fleet.boot("host-a", f"many{i}", memory_mib=96, dirty_mb=16, dirty_rate=1)
              for i in range(5)]
    before = {g.name: fleet.last_heartbeat("host-a", g) for g in guests}
    procs = [fleet.virtmig_async("host-a", *migrate_args(g.name, "host-b")) for g in guests]
    for g, proc in zip(guests, procs, strict=True):
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (g.name, out, err)
    for g in guests:
        fleet.wait_heartbeat("host-b", g, before[g.name])
    assert set(fleet.domains("host-b")) == {g.name for g in guests}
    assert fleet.domains("host-a") == {}
    assert fleet.qemus("host-a") == []
    assert len(fleet.qemus("host-b")) == 5
    for g in guests:
        fleet.remove_guest(g)


def test_destination_disconnected_mid_migration(fleet: Fleet) -> None:
    """host-b leaves the network while the guest's memory streams to it, and comes back: the
    migration fails or completes, and once the daemons have settled it exactly one host runs
    the guest; the other holds no copy, job or QEMU."""
    guest = fleet.boot("host-a", "cut", dirty_rate=8)
    proc = fleet.virtmig_async("host-a", *migrate_args(
        guest.name, "host-b", ("--p2p", "--bandwidth", "4", "--stall-timeout", "10")))
    try:
        wait_until_sync(lambda: streaming(fleet, guest), timeout=120, interval=0.5,
                        what="the migration streaming")
        fleet.disconnect("host-b")
        _, err = proc.communicate(timeout=300)
        assert proc.returncode != 0, "the migration ended before host-b left"
        assert b"error:" in err
    finally:
        if proc.returncode is None:
            proc.kill()
            proc.communicate()
        fleet.reconnect("host-b")
    wait_until_sync(lambda: settled(fleet, guest), timeout=180, interval=1,
                    what=lambda: f"one copy of {guest.name}: {placement(fleet, guest)}")
    winner = settled(fleet, guest)
    assert winner is not None
    before = fleet.last_heartbeat(winner, guest)
    fleet.wait_heartbeat(winner, guest, before)
    fleet.remove_guest(guest)


def streaming(fleet: Fleet, guest: Guest) -> bool:
    info = fleet.virtmig("host-a", "domjobinfo", guest.name, check=False).stdout.decode()
    for line in info.splitlines():
        if line.startswith("Memory processed:"):
            return float(line.split()[2]) > 0
    return False


def placement(fleet: Fleet, guest: Guest) -> dict[str, tuple[str | None, int]]:
    return {h: (fleet.domains(h).get(guest.name), len(fleet.qemus(h))) for h in HOSTS}


def settled(fleet: Fleet, guest: Guest) -> str | None:
    """The one host that runs ``guest`` while the other has no QEMU and no running or paused
    copy (a shut-off definition that knows where it went may stay); None otherwise."""
    where = placement(fleet, guest)
    running = [h for h, (state, _) in where.items() if state == "running"]
    if len(running) != 1:
        return None
    state, qemus = where[other(running[0])]
    if qemus or state not in (None, "shut off"):
        return None
    return running[0]


def test_network_is_internal(fleet: Fleet) -> None:
    """The fleet's network has no way out; the client finds the hosts by container name."""
    internal = fleet.podman.text("network", "inspect", "--format", "{{.Internal}}",
                                 fleet.network).strip()
    assert internal == "true"
    for host in HOSTS:
        assert fleet.virtmig(host, "hostname").stdout.decode().strip() == host


def health_state(fleet: Fleet, host: str) -> str:
    """The health status podman records for ``host`` (``.State.Health``; ``Healthcheck`` in
    older podman)."""
    state = json.loads(fleet.podman.text("inspect", "--format", "{{json .State}}",
                                         fleet.names[host]))
    return str((state.get("Health") or state.get("Healthcheck") or {}).get("Status"))


def test_health_check_asks_the_grpc_health_service(fleet: Fleet) -> None:
    """The image's HEALTHCHECK is ``virtmig health`` on the local socket: it passes on a host
    whose daemon serves (podman then reports it healthy) and fails while the daemon does not
    answer; ``virtmig health`` over mutual TLS from the client says SERVING."""
    for host in HOSTS:
        check = json.loads(fleet.podman.text("inspect", "--format",
                                             "{{json .Config.Healthcheck}}", fleet.names[host]))
        assert check["Test"][-1] == "health" and f"virtmig+unix://{SOCKET}" in check["Test"]
        assert fleet.podman("healthcheck", "run", fleet.names[host], check=False).returncode == 0
        assert health_state(fleet, host) == "healthy"
        assert fleet.virtmig(host, "-q", "health").stdout == b"SERVING\n"
        unknown = fleet.virtmig(host, "health", "--service", "no.such.Service", check=False)
        assert (unknown.returncode, unknown.stdout.strip()) == (1, b"SERVICE_UNKNOWN")
    # The daemon frozen (SIGSTOP to tini's child): the check gives up and fails.
    daemon = "kill -{} $(cat /proc/1/task/1/children)"
    fleet.podman("exec", fleet.names["host-a"], "sh", "-c", daemon.format("STOP"))
    try:
        frozen = fleet.podman("healthcheck", "run", fleet.names["host-a"], check=False)
        assert frozen.returncode != 0
    finally:
        fleet.podman("exec", fleet.names["host-a"], "sh", "-c", daemon.format("CONT"))
    fleet.wait_ready("host-a")
    assert health_state(fleet, "host-a") == "healthy"
