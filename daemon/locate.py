"""A guest runs in one place: asking the host a guest went to before this host starts or
resumes its own copy.

What this host remembers is :mod:`virtmig.daemon.placement`'s.  The question goes to the peer's
daemon over the daemon-to-daemon channel (this daemon's host certificate over mutual TLS, as in
peer-to-peer migration), as the read RPC ``GuestLocation``: does a copy of this UUID run there,
which incoming migration finished there last, is one under way, and did that host send the guest
on (then the next host is asked, at most :data:`MAX_HOPS` of them).  A peer whose daemon answers
with another host UUID than the one recorded is not the host asked about: it counts as
unreachable.

* **start** (:func:`check_start`): a guest recorded as migrated away is started only when its
  destination answers that no copy runs (or arrives) there; the record then clears.  When a copy
  runs there, or the destination cannot be asked, the start is refused with
  :class:`~virtmig.proto.errors.GuestElsewhere` naming the host; ``force`` starts it anyway
  (logged at WARNING) and clears the record.
* **unknown outcomes** (:func:`settle_later`): when a source cannot tell whether its migration
  finished (a lost Finish reply, its caller gone after Perform, a Confirm(cancelled) the
  destination contradicts or cannot confirm, a restart), its guest stays paused, the record says
  "uncertain", and a background task asks the destination about that migration id, with backoff
  (``settle_retry_min`` doubling to ``settle_retry_max`` seconds, at most ``settle_attempts``
  tries).  The verdict (:func:`judge`): the migration **arrived** there (never resume here: this
  copy is shut off as migrated), it **failed** (no copy there: this copy is put back as it was),
  it is **pending** (Finish is still under way there) or in **conflict** (a copy runs there that
  this migration did not bring: never resumed, a human decides).  Until then ``domstate
  --reason`` shows what it waits for (the placement's notes) and the log says it at each try;
  ``virtmig migrate-resolve`` (:func:`resolve`) asks once, now.  Resume and a new migration of
  such a guest are refused.
"""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, replace

from virtmig.client.connection import AsyncConnection
from virtmig.client.values import GuestLocation
from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.core import Daemon
from virtmig.daemon.job import AsyncJob, MigrationJob
from virtmig.daemon.placement import Away, Peer
from virtmig.daemon.registry import DomainObj
from virtmig.proto import logsafe
from virtmig.proto.aio import within
from virtmig.proto.errors import (
    GuestElsewhere,
    InvalidArgument,
    NoDomain,
    OperationFailed,
    OperationInvalid,
    VirtmigError,
)
from virtmig.proto.flags import DomainState, PausedReason, RunningReason, ShutoffReason
from virtmig.proto.migid import is_migration_id
from virtmig.proto.uri import parse_uri

log = logsafe.logger(__name__)

MAX_HOPS = 4


class PeerUnreachable(Exception):
    """The peer's daemon cannot be asked (the reason is the message)."""


class Verdict(enum.Enum):
    ARRIVED = "arrived"
    FAILED = "failed"
    PENDING = "pending"
    CONFLICT = "conflict"


def check_dest_uri(uri: str) -> str:
    """A destination daemon URI given by a caller (``virtmig.dest_uri``, migrate-resolve's) or
    p2p's ``dconnuri``: a connection URI without ``pkipath`` (this daemon connects with the
    certificate of its own ``pki_dir``, as in peer-to-peer migration)."""
    if not uri:
        raise InvalidArgument("the destination daemon's URI must not be empty")
    try:
        parsed = parse_uri(uri)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid destination daemon URI: {exc.detail}") from None
    if parsed.pki_dir:
        raise InvalidArgument("the destination daemon's URI must not name a pkipath: this "
                              "daemon connects with the certificate of its own pki_dir")
    return str(parsed)


def away_of(job: MigrationJob) -> Away:
    """Where an outgoing job sent (or was sending) its guest."""
    pre = "paused" if job.pre_state is DomainState.PAUSED else "running"
    return Away(Peer(job.peer_hostuuid, job.peer_hostname, job.dest_uri), job.migration_id,
                pre_state=pre)


# =================================================================================================
# Answering and asking


