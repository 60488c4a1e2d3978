"""``virtmig migrate --tls`` and ``--tls-destination`` against two real ``virtmigd`` processes
(test backend): the stream is TLS with the hosts' PKI dirs, the destination's certificate must
name the expected host, and ``--tls-destination`` needs ``--tls``.
"""

from __future__ import annotations

from pathlib import Path

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, fails, ok, start_guest

daemons = cli_helpers.daemons


def test_migrate_with_tls(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = daemons
    start_guest(tmp_path, src.uri, "web")

    assert fails(src.uri, "migrate", "--live", "--tls-destination", "dst.test", "web",
                 dst.uri) == ("error: argument unsupported: parameter 'tls.destination' "
                              "requires flag VIR_MIGRATE_TLS\n")
    err = fails(src.uri, "migrate", "--live", "--tls", "--tls-destination", "elsewhere.test",
                "web", dst.uri)
    assert "certificate verify failed: Hostname mismatch, certificate is not valid for " \
           "'elsewhere.test'" in err
    assert ok(src.uri, "domstate", "web") == "running\n"

    assert ok(src.uri, "migrate", "--live", "--tls", "web", dst.uri) == ""
    assert ok(dst.uri, "domstate", "--reason", "web") == "running (migrated)\n"
    assert ok(dst.uri, "migrate", "--live", "--tls", "--tls-destination", "src.test", "web",
              src.uri) == ""
    assert ok(src.uri, "domstate", "--reason", "web") == "running (migrated)\n"
    assert ok(src.uri, "migrate", "--live", "--p2p", "--tunnelled", "--tls", "web",
              dst.uri) == ""
    assert ok(dst.uri, "domstate", "--reason", "web") == "running (migrated)\n"
