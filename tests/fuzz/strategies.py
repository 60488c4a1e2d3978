"""Hypothesis strategies for hostile input: names, domain XML, typed params, flags, cookies,
loopback-only URIs, and whole request messages of every RPC.

Every address a generated request can make a daemon connect to or bind is on loopback: URIs,
``dconnuri``, ``migrate_uri`` and ``listen_address`` are drawn from templates whose host is
127.0.0.1, ::1 or localhost, or from strings that are not addresses at all (they fail to parse
before anything resolves).  Free text never reaches a field that names a host.

Nothing is narrowed to spare the daemons: names up to megabytes (beyond gRPC's 4 MiB message
limit, :data:`HUGE_LENGTHS`), guest memory up to 2**70 units, any dirty rate and seed, any typed
param value; the daemons' own bounds must refuse what they cannot take.

Huge strings are drawn as a short marker (:func:`huge`, e.g. ``⟦huge 4194305 n⟧``) that the
harness expands in the request it sends (:func:`expand`): hypothesis keeps the values it drew for
many past examples, so megabyte values drawn as such would grow this process by gigabytes, and
the RSS bound would measure hypothesis rather than the daemons.  (A marker a mutation cut in two
stays as it is: odd text.)
"""

from __future__ import annotations

import re
import uuid as uuidlib
from collections.abc import Callable
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from virtmig.daemon import cookie as ck
from virtmig.daemon.backend.test.guest import MAX_DIRTY_RATE_MIB
from virtmig.daemon.domxml import MAX_NAME_BYTES
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MIGRATION_PARAMS, MigrateParam

_HUGE = re.compile("\u27e6huge (\\d+) (.)\u27e7")


def huge(length: int, char: str = "n") -> str:
    """A marker that :func:`expand` turns into ``char * length``."""
    return f"\u27e6huge {length} {char}\u27e7"


def expand(text: str) -> str:
    """``text`` with every :func:`huge` marker expanded."""
    if "\u27e6" not in text:
        return text
    return _HUGE.sub(lambda m: m[2] * int(m[1]), text)


# Lengths of huge strings: around the name cap, around gRPC's 4 MiB message limit.
HUGE_LENGTHS = st.one_of(
    st.integers(1, 2 * MAX_NAME_BYTES),
    st.sampled_from([MAX_NAME_BYTES - 1, MAX_NAME_BYTES, MAX_NAME_BYTES + 1, 2**16, 2**20,
                     4 * 2**20 - 64, 4 * 2**20 + 1]),
)
# Dirty rates (MiB/s) of the test backend: small ones (guests that converge), any in range, and
# beyond it.
dirty_rates = st.one_of(
    st.integers(0, 8).map(str), st.integers(0, 8).map(str),
    st.floats(0, MAX_DIRTY_RATE_MIB).map(repr),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from([str(MAX_DIRTY_RATE_MIB), str(MAX_DIRTY_RATE_MIB + 1), "1e308", "-1",
                     "nan", "x", "1" * 400]),
)

# --- loopback-only addresses ---------------------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
# Strings that are not addresses: each fails to parse before any name could be resolved.
NOT_ADDRESSES = ("", ":", "tcp:", "tcp://", "tcp://:1", "tcp://[::1", "rdma://127.0.0.1:1",
                 "unix:", "%", "tcp://127.0.0.1:notaport", "tcp://127.0.0.1:99999",
                 "tcp://127.0.0.1:-1", "virtmig+bogus://127.0.0.1", "\u00e9\u0000",
                 "tcp:[::1:1", "tcp://[127.0.0.1]:1", "virtmig+tls://[::1",
                 "virtmig+tls://[127.0.0.1]:1")

ports = st.one_of(st.sampled_from([0, 1, 65535, 65536, 49152, 49215]),
                  st.integers(1024, 65535))


