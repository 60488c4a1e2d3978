"""The one virtmig exception tree, its messages, and its mapping to and from gRPC status codes.

Every failure a user can see is one of these classes.  Each carries libvirt's error number name
(``code``), libvirt's message format for that code and a gRPC status code.  A raise site passes
only the detail; the class formats the message the way libvirt's ``virErrorMsg`` does, so that
``OperationInvalid("domain is not running")`` reads ``Requested operation is not valid: domain is
not running``.  The server turns an exception into a status in :func:`to_status`; the client turns
a status back into the same class in :func:`from_status`.  Nowhere else maps errors.

::

    VirtmigError                         (grpc status)
     ├── InvalidArgument                 INVALID_ARGUMENT   VIR_ERR_INVALID_ARG
     │    ├── XMLError                   INVALID_ARGUMENT   VIR_ERR_XML_ERROR
     │    └── Overflow                   INVALID_ARGUMENT   VIR_ERR_OVERFLOW
     ├── ArgumentUnsupported             INVALID_ARGUMENT   VIR_ERR_ARGUMENT_UNSUPPORTED
     ├── ConfigUnsupported               FAILED_PRECONDITION VIR_ERR_CONFIG_UNSUPPORTED
     ├── OperationInvalid                FAILED_PRECONDITION VIR_ERR_OPERATION_INVALID
     │    └── GuestElsewhere             FAILED_PRECONDITION VIR_ERR_OPERATION_INVALID
     ├── OperationUnsupported            UNIMPLEMENTED      VIR_ERR_OPERATION_UNSUPPORTED
     ├── NoSupport                       UNIMPLEMENTED      VIR_ERR_NO_SUPPORT
     ├── NoDomain                        NOT_FOUND          VIR_ERR_NO_DOMAIN
     ├── DomainExists                    ALREADY_EXISTS     VIR_ERR_DOM_EXIST
     ├── OperationFailed                 ABORTED            VIR_ERR_OPERATION_FAILED
     ├── OperationAborted                ABORTED            VIR_ERR_OPERATION_ABORTED
     ├── MigrateFinishOk                 ABORTED            VIR_ERR_MIGRATE_FINISH_OK
     ├── MigrateUnsafe                   FAILED_PRECONDITION VIR_ERR_MIGRATE_UNSAFE
     ├── OperationTimeout                DEADLINE_EXCEEDED  VIR_ERR_OPERATION_TIMEOUT
     ├── ResourceExhausted               RESOURCE_EXHAUSTED VIR_ERR_RESOURCE_BUSY
     ├── PermissionDenied                PERMISSION_DENIED  VIR_ERR_ACCESS_DENIED
     ├── ConnectionFailed                UNAVAILABLE        VIR_ERR_NO_CONNECT / VIR_ERR_RPC
     └── InternalError                   INTERNAL           VIR_ERR_INTERNAL_ERROR
          ├── InternalInputError         INVALID_ARGUMENT   VIR_ERR_INTERNAL_ERROR
          │    └── CookieError           INVALID_ARGUMENT   VIR_ERR_INTERNAL_ERROR
          └── PortsExhausted             RESOURCE_EXHAUSTED VIR_ERR_INTERNAL_ERROR

The exact class travels in the trailing metadata key ``virtmig-error``, so a status code shared by
several classes still maps back to the right one.  The message travels already formatted: the
client rebuilds the error with :meth:`VirtmigError.from_message`, which never adds the prefix a
second time; so does any code that wraps a message formatted before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar, Self

if TYPE_CHECKING:
    import grpc

ERROR_METADATA_KEY = "virtmig-error"


def _status_code(name: str) -> grpc.StatusCode:
    import grpc  # only where a status is needed: the CLI's parsing must not load gRPC

    return grpc.StatusCode[name]


class VirtmigError(Exception):
    """Base of every virtmig error.  ``str(err)`` is the user-facing message.

    ``msginfo`` is libvirt's message format for ``code`` with one ``%s`` for the detail, ``msg``
    the message without a detail.  ``err.message`` is the whole message, ``err.detail`` the part
    the raise site gave (for a message formatted elsewhere: the part after the class's prefix).
    """

    code: ClassVar[str] = "VIR_ERR_INTERNAL_ERROR"
    # The gRPC status code's name (``err.status`` is the code itself): a name, so that importing
    # the errors (the CLI's ``--help``) does not import gRPC.
    status_name: ClassVar[str] = "UNKNOWN"
    msginfo: ClassVar[str] = "%s"
    msg: ClassVar[str] = "unknown error"

    message: str
    detail: str

    def __init__(self, detail: str = "") -> None:
        self._set(self.format(detail), detail)

    @property
    def status(self) -> grpc.StatusCode:
        return _status_code(self.status_name)

    @classmethod
    def format(cls, detail: str) -> str:
        """The full message for ``detail``, as libvirt's ``virErrorMsg`` formats it."""
        if not detail:
            return cls.msg
        head, _, tail = cls.msginfo.partition("%s")
        return f"{head}{detail}{tail}"

    @classmethod
    def parse_detail(cls, message: str) -> str:
        """The detail of a message that is already formatted (all of it, if it is not ours)."""
        head, _, tail = cls.msginfo.partition("%s")
        framed = (len(message) >= len(head) + len(tail)
                  and message.startswith(head) and message.endswith(tail))
        if framed and (head or tail):
            return message[len(head):len(message) - len(tail)]
        return "" if message == cls.msg else message

    @classmethod
    def from_message(cls, message: str) -> Self:
        """The error for a message that already carries its prefix (from the wire, or stored)."""
        err = cls.__new__(cls)
        err._set(message, cls.parse_detail(message))
        return err

    def _set(self, message: str, detail: str) -> None:
        Exception.__init__(self, message)
        self.message = message
        self.detail = detail

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[object, tuple[str]]:
        # args holds the formatted message: rebuilding through __init__ would prefix it again.
        return type(self).from_message, (self.message,)


class InvalidArgument(VirtmigError):
    code = "VIR_ERR_INVALID_ARG"
    status_name = "INVALID_ARGUMENT"
    msginfo = "invalid argument: %s"
    msg = "invalid argument"


class XMLError(InvalidArgument):
    code = "VIR_ERR_XML_ERROR"
    msginfo = "XML error: %s"
    msg = "XML description is invalid or not well formed"


class Overflow(InvalidArgument):
    """A number above its range where libvirt reports VIR_ERR_OVERFLOW ("bandwidth must be less
    than ..."); other out-of-range values are plain :class:`InvalidArgument`."""

    code = "VIR_ERR_OVERFLOW"
    msginfo = "numerical overflow: %s"
    msg = "numerical overflow"


class ArgumentUnsupported(VirtmigError):
    code = "VIR_ERR_ARGUMENT_UNSUPPORTED"
    status_name = "INVALID_ARGUMENT"
    msginfo = "argument unsupported: %s"
    msg = "argument unsupported"


class ConfigUnsupported(VirtmigError):
    code = "VIR_ERR_CONFIG_UNSUPPORTED"
    status_name = "FAILED_PRECONDITION"
    msginfo = "unsupported configuration: %s"
    msg = "unsupported configuration"


class OperationInvalid(VirtmigError):
    code = "VIR_ERR_OPERATION_INVALID"
    status_name = "FAILED_PRECONDITION"
    msginfo = "Requested operation is not valid: %s"
    msg = "Requested operation is not valid"


class GuestElsewhere(OperationInvalid):
    """virtmig's one-place rule: the guest was migrated to another host, which runs it (or
    cannot be asked), so it is not started or resumed here; the message names that host."""


class OperationUnsupported(VirtmigError):
    code = "VIR_ERR_OPERATION_UNSUPPORTED"
    status_name = "UNIMPLEMENTED"
    msginfo = "Operation not supported: %s"
    msg = "Operation not supported"


class NoSupport(VirtmigError):
    code = "VIR_ERR_NO_SUPPORT"
    status_name = "UNIMPLEMENTED"
    msginfo = "this function is not supported by the connection driver: %s"
    msg = "this function is not supported by the connection driver"


class NoDomain(VirtmigError):
    code = "VIR_ERR_NO_DOMAIN"
    status_name = "NOT_FOUND"
    msginfo = "Domain not found: %s"
    msg = "Domain not found"


class DomainExists(VirtmigError):
    """libvirt's DOM_EXIST puts the detail (the domain) inside the message, not after it."""

    code = "VIR_ERR_DOM_EXIST"
    status_name = "ALREADY_EXISTS"
    msginfo = "domain %s exists already"
    msg = "this domain exists already"


class OperationFailed(VirtmigError):
    code = "VIR_ERR_OPERATION_FAILED"
    status_name = "ABORTED"
    msginfo = "operation failed: %s"
    msg = "operation failed"


class OperationAborted(VirtmigError):
    code = "VIR_ERR_OPERATION_ABORTED"
    status_name = "ABORTED"
    msginfo = "operation aborted: %s"
    msg = "operation aborted"


class MigrateFinishOk(VirtmigError):
    """Finish(cancelled) did its job: not a failure of its own (libvirt's MIGRATE_FINISH_OK).

    Raised without a detail: ``MigrateFinishOk()`` reads "migration successfully aborted".
    """

    code = "VIR_ERR_MIGRATE_FINISH_OK"
    status_name = "ABORTED"
    msginfo = "migration successfully aborted: %s"
    msg = "migration successfully aborted"


class MigrateUnsafe(VirtmigError):
    """A migration that may corrupt the guest's data (libvirt's MIGRATE_UNSAFE: disks cached by
    the host); ``VIR_MIGRATE_UNSAFE`` overrides it."""

    code = "VIR_ERR_MIGRATE_UNSAFE"
    status_name = "FAILED_PRECONDITION"
    msginfo = "Unsafe migration: %s"
    msg = "Unsafe migration"


class OperationTimeout(VirtmigError):
    code = "VIR_ERR_OPERATION_TIMEOUT"
    status_name = "DEADLINE_EXCEEDED"
    msginfo = "Timed out during operation: %s"
    msg = "Timed out during operation"


class ResourceExhausted(VirtmigError):
    code = "VIR_ERR_RESOURCE_BUSY"
    status_name = "RESOURCE_EXHAUSTED"
    msginfo = "resource busy: %s"
    msg = "resource busy"


class PermissionDenied(VirtmigError):
    """The caller may not make this call: its certificate is not on the allowed-DN lists, or
    its access is read-only and the call is not (see :mod:`virtmig.daemon.authz`)."""

    code = "VIR_ERR_ACCESS_DENIED"
    status_name = "PERMISSION_DENIED"
    msginfo = "access denied: %s"
    msg = "access denied"


class ConnectionFailed(VirtmigError):
    """The daemon cannot be reached, or the connection to it broke.

    libvirt reports these as system or RPC errors (VIR_ERR_SYSTEM_ERROR, VIR_ERR_RPC) whose format
    is the bare message; VIR_ERR_NO_CONNECT's own format ("no connection driver available for
    %s") names a URI that no driver accepts, which is not what this class says.
    """

    code = "VIR_ERR_NO_CONNECT"
    status_name = "UNAVAILABLE"
    msginfo = "%s"
    msg = "RPC error"


class InternalError(VirtmigError):
    code = "VIR_ERR_INTERNAL_ERROR"
    status_name = "INTERNAL"
    msginfo = "internal error: %s"
    msg = "internal error"


class InternalInputError(InternalError):
    """A request libvirt reports as an internal error (its message is kept: "no domain XML
    passed", "Unexpected dconnuri parameter with non-peer2peer migration"), but it is the
    caller's input, so the status is INVALID_ARGUMENT."""

    status_name = "INVALID_ARGUMENT"


class CookieError(InternalInputError):
    """A migration cookie the caller sent that cannot be used (libvirt: an internal error)."""


class PortsExhausted(InternalError):
    """No migration port is free: libvirt's port allocator says "internal error: Unable to find
    an unused port in range ..."; the status says what it is, RESOURCE_EXHAUSTED."""

    status_name = "RESOURCE_EXHAUSTED"


def _all_classes() -> dict[str, type[VirtmigError]]:
    out: dict[str, type[VirtmigError]] = {}
    todo: list[type[VirtmigError]] = [VirtmigError]
    while todo:
        cls = todo.pop()
        out[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    return out


ERROR_CLASSES: dict[str, type[VirtmigError]] = _all_classes()

# Status codes that carry no virtmig class (a non-virtmig server, or the transport itself).
_STATUS_FALLBACK: dict[str, type[VirtmigError]] = {
    "INVALID_ARGUMENT": InvalidArgument,
    "NOT_FOUND": NoDomain,
    "ALREADY_EXISTS": DomainExists,
    "FAILED_PRECONDITION": OperationInvalid,
    "UNIMPLEMENTED": NoSupport,
    "ABORTED": OperationFailed,
    "CANCELLED": OperationAborted,
    "DEADLINE_EXCEEDED": OperationTimeout,
    "RESOURCE_EXHAUSTED": ResourceExhausted,
    "PERMISSION_DENIED": PermissionDenied,
    "UNAVAILABLE": ConnectionFailed,
}


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Server side: the status code, details and trailing metadata for an exception."""
    if not isinstance(err, VirtmigError):
        err = InternalError(f"{type(err).__name__}: {err}")
    return err.status, err.message, ((ERROR_METADATA_KEY, type(err).__name__),)


def from_status(
    code: grpc.StatusCode | None,
    details: str | None,
    metadata: Iterable[tuple[str, str | bytes]] | Sequence[object] | None = None,
) -> VirtmigError:
    """Client side: the virtmig exception for a failed RPC's status.

    The details are the message as the server formatted it: it is kept as it is, never prefixed
    again.  A status from something that is not a virtmig server keeps its own words too.
    """
    name = None
    for item in metadata or ():
        if isinstance(item, tuple) and len(item) == 2 and item[0] == ERROR_METADATA_KEY:
            value = item[1]
            name = value.decode() if isinstance(value, bytes) else str(value)
    cls = ERROR_CLASSES.get(name or "")
    message = details or "unknown error"
    if cls is None:
        code_name = code.name if code is not None else ""
        cls = _STATUS_FALLBACK.get(code_name, InternalError)
        if code_name == "UNAVAILABLE":
            message = f"unable to connect to the daemon: {message}"
    return cls.from_message(message)
