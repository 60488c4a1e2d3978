"""The CLI's side of "a guest runs in one place": ``start`` of a migrated guest refused naming
its host, ``start --force`` (logged by the daemon), ``domstate --reason`` of a migrated guest and
``migrate-resolve`` of one whose outcome is known, against two real ``virtmigd`` processes.  An
unknown outcome's ``domstate --reason`` detail and ``migrate-resolve`` settling it:
``tests/daemon/test_one_place_settle.py``.
"""

from __future__ import annotations

from pathlib import Path

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, fails, ok, start_guest, virtmig

daemons = cli_helpers.daemons


def test_start_after_migration_refused_then_forced(daemons: tuple[Daemon, Daemon],
                                                   tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "web")
    res = virtmig(src.uri, "migrate", "--live", "web", dst.uri)
    assert res.returncode == 0, res.stderr

    err = fails(src.uri, "start", "web")
    assert err.startswith("error: Failed to start domain 'web'\nerror: Requested operation is "
                          "not valid: domain 'web' runs on host dst.test (")
    assert "'start --force'" in err and err.count("\n") == 2
    assert ok(src.uri, "domstate", "--reason", "web") == "shut off (migrated)\n"
    assert "no migration whose outcome is unknown" in fails(src.uri, "migrate-resolve", "web")

    assert ok(src.uri, "start", "--force", "web") == "Domain 'web' started\n"
    assert "with --force although it was migrated to host dst.test" in src.log.read_text()
    # Both copies run now, as the operator forced; the source's record is gone.
    assert ok(src.uri, "destroy", "web") == "Domain 'web' destroyed\n"
    assert ok(src.uri, "start", "web") == "Domain 'web' started\n"
