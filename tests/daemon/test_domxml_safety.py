"""Domain XML parsing safety: malformed documents, encodings, the size limit, DTDs and entities.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.daemon.domxml_helpers import dom, raises
from virtmig.daemon import domxml
from virtmig.daemon.domxml import (
    MAX_XML_BYTES,
    parse_domain_xml,
)
from virtmig.proto.errors import InvalidArgument, XMLError

# Malformed input, encodings


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "<domain type='test'>\n  <name>x</nam>\n</domain>",
            r"^XML error: malformed domain XML at line 2, column \d+: "
            r"Opening and ending tag mismatch: name line 2 and nam$",
        ),
        ("", r"^XML error: malformed domain XML at line 1, column 1: Document is empty$"),
        ("   \n", r"^XML error: malformed domain XML at line \d+, column \d+: "),
        (
            "<domain type='test'>\n<name>&foo;</name>",
            r"line 2, column \d+: Entity 'foo' not defined",
        ),
        ("<domain type='test'/><domain/>", r"Extra content at the end of the document$"),
        ("<domain type='test' type='kvm'/>", r"Attribute type redefined$"),
    ],
)
def test_malformed(text: str, message: str) -> None:
    raises(XMLError, text, message)


def test_not_str_or_bytes() -> None:
    with pytest.raises(InvalidArgument,
                       match=r"^invalid argument: domain XML must be str or bytes, not int$"):
        parse_domain_xml(42)  # type: ignore[arg-type]


def test_str_with_encoding_declaration() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + dom(name="<name>café</name>")
    assert parse_domain_xml(text).name == "café"


def test_bytes_in_declared_latin1() -> None:
    text = "<?xml version='1.0' encoding='ISO-8859-1'?>\n" + dom(name="<name>café</name>")
    d = parse_domain_xml(text.encode("latin-1"))
    assert d.name == "café"
    assert parse_domain_xml(d.xml) == d


@pytest.mark.parametrize("codec", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-8-sig"])
def test_bytes_in_unicode_encodings(codec: str) -> None:
    text = "<?xml version='1.0'?>" + dom(name="<name>café</name>")
    assert parse_domain_xml(text.encode(codec)).name == "café"


def test_invalid_utf8_bytes() -> None:
    raises(XMLError, dom().encode() + b"<!-- \xff -->",
           "^XML error: domain XML is not valid utf-8: ")


def test_unknown_declared_encoding() -> None:
    text = "<?xml version='1.0' encoding='x-nonesuch'?>" + dom()
    raises(XMLError, text.encode(), "^XML error: unsupported encoding 'x-nonesuch' in domain XML$")


def test_lone_surrogate_in_str() -> None:
    raises(XMLError, dom(name="<name>a\ud800</name>"),
           "^XML error: domain XML is not valid Unicode: ")


# Size limit, DTDs, entities

PASSWD = Path("/etc/passwd")


def _padded(size: int, filler: str = " ") -> str:
    base = dom()
    return base + filler * (size - len(base.encode()))


def test_oversize_refused_before_parsing() -> None:
    text = "x" * (MAX_XML_BYTES + 1)  # not even XML: the size check comes first
    raises(
        XMLError,
        text,
        f"^XML error: domain XML is too large: {MAX_XML_BYTES + 1} bytes exceeds the limit of "
        f"{MAX_XML_BYTES} bytes$",
    )
    raises(XMLError, text.encode(), "too large")


def test_exactly_max_size_accepted() -> None:
    text = _padded(MAX_XML_BYTES)
    assert len(text.encode()) == MAX_XML_BYTES
    assert parse_domain_xml(text).name == "vm1"
    raises(XMLError, text + " ", "too large")


def test_size_counts_utf8_bytes_not_characters() -> None:
    text = dom() + "<!--" + "é" * (MAX_XML_BYTES // 2) + "-->"
    assert len(text) < MAX_XML_BYTES < len(text.encode())
    raises(XMLError, text, "^XML error: domain XML is too large: ")


DTD_DOCUMENTS = {
    "plain doctype": "<!DOCTYPE domain>\n" + dom(),
    "system doctype": "<!DOCTYPE domain SYSTEM 'http://example.invalid/domain.dtd'>" + dom(),
    "after declaration, comment and PI": (
        "<?xml version='1.0'?>\n<!-- hi -->\n<?pi x?>\n<!DOCTYPE domain>" + dom()
    ),
    "internal entity": ("<!DOCTYPE domain [<!ENTITY vm 'vm1'>]>" + dom(name="<name>&vm;</name>")),
    "xxe": (
        "<!DOCTYPE domain [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>]>"
        + dom(name="<name>&xxe;</name>")
    ),
    "xxe in attribute default": (
        "<!DOCTYPE domain [<!ENTITY xxe SYSTEM 'file:///etc/passwd'>"
        "<!ATTLIST domain leak CDATA '&xxe;'>]>" + dom()
    ),
    "parameter entity": (
        "<!DOCTYPE domain [<!ENTITY % p SYSTEM 'file:///etc/passwd'> %p;]>" + dom()
    ),
    "network dtd": "<!DOCTYPE domain SYSTEM 'http://127.0.0.1:9/x.dtd'>" + dom(),
}


def _billion_laughs() -> str:
    entities = "<!ENTITY lol0 'lol'>" + "".join(
        f"<!ENTITY lol{i} '{f'&lol{i - 1};' * 10}'>" for i in range(1, 10)
    )
    return f"<!DOCTYPE domain [{entities}]>" + dom(
        name="<name>&lol9;</name>", body="<memory>1</memory><description a='&lol9;'/>"
    )


DTD_DOCUMENTS["billion laughs"] = _billion_laughs()


@pytest.mark.parametrize("text", DTD_DOCUMENTS.values(), ids=DTD_DOCUMENTS.keys())
def test_dtd_and_entities_refused(text: str) -> None:
    for given in (text, text.encode(), text.encode("utf-16")):
        started = time.monotonic()
        with pytest.raises(XMLError) as info:
            parse_domain_xml(given)
        assert str(info.value) == "XML error: DTDs and entities are not allowed in domain XML"
        assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("text", DTD_DOCUMENTS.values(), ids=DTD_DOCUMENTS.keys())
def test_dtd_refused_even_past_the_prolog_scan(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: without the prolog scan, libxml2 must still neither expand nor leak."""
    monkeypatch.setattr(domxml, "_has_doctype", lambda data: False)
    started = time.monotonic()
    with pytest.raises(XMLError) as info:
        parse_domain_xml(text)
    assert time.monotonic() - started < 1.0
    message = str(info.value)
    assert "lollollol" not in message
    if PASSWD.exists():
        for line in PASSWD.read_text().splitlines()[:3]:
            assert line not in message
    assert "root:" not in message


def test_xxe_does_not_leak_through_any_field() -> None:
    text = DTD_DOCUMENTS["xxe"]
    with pytest.raises(XMLError) as info:
        parse_domain_xml(text)
    assert "root:" not in str(info.value)
    assert "passwd" not in str(info.value)


def test_doctype_text_in_body_is_not_a_doctype() -> None:
    text = dom(
        "<memory>1</memory><description>&lt;!DOCTYPE x&gt; <![CDATA[<!ENTITY y 'z'>]]>"
        "</description><!-- <!DOCTYPE domain> -->"
    )
    d = parse_domain_xml("<!-- <!DOCTYPE domain> -->" + text)
    assert "<!DOCTYPE domain> -->" in d.xml
