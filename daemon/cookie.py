"""The migration cookie: building and parsing libvirt's ``<qemu-migration>`` XML document.

The cookie is the opaque, NUL-terminated blob that each v3 step hands to the next (A: Begin →
Prepare, B: Prepare → Perform, C: Perform → Finish, D: Finish → Confirm).  The client never looks
inside; only the daemons do, and only in this module.  The layout is libvirt's
(``src/qemu/qemu_migration_cookie.c``), so cookies read the same as libvirt's, and libvirt's own
cookies parse here::

    <qemu-migration>
      <name>vm1</name>                       always: domain name (the *original* name on rename)
      <uuid>…</uuid>                         always: domain UUID
      <hostname>src.example</hostname>       always: sender's hostname (stored, never compared)
      <hostuuid>…</hostuuid>                 always: sender's host UUID (must differ from ours)
      <feature name='persistent'/>           mandatory features the receiver must understand
      <domain>…</domain>                     persistent           (inactive definition)
      <statistics>…</statistics>             statistics           (job timings and final stats)
      <capabilities>                         capabilities         (migration caps of the sender)
        <cap name='xbzrle' auto='yes'/>
      </capabilities>
      <virtmig-stream-token>…</virtmig-stream-token>   virtmig's own: see below
      <virtmig-migration-id>…</virtmig-migration-id>   virtmig's own: see below
      <virtmig-host-cpu>…</virtmig-host-cpu>           virtmig's own: see below
    </qemu-migration>

Which step produces and consumes which section (as libvirt's QEMU driver does it; the sections
virtmig models are marked with *):

=============  ====================================  ===============================================
cookie         produced by                            consumed by (``accept`` of parse_cookie)
=============  ====================================  ===============================================
A  Begin       capabilities* (unless offline),        Prepare: capabilities* (+ lockstate, nbd, cpu,
               mandatory memory-/cpu-hotplug          memory-/cpu-hotplug, block-dirty-bitmaps)
B  Prepare     capabilities* (unless offline),        Perform: capabilities* (+ graphics,
               graphics, nbd                          block-dirty-bitmaps, nbd)
C  Perform     statistics*, persistent* (with         Finish: statistics*, persistent* (+ network,
               PERSIST_DEST; listed as mandatory),    nbd)
               network, nbd
D  Finish      statistics* (the destination's view:   Confirm: statistics*
               time delta, real downtime)
=============  ====================================  ===============================================

virtmig adds one element of its own, ``<virtmig-stream-token>`` (32 hex digits) in cookie B: the
per-migration secret the destination's Prepare chose, which the source's stream must prove it
knows (``MigrationTuning.stream_token``).  libvirt's parser skips elements it does not know, so a
libvirt peer ignores it; it is never listed as a mandatory feature.  It is read whatever the step
(only Perform uses it), a cookie without it parses with ``stream_token == ""``, and it never
appears in a :class:`Cookie`'s repr.

A third, ``<virtmig-host-cpu>`` (64 hex digits), rides in cookie A for a guest that runs on the
host's own CPU (``host-passthrough``): the backend's digest of the source host's CPU
(:meth:`~virtmig.daemon.backend.base.Backend.host_cpu`), which the destination's Prepare
compares with its own (:meth:`~virtmig.daemon.backend.base.Backend.check_host_cpu`).  Same
rules: skipped by libvirt, never mandatory, "" when absent.

The other libvirt sections (graphics, lockstate, network, nbd, cpu, allowReboot,
blockDirtyBitmaps) are never produced here and are skipped when parsing; their names are known, so
a mandatory ``<feature>`` naming one is refused as *unsupported* unless the caller accepts it.

Parsing applies libvirt's checks (qemuMigrationCookieXMLParse's) with libvirt's messages, all as
:class:`~virtmig.proto.errors.CookieError` (an InternalError, status INVALID_ARGUMENT), in
libvirt's order: NUL terminator, well-formed XML, name, uuid, hostname, hostuuid (and "same
host"), mandatory features, then the sections listed in ``accept`` (others are ignored).  No
entities, DTDs or network access in the XML, a DOCTYPE is refused, and the size is capped
(:mod:`.cookiexml`).

The persistent ``<domain>`` stays a string here: this module neither interprets nor renames it
(libvirt forces the definition's name to the local name on Finish; that is the caller's job).  It is
re-serialised in one canonical style (libvirt's: two-space indent, single-quoted attributes), so a
round trip returns :func:`canonical_domain_xml` of what was sent.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from virtmig.daemon.cookiexml import UnsafeXML, emit, safe_fromstring, text_of
from virtmig.proto.errors import CookieError, InternalError, XMLError
from virtmig.proto.migid import MIGRATION_ID_TAG

__all__ = [
    "ACCEPT_CONFIRM",
    "ACCEPT_FINISH",
    "ACCEPT_PERFORM",
    "ACCEPT_PREPARE",
    "MAX_COOKIE_BYTES",
    "Cookie",
    "CookieFlag",
    "MigrationStats",
    "build_cookie",
    "canonical_domain_xml",
    "mandatory_features",
    "parse_cookie",
    "parse_cookie_opt",
]

ROOT_TAG = "qemu-migration"
TOKEN_TAG = "virtmig-stream-token"
_TOKEN_RE = re.compile(r"[0-9a-f]{32}")
_HEX32_RE = re.compile(r"[0-9a-fA-F]{32}")
HOST_CPU_TAG = "virtmig-host-cpu"
_CPU_RE = re.compile(r"[0-9a-f]{64}")
MAX_COOKIE_BYTES = 16 * 1024 * 1024


class CookieFlag(enum.Flag):
    """libvirt's cookie sections / features (``qemuMigrationCookieFlags``; the bit is the index)."""

    GRAPHICS = 1 << 0
    LOCKSTATE = 1 << 1
    PERSISTENT = 1 << 2
    NETWORK = 1 << 3
    NBD = 1 << 4
    STATISTICS = 1 << 5
    MEMORY_HOTPLUG = 1 << 6
    CPU_HOTPLUG = 1 << 7
    CPU = 1 << 8
    ALLOW_REBOOT = 1 << 9
    CAPABILITIES = 1 << 10
    BLOCK_DIRTY_BITMAPS = 1 << 11

    @property
    def feature(self) -> str:
        """The ``<feature name=…>`` string of a single flag."""
        try:
            return _FEATURE_NAMES[self]
        except KeyError:
            raise ValueError(f"{self!r} is not a single cookie flag") from None

    @classmethod
    def from_feature(cls, name: str) -> CookieFlag | None:
        """The flag named ``name`` in a ``<feature>`` element, or None when unknown."""
        return _FEATURES_BY_NAME.get(name)


