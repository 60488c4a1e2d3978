"""``virtmig migrate-history`` against real ``virtmigd`` processes after a migration made with the
CLI: the table, ``--json``'s stable shape, a domain filter, and the daemons' log lines carrying
the same migration id."""

from __future__ import annotations

import json
from pathlib import Path

from tests.client.cli_helpers import Daemon, daemons, fails, ok, start_guest

__all__ = ["daemons"]

FIELDS = {"time", "migration_id", "domain", "uuid", "role", "source", "destination", "mode",
          "transport", "protocol", "outcome", "error", "duration_ms", "downtime_ms", "bytes"}


def test_migrate_history_after_a_cli_migration(tmp_path: Path,
                                               daemons: tuple[Daemon, Daemon]) -> None:
    src, dst = daemons
    assert json.loads(ok(src.uri, "migrate-history", "--json")) == []
    start_guest(tmp_path, src.uri, "vm1")
    ok(src.uri, "migrate", "--live", "vm1", dst.uri)
    [s] = json.loads(ok(src.uri, "migrate-history", "--json"))
    [d] = json.loads(ok(dst.uri, "migrate-history", "vm1", "--json"))
    assert set(s) == FIELDS and set(d) == FIELDS
    assert s["migration_id"] == d["migration_id"] and len(s["migration_id"]) == 32
    assert (s["role"], d["role"], s["outcome"], d["outcome"]) == (
        "source", "destination", "completed", "completed")
    assert (s["source"], s["destination"], s["mode"], s["transport"]) == (
        "src.test", "dst.test", "live", "direct")
    assert json.loads(ok(src.uri, "migrate-history", "other", "--json")) == []
    # the client sees the same id in the job statistics of both daemons
    for uri in (src.uri, dst.uri):
        stats = ok(uri, "domjobinfo", "vm1", "--completed", "--rawstats").splitlines()
        assert f"virtmig.migration_id: {s['migration_id']}" in stats
    table = ok(src.uri, "migrate-history", "vm1").splitlines()
    assert table[0].split() == ["Time", "Domain", "Role", "Source", "Destination", "Mode",
                                "Outcome", "Duration", "Downtime", "Bytes"]
    assert table[2].split()[2:8] == ["vm1", "source", "src.test", "dst.test", "live/direct",
                                     "completed"]
    assert fails(src.uri, "migrate-history", "--limit", "x") == (
        "error: Numeric value 'x' for <limit> option is malformed or out of range\n")
    # the daemons' logs: phase lines and one finished line, each with the migration id
    for daemon, phases in ((src, ("begin3", "perform3", "perform3_done", "confirm3")),
                           (dst, ("prepare", "finish3"))):
        lines = [line for line in daemon.log.read_text().splitlines()
                 if f"migration {s['migration_id']} of vm1" in line]
        assert [line.rsplit("-> ", 1)[1].split()[0] for line in lines if "phase" in line] == [
            *phases]
        assert sum(" INFO migration " in line and " completed: " in line for line in lines) == 1
