"""The five phases of migration protocol v3, as the daemon runs them.

Names say where code runs (libvirt's convention): ``src_*`` only on the source host, ``dst_*`` only
on the destination, ``any_*`` on either.  The call order and the decisions *between* phases belong
to the sequence driver (``virtmig.client.sequence``); each phase here checks its inputs before
changing anything, and on failure puts its own side back as it was:

* ``src_begin``    job ``migration out`` in phase begin3 (kept only with CHANGE_PROTECTION);
                   returns the migratable XML and cookie A.
* ``dst_prepare``  adds the incoming domain (paused, reason migration), job ``migration in`` in
                   phase prepare, opens the data port; returns cookie B and the URI.
* ``src_perform``  streams the guest to the URI; success leaves it paused (perform3_done);
                   failure resumes it (if it ran before) and ends the job.
* ``dst_finish``   cancelled: kills the incoming guest; else waits for the stream, starts vCPUs
                   (unless PAUSED), persists (PERSIST_DEST); any failure kills the incoming guest.
* ``src_confirm``  cancelled: resumes the source if it ran before; else stops it as migrated.

Protocol v2 (:mod:`.v2`: ``dst_prepare2``, ``src_perform2``, ``dst_finish2``, and
``src_settle2`` for peer-to-peer) reuses these phases' steps; its Perform stops the source itself.

Modules, one concern each, from the bottom up (a module imports only those above it):

* :mod:`.common` -- what every phase uses: the flags and params check (``any_check``), the
  cookie a phase hands on and its statistics, the job guards.
* :mod:`.uri` -- migration URIs: the caller's to Prepare, Prepare's own, Perform's target.
* :mod:`.tuning` -- the backend's settings for one migration, source and destination.
* :mod:`.rollback` -- a side put back: the source guest restored, the incoming domain undone.
* :mod:`.owner` -- the caller went away: the job abandoned (libvirt's ConnectionClosed); a job
  no session owns, rolled back after ``incoming_job_timeout``.
* :mod:`.source` -- Begin, Perform, Confirm; :mod:`.destination` -- Prepare, Finish.
* :mod:`.v2` -- protocol v2: Prepare2, Perform, Finish2, built from the two above.

Names with a leading underscore are internal to the package (used across its modules); this
module re-exports the public ones.
"""

from __future__ import annotations

from virtmig.daemon.migration.common import any_check, any_cookie, any_stats
from virtmig.daemon.migration.destination import dst_finish, dst_prepare
from virtmig.daemon.migration.owner import (
    any_check_owner,
    any_owner_gone,
    any_reap_unowned,
    any_session_closed,
)
from virtmig.daemon.migration.rollback import src_restore
from virtmig.daemon.migration.source import src_begin, src_confirm, src_perform
from virtmig.daemon.migration.tuning import (
    DEFAULT_PARALLEL,
    dst_tuning,
    parallel_connections,
    src_tuning,
)
from virtmig.daemon.migration.uri import dst_parse_uri_in, src_parse_uri
from virtmig.daemon.migration.v2 import dst_finish2, dst_prepare2, src_perform2, src_settle2

__all__ = [
    "DEFAULT_PARALLEL",
    "any_check",
    "any_check_owner",
    "any_cookie",
    "any_owner_gone",
    "any_reap_unowned",
    "any_session_closed",
    "any_stats",
    "dst_finish",
    "dst_finish2",
    "dst_parse_uri_in",
    "dst_prepare",
    "dst_prepare2",
    "dst_tuning",
    "parallel_connections",
    "src_begin",
    "src_confirm",
    "src_parse_uri",
    "src_perform",
    "src_perform2",
    "src_restore",
    "src_settle2",
    "src_tuning",
]
