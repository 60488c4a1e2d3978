"""``virtmig dumpxml --security-info``: the graphics passwords only when asked for (libvirt's
VIR_DOMAIN_XML_SECURE), on the live, inactive and migratable XML alike."""

from __future__ import annotations

from pathlib import Path

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, domain_xml, ok

daemons = cli_helpers.daemons

GRAPHICS = "<devices><graphics type='vnc' passwd='hunter2'/></devices>"


def test_dumpxml_shows_passwords_only_with_security_info(daemons: tuple[Daemon, Daemon],
                                                          tmp_path: Path) -> None:
    src, _dst = daemons
    xml = tmp_path / "web.xml"
    xml.write_text(domain_xml("web").replace("</domain>", GRAPHICS + "</domain>"))
    ok(src.uri, "define", str(xml))
    for extra in ((), ("--inactive",), ("--migratable",)):
        shown = ok(src.uri, "dumpxml", *extra, "web")
        assert "<graphics type=\"vnc\"/>" in shown and "hunter2" not in shown
        secure = ok(src.uri, "dumpxml", "--security-info", *extra, "web")
        assert "<graphics type=\"vnc\" passwd=\"hunter2\"/>" in secure
