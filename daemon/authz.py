"""Authorization: the one table of RPC -> role, and who may make a call on a listener.

Every RPC is a **read** call (it only looks: lists, info, state, XML, job info and stats, the
watch and event streams, host info and capabilities, and the standard gRPC health and server
reflection services) or a **write** call (everything else:
lifecycle, job control, and every migration phase).  :data:`ROLES` holds each RPC's full method
name; the server interceptor refuses a method that is not in it, and a test fails when an RPC of
the service descriptors has no entry.  Two entries are write for a reason of their own:

- ``OpenSession``: the session stream makes its caller the owner of the migration jobs it
  starts, and its end rolls them back (libvirt's connection-closed handling): only a caller who
  may start a migration needs one.
- ``Tunnel``: it carries a migration's data into the destination's incoming guest.

A read call that asks for secrets is a write call (:data:`SECRET_FIELDS`): ``GetXML`` with
``secure`` (``dumpxml --security-info``: the graphics passwords), as libvirt refuses
VIR_DOMAIN_XML_SECURE on a read-only connection.

Migration phases that only a peer daemon or an operator should send (Prepare3, Finish3, Prepare2,
Finish2, Tunnel on a destination; Confirm3 on a source) are write calls like any other: a
peer-to-peer source presents its host certificate and is authorized as any client.

Who the caller is, and so its :class:`Access`, depends on the listener (one
:class:`Policy` per gRPC server, see :mod:`virtmig.daemon.interceptor`):

==========================  =================================================================
listener                    access
==========================  =================================================================
``tls://``                  by the client certificate's subject DN (:func:`tls_access`), over
                            TLS 1.3 only
main unix socket            full: the socket is 0600, its owner is the daemon's user
``virtmigd-ro.sock``        read-only
plain ``tcp://``            full (only with ``listen_insecure_tcp``: anyone who reaches it)
==========================  =================================================================

The DN lists (``tls_allowed_dn_list``: full access, ``tls_readonly_dn_list``: read-only) hold
libvirt's wildcard patterns (:func:`virtmig.proto.pki.dn_matches`).  A DN matching the read-only
list is read-only whatever else it matches; one matching the full list, or any DN when that
list is empty (libvirt's rule: every certificate the CA signed), has full access; any other is
refused.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from virtmig.proto.errors import PermissionDenied
from virtmig.proto.pki import dn_matches, subject_dn


class Role(enum.Enum):
    READ = "read"
    WRITE = "write"


class Access(enum.Enum):
    NONE = "none"
    READ_ONLY = "read-only"
    FULL = "full"

    def permits(self, role: Role) -> bool:
        return self is Access.FULL or (self is Access.READ_ONLY and role is Role.READ)


_R, _W = Role.READ, Role.WRITE

ROLES: Final[Mapping[str, Role]] = MappingProxyType({
    "/virtmig.v1.Host/GetHost": _R,
    "/virtmig.v1.Host/OpenSession": _W,
    "/virtmig.v1.Domains/List": _R,
    "/virtmig.v1.Domains/ListStream": _R,
    "/virtmig.v1.Domains/Lookup": _R,
    "/virtmig.v1.Domains/GetXML": _R,
    "/virtmig.v1.Domains/GetInfo": _R,
    "/virtmig.v1.Domains/GetState": _R,
    "/virtmig.v1.Domains/Events": _R,
    # A guest runs in one place (virtmig.daemon.locate): a peer daemon asks where a guest is
    # (read: it only looks); settling an unknown outcome may resume or stop a guest (write).
    "/virtmig.v1.Domains/GuestLocation": _R,
    "/virtmig.v1.Domains/ResolveMigration": _W,
    "/virtmig.v1.Domains/Define": _W,
    "/virtmig.v1.Domains/Undefine": _W,
    "/virtmig.v1.Domains/Start": _W,
    "/virtmig.v1.Domains/Destroy": _W,
    "/virtmig.v1.Domains/Suspend": _W,
    "/virtmig.v1.Domains/Resume": _W,
    "/virtmig.v1.Migration/GetJobInfo": _R,
    "/virtmig.v1.Migration/WatchJob": _R,
    "/virtmig.v1.Migration/GetMaxDowntime": _R,
    "/virtmig.v1.Migration/GetMaxSpeed": _R,
    "/virtmig.v1.Migration/GetCompressionCache": _R,
    "/virtmig.v1.Migration/GetHistory": _R,
    "/virtmig.v1.Migration/AbortJob": _W,
    "/virtmig.v1.Migration/SetMaxDowntime": _W,
    "/virtmig.v1.Migration/SetMaxSpeed": _W,
    "/virtmig.v1.Migration/SetCompressionCache": _W,
    "/virtmig.v1.Migration/StartPostCopy": _W,
    "/virtmig.v1.Migration/Tunnel": _W,
    "/virtmig.v1.Migration/Begin3": _W,
    "/virtmig.v1.Migration/Begin3Params": _W,
    "/virtmig.v1.Migration/Prepare3": _W,
    "/virtmig.v1.Migration/Prepare3Params": _W,
    "/virtmig.v1.Migration/Perform3": _W,
    "/virtmig.v1.Migration/Perform3Params": _W,
    "/virtmig.v1.Migration/Finish3": _W,
    "/virtmig.v1.Migration/Finish3Params": _W,
    "/virtmig.v1.Migration/Confirm3": _W,
    "/virtmig.v1.Migration/Confirm3Params": _W,
    "/virtmig.v1.Migration/Prepare2": _W,
    "/virtmig.v1.Migration/Perform": _W,
    "/virtmig.v1.Migration/Finish2": _W,
    # The standard services beside virtmig's (virtmig.daemon.health): they only look.
    "/grpc.health.v1.Health/Check": _R,
    "/grpc.health.v1.Health/Watch": _R,
    "/grpc.health.v1.Health/List": _R,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": _R,
})

#: Read calls that become write calls when the request sets this (boolean) field: they ask for
#: secrets.
SECRET_FIELDS: Final[Mapping[str, str]] = MappingProxyType({
    "/virtmig.v1.Domains/GetXML": "secure",
})


def role_of(method: str, request: object = None) -> Role | None:
    """The role a call of ``method`` with ``request`` needs (None: ``method`` is unknown)."""
    role = ROLES.get(method)
    secret = SECRET_FIELDS.get(method)
    if role is not None and secret is not None and getattr(request, secret, False) is True:
        return Role.WRITE
    return role


TLS_VERSION = "TLSv1.3"

AuthContext = Mapping[str, Iterable[bytes]]


@functools.lru_cache(maxsize=1024)
def tls_access(dn: str, allowed: tuple[str, ...], readonly: tuple[str, ...]) -> Access:
    """The access of a TLS client whose certificate's subject is ``dn``, by the DN lists."""
    if dn_matches(dn, readonly):
        return Access.READ_ONLY
    if not allowed or dn_matches(dn, allowed):
        return Access.FULL
    return Access.NONE


