"""Domain XML: safe parsing, the few fields virtmig interprets, and libvirt's ABI-stability check.

The concern of this module is the *domain definition document* (libvirt's ``<domain>`` format, a
subset): turning untrusted text into a :class:`DomainDef` without ever expanding entities, loading
DTDs or touching the network; keeping everything it does not interpret **verbatim** so that a
definition round-trips without loss; producing libvirt's *migratable* form; and refusing a
migration target definition whose guest-visible ABI differs from the source's; and leaving the
graphics passwords (``<graphics passwd=>``) out of what is shown without libvirt's
VIR_DOMAIN_XML_SECURE.

Only these fields are interpreted: the domain ``type``, ``<name>``, ``<uuid>``, ``<memory>``,
``<currentMemory>``, ``<vcpu>``, ``<os><type arch= machine=>`` and the attributes of
``<metadata><virtmig:guest xmlns:virtmig="urn:virtmig:domain:1" .../></metadata>``.  Devices,
features, clock, lifecycle actions, comments, unknown elements and other metadata namespaces are
kept as they are.

Errors: :class:`XMLError` for malformed or invalid XML, :class:`ConfigUnsupported` for an ABI
mismatch, :class:`InvalidArgument` for other bad input (a bad new name for :func:`rename`).
"""

from __future__ import annotations

import codecs
import dataclasses
import re
import threading
import types
import unicodedata
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from lxml import etree

from virtmig.proto.errors import InvalidArgument, XMLError

__all__ = [
    "DOMAIN_TYPES",
    "MAX_NAME_BYTES",
    "MAX_XML_BYTES",
    "VIRTMIG_NS",
    "DomainDef",
    "check_name_length",
    "device_counts",
    "format_domain_xml",
    "interface_macs",
    "parse_domain_xml",
    "parse_memory_kib",
    "rename",
    "validate_name",
]

VIRTMIG_NS = "urn:virtmig:domain:1"
MAX_XML_BYTES = 1024 * 1024
#: The longest domain name, in bytes of UTF-8 (libvirt has no limit; a cap keeps every reply
#: that carries names bounded).
MAX_NAME_BYTES = 255

#: The virtualization types (``<domain type=...>``) virtmig accepts.
DOMAIN_TYPES = frozenset({"test", "qemu", "kvm"})

_GUEST_TAG = f"{{{VIRTMIG_NS}}}guest"
_DEFAULT_OS_TYPE = "hvm"
_DEFAULT_ARCH = "x86_64"
# libvirt parses memory as a byte count no larger than LLONG_MAX, and vCPUs as an unsigned int.
_MAX_MEMORY_BYTES = 2**63 - 1
_MAX_VCPUS = 2**32 - 1
_DTD_REFUSED = "DTDs and entities are not allowed in domain XML"

_INT_RE = re.compile(r"[ \t\n\r]*([0-9]+)[ \t\n\r]*", re.ASCII)
# libvirt's virUUIDParse: 16 hex pairs, '-' or ' ' allowed between pairs, whitespace around.
_UUID_RE = re.compile(r"[ \t\n\v\f\r]*((?:[- ]*[0-9a-fA-F]{2}){16})[ \t\n\v\f\r]*", re.ASCII)
# A UUID already in canonical form (what the daemon itself writes): kept as it is.
_CANONICAL_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                                re.ASCII)
_ENCODING_DECL_RE = re.compile(
    rb"<\?xml[^>]*?\bencoding[ \t\r\n]*=[ \t\r\n]*[\"']([A-Za-z][A-Za-z0-9._-]*)[\"']"
)
_LXML_POSITION_RE = re.compile(r", line \d+, column \d+$")


@dataclass(frozen=True)
class DomainDef:
    """A parsed domain definition: the interpreted fields plus the whole document in ``xml``.

    ``xml`` is authoritative: every other field is derived from it by :func:`parse_domain_xml`.
    """

    name: str
    uuid: str
    domain_type: str
    memory_kib: int
    current_memory_kib: int
    vcpus: int
    os_type: str
    arch: str
    machine: str
    options: Mapping[str, str] = field(hash=False)
    xml: str = field(repr=False)


# --------------------------------------------------------------------------------------------
# Safe parsing


_PARSERS = threading.local()


def _parser() -> etree.XMLParser:
    """This thread's parser (lxml parser objects must not be shared between threads; one per
    document costs a third of a small document's parse)."""
    parser: etree.XMLParser | None = getattr(_PARSERS, "parser", None)
    if parser is None:
        parser = _PARSERS.parser = _new_parser()
    return parser