_FEATURE_NAMES: Mapping[CookieFlag, str] = {
    CookieFlag.GRAPHICS: "graphics",
    CookieFlag.LOCKSTATE: "lockstate",
    CookieFlag.PERSISTENT: "persistent",
    CookieFlag.NETWORK: "network",
    CookieFlag.NBD: "nbd",
    CookieFlag.STATISTICS: "statistics",
    CookieFlag.MEMORY_HOTPLUG: "memory-hotplug",
    CookieFlag.CPU_HOTPLUG: "cpu-hotplug",
    CookieFlag.CPU: "cpu",
    CookieFlag.ALLOW_REBOOT: "allowReboot",
    CookieFlag.CAPABILITIES: "capabilities",
    CookieFlag.BLOCK_DIRTY_BITMAPS: "block-dirty-bitmaps",
}
_FEATURES_BY_NAME: Mapping[str, CookieFlag] = {v: k for k, v in _FEATURE_NAMES.items()}

# What each receiving step parses.  Only what virtmig acts on: a sender that makes, say, lockstate
# mandatory is refused ("Unsupported migration cookie feature lockstate") rather than ignored.
# libvirt's Finish always accepts persistent, for senders that add it without PERSIST_DEST.
ACCEPT_PREPARE = CookieFlag.CAPABILITIES
ACCEPT_PERFORM = CookieFlag.CAPABILITIES
ACCEPT_FINISH = CookieFlag.PERSISTENT | CookieFlag.STATISTICS
ACCEPT_CONFIRM = CookieFlag.STATISTICS


