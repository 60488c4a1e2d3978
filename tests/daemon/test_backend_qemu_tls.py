"""The ``qemu`` backend's TLS migration stream (``VIR_MIGRATE_TLS``), driven directly.

Each side gets a :class:`StreamTls` from the session's throw-away PKI (the destination its
server certificate, the source its client certificate and the name the destination must
carry): a TLS migration moves a real guest (its heartbeat goes on at the destination, memory
intact), over multifd channels; a wrong name, an untrusted source certificate, a plain source or
a stranger's garbage never get a guest in, and the source runs on.  The credentials QEMU loads
are written owner-only for QEMU's user and removed once loaded; the object goes after the
migration.  Without QEMU: the credentials folder and the parameters, as values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import stat
import uuid as uuidlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import (
    SLOW,
    make_spec,
    process_gone,
    to,
    wait_status,
    within,
)
from tests.e2e.test_qemu_migration import (
    TCG_RERUNS,
    assert_memory_ok,
    heartbeats,
    lives_on,
    wait_heartbeat,
)
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    GuestSpec,
    MigrationFailed,
    MigrationStatus,
    MigrationTuning,
    StreamTls,
)
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.daemon.backend.qemu.confine import (
    TLS_CREDS_DIR,
    RunAs,
    prepare_guest_dir,
    remove_tls_creds,
    write_tls_creds,
)
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.daemon.backend.qemu.migration import (
    TLS_OBJECT_ID,
    _Outgoing,
    _src_settings,
    _tls_params,
)
from virtmig.daemon.backend.qemu.monitor import QMP_TIMEOUT
from virtmig.daemon.backend.qemu.outgoing import _src_ended_error
from virtmig.proto.compat import check_flags_supported
from virtmig.proto.errors import ArgumentUnsupported
from virtmig.proto.flags import MigrateFlags
from virtmig.testing import GuestImage, free_port, qemu_domain_xml, session_pki, wait_until

backends = backend_qemu_helpers.backends
dst = backend_qemu_helpers.dst
src = backend_qemu_helpers.src

BOOT_TIMEOUT = 90.0  # the test guest's first heartbeat under TCG, under load


def server_tls(host: str = "dst") -> StreamTls:
    """The destination's side: its server certificate."""
    pki = session_pki().host(host)
    return StreamTls(pki / "cacert.pem", pki / "servercert.pem", pki / "private/serverkey.pem")


def client_tls(pki: Path, hostname: str = "dst.test") -> StreamTls:
    """The source's side: a client certificate, and the name the destination must carry."""
    return StreamTls(pki / "cacert.pem", pki / "clientcert.pem", pki / "private/clientkey.pem",
                     hostname)


def creds_left(backend: QemuBackend, uuid: str) -> bool:
    """Whether the guest's folder still holds a credentials folder (or anything in its place)."""
    return os.path.lexists(backend._state_dir() / uuid / TLS_CREDS_DIR)


def qemu_uid(backend: QemuBackend) -> int:
    return backend._owner.uid if backend._owner is not None else os.geteuid()


