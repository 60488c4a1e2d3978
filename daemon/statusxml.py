"""A domain's status file (``status/<uuid>.xml``): what the registry writes while a domain is
active or has a job, and what a restarted daemon reads back.

``<domstatus state= reason= id= persistent=>`` holds the migration job (``<job>``: its kind,
phase, flags, start, pre-migration state and original name, as libvirt's status XML has them,
plus virtmig's own migration id and peer, see :mod:`virtmig.daemon.placement`) and the live
definition.  :func:`status_needs_fsync` is the rule for which writes must survive a power loss.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from lxml import etree

from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.proto.flags import DomainState, MigrateFlags

if TYPE_CHECKING:
    from virtmig.daemon.domobj import DomainObj


def render(dom: DomainObj) -> bytes | None:
    """The status file's bytes; None when the domain is inactive with no job (no file)."""
    if not dom.active and dom.job is None:
        return None
    root = etree.Element(
        "domstatus",
        state=dom.state.name.lower(),
        reason=dom.reason_label,
        id=str(dom.id),
        persistent="yes" if dom.persistent else "no",
    )
    if dom.job is not None:
        job = dom.job
        etree.SubElement(
            root,
            "job",
            {
                "async": job.kind.value,
                "phase": job.phase.label,
                "flags": hex(int(job.flags)),
                "asyncStarted": str(int(job.started * 1000)),
                "preState": job.pre_state.name.lower(),
                "origname": job.origname,
                "port": str(job.port),
                # virtmig's own: which migration, and the peer (virtmig.daemon.placement)
                "migrationId": job.migration_id,
                "peerHostUuid": job.peer_hostuuid,
                "peerHostname": job.peer_hostname,
                "destUri": job.dest_uri,
            },
        )
    if dom.live is None:
        return bytes(etree.tostring(root, pretty_print=True))
    # The live definition as it serialises inside <domstatus>, parsed once per document
    # (a migration writes the same live XML 3 or 4 times): spliced in at a placeholder,
    # the bytes are those of the document with the parsed definition appended.
    etree.SubElement(root, _LIVE_PLACEHOLDER)
    return bytes(etree.tostring(root, pretty_print=True)).replace(
        _LIVE_PLACEHOLDER_BYTES, _live_section(dom.live.xml), 1)


#: The element :func:`render` replaces with the live definition's bytes (a
#: tag no document has: ``<`` is escaped in attribute values, and the job has no children).
_LIVE_PLACEHOLDER = "virtmig-live-definition"
_LIVE_PLACEHOLDER_BYTES = b"<virtmig-live-definition/>"
_LIVE_WRAP_OPEN = b"<domstatus>\n  "
_LIVE_WRAP_CLOSE = b"\n</domstatus>\n"
#: Live definitions larger than this are not kept in :func:`_live_section`'s cache.
_LIVE_CACHE_MAX_CHARS = 64 * 1024
#: Live definitions :func:`_live_section` parsed (its cache's misses; read by tests and
#: benchmarks).
LIVE_PARSES = [0]


def _live_section(xml: str) -> bytes:
    """The bytes of live definition ``xml`` as ``etree.tostring(..., pretty_print=True)`` puts
    it as the child of a <domstatus> root (its indentation and line breaks included)."""
    if len(xml) <= _LIVE_CACHE_MAX_CHARS:
        return _live_section_cached(xml)
    return _render_live_section(xml)


def _render_live_section(xml: str) -> bytes:
    LIVE_PARSES[0] += 1
    wrap = etree.Element("domstatus")
    wrap.append(etree.fromstring(xml.encode()))
    out = bytes(etree.tostring(wrap, pretty_print=True))
    assert out.startswith(_LIVE_WRAP_OPEN) and out.endswith(_LIVE_WRAP_CLOSE)
    return out[len(_LIVE_WRAP_OPEN):-len(_LIVE_WRAP_CLOSE)]


_live_section_cached = functools.lru_cache(maxsize=64)(_render_live_section)


def status_needs_fsync(job: MigrationJob | None) -> bool:
    """Whether a status write must survive a power loss (or kernel crash): fsync matters for
    nothing else, since a killed daemon still leaves every file it renamed.

    A power loss ends every guest of the host, so after one a status file is read only by the
    start-up rule for guests that did not survive (``Daemon.open``): a domain whose outgoing
    job was in perform3..confirm3 (``_remember_departure``) may run on the destination, so its
    start asks there first.  Hence the writes that may skip fsync:

    * every write of an incoming job (the guest arriving here dies with the host; what the
      destination must keep is the placement record ``arrived``, fsynced before Finish ends);
    * begin3 (nothing has left; recovered like the status before it);
    * perform3 without post-copy (the destination resumes the guest only after Perform's reply,
      or in peer-to-peer the source's Finish call, both after perform3_done's write, which is
      fsynced; with post-copy the guest may run there during Perform, so it is fsynced);
    * confirm3 and confirm3_cancelled: perform3_done, fsynced, before them recovers the same
      way (the destination is asked) after a power loss.

    Everything else (no job, perform3_done, perform2, post-copy failures, resume phases) is
    fsynced as before.
    """
    if job is None:
        return True
    if job.kind is AsyncJob.MIGRATION_IN:
        return False
    if job.phase in (Phase.BEGIN3, Phase.CONFIRM3, Phase.CONFIRM3_CANCELLED):
        return False
    return not (job.phase is Phase.PERFORM3 and not job.flags & MigrateFlags.POSTCOPY)


def job_from_status(root: etree._Element) -> MigrationJob | None:
    el = root.find("job")
    if el is None:
        return None
    job = MigrationJob(
        kind=AsyncJob(el.get("async", "")),
        phase=Phase.from_label(el.get("phase", "none")),
        flags=MigrateFlags(int(el.get("flags", "0"), 16)),
        started=int(el.get("asyncStarted", "0")) / 1000,
        pre_state=DomainState[el.get("preState", "nostate").upper()],
        origname=el.get("origname", ""),
        port=int(el.get("port", "0")),
        migration_id=el.get("migrationId", ""),
        peer_hostuuid=el.get("peerHostUuid", ""),
        peer_hostname=el.get("peerHostname", ""),
        dest_uri=el.get("destUri", ""),
    )
    job.reported_phase = job.phase  # logged before the restart
    return job

