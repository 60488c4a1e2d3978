"""End to end: ``--tls`` between two ``qemu`` daemons, regular and peer-to-peer.

Both daemons run with ``migrate_tls_force`` on (the default of a qemu daemon listening on TLS
only): a plain migration is refused at Begin, a ``--tls`` one reaches both QEMUs as
``tls-creds-x509`` objects from each host's PKI dir (the destination's server certificate, the
source's client certificate, ``tls-hostname`` the migration URI's host) and moves the real test
guest, whose heartbeat goes on at the destination with its memory intact (the judge of
:mod:`tests.e2e.test_qemu_migration`, whose helpers and rerun rule this module shares).  A
``tls.destination`` the destination's certificate does not name fails the migration with QEMU's
words; the source guest runs on and nothing is left at the destination.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_qemu_migration import (
    TCG_RERUNS,
    assert_migrated,
    assert_untouched_source,
    boot,
    dest_params,
    heartbeats,
)
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.daemon.backend.qemu.migration import TLS_OBJECT_ID
from virtmig.proto.errors import NoDomain, OperationFailed, VirtmigError
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam
from virtmig.testing import GuestImage, Host, hosts

pytestmark = [pytest.mark.qemu, TCG_RERUNS]

F = MigrateFlags
P = MigrateParam
FORCED: dict[str, object] = {"migrate_tls_force": True}


def spy(host: Host, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, dict[str, Any]]]:
    """The QMP commands the host's backend sends, in order."""
    sent: list[tuple[str, dict[str, Any]]] = []
    qemu = host.daemon.backend
    assert isinstance(qemu, QemuBackend)
    real = qemu._exec

    async def record(guest: Any, command: str, args: dict[str, Any] | None = None,
                     **kw: Any) -> dict[str, Any]:
        sent.append((command, dict(args or {})))
        return await real(guest, command, args, **kw)

    monkeypatch.setattr(qemu, "_exec", record)
    return sent


def before_stream(sent: list[tuple[str, dict[str, Any]]], start: str) -> dict[str, Any]:
    """What the backend set up before ``start`` (``migrate`` / ``migrate-incoming``): the
    credentials object's arguments and the migration parameters."""
    setup = sent[:[c for c, _ in sent].index(start)]
    params: dict[str, Any] = {}
    for command, args in setup:
        if command == "migrate-set-parameters":
            params.update(args)
    objects = [args for command, args in setup if command == "object-add"]
    assert len(objects) == 1, setup
    return {"object": objects[0], **params}


@pytest.mark.parametrize("p2p", [False, True], ids=["regular", "p2p"])
async def test_tls_migration(tmp_path: Path, guest_image: GuestImage,
                             monkeypatch: pytest.MonkeyPatch, p2p: bool) -> None:
    async with hosts(tmp_path, "qemu", ("src", FORCED), ("dst", FORCED)) as (src, dst):
        uuid = await boot(src, guest_image)
        src_serial, dst_serial = src.serial_log(uuid), dst.serial_log(uuid)
        extra = F.PEER2PEER if p2p else F(0)

        async def migrate(flags: MigrateFlags) -> None:
            params = dest_params(guest_image, uuid)
            if flags & F.PEER2PEER:
                await src.conn.migrate_to_uri3("vm1", dst.uri, params, flags)
            else:
                await src.conn.migrate3("vm1", dst.conn, params, flags)

        with pytest.raises(VirtmigError, match="allows migration only with VIR_MIGRATE_TLS"):
            await migrate(F.LIVE | extra)
        src_sent, dst_sent = spy(src, monkeypatch), spy(dst, monkeypatch)
        before = heartbeats(src_serial)[-1][0]
        await migrate(F.LIVE | F.TLS | extra)
        await assert_migrated(src, dst, uuid, src_serial, dst_serial, before)

        out = before_stream(src_sent, "migrate")
        assert out["object"] == {"qom-type": "tls-creds-x509", "id": TLS_OBJECT_ID,
                                 "dir": "migrate-tls", "endpoint": "client",
                                 "verify-peer": True}
        assert (out["tls-creds"], out["tls-hostname"]) == (TLS_OBJECT_ID, "127.0.0.1")
        inc = before_stream(dst_sent, "migrate-incoming")
        assert inc["object"]["endpoint"] == "server"
        assert inc["tls-creds"] == TLS_OBJECT_ID


async def test_tls_destination_must_be_named_by_its_certificate(
    qemu_pair: tuple[Host, Host], guest_image: GuestImage
) -> None:
    """The daemons' TLS hands QEMU the name to check: a destination whose certificate does not
    carry it fails the migration; the source runs on, the destination keeps nothing."""
    src, dst = qemu_pair
    uuid = await boot(src, guest_image)
    params = dest_params(guest_image, uuid)
    params.add(P.TLS_DESTINATION, "elsewhere.test")
    # The caller gets Perform's error, or Finish's when the destination's QEMU had already
    # failed on the stream the source dropped ("Not a migration stream": the sequence's rule,
    # libvirt's, prefers the destination's words); the source's own is the reason.
    with pytest.raises(OperationFailed):
        await src.conn.migrate3("vm1", dst.conn, params, F.LIVE | F.TLS)
    assert src.daemon.backend.progress(uuid).error == (
        "Certificate does not match the hostname elsewhere.test")
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    await assert_untouched_source(src, dst, src.serial_log(uuid))


async def test_tunnelled_rides_the_control_channel(tmp_path: Path, guest_image: GuestImage,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tls --p2p --tunnelled`` between daemons that force TLS: accepted, and the stream goes
    through the daemons' mutual-TLS connection, so neither QEMU gets TLS credentials (the
    tunnel's QEMU ends are local) and both have ``tls-creds`` reset."""
    async with hosts(tmp_path, "qemu", ("src", FORCED), ("dst", FORCED)) as (src, dst):
        uuid = await boot(src, guest_image)
        src_serial, dst_serial = src.serial_log(uuid), dst.serial_log(uuid)
        src_sent, dst_sent = spy(src, monkeypatch), spy(dst, monkeypatch)
        before = heartbeats(src_serial)[-1][0]
        await src.conn.migrate_to_uri3("vm1", dst.uri, dest_params(guest_image, uuid),
                                       F.LIVE | F.PEER2PEER | F.TUNNELLED | F.TLS)
        await assert_migrated(src, dst, uuid, src_serial, dst_serial, before)
        assert not dst.daemon.ports._used  # no migration port was opened: the tunnel carried it
        for sent in (src_sent, dst_sent):
            assert not [a for c, a in sent if c == "object-add"]
            tls = [a.get("tls-creds") for c, a in sent
                   if c == "migrate-set-parameters" and "tls-creds" in a]
            assert tls and set(tls) == {""}
