"""The daemon's wire layer: every conversion between protobuf messages and the daemon's values.

Requests become core arguments here: a ``DomainRef`` resolves to its domain object, and the
non-params v3 and the v2 RPCs' arguments become typed params (libvirt's mapping), so the phases
see one form.
Core values become replies here: domains (a ``List`` reply of at most
:data:`LIST_REPLY_MAX`, ``ListStream``'s chunks of :data:`LIST_CHUNK`), host and domain info,
job info, events, the migration history (as many of the newest entries as fit in
``history.MAX_REPLY_BYTES``).  The core (jobctl, events, registry, migration, p2p,
lifecycle, core, the backends) never sees a message.

Two other daemon modules name the generated types: ``server`` (the service classes and the
request types its handlers read) and ``tunnel``, a streaming transport of raw bytes that builds
and reads its ``TunnelChunk`` messages itself.  Typed params' wire form is shared with the
client: ``virtmig.proto.wire``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from virtmig.client.values import GuestLocation
from virtmig.daemon.core import HostInfo
from virtmig.daemon.events import Event
from virtmig.daemon.history import MAX_REPLY_BYTES, Entry, entry_dict
from virtmig.daemon.job import JobInfo
from virtmig.daemon.registry import DomainObj, Registry
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import InvalidArgument, ResourceExhausted
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.wire import from_wire, to_wire

#: The most domains one ``List`` reply holds: with names of the longest (``domxml.MAX_NAME_BYTES``),
#: about 350 bytes each, 3.4 MiB, under gRPC's default message limit of 4 MiB.  More: ListStream.
LIST_REPLY_MAX = 10000
#: The most domains one ``ListStream`` reply holds (about 350 KiB at worst).
LIST_CHUNK = 1000

# --- requests ------------------------------------------------------------------------------------


def resolve(registry: Registry, ref: pb.DomainRef) -> DomainObj:
    key = ref.WhichOneof("key")
    if key == "name":
        return registry.by_name(ref.name)
    if key == "uuid":
        return registry.by_uuid(ref.uuid)
    raise InvalidArgument("a domain name or uuid is required")


def optional(msg: Any, field: str) -> str | None:
    """An ``optional string`` field: None when the caller did not set it."""
    return str(getattr(msg, field)) if msg.HasField(field) else None


def typed_params(items: Iterable[pb.TypedParam]) -> TypedParams:
    """A ``*Params`` RPC's params."""
    return from_wire(items)


def legacy_params(
    *, xml: str | None = None, dname: str | None = None, uri: str | None = None,
    bandwidth: int = 0,
) -> TypedParams:
    """Non-params RPC arguments as the params the core uses (as libvirt maps the old fixed
    arguments onto typed params)."""
    params = TypedParams()
    if uri is not None:
        params.add(MigrateParam.URI, uri)
    if dname is not None:
        params.add(MigrateParam.DEST_NAME, dname)
    if xml is not None:
        params.add(MigrateParam.DEST_XML, xml)
    if bandwidth:
        params.add(MigrateParam.BANDWIDTH, bandwidth)
    return params


def begin3_params(req: pb.Begin3Request) -> TypedParams:
    return legacy_params(xml=optional(req, "xmlin"), dname=optional(req, "dname"),
                         bandwidth=req.resource)


def prepare3_params(req: pb.Prepare3Request) -> TypedParams:
    return legacy_params(xml=req.dom_xml, dname=optional(req, "dname"),
                         uri=optional(req, "uri_in"), bandwidth=req.resource)


def perform3_params(req: pb.Perform3Request) -> TypedParams:
    return legacy_params(xml=optional(req, "xmlin"), dname=optional(req, "dname"),
                         uri=optional(req, "uri"), bandwidth=req.resource)


def finish3_params(req: pb.Finish3Request) -> TypedParams:
    return legacy_params(dname=optional(req, "dname"), uri=optional(req, "uri"))


def prepare2_params(req: pb.Prepare2Request) -> TypedParams:
    return legacy_params(xml=req.dom_xml, dname=optional(req, "dname"),
                         uri=optional(req, "uri_in"), bandwidth=req.resource)