def answer(daemon: Daemon, uuid: str, migration_id: str = "") -> GuestLocation:
    """``GuestLocation`` on this host: what it knows of the guest ``uuid``."""
    if len(uuid) > 64 or (migration_id and not is_migration_id(migration_id)):
        raise InvalidArgument("malformed guest location request: expected a domain uuid and "
                              "an optional migration id of 32 hex digits")
    try:
        dom: DomainObj | None = daemon.registry.by_uuid(uuid)
    except NoDomain:
        dom = None
    key = dom.uuid if dom is not None else uuid.lower()
    record = daemon.placement.get(key)
    job = dom.job if dom is not None else None
    incoming = job if job is not None and job.kind is AsyncJob.MIGRATION_IN else None
    away = record.away
    return GuestLocation(
        host_uuid=daemon.host_uuid, known=dom is not None,
        active=dom is not None and dom.active and incoming is None,
        state=dom.state if dom is not None else DomainState.NOSTATE,
        arrived_migration_id=record.arrived,
        incoming_migration_id=(incoming.migration_id or "unknown") if incoming else "",
        incoming_phase=incoming.phase.label if incoming else "",
        away_host_uuid=away.peer.host_uuid if away else "",
        away_hostname=away.peer.hostname if away else "",
        away_uri=away.peer.uri if away else "",
        away_migration_id=away.migration_id if away else "",
    )


async def ask(daemon: Daemon, peer: Peer, uuid: str, migration_id: str = "") -> GuestLocation:
    """Ask ``peer``'s daemon where the guest ``uuid`` is; :class:`PeerUnreachable` if it
    cannot be asked (or answers as another host)."""
    if not peer.uri:
        raise PeerUnreachable("the URI of its daemon is unknown (the migration carried no "
                              "virtmig.dest_uri)")
    try:  # (a URI another host recorded is checked as a caller's is: no pkipath)
        uri = check_dest_uri(peer.uri)
    except InvalidArgument as exc:
        raise PeerUnreachable(str(exc)) from None
    timeout = daemon.config.peer_timeout
    try:
        conn = await within(AsyncConnection.open(
            uri, pki_dir=daemon.config.pki_dir or None, connect_timeout=timeout),
            timeout + 1)
    except (VirtmigError, OSError, TimeoutError) as exc:
        raise PeerUnreachable(f"cannot connect to {peer.uri}: {exc}") from None
    try:
        loc = await conn.guest_location(uuid, migration_id, timeout=timeout)
    except (VirtmigError, OSError, TimeoutError) as exc:
        raise PeerUnreachable(f"{peer.uri} did not answer: {exc}") from None
    finally:
        await conn.close()
    if peer.host_uuid and loc.host_uuid != peer.host_uuid:
        raise PeerUnreachable(f"{peer.uri} answers as host {loc.host_uuid}, "
                              f"not {peer.host_uuid}")
    return loc


@dataclass(frozen=True)
class Found:
    """Where :func:`find` ended: ``runs`` whether a copy runs (or arrives) at ``peer``."""

    runs: bool
    peer: Peer


async def find(daemon: Daemon, uuid: str, away: Away) -> Found:
    """Follow the guest from ``away.peer`` on, host by host (:data:`MAX_HOPS` at most)."""
    peer = away.peer
    for _ in range(MAX_HOPS):
        loc = await ask(daemon, peer, uuid)
        if loc.active or loc.incoming_migration_id:
            return Found(True, peer)
        if not loc.away_host_uuid or loc.away_host_uuid == daemon.host_uuid:
            return Found(False, peer)
        peer = Peer(loc.away_host_uuid, loc.away_hostname, loc.away_uri)
    raise PeerUnreachable(f"the guest went on through more than {MAX_HOPS} hosts")


# =================================================================================================
# start, resume, a new migration


async def check_start(daemon: Daemon, dom: DomainObj, *, force: bool) -> None:
    """Refuse to start ``dom`` while a copy may run where it went (see the module docstring)."""
    away = daemon.placement.away(dom.uuid)
    if away is None:
        return
    if force:
        log.warning("starting %s with --force although it was migrated to host %s "
                    "(migration %s): the one-place check is skipped", dom.name,
                    away.peer.describe(), away.migration_id or "unknown")
        return
    try:
        found = await find(daemon, dom.uuid, away)
    except PeerUnreachable as exc:
        raise GuestElsewhere(
            f"domain '{dom.name}' was migrated to host {away.peer.describe()}, which cannot be "
            f"asked whether it runs there ({exc}); 'start --force' starts it here anyway"
        ) from None
    if found.runs:
        raise GuestElsewhere(
            f"domain '{dom.name}' runs on host {found.peer.describe()}: it was migrated there "
            f"(migration {away.migration_id or 'unknown'}); stop it there first, or use "
            "'start --force'")
    log.info("%s was migrated to host %s, which does not run it: starting it here", dom.name,
             found.peer.describe())