def mandatory_features(flags: CookieFlag) -> tuple[str, ...]:
    """``Cookie.mandatory`` for ``flags``, in libvirt's (bit) order."""
    return tuple(_FEATURE_NAMES[f] for f in CookieFlag if f in flags)


@dataclass(frozen=True)
class MigrationStats:
    """The ``<statistics>`` section: when the job ran and its final numbers.

    Times are milliseconds (``started``/``stopped``/``sent`` since the epoch), sizes bytes,
    rates bytes/s (dirty rate pages/s).  ``delta`` is the receiver's clock minus the sender's.
    Field names are libvirt's element names, written in this order.
    """

    started: int = 0
    stopped: int = 0
    sent: int = 0
    delta: int = 0
    time_elapsed: int = 0
    downtime: int = 0
    setup_time: int = 0
    memory_total: int = 0
    memory_processed: int = 0
    memory_remaining: int = 0
    memory_bps: int = 0
    memory_constant: int = 0
    memory_normal: int = 0
    memory_normal_bytes: int = 0
    memory_dirty_rate: int = 0
    memory_iteration: int = 0
    memory_page_size: int = 0


_STATS_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(MigrationStats))


@dataclass(frozen=True)
class Cookie:
    """One migration cookie.  On parse, ``hostname``/``hostuuid`` are the *sender's*."""

    name: str
    uuid: str
    hostname: str
    hostuuid: str
    # <feature name='…'/>: features the receiver must accept (see mandatory_features()).
    mandatory: tuple[str, ...] = ()
    # A whole <domain> element (PERSIST_DEST).  libvirt also lists "persistent" as mandatory.
    persistent_xml: str | None = None
    statistics: MigrationStats | None = None
    # (capability name, auto): migration capabilities the sender supports; ``auto`` means it turns
    # the capability on by itself.  () is an empty section, None no section.
    capabilities: tuple[tuple[str, bool], ...] | None = None
    # <virtmig-stream-token>: the destination's per-migration stream secret ("": none).
    stream_token: str = dataclasses.field(default="", repr=False)
    # <virtmig-migration-id>: the migration's id ("": none).
    migration_id: str = ""
    # <virtmig-host-cpu>: cookie A, the source host's CPU for a guest that depends on it
    # (host-passthrough): 64 hex digits, the backend's digest ("": none).
    host_cpu: str = ""


# ---------------------------------------------------------------------------------------------
# Building


