from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DomainState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DOMAIN_STATE_NOSTATE: _ClassVar[DomainState]
    DOMAIN_STATE_RUNNING: _ClassVar[DomainState]
    DOMAIN_STATE_BLOCKED: _ClassVar[DomainState]
    DOMAIN_STATE_PAUSED: _ClassVar[DomainState]
    DOMAIN_STATE_SHUTDOWN: _ClassVar[DomainState]
    DOMAIN_STATE_SHUTOFF: _ClassVar[DomainState]
    DOMAIN_STATE_CRASHED: _ClassVar[DomainState]
    DOMAIN_STATE_PMSUSPENDED: _ClassVar[DomainState]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_LIFECYCLE: _ClassVar[EventKind]
    EVENT_KIND_MIGRATION_ITERATION: _ClassVar[EventKind]
    EVENT_KIND_JOB_COMPLETED: _ClassVar[EventKind]
    EVENT_KIND_JOB_FAILED: _ClassVar[EventKind]

class JobType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_TYPE_NONE: _ClassVar[JobType]
    JOB_TYPE_BOUNDED: _ClassVar[JobType]
    JOB_TYPE_UNBOUNDED: _ClassVar[JobType]
    JOB_TYPE_COMPLETED: _ClassVar[JobType]
    JOB_TYPE_FAILED: _ClassVar[JobType]
    JOB_TYPE_CANCELLED: _ClassVar[JobType]
DOMAIN_STATE_NOSTATE: DomainState
DOMAIN_STATE_RUNNING: DomainState
DOMAIN_STATE_BLOCKED: DomainState
DOMAIN_STATE_PAUSED: DomainState
DOMAIN_STATE_SHUTDOWN: DomainState
DOMAIN_STATE_SHUTOFF: DomainState
DOMAIN_STATE_CRASHED: DomainState
DOMAIN_STATE_PMSUSPENDED: DomainState
EVENT_KIND_LIFECYCLE: EventKind
EVENT_KIND_MIGRATION_ITERATION: EventKind
EVENT_KIND_JOB_COMPLETED: EventKind
EVENT_KIND_JOB_FAILED: EventKind
JOB_TYPE_NONE: JobType
JOB_TYPE_BOUNDED: JobType
JOB_TYPE_UNBOUNDED: JobType
JOB_TYPE_COMPLETED: JobType
JOB_TYPE_FAILED: JobType
JOB_TYPE_CANCELLED: JobType

class TypedParam(_message.Message):
    __slots__ = ("name", "int", "uint", "llong", "ullong", "double", "boolean", "string")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INT_FIELD_NUMBER: _ClassVar[int]
    UINT_FIELD_NUMBER: _ClassVar[int]
    LLONG_FIELD_NUMBER: _ClassVar[int]
    ULLONG_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_FIELD_NUMBER: _ClassVar[int]
    BOOLEAN_FIELD_NUMBER: _ClassVar[int]
    STRING_FIELD_NUMBER: _ClassVar[int]
    name: str
    int: int
    uint: int
    llong: int
    ullong: int
    double: float
    boolean: bool
    string: str
    def __init__(self, name: _Optional[str] = ..., int: _Optional[int] = ..., uint: _Optional[int] = ..., llong: _Optional[int] = ..., ullong: _Optional[int] = ..., double: _Optional[float] = ..., boolean: _Optional[bool] = ..., string: _Optional[str] = ...) -> None: ...

class DomainRef(_message.Message):
    __slots__ = ("name", "uuid")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    name: str
    uuid: str
    def __init__(self, name: _Optional[str] = ..., uuid: _Optional[str] = ...) -> None: ...

