"""``virtmig ttyconsole DOMAIN``: the pty of a running domain's console, read from its live XML
as virsh does (``<console tty=>``); one clear error when there is none."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, domain_xml, fails, ok
from virtmig.client.cli.domains import console_tty

daemons = cli_helpers.daemons


def wrap(devices: str) -> str:
    return f"<domain type='qemu'><name>x</name><devices>{devices}</devices></domain>"


@pytest.mark.parametrize(("devices", "tty"), [
    ("<console type='pty' tty='/dev/pts/3'><source path='/dev/pts/3'/></console>", "/dev/pts/3"),
    ("<console type='pty'><source path='/dev/pts/5'/></console>", "/dev/pts/5"),
    ("<serial type='pty'><source path='/dev/pts/6'/></serial>", "/dev/pts/6"),
    ("<serial type='file'><source path='/var/x.log'/></serial>", ""),
    ("<console type='pty'/>", ""),  # not running: no pty yet
    ("", ""),
])
def test_console_tty(devices: str, tty: str) -> None:
    assert console_tty(wrap(devices)) == tty


def test_ttyconsole_command(daemons: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, _dst = daemons
    xml = tmp_path / "con.xml"
    # The test backend keeps the definition as it is: the live XML shows this tty.
    xml.write_text(domain_xml("con").replace(
        "</domain>", "<devices><console type='pty' tty='/dev/pts/42'/></devices></domain>"))
    ok(src.uri, "define", str(xml))
    ok(src.uri, "start", "con")
    assert ok(src.uri, "ttyconsole", "con") == "/dev/pts/42\n"
    plain = tmp_path / "plain.xml"
    plain.write_text(domain_xml("plain"))
    ok(src.uri, "define", str(plain))
    assert fails(src.uri, "ttyconsole", "plain") == \
        "error: domain 'plain' has no pty console (is it running?)\n"
    assert fails(src.uri, "ttyconsole", "nosuch").startswith("error: failed to get domain 'nosuch'")