def build_cookie(c: Cookie) -> bytes:
    """Serialise ``c`` as UTF-8 ``<qemu-migration>`` XML plus one terminating NUL byte.

    Raises InternalError for values that cannot form a valid cookie (empty or malformed name,
    UUIDs, hostname, feature names; characters XML cannot carry) and XMLError when
    ``persistent_xml`` is not a well-formed ``<domain>`` document.
    """
    for what, value in (("name", c.name), ("hostname", c.hostname)):
        if not value:
            raise InternalError(f"cannot build migration cookie: empty {what}")
    uuid = _canonical_uuid(c.uuid)
    hostuuid = _canonical_uuid(c.hostuuid)
    if uuid is None:
        raise InternalError(f"cannot build migration cookie: malformed uuid '{c.uuid}'")
    if hostuuid is None:
        raise InternalError(f"cannot build migration cookie: malformed hostuuid '{c.hostuuid}'")

    root = etree.Element(ROOT_TAG)
    try:
        etree.SubElement(root, "name").text = c.name
        etree.SubElement(root, "uuid").text = uuid
        etree.SubElement(root, "hostname").text = c.hostname
        etree.SubElement(root, "hostuuid").text = hostuuid
        for feature in c.mandatory:
            if not feature:
                raise InternalError("cannot build migration cookie: empty feature name")
            etree.SubElement(root, "feature", name=feature)
        # libvirt's order: graphics, lockstate, domain, network, nbd, statistics, cpu,
        # capabilities, blockDirtyBitmaps.
        if c.persistent_xml is not None:
            root.append(_parse_domain(c.persistent_xml))
        if c.statistics is not None:
            stats = etree.SubElement(root, "statistics")
            for field in _STATS_FIELDS:
                etree.SubElement(stats, field).text = str(getattr(c.statistics, field))
        if c.capabilities is not None:
            caps = etree.SubElement(root, "capabilities")
            for cap, auto in c.capabilities:
                if not cap:
                    raise InternalError("cannot build migration cookie: empty capability name")
                etree.SubElement(caps, "cap", name=cap, auto="yes" if auto else "no")
        if c.stream_token:
            etree.SubElement(root, TOKEN_TAG).text = _checked_token(c.stream_token, build=True)
        if c.migration_id:
            etree.SubElement(root, MIGRATION_ID_TAG).text = _checked_id(c.migration_id,
                                                                         build=True)
        if c.host_cpu:
            etree.SubElement(root, HOST_CPU_TAG).text = _checked_cpu(c.host_cpu, build=True)
    except ValueError as err:  # lxml refuses NUL and control characters
        raise InternalError(f"cannot build migration cookie: {err}") from err

    out: list[str] = []
    emit(root, 0, {}, out)
    return "".join(out).encode("utf-8") + b"\0"


def canonical_domain_xml(xml: str) -> str:
    """``xml`` (one ``<domain>`` element) in the style a parsed cookie returns it.

    ``parse_cookie(build_cookie(c)).persistent_xml == canonical_domain_xml(c.persistent_xml)``.
    Raises XMLError when ``xml`` is not a well-formed ``<domain>`` document.
    """
    out: list[str] = []
    emit(_parse_domain(xml), 0, {}, out)
    return "".join(out)


def _parse_domain(xml: str) -> etree._Element:
    try:
        el = safe_fromstring(xml.encode("utf-8"))
    except UnsafeXML as err:
        raise XMLError(f"persistent domain XML: {err}") from None
    except etree.XMLSyntaxError as err:
        raise XMLError(f"persistent domain XML is not well-formed: {err}") from None
    if el.tag != "domain":
        raise XMLError(f"persistent domain XML: unexpected root element <{el.tag}>, "
                       "expecting <domain>")
    return el


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_cookie_opt(
    data: bytes,
    *,
    expected_name: str,
    expected_uuid: str,
    local_hostuuid: str,
    accept: CookieFlag,
) -> Cookie | None:
    """Like :func:`parse_cookie`, but an empty ``data`` means "no cookie" (None), as in libvirt."""
    if not data:
        return None
    return parse_cookie(
        data,
        expected_name=expected_name,
        expected_uuid=expected_uuid,
        local_hostuuid=local_hostuuid,
        accept=accept,
    )


