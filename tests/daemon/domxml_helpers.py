"""Shared by the domain XML test modules: the test data, a document builder, the parse-error
assertion and the ``realistic`` fixture (the parsed realistic document).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from lxml import etree

from virtmig.daemon.domxml import (
    DomainDef,
    parse_domain_xml,
)

DATA = Path(__file__).parent / "data" / "domxml"


REALISTIC = (DATA / "realistic.xml").read_text()


REALISTIC_UUID = "c7a5fdbd-edaf-9455-926a-d65c16db1809"


UUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"


def dom(
    body: str = "<memory>1024</memory>",
    *,
    head: str = "<domain type='test'>",
    name: str = "<name>vm1</name>",
    uuid: str = f"<uuid>{UUID}</uuid>",
) -> str:
    return f"{head}\n  {name}\n  {uuid}\n  {body}\n</domain>\n"


def c14n(text: str) -> bytes:
    return etree.tostring(etree.fromstring(text.encode()).getroottree(), method="c14n")


def raises(exc: type[Exception], text: str | bytes, match: str) -> None:
    with pytest.raises(exc, match=match):
        parse_domain_xml(text)


# Realistic document: interpretation, verbatim round trip


@pytest.fixture
def realistic() -> DomainDef:
    return parse_domain_xml(REALISTIC)