def spy_creds(backend: QemuBackend, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record the credentials folder as QEMU finds it at each ``object-add``."""
    seen: list[dict[str, Any]] = []
    real = backend._exec

    async def spy(guest: Any, command: str, args: dict[str, object] | None = None,
                  timeout: float = QMP_TIMEOUT, *, oob: bool = False) -> dict[str, Any]:
        if command == "object-add" and args is not None:
            folder = guest.dir / str(args["dir"])
            st = os.lstat(folder)
            seen.append({
                "args": dict(args), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
                "dir": stat.S_ISDIR(st.st_mode),
                "files": {p.name: (stat.S_IMODE(p.lstat().st_mode), p.lstat().st_uid)
                          for p in folder.iterdir()},
            })
        return await real(guest, command, args, timeout, oob=oob)

    monkeypatch.setattr(backend, "_exec", spy)
    return seen


async def tls_object(backend: QemuBackend, uuid: str) -> bool:
    objects = await backend.query(uuid, "qom-list", {"path": "/objects"})
    return any(o["name"] == TLS_OBJECT_ID for o in objects)


async def tls_creds_param(backend: QemuBackend, uuid: str) -> str:
    return str((await backend.query(uuid, "query-migrate-parameters")).get("tls-creds"))


async def wait_tls_dropped(backend: QemuBackend, uuid: str) -> None:
    """Until QEMU holds no credentials object and its next stream is plain."""
    async def dropped() -> bool:
        return not await tls_object(backend, uuid) and await tls_creds_param(backend, uuid) == ""

    await wait_until(dropped, timeout=10, interval=0.1, what="the TLS credentials to go")


# --- without QEMU ---------------------------------------------------------------------------------


def test_tls_is_a_qemu_flag() -> None:
    check_flags_supported(MigrateFlags.TLS | MigrateFlags.LIVE, QemuBackend.extra_flags)
    with pytest.raises(ArgumentUnsupported, match="VIR_MIGRATE_TLS"):  # (a backend without it)
        check_flags_supported(MigrateFlags.TLS, QemuBackend.extra_flags & ~MigrateFlags.TLS)


def test_tls_parameters_per_side() -> None:
    tls = client_tls(session_pki().host("src"), "dst.test")
    assert _tls_params(MigrationTuning(tls=tls), incoming=False) == {
        "tls-creds": TLS_OBJECT_ID, "tls-hostname": "dst.test"}
    assert _tls_params(MigrationTuning(tls=server_tls()), incoming=True) == {
        "tls-creds": TLS_OBJECT_ID, "tls-hostname": ""}
    # A plain stream resets what an earlier TLS migration set.
    plain = {"tls-creds": "", "tls-hostname": ""}
    assert _tls_params(MigrationTuning(), incoming=False) == plain
    assert plain.items() <= _src_settings(MigrationTuning())[1].items()


def _owner() -> RunAs | None:
    """Someone other than the tests when they run as root (their files must become theirs)."""
    if os.geteuid() != 0:
        return None
    nobody = pwd.getpwnam("nobody")
    return RunAs(user="nobody", uid=nobody.pw_uid, gid=nobody.pw_gid, groups=())


@pytest.mark.parametrize("server", [True, False])
def test_creds_folder_is_qemus_alone(tmp_path: Path, server: bool) -> None:
    gdir = tmp_path / "guest"
    gdir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (gdir / TLS_CREDS_DIR).symlink_to(elsewhere)  # planted: never followed
    owner = _owner()
    uid = owner.uid if owner else os.geteuid()
    pki = session_pki().host("dst")
    tls = server_tls() if server else client_tls(pki)
    old = os.umask(0)
    try:
        name = write_tls_creds(gdir, tls, server=server, owner=owner)
    finally:
        os.umask(old)
    folder = gdir / name
    assert name == TLS_CREDS_DIR and not folder.is_symlink() and folder.is_dir()
    assert not list(elsewhere.iterdir())
    st = folder.lstat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700, uid)
    role = "server" if server else "client"
    files = {p.name: p.lstat() for p in folder.iterdir()}
    assert sorted(files) == sorted(["ca-cert.pem", f"{role}-cert.pem", f"{role}-key.pem"])
    assert all((stat.S_IMODE(s.st_mode), s.st_uid) == (0o400, uid) for s in files.values())
    assert (folder / f"{role}-key.pem").read_bytes() == tls.key.read_bytes()
    assert (folder / "ca-cert.pem").read_bytes() == tls.ca_cert.read_bytes()
    remove_tls_creds(gdir)
    assert not os.path.lexists(folder)


def test_leftover_creds_go_when_the_guest_starts(tmp_path: Path) -> None:
    gdir = tmp_path / "guest"
    gdir.mkdir()
    write_tls_creds(gdir, server_tls(), server=True, owner=None)  # a crashed daemon's
    prepare_guest_dir(gdir, None)
    assert not os.path.lexists(gdir / TLS_CREDS_DIR)


def test_unreadable_creds_leave_nothing(tmp_path: Path) -> None:
    gdir = tmp_path / "guest"
    gdir.mkdir()
    pki = session_pki().host("dst")
    bad = StreamTls(pki / "cacert.pem", pki / "servercert.pem", tmp_path / "missing.pem")
    with pytest.raises(BackendError, match=r"cannot read .*missing\.pem"):
        write_tls_creds(gdir, bad, server=True, owner=None)
    assert not os.path.lexists(gdir / TLS_CREDS_DIR)


async def test_source_error_from_qemus_log_when_query_migrate_has_none(tmp_path: Path) -> None:
    """A TLS peer that hangs up can leave ``query-migrate`` without ``error-desc``: the error is
    then QEMU's own words from its log, written since ``migrate`` (not an earlier failure's)."""
    guest = _Guest(uuid="u", dir=tmp_path, pid=0)
    log = tmp_path / "qemu.log"
    log.write_text("2026-01-01T00:00:00.000000Z qemu-system-x86_64: an earlier failure\n")
    mig = _Outgoing(tuning=MigrationTuning(), was_running=True, log_at=guest.log_size())
    with log.open("a") as f:
        f.write("2026-01-01T00:00:01.000000Z qemu-system-x86_64: Cannot write to TLS channel: "
                "Input/output error\n")
    guest.mig_status = "failed"

    async def qmp(guest: Any, command: str, args: Any = None, timeout: float = 0, *,
                  oob: bool = False) -> dict[str, Any]:
        return {"status": "failed"}

    error = await _src_ended_error(qmp, guest, mig)
    assert isinstance(error, MigrationFailed)
    assert str(error) == "Cannot write to TLS channel: Input/output error"


# --- with QEMU ------------------------------------------------------------------------------------


@pytest.mark.qemu
@TCG_RERUNS
async def test_tls_migration_over_multifd(
    src: QemuBackend, dst: QemuBackend, guest_image: GuestImage,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    src_seen, dst_seen = spy_creds(src, monkeypatch), spy_creds(dst, monkeypatch)
    uuid = str(uuidlib.uuid4())
    spec = make_spec(qemu_domain_xml(guest_image, "vm1", 128, uuid=uuid, dirty_mb=16,
                                     dirty_rate=4))
    await within(src.start(spec, paused=False))
    src_serial = src._state_dir() / uuid / "serial0.log"
    dst_serial = dst._state_dir() / uuid / "serial0.log"
    await wait_heartbeat(src_serial, 1, BOOT_TIMEOUT)

    port = await within(dst.incoming_start(spec, to(free_port()), MigrationTuning(
        parallel_connections=2, tls=server_tls())))
    assert await tls_creds_param(dst, uuid) == TLS_OBJECT_ID
    assert await tls_object(dst, uuid)
    assert not creds_left(dst, uuid)  # loaded: gone
    before = heartbeats(src_serial)[-1][0]
    out = await within(src.outgoing(uuid, to(port), MigrationTuning(
        parallel_connections=2, tls=client_tls(session_pki().host("src")))), 60)
    assert out.status is MigrationStatus.COMPLETED
    assert (await within(dst.incoming_wait(uuid))).status is MigrationStatus.COMPLETED
    await within(dst.resume(uuid))

    # The guest goes on counting at the destination, its memory intact.
    await lives_on(dst, uuid, dst_serial, before, 30)
    assert_memory_ok(dst_serial, destination=True)
    assert_memory_ok(src_serial)

    # QEMU found its credentials owner-only, QEMU's user's, in the layout it wants.
    for backend, seen, role in ((src, src_seen, "client"), (dst, dst_seen, "server")):
        assert len(seen) == 1
        assert seen[0]["args"] == {"qom-type": "tls-creds-x509", "id": TLS_OBJECT_ID,
                                   "dir": TLS_CREDS_DIR, "endpoint": role,
                                   "verify-peer": True}
        uid = qemu_uid(backend)
        assert (seen[0]["dir"], seen[0]["mode"], seen[0]["uid"]) == (True, 0o700, uid)
        assert seen[0]["files"] == {"ca-cert.pem": (0o400, uid), f"{role}-cert.pem": (0o400, uid),
                                    f"{role}-key.pem": (0o400, uid)}
        assert not creds_left(backend, uuid)
    # Afterwards neither QEMU keeps the credentials, and the destination's next migration is
    # plain unless asked otherwise.
    assert not await tls_object(dst, uuid)
    assert await tls_creds_param(dst, uuid) == ""
    await wait_tls_dropped(src, uuid)


async def _refused(src: QemuBackend, dst: QemuBackend, source_tls: StreamTls) -> tuple[
        str, GuestSpec]:
    """A TLS migration of an idle guest whose handshake fails: QEMU's error, once checked that
    the source runs on, without credentials, and the destination's guest never ran."""
    spec = make_spec()
    await within(src.start(spec, paused=False))
    port = await within(dst.incoming_start(spec, to(free_port()), MigrationTuning(
        tls=server_tls())))
    with pytest.raises(MigrationFailed) as info:
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning(tls=source_tls)))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert (await src.query(spec.uuid, "query-status"))["status"] == "running"
    assert src.progress(spec.uuid).status is MigrationStatus.FAILED
    assert src.progress(spec.uuid).error == str(info.value)
    await wait_tls_dropped(src, spec.uuid)
    assert not creds_left(src, spec.uuid)
    assert dst.state(spec.uuid) is not GuestRunState.RUNNING
    return str(info.value), spec


