"""The migration id: its form, where the migration cookie carries it, and its job statistic.

A source daemon makes one id per migration at Begin (32 lowercase hex digits; the destination
makes it at Prepare2 in protocol v2, which has no cookie A).  It travels in cookies A and B as
the root's last child, ``<virtmig-migration-id>``, and is the same in both daemons' logs,
histories and job statistics (``virtmig.migration_id``).  The client reads it from the cookies
it carries between the daemons (:func:`migration_id_in_cookie`) to log it too.
"""

from __future__ import annotations

import re

__all__ = ["MIGRATION_ID_STAT", "MIGRATION_ID_TAG", "is_migration_id",
           "migration_id_in_cookie"]

MIGRATION_ID_TAG = "virtmig-migration-id"
#: The job statistic that carries the id (``domjobinfo``, completed or not).
MIGRATION_ID_STAT = "virtmig.migration_id"

_ID_RE = re.compile(r"[0-9a-f]{32}")
# The daemon writes the id as the root's last child; anchored at the end of the document, no
# element of a domain definition the cookie may embed is taken for it.
_IN_COOKIE_RE = re.compile(
    rb"<" + MIGRATION_ID_TAG.encode() + rb">([0-9a-f]{32})</" + MIGRATION_ID_TAG.encode()
    + rb">\s*</qemu-migration>\s*\x00?\Z")


def is_migration_id(text: str) -> bool:
    """Whether ``text`` has a migration id's form (32 lowercase hex digits)."""
    return _ID_RE.fullmatch(text) is not None


def migration_id_in_cookie(cookie: bytes) -> str:
    """The migration id a daemon's cookie carries, or "" (none, or not a cookie of ours)."""
    m = _IN_COOKIE_RE.search(cookie[-4096:])
    return m.group(1).decode("ascii") if m else ""