def _new_parser() -> etree.XMLParser:
    # ``encoding`` is forced because every input is normalised to UTF-8 first (see _to_utf8).
    return etree.XMLParser(
        encoding="utf-8",
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        strip_cdata=False,
        remove_comments=False,
        remove_pis=False,
        remove_blank_text=False,
    )


_BOMS: tuple[tuple[bytes, str], ...] = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
# XML 1.0 appendix F: '<?' (or '<') in UTF-16/32 without a byte order mark.
_BOMLESS: tuple[tuple[bytes, str], ...] = (
    (b"<\x00\x00\x00", "utf-32-le"),
    (b"\x00\x00\x00<", "utf-32-be"),
    (b"<\x00?\x00", "utf-16-le"),
    (b"\x00<\x00?", "utf-16-be"),
)


def _to_utf8(text: str | bytes) -> bytes:
    """Normalise the input to UTF-8 bytes, so the DOCTYPE scan below sees what libxml2 sees."""
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise XMLError(f"domain XML is not valid Unicode: {err.reason}") from None
    codec = None
    for prefix, name in _BOMS + _BOMLESS:
        if text.startswith(prefix):
            codec = name
            break
    if codec is None:
        declared = _ENCODING_DECL_RE.match(text, 0, 200)
        codec = declared.group(1).decode("ascii") if declared else "utf-8"
    try:
        decoded = text.decode(codec)
    except LookupError:
        raise XMLError(f"unsupported encoding '{codec}' in domain XML") from None
    except UnicodeDecodeError as err:
        raise XMLError(
            f"domain XML is not valid {codec}: {err.reason} at byte {err.start}"
        ) from None
    return text if codecs.lookup(codec).name == "utf-8" else decoded.encode("utf-8")


def _has_doctype(data: bytes) -> bool:
    """Whether the prolog (before the root element) declares a DOCTYPE.

    A DOCTYPE can only appear after the XML declaration, comments, processing instructions and
    whitespace; a linear scan over those finds it without handing libxml2 a DTD to parse.
    """
    pos = 3 if data.startswith(codecs.BOM_UTF8) else 0
    end = len(data)
    while pos < end:
        if data[pos] in b" \t\r\n":
            pos += 1
        elif data.startswith(b"<?", pos):
            close = data.find(b"?>", pos + 2)
            if close < 0:
                return False  # malformed: the parser reports it
            pos = close + 2
        elif data.startswith(b"<!--", pos):
            close = data.find(b"-->", pos + 4)
            if close < 0:
                return False
            pos = close + 3
        else:
            return data.startswith(b"<!DOCTYPE", pos)
    return False


def _check_size(size: int, form: str = "") -> None:
    if size > MAX_XML_BYTES:
        raise XMLError(f"domain XML is too large{form}: {size} bytes exceeds the limit of "
                       f"{MAX_XML_BYTES} bytes")


def _parse_tree(text: str | bytes) -> etree._ElementTree:
    """Parse untrusted text into a tree: size limit, no DTD, no entities, no network."""
    if not isinstance(text, str | bytes):
        raise InvalidArgument(f"domain XML must be str or bytes, not {type(text).__name__}")
    _check_size(len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text))
    data = _to_utf8(text)
    if _has_doctype(data):
        raise XMLError(_DTD_REFUSED)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as err:
        reason = _LXML_POSITION_RE.sub("", str(err.msg or "unknown error"))
        line, column = err.position
        raise XMLError(f"malformed domain XML at line {line}, column {column}: {reason}") from None
    tree = root.getroottree()
    # Belt and braces: the prolog scan should have caught every DTD already.
    if (
        tree.docinfo.internalDTD is not None
        or tree.docinfo.externalDTD is not None
        or next(root.iter(etree.Entity), None) is not None
    ):
        raise XMLError(_DTD_REFUSED)
    return tree


def _serialize(tree: etree._ElementTree) -> str:
    """The document without XML declaration; top-level comments and PIs on their own lines."""
    root = tree.getroot()
    nodes = [*reversed(list(root.itersiblings(preceding=True))), root, *root.itersiblings()]
    return "\n".join(etree.tostring(node, encoding="unicode", with_tail=False) for node in nodes)


# --------------------------------------------------------------------------------------------
# Field helpers


def _is_element(node: etree._Element) -> bool:
    return isinstance(node.tag, str)