class Domain(_message.Message):
    __slots__ = ("name", "uuid", "id", "persistent", "state", "reason", "reason_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    PERSISTENT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    uuid: str
    id: int
    persistent: bool
    state: DomainState
    reason: int
    reason_name: str
    def __init__(self, name: _Optional[str] = ..., uuid: _Optional[str] = ..., id: _Optional[int] = ..., persistent: _Optional[bool] = ..., state: _Optional[_Union[DomainState, str]] = ..., reason: _Optional[int] = ..., reason_name: _Optional[str] = ...) -> None: ...

class GetHostRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("hostname", "host_uuid", "version", "backend", "features", "cpus", "memory_kib", "arch", "active_domains", "inactive_domains")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    HOST_UUID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    CPUS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_KIB_FIELD_NUMBER: _ClassVar[int]
    ARCH_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DOMAINS_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_DOMAINS_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    host_uuid: str
    version: str
    backend: str
    features: _containers.RepeatedScalarFieldContainer[str]
    cpus: int
    memory_kib: int
    arch: str
    active_domains: int
    inactive_domains: int
    def __init__(self, hostname: _Optional[str] = ..., host_uuid: _Optional[str] = ..., version: _Optional[str] = ..., backend: _Optional[str] = ..., features: _Optional[_Iterable[str]] = ..., cpus: _Optional[int] = ..., memory_kib: _Optional[int] = ..., arch: _Optional[str] = ..., active_domains: _Optional[int] = ..., inactive_domains: _Optional[int] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("heartbeat_seconds",)
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_seconds: int
    def __init__(self, heartbeat_seconds: _Optional[int] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DefineRequest(_message.Message):
    __slots__ = ("xml",)
    XML_FIELD_NUMBER: _ClassVar[int]
    xml: str
    def __init__(self, xml: _Optional[str] = ...) -> None: ...

class DomainRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ...) -> None: ...

class StartRequest(_message.Message):
    __slots__ = ("domain", "paused", "force")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    paused: bool
    force: bool
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., paused: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("active", "inactive")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_FIELD_NUMBER: _ClassVar[int]
    active: bool
    inactive: bool
    def __init__(self, active: _Optional[bool] = ..., inactive: _Optional[bool] = ...) -> None: ...

class ListReply(_message.Message):
    __slots__ = ("domains",)
    DOMAINS_FIELD_NUMBER: _ClassVar[int]
    domains: _containers.RepeatedCompositeFieldContainer[Domain]
    def __init__(self, domains: _Optional[_Iterable[_Union[Domain, _Mapping]]] = ...) -> None: ...

class GetXMLRequest(_message.Message):
    __slots__ = ("domain", "inactive", "migratable", "secure")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    INACTIVE_FIELD_NUMBER: _ClassVar[int]
    MIGRATABLE_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    inactive: bool
    migratable: bool
    secure: bool
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., inactive: _Optional[bool] = ..., migratable: _Optional[bool] = ..., secure: _Optional[bool] = ...) -> None: ...

class GetXMLReply(_message.Message):
    __slots__ = ("xml",)
    XML_FIELD_NUMBER: _ClassVar[int]
    xml: str
    def __init__(self, xml: _Optional[str] = ...) -> None: ...

class DomainInfo(_message.Message):
    __slots__ = ("domain", "max_memory_kib", "memory_kib", "vcpus", "cpu_time_ns", "os_type", "autostart")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    MAX_MEMORY_KIB_FIELD_NUMBER: _ClassVar[int]
    MEMORY_KIB_FIELD_NUMBER: _ClassVar[int]
    VCPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_TIME_NS_FIELD_NUMBER: _ClassVar[int]
    OS_TYPE_FIELD_NUMBER: _ClassVar[int]
    AUTOSTART_FIELD_NUMBER: _ClassVar[int]
    domain: Domain
    max_memory_kib: int
    memory_kib: int
    vcpus: int
    cpu_time_ns: int
    os_type: str
    autostart: bool
    def __init__(self, domain: _Optional[_Union[Domain, _Mapping]] = ..., max_memory_kib: _Optional[int] = ..., memory_kib: _Optional[int] = ..., vcpus: _Optional[int] = ..., cpu_time_ns: _Optional[int] = ..., os_type: _Optional[str] = ..., autostart: _Optional[bool] = ...) -> None: ...

class DomainStateReply(_message.Message):
    __slots__ = ("state", "reason", "reason_name", "detail")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REASON_NAME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    state: DomainState
    reason: int
    reason_name: str
    detail: str
    def __init__(self, state: _Optional[_Union[DomainState, str]] = ..., reason: _Optional[int] = ..., reason_name: _Optional[str] = ..., detail: _Optional[str] = ...) -> None: ...

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EventsRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "domain_name", "domain_uuid", "event", "detail", "description", "iteration", "job", "timestamp_ms")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_NAME_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_UUID_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    ITERATION_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    kind: EventKind
    domain_name: str
    domain_uuid: str
    event: int
    detail: int
    description: str
    iteration: int
    job: JobInfo
    timestamp_ms: int
    def __init__(self, kind: _Optional[_Union[EventKind, str]] = ..., domain_name: _Optional[str] = ..., domain_uuid: _Optional[str] = ..., event: _Optional[int] = ..., detail: _Optional[int] = ..., description: _Optional[str] = ..., iteration: _Optional[int] = ..., job: _Optional[_Union[JobInfo, _Mapping]] = ..., timestamp_ms: _Optional[int] = ...) -> None: ...