def perform2_params(req: pb.PerformRequest) -> TypedParams:
    """Perform (v2) without PEER2PEER; with it, ``uri`` is the destination daemon's URI
    (:func:`perform2_p2p_params`)."""
    return legacy_params(dname=optional(req, "dname"), uri=optional(req, "uri"),
                         bandwidth=req.resource)


def perform2_p2p_params(req: pb.PerformRequest) -> TypedParams:
    return legacy_params(dname=optional(req, "dname"), bandwidth=req.resource)


def finish2_params(req: pb.Finish2Request) -> TypedParams:
    return legacy_params(dname=req.dname or None, uri=optional(req, "uri"))


# --- replies: host and domains -------------------------------------------------------------------


def empty() -> pb.Empty:
    return pb.Empty()


def session_event(session: str) -> pb.SessionEvent:
    return pb.SessionEvent(session_id=session)


def host_info_msg(info: HostInfo) -> pb.HostInfo:
    return pb.HostInfo(
        hostname=info.hostname,
        host_uuid=info.host_uuid,
        version=info.version,
        backend=info.backend,
        features=info.features,
        cpus=info.cpus,
        memory_kib=info.memory_kib,
        arch=info.arch,
        active_domains=info.active_domains,
        inactive_domains=info.inactive_domains,
    )


def domain_msg(dom: DomainObj) -> pb.Domain:
    return pb.Domain(
        name=dom.name,
        uuid=dom.uuid,
        id=dom.id,
        persistent=dom.persistent,
        state=int(dom.state),  # type: ignore[arg-type]
        reason=dom.reason,
        reason_name=dom.reason_label,
    )


def domain_list_msg(doms: Sequence[DomainObj]) -> pb.ListReply:
    """``List``'s one reply: at most :data:`LIST_REPLY_MAX` domains, else RESOURCE_EXHAUSTED
    naming ``ListStream`` (a reply with more could pass gRPC's 4 MiB message limit)."""
    if len(doms) > LIST_REPLY_MAX:
        raise ResourceExhausted(
            f"{len(doms)} domains do not fit in one List reply (at most {LIST_REPLY_MAX}): "
            "use ListStream")
    return _list_reply(doms)


def domain_list_chunks(doms: Sequence[DomainObj]) -> Iterator[pb.ListReply]:
    """``ListStream``'s replies: ``doms`` in order, :data:`LIST_CHUNK` at most in each (none
    for no domain); each entry as the domain is when its chunk is built."""
    for start in range(0, len(doms), LIST_CHUNK):
        yield _list_reply(doms[start:start + LIST_CHUNK])


def _list_reply(doms: Sequence[DomainObj]) -> pb.ListReply:
    """The entries of :func:`domain_msg` added in place (building each message and copying it
    in costs 60 % more: a list streams 100,000 of them)."""
    reply = pb.ListReply()
    add = reply.domains.add
    for d in doms:
        add(name=d.name, uuid=d.uuid, id=d.id, persistent=d.persistent,
            state=int(d.state),
            reason=d.reason, reason_name=d.reason_label)
    return reply


def domain_info_msg(dom: DomainObj, cpu_time_ns: int = 0) -> pb.DomainInfo:
    d = dom.definition
    return pb.DomainInfo(
        domain=domain_msg(dom),
        cpu_time_ns=cpu_time_ns if dom.active else 0,
        max_memory_kib=d.memory_kib,
        memory_kib=d.current_memory_kib,
        vcpus=d.vcpus,
        os_type=d.os_type,
    )


def domain_state_msg(dom: DomainObj, detail: str = "") -> pb.DomainStateReply:
    return pb.DomainStateReply(
        state=int(dom.state),  # type: ignore[arg-type]
        reason=dom.reason,
        reason_name=dom.reason_label,
        detail=detail,
    )