def _only_child(parent: etree._Element, tag: str) -> etree._Element | None:
    """The single child ``tag`` of ``parent``, None if absent; XMLError if repeated."""
    found = parent.iterchildren(tag)
    first = next(found, None)
    if first is not None and next(found, None) is not None:
        raise XMLError(f"element <{_display_tag(tag)}> may appear only once")
    return first


def _display_tag(tag: str) -> str:
    qname = etree.QName(tag)
    return f"virtmig:{qname.localname}" if qname.namespace == VIRTMIG_NS else qname.localname


def _leaf_text(el: etree._Element) -> str:
    """The text of an element that must hold text only (comments and PIs inside are skipped)."""
    parts = [el.text or ""]
    for child in el:
        if _is_element(child):
            raise XMLError(f"element <{_display_tag(str(el.tag))}> must contain text only")
        parts.append(child.tail or "")
    return "".join(parts)


def _set_leaf_text(el: etree._Element, value: str) -> None:
    for child in list(el):
        el.remove(child)
    el.text = value


def _scale_for_unit(unit: str, element: str) -> int:
    """libvirt's virScaleInteger suffixes (case-insensitive), as a multiplier in bytes."""
    lower = unit.lower()
    if lower in ("b", "byte", "bytes"):
        return 1
    if len(unit) == 1 or lower[1:] == "ib":
        base = 1024
    elif len(unit) == 2 and lower[1] == "b":
        base = 1000
    else:
        raise XMLError(f"unknown unit '{unit}' for element <{element}>")
    exponent = "kmgtpe".find(lower[0]) + 1
    if exponent == 0:
        raise XMLError(f"unknown unit '{unit}' for element <{element}>")
    return int(base**exponent)