class ResolveMigrationRequest(_message.Message):
    __slots__ = ("domain", "dest_uri")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DEST_URI_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    dest_uri: str
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., dest_uri: _Optional[str] = ...) -> None: ...

class GuestLocationRequest(_message.Message):
    __slots__ = ("uuid", "migration_id")
    UUID_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    uuid: str
    migration_id: str
    def __init__(self, uuid: _Optional[str] = ..., migration_id: _Optional[str] = ...) -> None: ...

class GuestLocationReply(_message.Message):
    __slots__ = ("host_uuid", "known", "active", "state", "arrived_migration_id", "incoming_migration_id", "incoming_phase", "away_host_uuid", "away_hostname", "away_uri", "away_migration_id")
    HOST_UUID_FIELD_NUMBER: _ClassVar[int]
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ARRIVED_MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    INCOMING_MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    INCOMING_PHASE_FIELD_NUMBER: _ClassVar[int]
    AWAY_HOST_UUID_FIELD_NUMBER: _ClassVar[int]
    AWAY_HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AWAY_URI_FIELD_NUMBER: _ClassVar[int]
    AWAY_MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    host_uuid: str
    known: bool
    active: bool
    state: DomainState
    arrived_migration_id: str
    incoming_migration_id: str
    incoming_phase: str
    away_host_uuid: str
    away_hostname: str
    away_uri: str
    away_migration_id: str
    def __init__(self, host_uuid: _Optional[str] = ..., known: _Optional[bool] = ..., active: _Optional[bool] = ..., state: _Optional[_Union[DomainState, str]] = ..., arrived_migration_id: _Optional[str] = ..., incoming_migration_id: _Optional[str] = ..., incoming_phase: _Optional[str] = ..., away_host_uuid: _Optional[str] = ..., away_hostname: _Optional[str] = ..., away_uri: _Optional[str] = ..., away_migration_id: _Optional[str] = ...) -> None: ...

class Begin3Request(_message.Message):
    __slots__ = ("domain", "xmlin", "flags", "dname", "resource")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    XMLIN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    DNAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    xmlin: str
    flags: int
    dname: str
    resource: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., xmlin: _Optional[str] = ..., flags: _Optional[int] = ..., dname: _Optional[str] = ..., resource: _Optional[int] = ...) -> None: ...

class Begin3ParamsRequest(_message.Message):
    __slots__ = ("domain", "params", "flags")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    params: _containers.RepeatedCompositeFieldContainer[TypedParam]
    flags: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., params: _Optional[_Iterable[_Union[TypedParam, _Mapping]]] = ..., flags: _Optional[int] = ...) -> None: ...

class Begin3Reply(_message.Message):
    __slots__ = ("cookie_out", "xml")
    COOKIE_OUT_FIELD_NUMBER: _ClassVar[int]
    XML_FIELD_NUMBER: _ClassVar[int]
    cookie_out: bytes
    xml: str
    def __init__(self, cookie_out: _Optional[bytes] = ..., xml: _Optional[str] = ...) -> None: ...