def started(daemon: Daemon, dom: DomainObj) -> None:
    """``dom`` runs here now: it is no longer away."""
    if daemon.placement.away(dom.uuid) is not None:
        daemon.placement.clear_away(dom.uuid)


def refuse_uncertain(daemon: Daemon, dom: DomainObj, what: str) -> None:
    """Refuse ``what`` (resume, migrate) of a guest whose last migration's outcome is unknown."""
    away = daemon.placement.away(dom.uuid)
    if away is not None and away.uncertain:
        raise GuestElsewhere(
            f"cannot {what} domain '{dom.name}': whether its migration to host "
            f"{away.peer.describe()} finished is unknown (it may run there); "
            f"'virtmig migrate-resolve {dom.name}' settles it")


# =================================================================================================
# Unknown outcomes


def judge(loc: GuestLocation, migration_id: str) -> Verdict:
    """What the destination's answer says of migration ``migration_id``."""
    if migration_id and loc.arrived_migration_id == migration_id:
        return Verdict.ARRIVED
    if migration_id and loc.incoming_migration_id == migration_id:
        return Verdict.PENDING
    if loc.active or loc.incoming_migration_id:
        return Verdict.CONFLICT
    return Verdict.FAILED


def note(daemon: Daemon, uuid: str) -> str:
    """What the guest ``uuid`` waits for ("" when nothing): ``domstate --reason``'s detail."""
    return daemon.placement.notes.get(uuid, "")


def settle_later(daemon: Daemon, uuid: str, away: Away, why: str) -> None:
    """The outcome of ``away``'s migration is unknown: record it, and settle it in the
    background (this host's copy, if any, stays as it is: paused)."""
    away = replace(away, uncertain=True)
    daemon.placement.departed(uuid, away)
    _note(daemon, uuid, away, f"{why}; asking")
    log.warning("outcome of migration %s of %s to host %s unknown (%s): the guest stays paused "
                "here until that host answers", away.migration_id or "unknown", uuid,
                away.peer.describe(), why)
    _spawn(daemon, uuid)


def resume_settling(daemon: Daemon) -> None:
    """At start: settle, in the background, every outcome left unknown before the restart."""
    for uuid, away in daemon.placement.uncertain():
        _note(daemon, uuid, away, "the daemon restarted; asking")
        _spawn(daemon, uuid)


async def stop_settling(daemon: Daemon) -> None:
    tasks = list(daemon.placement.tasks.values())
    daemon.placement.tasks.clear()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _spawn(daemon: Daemon, uuid: str) -> None:
    task = daemon.placement.tasks.get(uuid)
    if task is None or task.done():
        daemon.placement.tasks[uuid] = asyncio.get_running_loop().create_task(
            _settle_loop(daemon, uuid))


def _note(daemon: Daemon, uuid: str, away: Away, text: str) -> None:
    daemon.placement.notes[uuid] = (
        f"outcome of migration {away.migration_id or 'unknown'} to host "
        f"{away.peer.describe()} unknown: {text}")


async def _settle_loop(daemon: Daemon, uuid: str) -> None:
    cfg = daemon.config
    delay = cfg.settle_retry_min
    for attempt in range(1, cfg.settle_attempts + 1):
        away = daemon.placement.away(uuid)
        if away is None or not away.uncertain:
            return
        last = attempt == cfg.settle_attempts
        try:
            if await settle_once(daemon, uuid, away):
                return
        except PeerUnreachable as exc:
            _note(daemon, uuid, away, f"waiting for its daemon ({away.peer.uri or 'URI unknown'}) "
                  f"to answer: {exc} (try {attempt} of {cfg.settle_attempts}"
                  + (")" if last else f", next in {delay:g} s)"))
            log.warning("%s: %s", uuid, note(daemon, uuid))
        except (BackendError, OSError, VirtmigError) as exc:
            log.error("cannot settle the migration of %s: %s", uuid, exc)
        if last:  # (no wait after the last try: it gives up now)
            break
        await asyncio.sleep(delay)
        delay = min(delay * 2, cfg.settle_retry_max)
    away = daemon.placement.away(uuid)
    if away is not None and away.uncertain:
        _note(daemon, uuid, away, f"gave up after {cfg.settle_attempts} tries: run 'virtmig "
              "migrate-resolve' once that host answers")
        log.error("%s: %s", uuid, note(daemon, uuid))


