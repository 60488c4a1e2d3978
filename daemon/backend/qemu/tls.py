"""TLS on QEMU's migration stream (``VIR_MIGRATE_TLS``): the credentials object, on either side.

Concern: the QMP half of a TLS migration.  :func:`add_tls_creds` gives QEMU the host's
certificates as a ``tls-creds-x509`` object (:data:`TLS_OBJECT_ID`; ``endpoint`` ``server`` on
the destination, ``client`` on the source; ``verify-peer``: each side accepts only a peer whose
certificate the CA signed); the flows then name it in ``migrate-set-parameters`` (``tls-creds``,
and on the source ``tls-hostname``: see ``migration._tls_params``) before ``migrate-incoming`` /
``migrate``.  :func:`drop_tls_creds` undoes that once the migration ended.

QEMU reads the files when the object is created (``object-add``) and keeps the credentials in
memory, so the copy the daemon writes for it (:func:`~virtmig.daemon.backend.qemu.confine.
write_tls_creds`: owner-only, QEMU's user's) exists only for the length of that one command: it
is removed right after, whatever the answer.

A plain stream (no ``tuning.tls``) cannot be bound to its migration: QEMU's stream has no room
for the daemons' per-migration token (``tuning.stream_token`` is ignored by this backend), and a
destination QEMU takes the first connection to its migration port as the stream.  Whoever
reaches that port first between Prepare and Perform can feed the destination a guest of their
own (and a source streams the guest's memory, in clear, to whatever answers at the address it is
given).  With ``--tls`` a connection without a certificate the CA signed fails its handshake and
the destination keeps waiting for the real source: use it (the daemon's ``migrate_tls_force``
refuses any migration without it) wherever the migration network is not fully trusted.
"""

from __future__ import annotations

import contextlib

from virtmig.daemon.backend.base import BackendError, StreamTls
from virtmig.daemon.backend.qemu.confine import RunAs, remove_tls_creds, write_tls_creds
from virtmig.daemon.backend.qemu.guest import _Guest
from virtmig.daemon.backend.qemu.migration import TLS_OBJECT_ID
from virtmig.daemon.backend.qemu.monitor import Exec, QmpCommandFailed
from virtmig.proto import logsafe

log = logsafe.logger("virtmig.daemon.backend.qemu")


async def add_tls_creds(qmp: Exec, guest: _Guest, tls: StreamTls, *, server: bool,
                        owner: RunAs | None) -> None:
    """Create the guest's ``tls-creds-x509`` object from ``tls`` (a leftover one goes first).

    ``BackendError`` with QEMU's words when QEMU refuses the credentials.
    """
    creds = write_tls_creds(guest.dir, tls, server=server, owner=owner)
    try:
        with contextlib.suppress(QmpCommandFailed):  # left by a migration we lost track of
            await qmp(guest, "object-del", {"id": TLS_OBJECT_ID})
        try:
            await qmp(guest, "object-add", {
                "qom-type": "tls-creds-x509", "id": TLS_OBJECT_ID, "dir": creds,
                "endpoint": "server" if server else "client", "verify-peer": True})
        except QmpCommandFailed as exc:
            raise BackendError(f"QEMU refused the migration TLS credentials: {exc.desc}") \
                from None
    finally:
        remove_tls_creds(guest.dir)  # loaded: QEMU reads them only at object-add


async def drop_tls_creds(qmp: Exec, guest: _Guest) -> None:
    """After a TLS migration: ``tls-creds`` and ``tls-hostname`` back to "" and the object
    deleted, so that the credentials do not stay in QEMU's memory (best effort: a QEMU that
    is gone, or going, has nothing left to drop)."""
    if guest.exited or guest.qmp is None:
        return
    try:
        await qmp(guest, "migrate-set-parameters", {"tls-creds": "", "tls-hostname": ""})
        await qmp(guest, "object-del", {"id": TLS_OBJECT_ID})
    except BackendError as exc:
        if not guest.exited:
            log.warning("qemu backend: guest %s: cannot drop the migration TLS credentials: "
                        "%s", guest.uuid, exc)