class Prepare3Request(_message.Message):
    __slots__ = ("cookie_in", "uri_in", "flags", "dname", "resource", "dom_xml")
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    URI_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    DNAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    DOM_XML_FIELD_NUMBER: _ClassVar[int]
    cookie_in: bytes
    uri_in: str
    flags: int
    dname: str
    resource: int
    dom_xml: str
    def __init__(self, cookie_in: _Optional[bytes] = ..., uri_in: _Optional[str] = ..., flags: _Optional[int] = ..., dname: _Optional[str] = ..., resource: _Optional[int] = ..., dom_xml: _Optional[str] = ...) -> None: ...

class Prepare3ParamsRequest(_message.Message):
    __slots__ = ("params", "cookie_in", "flags")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[TypedParam]
    cookie_in: bytes
    flags: int
    def __init__(self, params: _Optional[_Iterable[_Union[TypedParam, _Mapping]]] = ..., cookie_in: _Optional[bytes] = ..., flags: _Optional[int] = ...) -> None: ...

class Prepare3Reply(_message.Message):
    __slots__ = ("cookie_out", "uri_out")
    COOKIE_OUT_FIELD_NUMBER: _ClassVar[int]
    URI_OUT_FIELD_NUMBER: _ClassVar[int]
    cookie_out: bytes
    uri_out: str
    def __init__(self, cookie_out: _Optional[bytes] = ..., uri_out: _Optional[str] = ...) -> None: ...

class Perform3Request(_message.Message):
    __slots__ = ("domain", "xmlin", "cookie_in", "dconnuri", "uri", "flags", "dname", "resource")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    XMLIN_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    DCONNURI_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    DNAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    xmlin: str
    cookie_in: bytes
    dconnuri: str
    uri: str
    flags: int
    dname: str
    resource: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., xmlin: _Optional[str] = ..., cookie_in: _Optional[bytes] = ..., dconnuri: _Optional[str] = ..., uri: _Optional[str] = ..., flags: _Optional[int] = ..., dname: _Optional[str] = ..., resource: _Optional[int] = ...) -> None: ...

class Perform3ParamsRequest(_message.Message):
    __slots__ = ("domain", "dconnuri", "params", "cookie_in", "flags")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DCONNURI_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    dconnuri: str
    params: _containers.RepeatedCompositeFieldContainer[TypedParam]
    cookie_in: bytes
    flags: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., dconnuri: _Optional[str] = ..., params: _Optional[_Iterable[_Union[TypedParam, _Mapping]]] = ..., cookie_in: _Optional[bytes] = ..., flags: _Optional[int] = ...) -> None: ...

class Perform3Reply(_message.Message):
    __slots__ = ("cookie_out", "protocol", "migration_id")
    COOKIE_OUT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    cookie_out: bytes
    protocol: str
    migration_id: str
    def __init__(self, cookie_out: _Optional[bytes] = ..., protocol: _Optional[str] = ..., migration_id: _Optional[str] = ...) -> None: ...