def guest_location_msg(loc: GuestLocation) -> pb.GuestLocationReply:
    return pb.GuestLocationReply(
        host_uuid=loc.host_uuid, known=loc.known, active=loc.active,
        state=int(loc.state),  # type: ignore[arg-type]
        arrived_migration_id=loc.arrived_migration_id,
        incoming_migration_id=loc.incoming_migration_id, incoming_phase=loc.incoming_phase,
        away_host_uuid=loc.away_host_uuid, away_hostname=loc.away_hostname,
        away_uri=loc.away_uri, away_migration_id=loc.away_migration_id,
    )


def xml_msg(xml: str) -> pb.GetXMLReply:
    return pb.GetXMLReply(xml=xml)


def event_msg(event: Event) -> pb.Event:
    msg = pb.Event(
        kind=int(event.kind),  # type: ignore[arg-type]
        domain_name=event.domain_name,
        domain_uuid=event.domain_uuid,
        event=event.event,
        detail=event.detail,
        description=event.description,
        iteration=event.iteration,
        timestamp_ms=event.timestamp_ms,
    )
    if event.job is not None:
        msg.job.CopyFrom(job_info_msg(event.job))
    return msg


# --- replies: migration and jobs -----------------------------------------------------------------


def begin3_reply(xml: str, cookie: bytes) -> pb.Begin3Reply:
    return pb.Begin3Reply(xml=xml, cookie_out=cookie)


def prepare3_reply(cookie: bytes, uri_out: str | None) -> pb.Prepare3Reply:
    reply = pb.Prepare3Reply(cookie_out=cookie)
    if uri_out is not None:
        reply.uri_out = uri_out
    return reply


def perform3_reply(cookie: bytes = b"", protocol: str = "",
                   migration_id: str = "") -> pb.Perform3Reply:
    """``protocol``, ``migration_id``: peer-to-peer only, the protocol the run used with the
    destination and the migration's id."""
    return pb.Perform3Reply(cookie_out=cookie, protocol=protocol, migration_id=migration_id)


def finish3_reply(dom: DomainObj, cookie: bytes) -> pb.Finish3Reply:
    return pb.Finish3Reply(domain=domain_msg(dom), cookie_out=cookie)


def confirm3_reply() -> pb.Confirm3Reply:
    return pb.Confirm3Reply()


def prepare2_reply(cookie: bytes, uri_out: str | None) -> pb.Prepare2Reply:
    reply = pb.Prepare2Reply(cookie_out=cookie)
    if uri_out is not None:
        reply.uri_out = uri_out
    return reply


def perform_reply(protocol: str = "", migration_id: str = "") -> pb.PerformReply:
    return pb.PerformReply(protocol=protocol, migration_id=migration_id)


def finish2_reply(dom: DomainObj) -> pb.Finish2Reply:
    return pb.Finish2Reply(domain=domain_msg(dom))


def job_info_msg(info: JobInfo) -> pb.JobInfo:
    return pb.JobInfo(
        type=int(info.type),  # type: ignore[arg-type]
        operation=int(info.operation),
        time_elapsed_ms=info.time_elapsed_ms,
        data_total=info.data_total,
        data_processed=info.data_processed,
        data_remaining=info.data_remaining,
        mem_total=info.mem_total,
        mem_processed=info.mem_processed,
        mem_remaining=info.mem_remaining,
        stats=to_wire(info.stats),
        phase=info.phase,
        error=info.error,
        abort_requested=info.abort_requested,
    )


def downtime_reply(downtime_ms: int) -> pb.DowntimeReply:
    return pb.DowntimeReply(downtime_ms=downtime_ms)


def speed_reply(bandwidth_mib: int) -> pb.SpeedReply:
    return pb.SpeedReply(bandwidth_mib=bandwidth_mib)


def history_reply(entries: Iterable[Entry], max_bytes: int = MAX_REPLY_BYTES) -> pb.HistoryReply:
    """``GetHistory``'s reply: ``entries`` (newest first) as long as they fit in ``max_bytes``,
    so that a reply never passes gRPC's message limit however big the history is."""
    reply = pb.HistoryReply()
    size = 0
    for entry in entries:
        msg = pb.HistoryEntry(**entry_dict(entry))
        size += msg.ByteSize() + 8  # with the field's tag and length
        if size > max_bytes:
            break
        reply.entries.append(msg)
    return reply
