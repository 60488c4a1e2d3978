"""Safe XML input and libvirt-style XML output, for the migration cookie (:mod:`.cookie`).

Input: :func:`safe_fromstring` parses without entity expansion, DTD loading or network access,
and refuses any DOCTYPE (:class:`UnsafeXML`).  Output: :func:`emit` writes an element tree in
libvirt's style (two-space indent, single-quoted attributes, one element per line; an element
with text only stays on one line, one with mixed content is written inline as it came, so no
text changes), deterministically for a given tree.
"""

from __future__ import annotations

from collections.abc import Mapping

from lxml import etree

from virtmig.proto.errors import InternalError

__all__ = ["UnsafeXML", "emit", "safe_fromstring", "text_of"]


def text_of(value: str | bytes) -> str:
    """An lxml text or attribute value as str (lxml hands out str; its stubs also allow bytes)."""
    return value if isinstance(value, str) else value.decode("utf-8")


# ---------------------------------------------------------------------------------------------
# Safe XML input


class UnsafeXML(Exception):
    pass


def safe_fromstring(data: bytes) -> etree._Element:
    """Parse without entity expansion, DTD loading or network access; refuse any DOCTYPE."""
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )
    root = etree.fromstring(data, parser)
    docinfo = root.getroottree().docinfo
    # lxml records every <!DOCTYPE …>, with or without a subset or identifiers, as internalDTD.
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None:
        raise UnsafeXML("DOCTYPE declarations are not allowed")
    return root


# ---------------------------------------------------------------------------------------------
# Output: libvirt's style.  Two-space indent, attributes in single quotes, one element per line;
# an element with text only stays on one line; an element with mixed content is written inline
# as it came, so no text changes.  Deterministic for a given tree.

_XML_NS = "http://www.w3.org/XML/1998/namespace"
_TEXT_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;", "\r": "&#13;"}
)
_ATTR_ESCAPES = str.maketrans(
    {"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;", '"': "&quot;", "\r": "&#13;",
     "\n": "&#10;", "\t": "&#9;"}
)

_NsMap = Mapping[str | None, str]


def emit(el: etree._Element, depth: int, parent_ns: _NsMap, out: list[str]) -> None:
    indent = "  " * depth
    name = _element_name(el)
    children = list(el)
    text = el.text or ""
    if not children:
        start = _start_tag(el, name, parent_ns)
        out.append(f"{indent}<{start}>{text.translate(_TEXT_ESCAPES)}</{name}>\n" if text
                   else f"{indent}<{start}/>\n")
    elif text.strip() or any((child.tail or "").strip() for child in children):
        out.append(f"{indent}{_inline(el, parent_ns)}\n")
    else:
        out.append(f"{indent}<{_start_tag(el, name, parent_ns)}>\n")
        for child in children:
            emit(child, depth + 1, el.nsmap, out)
        out.append(f"{indent}</{name}>\n")


def _inline(el: etree._Element, parent_ns: _NsMap) -> str:
    name = _element_name(el)
    start = _start_tag(el, name, parent_ns)
    children = list(el)
    if not children and not el.text:
        return f"<{start}/>"
    parts = [f"<{start}>", (el.text or "").translate(_TEXT_ESCAPES)]
    for child in children:
        parts.append(_inline(child, el.nsmap))
        parts.append((child.tail or "").translate(_TEXT_ESCAPES))
    parts.append(f"</{name}>")
    return "".join(parts)


def _start_tag(el: etree._Element, name: str, parent_ns: _NsMap) -> str:
    parts = [name]
    nsmap = el.nsmap
    if None in parent_ns and None not in nsmap:
        parts.append("xmlns=''")
    for prefix in sorted(nsmap, key=lambda p: "" if p is None else f":{p}"):
        uri = nsmap[prefix]
        if parent_ns.get(prefix) != uri:
            attr = "xmlns" if prefix is None else f"xmlns:{prefix}"
            parts.append(f"{attr}='{uri.translate(_ATTR_ESCAPES)}'")
    for key, value in el.attrib.items():
        escaped = text_of(value).translate(_ATTR_ESCAPES)
        parts.append(f"{_attribute_name(text_of(key), nsmap)}='{escaped}'")
    return " ".join(parts)


def _element_name(el: etree._Element) -> str:
    local = etree.QName(el).localname
    return f"{el.prefix}:{local}" if el.prefix else local


def _attribute_name(key: str, nsmap: _NsMap) -> str:
    qname = etree.QName(key)
    uri = qname.namespace
    if uri is None:
        return qname.localname
    if uri == _XML_NS:
        return f"xml:{qname.localname}"
    prefixes = sorted(p for p, u in nsmap.items() if u == uri and p is not None)
    if not prefixes:  # lxml always has one for a parsed or built attribute
        raise InternalError(f"no namespace prefix for attribute {key}")
    return f"{prefixes[0]}:{qname.localname}"