def migrate_uris(extra: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Migration URIs (``tcp:host:port``) on loopback, or not addresses."""
    templ = st.builds(lambda scheme, host, port: f"{scheme}{host}:{port}",
                      st.sampled_from(["tcp:", "tcp://"]), st.sampled_from(LOOPBACK_HOSTS),
                      ports)
    return st.one_of(templ, st.sampled_from(NOT_ADDRESSES + extra))


def conn_uris(extra: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    """Connection URIs (a peer-to-peer ``dconnuri``) on loopback, or not addresses."""
    templ = st.builds(lambda scheme, host, port: f"{scheme}://{host}:{port}",
                      st.sampled_from(["virtmig+tls", "virtmig+tcp", "tls"]),
                      st.sampled_from(LOOPBACK_HOSTS), ports)
    unix = st.sampled_from(["virtmig+unix:///nonexistent/sock", "virtmig+unix://", "virtmig:///"])
    return st.one_of(templ, unix, st.sampled_from(NOT_ADDRESSES + extra))


listen_addresses = st.sampled_from(["127.0.0.1", "::1", "localhost", "", "127.0.0.1:1"])

# --- names, uuids, text --------------------------------------------------------------------------

# Any character protobuf can carry (no lone surrogates: they cannot even be sent).
_chars = st.characters(exclude_categories=["Cs"])
texts = st.text(_chars, max_size=40)
# Text XML 1.0 can hold (no control characters): parts of documents that should parse.
xml_texts = st.text(st.characters(exclude_categories=["Cs", "Cc"]), max_size=40)
names = st.one_of(
    st.sampled_from(["fz", "fz2", "", " fz", "fz ", "a/b", "fz\n", "fz\x00", "\u00e9\u00e8"]),
    st.text(_chars, min_size=1, max_size=24),
    HUGE_LENGTHS.map(huge),
    st.integers(1, MAX_NAME_BYTES // 2 + 1).map(lambda n: huge(n, "\u00e9")),  # 2 bytes a char
)
uuid_texts = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: u.hex.upper()),
                       st.sampled_from(["", "not-a-uuid", "00000000-0000-0000-0000-000000000000"]),
                       texts)

_FLAG_VALUES = [int(f) for f in MigrateFlags]
flags_words = st.one_of(
    st.lists(st.sampled_from(_FLAG_VALUES), max_size=5).map(sum),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, int(MigrateFlags.LIVE), int(MigrateFlags.LIVE | MigrateFlags.OFFLINE),
                     int(MigrateFlags.PEER2PEER | MigrateFlags.TUNNELLED)]),
)
u32 = st.one_of(st.integers(0, 3), st.integers(0, 2**32 - 1))
u64 = st.one_of(st.integers(0, 10_000), st.integers(0, 2**64 - 1),
                st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**53 + 1]))

# --- domain XML: a small grammar, then mutations -------------------------------------------------

_units = st.sampled_from([None, "KiB", "MiB", "GiB", "TiB", "b", "bytes", "kB", "k", "x", ""])


def _opt_attr(name: str, values: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(st.just(""), values.map(lambda v: f" {name}={quoteattr(v)}"))


def _memory_el(tag: str) -> st.SearchStrategy[str]:
    value = st.one_of(st.integers(1, 2**20).map(str), st.integers(1, 2**20).map(str),
                      st.integers(0, 2**70).map(str), xml_texts.map(escape))
    def render(v: str, u: str | None) -> str:
        unit = "" if u is None else f" unit={quoteattr(u)}"
        return f"<{tag}{unit}>{v}</{tag}>"

    return st.builds(render, value, _units)


_guest_opts = st.builds(
    lambda rate, seed, fault:
        f"<virtmig:guest xmlns:virtmig='urn:virtmig:domain:1'{rate}{seed}{fault}/>",
    _opt_attr("dirty-rate-mib", dirty_rates),
    _opt_attr("seed", st.one_of(st.integers(-(2**70), 2**70).map(str),
                                st.sampled_from(["0x10", "x", ""]))),
    _opt_attr("fault", st.sampled_from(["", "corrupt-stream", "nope"])),
)
_devices = st.lists(st.sampled_from([
    "<serial type='pty'><target port='0'/></serial>", "<console type='pty'/>",
    "<controller type='usb' index='0'/>", "<controller type='pci' index='0' model='pci-root'/>",
    "<interface type='user'><alias name='net0'/></interface>", "<memballoon model='none'/>",
    "<!-- a comment -->", "<unknown-device attr='1'>text</unknown-device>",
    "<disk type='file' device='disk'><source file='/nonexistent.img'/></disk>",
]), max_size=4).map(lambda ds: f"<devices>{''.join(ds)}</devices>")


_xml_names = st.one_of(st.sampled_from(["fz", "fz2", " fz", "a/b", "\u00e9\u00e8"]),
                       st.text(st.characters(exclude_categories=["Cs", "Cc"]), min_size=1,
                               max_size=24),
                       HUGE_LENGTHS.map(huge))


def domain_xmls(name: st.SearchStrategy[str] = _xml_names,
                uuid: st.SearchStrategy[str] = uuid_texts) -> st.SearchStrategy[str]:
    """Valid-ish domain XML from a small grammar (each part may be missing, repeated or odd)."""
    parts = st.tuples(
        st.one_of(st.just("<name>{}</name>"),
                  st.sampled_from(["", "<name>{}</name><name>x</name>"])),
        st.one_of(st.just("<uuid>{}</uuid>"), st.just("")),
        st.one_of(_memory_el("memory"), _memory_el("memory"), st.just("")),
        st.one_of(st.just(""), _memory_el("currentMemory")),
        st.one_of(st.just("<vcpu>1</vcpu>"), st.just(""),
                  st.one_of(st.integers(0, 2**33).map(str), xml_texts.map(escape))
                  .map(lambda v: f"<vcpu>{v}</vcpu>")),
        st.one_of(st.just("<os><type arch='x86_64' machine='pc'>hvm</type></os>"), st.just(""),
                  st.builds(lambda a, t: f"<os><type{a}>{escape(t)}</type></os>",
                            _opt_attr("arch", xml_texts), xml_texts)),
        st.one_of(_guest_opts.map(lambda g: f"<metadata>{g}</metadata>"), st.just("")),
        _devices,
    )
    root = st.sampled_from(["domain type='test'"] * 4 + [
        "domain", "domain type='qemu'", "domain type='xen'", "domain type=''",
        "notdomain type='test'"])
    return st.builds(_render_xml, root, name, uuid, parts)


def _render_xml(root: str, name: str, uuid: str, parts: tuple[str, ...]) -> str:
    name_el, uuid_el, *rest = parts
    tag = root.split()[0]
    body = name_el.format(escape(name)) + uuid_el.format(escape(uuid)) + "".join(rest)
    return f"<{root}>{body}</{tag}>"


_SPLICES = ["<", ">", "&", "&amp;", "&bogus;", "]]>", "<![CDATA[x]]>", "<?pi x?>", "\x00",
            "<!DOCTYPE d [<!ENTITY e 'x'>]>", "&#0;", "&#x110000;", "<a>" * 300, "</domain>",
            "<domain>", "\u202e", "\ufeff", "<name>other</name>"]


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """``base``'s text with up to three random edits (cut, splice, duplicate)."""
    text = draw(base)
    for _ in range(draw(st.integers(0, 3))):
        i = draw(st.integers(0, len(text)))
        j = draw(st.integers(i, min(len(text), i + 40)))
        op = draw(st.sampled_from(["cut", "splice", "dup", "text"]))
        if op == "cut":
            text = text[:i] + text[j:]
        elif op == "splice":
            text = text[:i] + draw(st.sampled_from(_SPLICES)) + text[i:]
        elif op == "dup":
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + draw(texts) + text[i:]
    return text


def xml_docs() -> st.SearchStrategy[str]:
    """Domain XML from the grammar, often mutated afterwards."""
    base = domain_xmls()
    return st.one_of(base, base, mutated(base), texts)


# --- cookies -------------------------------------------------------------------------------------


@st.composite
def foreign_cookies(draw: st.DrawFn, name: str = "fz", uuid: str = "") -> bytes:
    """A well-formed cookie of another migration (another domain, host or UUID), or a mangled
    one."""
    c = ck.Cookie(
        name=draw(st.sampled_from([name, "other"])),
        uuid=uuid or str(draw(st.uuids())) if draw(st.booleans()) else str(draw(st.uuids())),
        hostname=draw(st.sampled_from(["src.test", "elsewhere"])),
        hostuuid=str(draw(st.uuids())),
    )
    data = ck.build_cookie(c)
    return draw(st.sampled_from([data, data[:-1], data + b"x\x00", data.replace(b"<", b"", 1),
                                 b"", b"\x00", b"<qemu-migration/>\x00"]))


raw_cookies = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff\xfe"]))

# --- typed params --------------------------------------------------------------------------------

_KNOWN = sorted(MIGRATION_PARAMS)
_VALUE_FIELDS = ("int", "uint", "llong", "ullong", "double", "boolean", "string")
_numbers = {
    "int": st.integers(-(2**31), 2**31 - 1),
    "uint": st.integers(0, 2**32 - 1),
    "llong": st.integers(-(2**63), 2**63 - 1),
    "ullong": u64,
    "double": st.floats(allow_nan=True, allow_infinity=True),
    "boolean": st.booleans(),
}


def _string_value(name: str, xml: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    if name in (MigrateParam.URI, MigrateParam.DISKS_URI, MigrateParam.GRAPHICS_URI):
        return migrate_uris()
    if name == MigrateParam.LISTEN_ADDRESS:
        return listen_addresses
    if name == MigrateParam.TLS_DESTINATION:
        return st.sampled_from(["localhost", "127.0.0.1", ""])
    if name in (MigrateParam.DEST_XML, MigrateParam.PERSIST_XML):
        return xml
    if name == MigrateParam.DEST_NAME:
        return names
    if name in (MigrateParam.COMPRESSION, MigrateParam.COMPLETION_TIMEOUT_ACTION):
        return st.sampled_from(["xbzrle", "mt", "zlib", "zstd", "abort", "suspend", "postcopy",
                                "", "bogus"])
    return texts


@st.composite
def typed_param(draw: st.DrawFn, xml: st.SearchStrategy[str]) -> pb.TypedParam:
    """One param: a known name (usually with its own type) or any name, any typed value."""
    name = draw(st.one_of(st.sampled_from(_KNOWN), st.sampled_from(_KNOWN), texts))
    spec = MIGRATION_PARAMS.get(name)
    field = spec.type.value if spec is not None and draw(st.integers(0, 3)) else \
        draw(st.sampled_from(_VALUE_FIELDS))
    if field == "string":
        value: Any = draw(_string_value(name, xml) if spec is not None else texts)
    else:
        value = draw(_numbers[field])
    return pb.TypedParam(name=name, **{field: value})


def typed_params(xml: st.SearchStrategy[str] | None = None,
                 ) -> st.SearchStrategy[list[pb.TypedParam]]:
    docs = xml if xml is not None else xml_docs()
    return st.lists(typed_param(docs), max_size=6)


# --- whole request messages, from the descriptors ------------------------------------------------


def _field_strategy(field: Any, ctx: RequestContext) -> st.SearchStrategy[Any]:
    name = field.name
    if field.message_type is not None:
        if field.message_type.name == "DomainRef":
            return domain_refs(ctx)
        if field.message_type.name == "TypedParam":
            return typed_params(ctx.xml)
        return messages(getattr(pb, field.message_type.name), ctx)
    special: dict[str, st.SearchStrategy[Any]] = {
        "dconnuri": conn_uris(ctx.conn_uris), "uri": migrate_uris(ctx.migrate_uris),
        "uri_in": migrate_uris(ctx.migrate_uris), "xml": ctx.xml, "xmlin": ctx.xml,
        "dom_xml": ctx.xml, "dname": st.one_of(st.sampled_from(ctx.names), names),
        "flags": flags_words if field.type == FieldDescriptor.TYPE_UINT64 else u32,
        "cookie_in": ctx.cookies, "data": st.binary(max_size=256),
        # GuestLocation / ResolveMigration: known or random uuids, ids, loopback daemons only.
        "uuid": st.one_of(st.sampled_from(ctx.uuids), texts) if ctx.uuids else texts,
        "migration_id": st.one_of(st.just(""), st.text("0123456789abcdef", min_size=32,
                                                        max_size=32), texts),
        "dest_uri": st.one_of(st.just(""), conn_uris(ctx.conn_uris)),
    }
    if name in special:
        return special[name]
    t = field.type
    if t == FieldDescriptor.TYPE_STRING:
        return texts
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return u32
    if t in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return u64
    if t == FieldDescriptor.TYPE_INT32:
        return st.integers(-(2**31), 2**31 - 1)
    if t == FieldDescriptor.TYPE_INT64:
        return st.integers(-(2**63), 2**63 - 1)
    if t == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        return st.sampled_from([v.number for v in field.enum_type.values])
    if t == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    raise AssertionError(f"no strategy for field {field.full_name}")  # pragma: no cover


class RequestContext:
    """What generated requests may refer to: the example's domains, cookies and URIs."""

    def __init__(self, names: tuple[str, ...] = ("fz",), uuids: tuple[str, ...] = (),
                 cookies: st.SearchStrategy[bytes] | None = None,
                 migrate_uris: tuple[str, ...] = (), conn_uris: tuple[str, ...] = ()) -> None:
        self.names = names
        self.uuids = uuids
        self.cookies = cookies if cookies is not None else st.one_of(raw_cookies,
                                                                   foreign_cookies())
        self.migrate_uris = migrate_uris
        self.conn_uris = conn_uris
        self.xml = xml_docs()


def domain_refs(ctx: RequestContext) -> st.SearchStrategy[pb.DomainRef]:
    by_name = st.one_of(st.sampled_from(ctx.names), names).map(lambda n: pb.DomainRef(name=n))
    by_uuid = st.one_of(st.sampled_from(ctx.uuids or ("",)), uuid_texts).map(
        lambda u: pb.DomainRef(uuid=u))
    return st.one_of(by_name, by_name, by_uuid, st.just(pb.DomainRef()))


def messages(cls: type[Message], ctx: RequestContext) -> st.SearchStrategy[Message]:
    """A message of ``cls`` with each field set or not (optional fields really unset)."""
    fields = cls.DESCRIPTOR.fields

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for f in fields:
            if not draw(st.integers(0, 3)):
                continue  # left unset (None for `optional`)
            strat = _field_strategy(f, ctx)
            if f.is_repeated:
                value = draw(strat) if f.message_type is not None and \
                    f.message_type.name == "TypedParam" else draw(st.lists(strat, max_size=3))
                getattr(msg, f.name).extend(value)
            elif f.message_type is not None:
                getattr(msg, f.name).CopyFrom(draw(strat))
            else:
                setattr(msg, f.name, draw(strat))
        return msg

    return build()


def uuid_of(seed: int) -> str:
    return str(uuidlib.UUID(int=seed))


Strategy = Callable[[RequestContext], st.SearchStrategy[Message]]