class Finish3Request(_message.Message):
    __slots__ = ("dname", "cookie_in", "dconnuri", "uri", "flags", "cancelled")
    DNAME_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    DCONNURI_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    dname: str
    cookie_in: bytes
    dconnuri: str
    uri: str
    flags: int
    cancelled: bool
    def __init__(self, dname: _Optional[str] = ..., cookie_in: _Optional[bytes] = ..., dconnuri: _Optional[str] = ..., uri: _Optional[str] = ..., flags: _Optional[int] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Finish3ParamsRequest(_message.Message):
    __slots__ = ("params", "cookie_in", "flags", "cancelled")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[TypedParam]
    cookie_in: bytes
    flags: int
    cancelled: bool
    def __init__(self, params: _Optional[_Iterable[_Union[TypedParam, _Mapping]]] = ..., cookie_in: _Optional[bytes] = ..., flags: _Optional[int] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Finish3Reply(_message.Message):
    __slots__ = ("domain", "cookie_out")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    COOKIE_OUT_FIELD_NUMBER: _ClassVar[int]
    domain: Domain
    cookie_out: bytes
    def __init__(self, domain: _Optional[_Union[Domain, _Mapping]] = ..., cookie_out: _Optional[bytes] = ...) -> None: ...

class Confirm3Request(_message.Message):
    __slots__ = ("domain", "cookie_in", "flags", "cancelled")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    cookie_in: bytes
    flags: int
    cancelled: bool
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., cookie_in: _Optional[bytes] = ..., flags: _Optional[int] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Confirm3ParamsRequest(_message.Message):
    __slots__ = ("domain", "params", "cookie_in", "flags", "cancelled")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    params: _containers.RepeatedCompositeFieldContainer[TypedParam]
    cookie_in: bytes
    flags: int
    cancelled: bool
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., params: _Optional[_Iterable[_Union[TypedParam, _Mapping]]] = ..., cookie_in: _Optional[bytes] = ..., flags: _Optional[int] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class Confirm3Reply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Prepare2Request(_message.Message):
    __slots__ = ("uri_in", "flags", "dname", "resource", "dom_xml")
    URI_IN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    DNAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    DOM_XML_FIELD_NUMBER: _ClassVar[int]
    uri_in: str
    flags: int
    dname: str
    resource: int
    dom_xml: str
    def __init__(self, uri_in: _Optional[str] = ..., flags: _Optional[int] = ..., dname: _Optional[str] = ..., resource: _Optional[int] = ..., dom_xml: _Optional[str] = ...) -> None: ...

class Prepare2Reply(_message.Message):
    __slots__ = ("cookie_out", "uri_out")
    COOKIE_OUT_FIELD_NUMBER: _ClassVar[int]
    URI_OUT_FIELD_NUMBER: _ClassVar[int]
    cookie_out: bytes
    uri_out: str
    def __init__(self, cookie_out: _Optional[bytes] = ..., uri_out: _Optional[str] = ...) -> None: ...

class PerformRequest(_message.Message):
    __slots__ = ("domain", "cookie_in", "uri", "flags", "dname", "resource")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    DNAME_FIELD_NUMBER: _ClassVar[int]
    RESOURCE_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    cookie_in: bytes
    uri: str
    flags: int
    dname: str
    resource: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., cookie_in: _Optional[bytes] = ..., uri: _Optional[str] = ..., flags: _Optional[int] = ..., dname: _Optional[str] = ..., resource: _Optional[int] = ...) -> None: ...

class PerformReply(_message.Message):
    __slots__ = ("protocol", "migration_id")
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    protocol: str
    migration_id: str
    def __init__(self, protocol: _Optional[str] = ..., migration_id: _Optional[str] = ...) -> None: ...

class Finish2Request(_message.Message):
    __slots__ = ("dname", "cookie_in", "uri", "flags", "retcode")
    DNAME_FIELD_NUMBER: _ClassVar[int]
    COOKIE_IN_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    RETCODE_FIELD_NUMBER: _ClassVar[int]
    dname: str
    cookie_in: bytes
    uri: str
    flags: int
    retcode: int
    def __init__(self, dname: _Optional[str] = ..., cookie_in: _Optional[bytes] = ..., uri: _Optional[str] = ..., flags: _Optional[int] = ..., retcode: _Optional[int] = ...) -> None: ...

class Finish2Reply(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: Domain
    def __init__(self, domain: _Optional[_Union[Domain, _Mapping]] = ...) -> None: ...

class HistoryRequest(_message.Message):
    __slots__ = ("domain", "limit")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    domain: str
    limit: int
    def __init__(self, domain: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("time", "migration_id", "domain", "uuid", "role", "source", "destination", "mode", "transport", "protocol", "outcome", "error", "duration_ms", "downtime_ms", "bytes")
    TIME_FIELD_NUMBER: _ClassVar[int]
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    time: str
    migration_id: str
    domain: str
    uuid: str
    role: str
    source: str
    destination: str
    mode: str
    transport: str
    protocol: str
    outcome: str
    error: str
    duration_ms: int
    downtime_ms: int
    bytes: int
    def __init__(self, time: _Optional[str] = ..., migration_id: _Optional[str] = ..., domain: _Optional[str] = ..., uuid: _Optional[str] = ..., role: _Optional[str] = ..., source: _Optional[str] = ..., destination: _Optional[str] = ..., mode: _Optional[str] = ..., transport: _Optional[str] = ..., protocol: _Optional[str] = ..., outcome: _Optional[str] = ..., error: _Optional[str] = ..., duration_ms: _Optional[int] = ..., downtime_ms: _Optional[int] = ..., bytes: _Optional[int] = ...) -> None: ...

class HistoryReply(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ...) -> None: ...

class JobInfoRequest(_message.Message):
    __slots__ = ("domain", "completed")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    completed: bool
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., completed: _Optional[bool] = ...) -> None: ...

class JobInfo(_message.Message):
    __slots__ = ("type", "operation", "time_elapsed_ms", "data_total", "data_processed", "data_remaining", "mem_total", "mem_processed", "mem_remaining", "stats", "phase", "error", "abort_requested")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    OPERATION_FIELD_NUMBER: _ClassVar[int]
    TIME_ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    DATA_TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    DATA_REMAINING_FIELD_NUMBER: _ClassVar[int]
    MEM_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MEM_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    MEM_REMAINING_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ABORT_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    type: JobType
    operation: int
    time_elapsed_ms: int
    data_total: int
    data_processed: int
    data_remaining: int
    mem_total: int
    mem_processed: int
    mem_remaining: int
    stats: _containers.RepeatedCompositeFieldContainer[TypedParam]
    phase: str
    error: str
    abort_requested: bool
    def __init__(self, type: _Optional[_Union[JobType, str]] = ..., operation: _Optional[int] = ..., time_elapsed_ms: _Optional[int] = ..., data_total: _Optional[int] = ..., data_processed: _Optional[int] = ..., data_remaining: _Optional[int] = ..., mem_total: _Optional[int] = ..., mem_processed: _Optional[int] = ..., mem_remaining: _Optional[int] = ..., stats: _Optional[_Iterable[_Union[TypedParam, _Mapping]]] = ..., phase: _Optional[str] = ..., error: _Optional[str] = ..., abort_requested: _Optional[bool] = ...) -> None: ...

class AbortJobRequest(_message.Message):
    __slots__ = ("domain", "flags")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    flags: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., flags: _Optional[int] = ...) -> None: ...

class DowntimeRequest(_message.Message):
    __slots__ = ("domain", "downtime_ms")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    downtime_ms: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., downtime_ms: _Optional[int] = ...) -> None: ...

