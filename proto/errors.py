"""The one virtmig exception tree, and its mapping to and from gRPC status codes.

Every failure a user can see is one of these classes.  Each carries libvirt's error number name
(``code``) so that messages and codes read like libvirt's, and a gRPC status code.  The server
turns an exception into a status in :func:`to_status`; the client turns a status back into the
same class in :func:`from_status`.  Nowhere else maps errors.

::

    VirtmigError                         (grpc status)
     ├── InvalidArgument                 INVALID_ARGUMENT   VIR_ERR_INVALID_ARG
     │    └── XMLError                   INVALID_ARGUMENT   VIR_ERR_XML_ERROR
     ├── ArgumentUnsupported             INVALID_ARGUMENT   VIR_ERR_ARGUMENT_UNSUPPORTED
     ├── ConfigUnsupported               FAILED_PRECONDITION VIR_ERR_CONFIG_UNSUPPORTED
     ├── OperationInvalid                FAILED_PRECONDITION VIR_ERR_OPERATION_INVALID
     ├── OperationUnsupported            UNIMPLEMENTED      VIR_ERR_OPERATION_UNSUPPORTED
     ├── NoSupport                       UNIMPLEMENTED      VIR_ERR_NO_SUPPORT
     ├── NoDomain                        NOT_FOUND          VIR_ERR_NO_DOMAIN
     ├── DomainExists                    ALREADY_EXISTS     VIR_ERR_DOM_EXIST
     ├── OperationFailed                 ABORTED            VIR_ERR_OPERATION_FAILED
     ├── OperationAborted                ABORTED            VIR_ERR_OPERATION_ABORTED
     ├── MigrateFinishOk                 ABORTED            VIR_ERR_MIGRATE_FINISH_OK
     ├── OperationTimeout                DEADLINE_EXCEEDED  VIR_ERR_OPERATION_TIMEOUT
     ├── ResourceExhausted               RESOURCE_EXHAUSTED VIR_ERR_RESOURCE_BUSY
     ├── ConnectionFailed                UNAVAILABLE        VIR_ERR_NO_CONNECT / VIR_ERR_RPC
     └── InternalError                   INTERNAL           VIR_ERR_INTERNAL_ERROR

The exact class travels in the trailing metadata key ``virtmig-error``, so a status code shared by
several classes still maps back to the right one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc

ERROR_METADATA_KEY = "virtmig-error"


class VirtmigError(Exception):
    """Base of every virtmig error.  ``str(err)`` is the user-facing message."""

    code: str = "VIR_ERR_INTERNAL_ERROR"
    status: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InvalidArgument(VirtmigError):
    code = "VIR_ERR_INVALID_ARG"
    status = grpc.StatusCode.INVALID_ARGUMENT


class XMLError(InvalidArgument):
    code = "VIR_ERR_XML_ERROR"


class ArgumentUnsupported(VirtmigError):
    code = "VIR_ERR_ARGUMENT_UNSUPPORTED"
    status = grpc.StatusCode.INVALID_ARGUMENT


class ConfigUnsupported(VirtmigError):
    code = "VIR_ERR_CONFIG_UNSUPPORTED"
    status = grpc.StatusCode.FAILED_PRECONDITION


class OperationInvalid(VirtmigError):
    code = "VIR_ERR_OPERATION_INVALID"
    status = grpc.StatusCode.FAILED_PRECONDITION


class OperationUnsupported(VirtmigError):
    code = "VIR_ERR_OPERATION_UNSUPPORTED"
    status = grpc.StatusCode.UNIMPLEMENTED


class NoSupport(VirtmigError):
    code = "VIR_ERR_NO_SUPPORT"
    status = grpc.StatusCode.UNIMPLEMENTED


class NoDomain(VirtmigError):
    code = "VIR_ERR_NO_DOMAIN"
    status = grpc.StatusCode.NOT_FOUND


class DomainExists(VirtmigError):
    code = "VIR_ERR_DOM_EXIST"
    status = grpc.StatusCode.ALREADY_EXISTS


class OperationFailed(VirtmigError):
    code = "VIR_ERR_OPERATION_FAILED"
    status = grpc.StatusCode.ABORTED


class OperationAborted(VirtmigError):
    code = "VIR_ERR_OPERATION_ABORTED"
    status = grpc.StatusCode.ABORTED


class MigrateFinishOk(VirtmigError):
    """Finish(cancelled) did its job: not a failure of its own (libvirt's MIGRATE_FINISH_OK)."""

    code = "VIR_ERR_MIGRATE_FINISH_OK"
    status = grpc.StatusCode.ABORTED


class OperationTimeout(VirtmigError):
    code = "VIR_ERR_OPERATION_TIMEOUT"
    status = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(VirtmigError):
    code = "VIR_ERR_RESOURCE_BUSY"
    status = grpc.StatusCode.RESOURCE_EXHAUSTED


class ConnectionFailed(VirtmigError):
    code = "VIR_ERR_NO_CONNECT"
    status = grpc.StatusCode.UNAVAILABLE


class InternalError(VirtmigError):
    code = "VIR_ERR_INTERNAL_ERROR"
    status = grpc.StatusCode.INTERNAL


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
_STATUS_FALLBACK: dict[grpc.StatusCode, type[VirtmigError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NoDomain,
    grpc.StatusCode.ALREADY_EXISTS: DomainExists,
    grpc.StatusCode.FAILED_PRECONDITION: OperationInvalid,
    grpc.StatusCode.UNIMPLEMENTED: NoSupport,
    grpc.StatusCode.ABORTED: OperationFailed,
    grpc.StatusCode.CANCELLED: OperationAborted,
    grpc.StatusCode.DEADLINE_EXCEEDED: OperationTimeout,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: ConnectionFailed,
}


def to_status(err: BaseException) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """Server side: the status code, details and trailing metadata for an exception."""
    if isinstance(err, VirtmigError):
        return err.status, err.message, ((ERROR_METADATA_KEY, type(err).__name__),)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error: {type(err).__name__}: {err}",
        ((ERROR_METADATA_KEY, InternalError.__name__),),
    )


def from_status(
    code: grpc.StatusCode | None,
    details: str | None,
    metadata: Iterable[tuple[str, str | bytes]] | Sequence[object] | None = None,
) -> VirtmigError:
    """Client side: the virtmig exception for a failed RPC's status."""
    name = None
    for item in metadata or ():
        if isinstance(item, tuple) and len(item) == 2 and item[0] == ERROR_METADATA_KEY:
            value = item[1]
            name = value.decode() if isinstance(value, bytes) else str(value)
    cls = ERROR_CLASSES.get(name or "")
    message = details or "unknown error"
    if cls is None:
        cls = _STATUS_FALLBACK.get(code, InternalError) if code is not None else InternalError
        if code is grpc.StatusCode.UNAVAILABLE:
            message = f"unable to connect to the daemon: {message}"
    return cls(message)