def parse_memory_kib(value: str, unit: str | None, element: str = "memory") -> int:
    """A libvirt scaled memory value (``unit`` defaults to KiB) in KiB, rounded up; must be > 0."""
    match = _INT_RE.fullmatch(value)
    if match is None:
        raise XMLError(
            f"invalid value '{value.strip()}' for element <{element}>: expected a positive integer"
        )
    digits = match.group(1)
    scale = _scale_for_unit(unit, element) if unit else 1024
    if len(digits) > 20 or int(digits) * scale > _MAX_MEMORY_BYTES:
        raise XMLError(f"value too large for element <{element}>: {digits}{unit or ''}")
    number = int(digits)
    if number == 0:
        raise XMLError(f"invalid value '0' for element <{element}>: must be greater than zero")
    return -(-number * scale // 1024)


def _memory_kib(root: etree._Element, tag: str) -> int | None:
    el = _only_child(root, tag)
    if el is None:
        return None
    return parse_memory_kib(_leaf_text(el), el.get("unit"), tag)


def check_name_length(name: str, error: type[InvalidArgument] = InvalidArgument) -> None:
    """Refuse a name over :data:`MAX_NAME_BYTES` (UTF-8) without echoing it: the cheap check a
    lookup runs before it searches."""
    if len(name) > MAX_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise error(
            f"domain name is too long: {len(name.encode('utf-8', 'surrogatepass'))} bytes, "
            f"the limit is {MAX_NAME_BYTES} bytes (UTF-8)"
        )


def _check_name(name: str, error: type[InvalidArgument]) -> None:
    """libvirt's name rules (not empty, no '/', no surrounding whitespace) plus virtmig's: at
    most :data:`MAX_NAME_BYTES` bytes of UTF-8, no control character (Unicode category Cc)."""
    if not name:
        raise error("missing name information")
    check_name_length(name, error)
    if name != name.strip():
        raise error(f"name '{name}' must not have leading or trailing whitespace")
    for char in name:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise error(f"invalid char in name: 0x{ord(char):02x}")
    if "/" in name:
        raise error(f"name {name} cannot contain '/'")


def validate_name(name: str) -> None:
    """Raise InvalidArgument unless ``name`` is a valid domain name."""
    _check_name(name, InvalidArgument)


def _canonical_uuid(text: str) -> str:
    if _CANONICAL_UUID_RE.fullmatch(text):
        return text
    match = _UUID_RE.fullmatch(text)
    if match is None:
        raise XMLError(f"malformed uuid element: '{text}'")
    return str(uuidlib.UUID(hex=match.group(1).replace("-", "").replace(" ", "")))


def _vcpus(root: etree._Element) -> int:
    el = _only_child(root, "vcpu")
    if el is None:
        return 1
    text = _leaf_text(el)
    match = _INT_RE.fullmatch(text)
    if match is None or len(match.group(1)) > 10 or int(match.group(1)) > _MAX_VCPUS:
        raise XMLError(f"maximum vcpus count must be an integer, not '{text.strip()}'")
    count = int(match.group(1))
    if count < 1:
        raise XMLError("Domain requires at least 1 vCPU")
    return count


def _os(root: etree._Element) -> tuple[str, str, str]:
    os_el = _only_child(root, "os")
    type_el = _only_child(os_el, "type") if os_el is not None else None
    if type_el is None:
        return _DEFAULT_OS_TYPE, _DEFAULT_ARCH, ""
    os_type = _leaf_text(type_el).strip() or _DEFAULT_OS_TYPE
    arch = type_el.get("arch")
    if arch is not None and not arch.strip():
        raise XMLError("invalid empty attribute 'arch' in element <type>")
    machine = type_el.get("machine") or ""
    return os_type, (arch.strip() if arch is not None else _DEFAULT_ARCH), machine.strip()


def _options(root: etree._Element) -> Mapping[str, str]:
    metadata = _only_child(root, "metadata")
    guest = _only_child(metadata, _GUEST_TAG) if metadata is not None else None
    if guest is None:
        return types.MappingProxyType({})
    # Namespace-qualified attributes are kept in the document but are not options.
    return types.MappingProxyType(
        {str(k): str(v) for k, v in guest.attrib.items() if not str(k).startswith("{")}
    )


def _from_tree(tree: etree._ElementTree) -> DomainDef:
    """Interpret a parsed tree, canonicalising (or inserting) the uuid in place."""
    root = tree.getroot()
    if root.tag != "domain":
        tag = root.tag if isinstance(root.tag, str) else "?"
        raise XMLError(f"unexpected root element <{tag}>, expecting <domain>")
    domain_type = root.get("type")
    if domain_type is None:
        raise XMLError("missing domain type attribute")
    if domain_type not in DOMAIN_TYPES:
        raise XMLError(
            f"invalid domain type '{domain_type}': expected one of "
            + ", ".join(sorted(DOMAIN_TYPES))
        )

    name_el = _only_child(root, "name")
    if name_el is None:
        raise XMLError("missing name information")
    name = _leaf_text(name_el)
    _check_name(name, XMLError)

    uuid_el = _only_child(root, "uuid")
    if uuid_el is None:
        uuid_el = etree.Element("uuid")
        uuid_el.text = str(uuidlib.uuid4())
        name_el.addnext(uuid_el)
        uuid_el.tail = name_el.tail
        uuid = str(uuid_el.text)
    else:
        text = _leaf_text(uuid_el)
        uuid = _canonical_uuid(text) if text else str(uuidlib.uuid4())
        if text != uuid:
            _set_leaf_text(uuid_el, uuid)

    memory_kib = _memory_kib(root, "memory")
    if memory_kib is None:
        raise XMLError("missing element <memory>")
    current = _memory_kib(root, "currentMemory")
    if current is None:
        current = memory_kib
    if current > memory_kib:
        raise XMLError(f"current memory {current} KiB exceeds maximum memory {memory_kib} KiB")

    os_type, arch, machine = _os(root)
    _only_child(root, "devices")  # one <devices>: device counts and stripping read only the first
    return DomainDef(
        name=name,
        uuid=uuid,
        domain_type=domain_type,
        memory_kib=memory_kib,
        current_memory_kib=current,
        vcpus=_vcpus(root),
        os_type=os_type,
        arch=arch,
        machine=machine,
        options=_options(root),
        xml=_serialize(tree),
    )


# --------------------------------------------------------------------------------------------
# Public API


def parse_domain_xml(text: str | bytes) -> DomainDef:
    """Parse and validate untrusted domain XML.

    A missing ``<uuid>`` is generated and inserted right after ``<name>``; a present one is
    rewritten in canonical form.  Everything else is kept verbatim in ``DomainDef.xml``, whose
    UTF-8 form is :data:`MAX_XML_BYTES` at most too (escaping can make it longer than the input).
    """
    d = _from_tree(_parse_tree(text))
    _check_size(len(d.xml.encode()), " once normalised")
    return d


def _remove_keeping_layout(el: etree._Element) -> None:
    """Remove ``el`` while keeping the surrounding indentation (and any text in its tail)."""
    parent = el.getparent()
    if parent is None:
        return
    prev = el.getprevious()
    before = (prev.tail if prev is not None else parent.text) or ""
    tail = el.tail or ""
    if before.strip() or tail.strip():
        text = before + tail  # mixed content: keep every character
    else:
        # Indentation only: a last child's tail is the indentation of the closing tag.
        text = tail if el.getnext() is None else before
    if prev is not None:
        prev.tail = text or None
    else:
        parent.text = text or None
    parent.remove(el)
    if len(parent) == 0 and not (parent.text or "").strip():
        parent.text = None  # <input>\n    </input> reads better as <input/>


def _is_user_alias(el: etree._Element) -> bool:
    alias = el.find("alias")
    return alias is not None and (alias.get("name") or "").startswith("ua-")


def _strip_for_migration(root: etree._Element) -> None:
    """libvirt's VIR_DOMAIN_XML_MIGRATABLE: drop runtime-only and implicit data."""
    if "id" in root.attrib:
        del root.attrib["id"]
    devices = root.find("devices")
    if devices is None:
        return
    controllers = devices.findall("controller")
    usb = [c for c in controllers if c.get("type") == "usb"]
    pci = [c for c in controllers if c.get("type") == "pci"]
    implicit: list[etree._Element] = []
    if (
        len(usb) == 1
        and (usb[0].get("index") or "0") == "0"
        and usb[0].get("model") in (None, "piix3-uhci")
        and not _is_user_alias(usb[0])
    ):
        implicit.append(usb[0])
    if (
        len(pci) == 1
        and (pci[0].get("index") or "0") == "0"
        and pci[0].get("model") == "pci-root"
        and not _is_user_alias(pci[0])
    ):
        implicit.append(pci[0])
    for controller in implicit:
        _remove_keeping_layout(controller)
    for alias in devices.findall("*/alias"):
        if not (alias.get("name") or "").startswith("ua-"):
            _remove_keeping_layout(alias)


def _migratable_tree(d: DomainDef) -> etree._ElementTree:
    tree = _parse_tree(d.xml)
    _strip_for_migration(tree.getroot())
    return tree


def format_domain_xml(d: DomainDef, *, migratable: bool = False, secure: bool = True) -> str:
    """The domain document; with ``migratable`` libvirt's migratable form (stable output).
    Without ``secure`` (libvirt's VIR_DOMAIN_XML_SECURE: ``dumpxml --security-info``) the
    graphics' ``passwd`` attributes are left out, as libvirt leaves them out."""
    if not migratable and (secure or not _has_passwords(d.xml)):
        return d.xml
    tree = _migratable_tree(d) if migratable else _parse_tree(d.xml)
    if not secure:
        for el in tree.getroot().iterfind("devices/graphics[@passwd]"):
            del el.attrib["passwd"]
    return _serialize(tree)


def _has_passwords(xml: str) -> bool:
    return "passwd" in xml  # cheap; the tree decides


def rename(d: DomainDef, new_name: str) -> DomainDef:
    """A copy of ``d`` named ``new_name`` (InvalidArgument if the name is not valid)."""
    _check_name(new_name, InvalidArgument)
    tree = _parse_tree(d.xml)
    name_el = _only_child(tree.getroot(), "name")
    if name_el is None:  # only for a hand-built DomainDef whose xml has no <name>
        raise XMLError("missing name information")
    _set_leaf_text(name_el, new_name)
    return dataclasses.replace(d, name=new_name, xml=_serialize(tree))


def _device_counts(tree: etree._ElementTree) -> dict[str, int]:
    counts: dict[str, int] = {}
    devices = tree.getroot().find("devices")
    for el in devices if devices is not None else ():
        if _is_element(el) and el.tag != "emulator":  # a host path, not a device
            qname = etree.QName(el)
            kind = qname.localname if qname.namespace is None else qname.text
            counts[kind] = counts.get(kind, 0) + 1
    return counts


def device_counts(d: DomainDef, *, migratable: bool = True) -> dict[str, int]:
    """How many of each device kind (``disk``, ``interface``, ...) ``<devices>`` holds.

    ``<emulator>`` (a host path) is not a device.  By default counted on the migratable form, so
    the implicit USB and PCI root controllers do not count.
    """
    return _device_counts(_migratable_tree(d) if migratable else _parse_tree(d.xml))


def interface_macs(d: DomainDef) -> list[str]:
    """The network cards' MAC addresses, in order, lower case ("" for a card without one)."""
    root = _parse_tree(d.xml).getroot()
    return [m.get("address", "").lower() for m in root.findall("devices/interface/mac")]