def qemu_log(backend: QemuBackend, uuid: str) -> str:
    return (backend._state_dir() / uuid / "qemu.log").read_text()


def refusals(dst: QemuBackend, uuid: str) -> int:
    """How many connections the destination's QEMU refused in their TLS handshake."""
    return qemu_log(dst, uuid).count("TLS handshake failed")


async def waits_for_its_source(dst: QemuBackend, uuid: str) -> None:
    """The destination got no guest: it still waits for its stream, vCPUs never started."""
    assert dst.state(uuid) is GuestRunState.PAUSED
    assert (await dst.query(uuid, "query-status"))["status"] == "inmigrate"
    assert dst.progress(uuid).status is MigrationStatus.SETUP


@pytest.mark.qemu
async def test_destination_certificate_must_name_the_host(
    src: QemuBackend, dst: QemuBackend
) -> None:
    """The source refuses a destination whose certificate does not carry ``tls.hostname``;
    the destination's QEMU, whose handshake had completed, fails to load the stream and exits,
    as after any failed incoming migration."""
    error, spec = await _refused(src, dst, client_tls(session_pki().host("src"),
                                                      "elsewhere.test"))
    assert error == "Certificate does not match the hostname elsewhere.test"
    with pytest.raises(MigrationFailed, match="QEMU exited"):
        await within(dst.incoming_wait(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF
    assert dst.progress(spec.uuid).status is MigrationStatus.FAILED


@pytest.mark.qemu
async def test_source_certificate_must_be_signed_by_the_ca(
    src: QemuBackend, dst: QemuBackend, tmp_path: Path
) -> None:
    """The destination refuses a source certificate its CA did not sign, and keeps waiting for
    its real source; the daemon destroys it as after any failed migration."""
    pki = session_pki()
    foreign = pki.foreign_client("src.test")
    # The stranger's QEMU trusts the real CA too (it would accept the destination), and its own
    # certificate holds together with its CA: only the destination's check can refuse it.
    bundle = tmp_path / "cacerts.pem"
    bundle.write_bytes((pki.root / "other-ca" / "cacert.pem").read_bytes()
                       + (pki.ca / "cacert.pem").read_bytes())
    error, spec = await _refused(src, dst, replace(client_tls(foreign), ca_cert=bundle))
    # All the source learns is that the destination hung up (QEMU's words: from query-migrate,
    # or from its log when query-migrate has none).
    assert "TLS channel" in error
    await wait_until(lambda: "hasn't got a known issuer" in qemu_log(dst, spec.uuid),
                     timeout=10, what=lambda: f"the refusal in {qemu_log(dst, spec.uuid)}")
    await waits_for_its_source(dst, spec.uuid)
    pid = dst.pid(spec.uuid)
    await within(dst.destroy(spec.uuid))  # what Finish does with a failed incoming migration
    assert dst.state(spec.uuid) is GuestRunState.SHUTOFF
    assert process_gone(pid)


@pytest.mark.qemu
async def test_credentials_qemu_refuses(src: QemuBackend) -> None:
    """A certificate its own CA did not sign is refused by QEMU when loaded: the migration
    fails with QEMU's words before any stream, and the guest runs on."""
    spec = make_spec()
    await within(src.start(spec, paused=False))
    foreign = client_tls(session_pki().foreign_client("src.test"))  # CA: not the signer
    with pytest.raises(MigrationFailed, match=r"QEMU refused the migration TLS credentials: "
                       r".*client-cert\.pem failed validation"):
        await within(src.outgoing(spec.uuid, to(free_port()), MigrationTuning(tls=foreign)))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    assert not creds_left(src, spec.uuid)
    assert await tls_creds_param(src, spec.uuid) == ""  # never set


@pytest.mark.qemu
async def test_plain_connections_get_no_guest_in(src: QemuBackend, dst: QemuBackend) -> None:
    """A stranger's garbage and a plain QEMU stream fail the TLS handshake; the destination
    keeps waiting, and the real source's TLS stream still gets in."""
    spec = make_spec()
    await within(src.start(spec, paused=False))
    port = await within(dst.incoming_start(spec, to(free_port()), MigrationTuning(
        tls=server_tls())))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as stranger:
        with contextlib.suppress(ConnectionError):  # (QEMU may hang up before the end)
            stranger.sendall(b"QEVM\x00\x00\x00\x03" + os.urandom(4096))  # a stream's header
        await wait_until(lambda: refusals(dst, spec.uuid) == 1, timeout=10,
                         what=lambda: f"the refusal in {qemu_log(dst, spec.uuid)}")
    await waits_for_its_source(dst, spec.uuid)
    with pytest.raises(MigrationFailed):  # a plain QEMU stream
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert src.state(spec.uuid) is GuestRunState.RUNNING
    await wait_until(lambda: refusals(dst, spec.uuid) == 2, timeout=10,
                     what=lambda: f"the second refusal in {qemu_log(dst, spec.uuid)}")
    await waits_for_its_source(dst, spec.uuid)

    out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning(
        tls=client_tls(session_pki().host("src")))), 60)
    assert out.status is MigrationStatus.COMPLETED
    assert (await within(dst.incoming_wait(spec.uuid))).status is MigrationStatus.COMPLETED
    await within(dst.resume(spec.uuid))
    assert dst.state(spec.uuid) is GuestRunState.RUNNING