class DowntimeReply(_message.Message):
    __slots__ = ("downtime_ms",)
    DOWNTIME_MS_FIELD_NUMBER: _ClassVar[int]
    downtime_ms: int
    def __init__(self, downtime_ms: _Optional[int] = ...) -> None: ...

class SpeedRequest(_message.Message):
    __slots__ = ("domain", "bandwidth_mib", "flags")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    BANDWIDTH_MIB_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    bandwidth_mib: int
    flags: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., bandwidth_mib: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class SpeedReply(_message.Message):
    __slots__ = ("bandwidth_mib",)
    BANDWIDTH_MIB_FIELD_NUMBER: _ClassVar[int]
    bandwidth_mib: int
    def __init__(self, bandwidth_mib: _Optional[int] = ...) -> None: ...

class CompressionCacheRequest(_message.Message):
    __slots__ = ("domain", "cache_size", "flags")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    domain: DomainRef
    cache_size: int
    flags: int
    def __init__(self, domain: _Optional[_Union[DomainRef, _Mapping]] = ..., cache_size: _Optional[int] = ..., flags: _Optional[int] = ...) -> None: ...

class CompressionCacheReply(_message.Message):
    __slots__ = ("cache_size",)
    CACHE_SIZE_FIELD_NUMBER: _ClassVar[int]
    cache_size: int
    def __init__(self, cache_size: _Optional[int] = ...) -> None: ...

class TunnelChunk(_message.Message):
    __slots__ = ("dname", "data", "seq")
    DNAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    dname: str
    data: bytes
    seq: int
    def __init__(self, dname: _Optional[str] = ..., data: _Optional[bytes] = ..., seq: _Optional[int] = ...) -> None: ...