def parse_cookie(
    data: bytes,
    *,
    expected_name: str,
    expected_uuid: str,
    local_hostuuid: str,
    accept: CookieFlag,
) -> Cookie:
    """Parse and check a cookie received by the domain ``expected_name``/``expected_uuid``.

    ``expected_name`` is the domain's *original* name when the migration renames it.
    ``accept`` lists the features and sections this step understands: a mandatory feature outside
    it is refused, a section outside it is ignored (returned as None).  Every failure is an
    CookieError (an InternalError) with libvirt's message.
    """
    our_uuid = _canonical_uuid(expected_uuid)
    our_hostuuid = _canonical_uuid(local_hostuuid)
    if our_uuid is None:
        raise ValueError(f"expected_uuid {expected_uuid!r} is not a UUID")
    if our_hostuuid is None:
        raise ValueError(f"local_hostuuid {local_hostuuid!r} is not a UUID")

    root = _parse_document(data)
    name, uuid = _parse_domain_identity(root, expected_name, our_uuid)
    hostname, hostuuid = _parse_host_identity(root, our_hostuuid)
    mandatory = _parse_mandatory(root, accept)

    persistent_xml = None
    if CookieFlag.PERSISTENT in accept:
        persistent_xml = _parse_persistent(root)

    statistics = None
    if CookieFlag.STATISTICS in accept:
        stats_el = root.find("statistics")
        if stats_el is not None:
            statistics = _parse_statistics(stats_el)

    capabilities = None
    if CookieFlag.CAPABILITIES in accept:
        caps_el = root.find("capabilities")
        if caps_el is not None:
            capabilities = _parse_capabilities(caps_el)

    token = None if root.find(TOKEN_TAG) is None else _child_text(root, TOKEN_TAG) or ""
    mid = None if root.find(MIGRATION_ID_TAG) is None else \
        _child_text(root, MIGRATION_ID_TAG) or ""
    cpu = None if root.find(HOST_CPU_TAG) is None else _child_text(root, HOST_CPU_TAG) or ""
    return Cookie(
        name=name,
        uuid=uuid,
        hostname=hostname,
        hostuuid=hostuuid,
        mandatory=mandatory,
        persistent_xml=persistent_xml,
        statistics=statistics,
        capabilities=capabilities,
        stream_token=_checked_token(token.strip()) if token is not None else "",
        migration_id=_checked_id(mid.strip()) if mid is not None else "",
        host_cpu=_checked_cpu(cpu.strip()) if cpu is not None else "",
    )


def _parse_domain_identity(
    root: etree._Element, expected_name: str, our_uuid: str
) -> tuple[str, str]:
    """The cookie's domain name and (canonical) UUID, which must be the receiving domain's."""
    name = _child_text(root, "name")
    if name is None:
        raise CookieError("missing name element in migration data")
    if name != expected_name:
        raise CookieError(f"Incoming cookie data had unexpected name {name} vs {expected_name}")

    uuid_text = _child_text(root, "uuid")
    if uuid_text is None:
        raise CookieError("missing uuid element in migration data")
    uuid = _canonical_uuid(uuid_text)
    if uuid != our_uuid:
        raise CookieError(f"Incoming cookie data had unexpected UUID {uuid_text} vs {our_uuid}")
    return name, uuid


def _parse_host_identity(root: etree._Element, our_hostuuid: str) -> tuple[str, str]:
    """The sender's hostname and (canonical) host UUID, which must not be ours."""
    hostname = _child_text(root, "hostname")
    if hostname is None:
        raise CookieError("missing hostname element in migration data")

    hostuuid_text = _child_text(root, "hostuuid")
    if hostuuid_text is None:
        raise CookieError("missing hostuuid element in migration data")
    hostuuid = _canonical_uuid(hostuuid_text)
    if hostuuid is None:
        raise CookieError("malformed hostuuid element in migration data")
    if hostuuid == our_hostuuid:
        raise CookieError(f"Attempt to migrate guest to the same host {hostuuid_text}")
    return hostname, hostuuid


def _parse_persistent(root: etree._Element) -> str | None:
    """The persistent ``<domain>``, re-serialised in the canonical style (at most one)."""
    domains = root.findall("domain")
    if len(domains) > 1:
        raise CookieError("Too many domain elements in migration cookie")
    if not domains:
        return None
    out: list[str] = []
    emit(domains[0], 0, {}, out)
    return "".join(out)