async def settle_once(daemon: Daemon, uuid: str, away: Away) -> bool:
    """Ask the destination once and act on its verdict; whether the outcome is settled."""
    loc = await ask(daemon, away.peer, uuid, away.migration_id)
    verdict = judge(loc, away.migration_id)
    if verdict is Verdict.PENDING:
        _note(daemon, uuid, away, f"it is still finishing there (phase {loc.incoming_phase})")
        return False
    if verdict is Verdict.CONFLICT:
        _note(daemon, uuid, away, "that host runs a copy this migration did not bring there: "
              "stop one copy by hand, then run 'virtmig migrate-resolve'")
        log.error("%s: %s", uuid, note(daemon, uuid))
        return False
    try:
        dom: DomainObj | None = daemon.registry.by_uuid(uuid)
    except NoDomain:
        dom = None
    if dom is None:
        _record(daemon, uuid, away, verdict, persistent=False)
        return True
    async with dom.lock:
        if dom.job is not None:  # (a migration job of its own: settled with it)
            _note(daemon, uuid, away, "a migration job runs on it here")
            return False
        await apply(daemon, dom, away, verdict)
    return True


async def apply(daemon: Daemon, dom: DomainObj, away: Away, verdict: Verdict) -> None:
    """Act on an ARRIVED or FAILED verdict (the caller holds ``dom``'s lock, and no job runs)."""
    if verdict is Verdict.ARRIVED:
        log.warning("migration %s of %s finished on host %s: the copy here is shut off as "
                    "migrated (never resumed)", away.migration_id, dom.name,
                    away.peer.describe())
        if dom.active:
            await daemon.backend.destroy(dom.uuid)
            daemon.mark_inactive(dom, ShutoffReason.MIGRATED)
    else:
        log.warning("migration %s of %s did not reach host %s (no copy there): the guest is "
                    "put back here", away.migration_id or "unknown", dom.name,
                    away.peer.describe())
        if dom.active and dom.state is DomainState.PAUSED:
            if away.pre_state == "running":
                await daemon.backend.resume(dom.uuid)
                daemon.set_state(dom, DomainState.RUNNING, RunningReason.MIGRATION_CANCELED)
            else:
                daemon.set_state(dom, DomainState.PAUSED, PausedReason.USER)
    _record(daemon, dom.uuid, away, verdict, persistent=dom.persistent)


def _record(daemon: Daemon, uuid: str, away: Away, verdict: Verdict, *,
            persistent: bool) -> None:
    if verdict is Verdict.ARRIVED and persistent:
        daemon.placement.departed(uuid, replace(away, uncertain=False))
        daemon.placement.forget_task(uuid)
    else:
        daemon.placement.clear_away(uuid)


async def resolve(daemon: Daemon, dom: DomainObj, dest_uri: str = "") -> None:
    """``virtmig migrate-resolve``: settle ``dom``'s unknown outcome now, asking its
    destination (at ``dest_uri``, if given) once."""
    away = daemon.placement.away(dom.uuid)
    if away is None or not away.uncertain:
        raise OperationInvalid(f"domain '{dom.name}' has no migration whose outcome is unknown")
    if dest_uri:
        away = replace(away, peer=replace(away.peer, uri=check_dest_uri(dest_uri)))
        daemon.placement.departed(dom.uuid, away)
    try:
        settled = await settle_once(daemon, dom.uuid, away)
    except PeerUnreachable as exc:
        raise OperationFailed(
            f"cannot settle the migration of '{dom.name}': host {away.peer.describe()} cannot "
            f"be asked ({exc}); it stays as it is") from None
    if not settled:
        raise OperationFailed(f"cannot settle the migration of '{dom.name}' yet: "
                              f"{note(daemon, dom.uuid)}")