@pytest.mark.qemu
@pytest.mark.postcopy
async def test_tls_postcopy(src: QemuBackend, dst: QemuBackend) -> None:
    """Post-copy over TLS: the pages the destination pulls come over the same TLS stream; the
    source drops its credentials only after the last page."""
    spec = make_spec()
    await within(src.start(spec, paused=False))
    port = await within(dst.incoming_start(spec, to(free_port()), MigrationTuning(
        postcopy=True, tls=server_tls())))
    out = asyncio.create_task(src.outgoing(spec.uuid, to(port), replace(
        SLOW, postcopy=True, postcopy_bandwidth_bytes_per_s=512 * 1024,
        tls=client_tls(session_pki().host("src")))))
    await wait_status(src, spec.uuid, MigrationStatus.ACTIVE)
    await within(src.start_postcopy(spec.uuid))
    assert (await within(out)).status is MigrationStatus.POSTCOPY_ACTIVE
    await wait_until(lambda: dst.progress(spec.uuid).status in (
        MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.COMPLETED), timeout=30,
        what=lambda: f"the destination's switch: {dst.progress(spec.uuid)}")
    inc = dst._guests[spec.uuid].incoming
    assert inc is not None and inc.switched  # (it ran in post-copy, not as a pre-copy stream)
    await within(dst.resume(spec.uuid))
    assert (await within(dst.incoming_wait(spec.uuid))).status is MigrationStatus.COMPLETED
    assert (await within(src.outgoing_wait(spec.uuid))).status is MigrationStatus.COMPLETED
    assert dst.state(spec.uuid) is GuestRunState.RUNNING
    assert not await tls_object(dst, spec.uuid)
    await wait_tls_dropped(src, spec.uuid)