def _parse_document(data: bytes) -> etree._Element:
    if len(data) > MAX_COOKIE_BYTES:
        raise CookieError(
            f"Migration cookie too large: {len(data)} bytes (limit {MAX_COOKIE_BYTES})"
        )
    if not data or data[-1] != 0:
        raise CookieError("Migration cookie was not NULL terminated")
    body = data[:-1]
    if b"\0" in body:
        raise CookieError("Migration cookie contains an embedded NUL byte")
    try:
        root = safe_fromstring(body)
    except UnsafeXML as err:
        raise CookieError(f"Malformed migration cookie: {err}") from None
    except etree.XMLSyntaxError as err:
        raise CookieError(f"Malformed migration cookie XML: {err}") from None
    if root.tag != ROOT_TAG:
        raise CookieError(
            f"Malformed migration cookie: unexpected root element <{root.tag}>, "
            f"expecting <{ROOT_TAG}>"
        )
    return root


def _parse_mandatory(root: etree._Element, accept: CookieFlag) -> tuple[str, ...]:
    names: list[str] = []
    for el in root.findall("feature"):
        name = el.get("name")
        if name is None:
            raise CookieError("missing feature name")
        flag = CookieFlag.from_feature(name)
        if flag is None:
            raise CookieError(f"Unknown migration cookie feature {name}")
        if flag not in accept:
            raise CookieError(f"Unsupported migration cookie feature {name}")
        names.append(name)
    return tuple(names)


_INT_RE = re.compile(r"[+-]?[0-9]+")


def _parse_statistics(el: etree._Element) -> MigrationStats:
    # Missing elements stay 0 (older or newer senders write different sets, as in libvirt);
    # elements we do not model (disk_*, compression_*, …) are skipped.
    values: dict[str, int] = {}
    for field in _STATS_FIELDS:
        text = _child_text(el, field)
        if text is None:
            continue
        text = text.strip()
        if not _INT_RE.fullmatch(text):
            raise CookieError(
                f"Malformed {field} element in migration cookie statistics: '{text}'"
            )
        values[field] = int(text)
    return MigrationStats(**values)


def _parse_capabilities(el: etree._Element) -> tuple[tuple[str, bool], ...]:
    caps: list[tuple[str, bool]] = []
    for cap in el.findall("cap"):
        name = cap.get("name")
        if name is None:
            raise CookieError("missing migration capability name")
        caps.append((name, cap.get("auto") == "yes"))
    return tuple(caps)


def _child_text(parent: etree._Element, tag: str) -> str | None:
    """The string value of the first ``tag`` child, None when absent or empty (libvirt's XPath)."""
    el = parent.find(tag)
    if el is None:
        return None
    return "".join(text_of(t) for t in el.itertext()) or None


def _checked_token(token: str, *, build: bool = False) -> str:
    """A stream token: 32 lowercase hex digits (never quoted in the error)."""
    if not _TOKEN_RE.fullmatch(token):
        if build:
            raise InternalError("cannot build migration cookie: malformed stream token")
        raise CookieError("Malformed virtmig-stream-token element in migration cookie")
    return token


def _checked_id(mid: str, *, build: bool = False) -> str:
    """A migration id: 32 lowercase hex digits."""
    if not _TOKEN_RE.fullmatch(mid):
        if build:
            raise InternalError("cannot build migration cookie: malformed migration id")
        raise CookieError("Malformed virtmig-migration-id element in migration cookie")
    return mid


def _checked_cpu(digest: str, *, build: bool = False) -> str:
    """A host CPU digest: 64 lowercase hex digits."""
    if not _CPU_RE.fullmatch(digest):
        if build:
            raise InternalError("cannot build migration cookie: malformed host CPU digest")
        raise CookieError("Malformed virtmig-host-cpu element in migration cookie")
    return digest


def _canonical_uuid(text: str) -> str | None:
    """Lowercase hyphenated form of a UUID, accepting what libvirt's parser does, or None."""
    compact = text.strip().replace("-", "").replace(" ", "")
    if not _HEX32_RE.fullmatch(compact):
        return None
    c = compact.lower()
    return f"{c[:8]}-{c[8:12]}-{c[12:16]}-{c[16:20]}-{c[20:]}"