@functools.lru_cache(maxsize=1024)
def _dn_of(pem: bytes) -> str:
    # What peer_subject_dn computes, from the same x509_pem_cert property (never gRPC's
    # x509_subject, whose order is reversed), parsed once per certificate rather than per call.
    return subject_dn(pem)


def _first(auth: AuthContext, key: str) -> str:
    for value in auth.get(key, ()):
        return value.decode(errors="replace")
    return ""


@dataclass(frozen=True)
class Policy:
    """Who may call what on the listeners of one gRPC server.

    ``read_only``: every caller is read-only (the ``virtmigd-ro.sock`` server).  Otherwise a TLS
    caller is authorized by its certificate's DN against the two lists, and a caller on any
    other listener of the server (the main unix socket, a plain TCP listener the operator asked
    for) has full access.
    """

    read_only: bool = False
    allowed_dns: tuple[str, ...] = ()
    readonly_dns: tuple[str, ...] = ()

    def check(self, method: str, auth: AuthContext, request: object = None) -> None:
        """Return if the caller whose connection has ``auth`` (gRPC's ``auth_context()``) may
        call ``method`` with ``request`` (:func:`role_of`); raise :class:`PermissionDenied`
        naming it otherwise."""
        name = method.rsplit("/", 1)[-1]
        role = role_of(method, request)
        if role is not ROLES.get(method):
            name += f" with {SECRET_FIELDS[method]}"
        if role is None:
            raise PermissionDenied(f"{method} has no role in the authorization table")
        if self.read_only:
            if role is not Role.READ:
                raise PermissionDenied(f"read-only socket: {name} is not a read call")
            return
        if _first(auth, "transport_security_type") != "ssl":
            return
        version = _first(auth, "ssl_tls_version")
        if version != TLS_VERSION:
            raise PermissionDenied(
                f"TLS 1.3 is required, the connection uses {version or 'an unknown version'}")
        pem = next(iter(auth.get("x509_pem_cert", ())), None)
        if pem is None:
            raise PermissionDenied("the client presented no certificate")
        dn = _dn_of(pem)
        access = tls_access(dn, self.allowed_dns, self.readonly_dns)
        if access is Access.NONE:
            raise PermissionDenied(
                f"client '{dn}' is not on the list of allowed clients (tls_allowed_dn_list)")
        if not access.permits(role):
            raise PermissionDenied(
                f"client '{dn}' has read-only access (tls_readonly_dn_list): {name} is not a "
                "read call")
