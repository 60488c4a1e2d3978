"""``migrate-history [DOMAIN] [--limit N] [--json]``: the daemon's finished migrations, newest
first (``Migration/GetHistory``; the daemon keeps them in its state dir, see
:mod:`virtmig.daemon.history`).

The table has one row per migration this daemon took part in (as source or destination); a
failed or cancelled one adds its error on the line below.  ``--json`` prints one JSON array of
objects with the history line's fields (``time``, ``migration_id``, ``domain``, ``uuid``,
``role``, ``source``, ``destination``, ``mode``, ``transport``, ``protocol``, ``outcome``,
``error``, ``duration_ms``, ``downtime_ms``, ``bytes``): a stable shape for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys

from virtmig.client.cli.base import INT_MAX, Session, act, number
from virtmig.client.values import HistoryEntry

_COLUMNS = ("Time", "Domain", "Role", "Source", "Destination", "Mode", "Outcome", "Duration",
            "Downtime", "Bytes")


async def cmd_migrate_history(s: Session, args: argparse.Namespace) -> None:
    limit = number("limit", args.limit, 0, INT_MAX) if args.limit is not None else 0
    conn = await s.conn()
    entries = await act("failed to get the migration history",
                        conn.migration_history(args.domain or "", limit=limit))
    if args.json:
        json.dump([e.to_dict() for e in entries], sys.stdout, indent=2)
        sys.stdout.write("\n")
        return
    sys.stdout.write(format_history(entries))


def _row(e: HistoryEntry) -> tuple[str, ...]:
    return (e.time[:19].replace("T", " "), e.domain, e.role, e.source or "-",
            e.destination or "-", f"{e.mode}/{e.transport}", e.outcome, f"{e.duration_ms} ms",
            f"{e.downtime_ms} ms", str(e.bytes))


def format_history(entries: list[HistoryEntry]) -> str:
    """A table of ``entries`` (virsh's list style: left-aligned columns, a dashed rule)."""
    rows = [_row(e) for e in entries]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]

    def line(cells: tuple[str, ...]) -> str:
        return " " + "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    out = [line(_COLUMNS), "-" * (sum(widths) + 3 * (len(widths) - 1) + 2)]
    for e, row in zip(entries, rows, strict=True):
        out.append(line(row))
        if e.error:
            out.append(f"   error: {e.error}")
    return "\n".join(out) + "\n\n"
