"""Authorization on its own: the role table against the service descriptors, the DN lists with
libvirt's wildcards, each listener's policy, and the interceptor refusing before the handler.

Real daemons and certificates: ``test_tls.py``; the sockets: ``test_listeners.py``.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from tests.daemon.test_interceptor import Context
from virtmig.daemon import interceptor
from virtmig.daemon.authz import ROLES, SECRET_FIELDS, Access, Policy, Role, role_of, tls_access
from virtmig.daemon.interceptor import wrap_handler
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ERROR_METADATA_KEY, PermissionDenied
from virtmig.testing.pki import session_pki

READ_CALLS = {
    "/virtmig.v1.Host/GetHost",
    "/virtmig.v1.Domains/List", "/virtmig.v1.Domains/ListStream",
    "/virtmig.v1.Domains/Lookup", "/virtmig.v1.Domains/GetXML",
    "/virtmig.v1.Domains/GetInfo", "/virtmig.v1.Domains/GetState", "/virtmig.v1.Domains/Events",
    "/virtmig.v1.Migration/GetJobInfo", "/virtmig.v1.Migration/WatchJob",
    "/virtmig.v1.Migration/GetMaxDowntime", "/virtmig.v1.Migration/GetMaxSpeed",
    "/virtmig.v1.Migration/GetCompressionCache",
    "/virtmig.v1.Domains/GuestLocation", "/virtmig.v1.Migration/GetHistory",
    "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
    "/grpc.health.v1.Health/List",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


def declared_methods() -> set[str]:
    """virtmig's RPCs, and those of the standard health and reflection services it serves."""
    files = (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR)
    return {f"/{service.full_name}/{m.name}"
            for f in files for service in f.services_by_name.values() for m in service.methods}


# --- the table -----------------------------------------------------------------------------------


def test_every_rpc_has_a_role_and_no_role_names_a_missing_rpc() -> None:
    declared = declared_methods()
    assert len(declared) > 30
    assert set(ROLES) == declared, (declared - set(ROLES), set(ROLES) - declared)


def test_read_calls_only_look() -> None:
    assert {m for m, role in ROLES.items() if role is Role.READ} == READ_CALLS
    # Every migration phase, the session that owns jobs, and the tunnel are write calls.
    for name in ("Begin3", "Prepare3", "Perform3", "Finish3", "Confirm3", "Tunnel"):
        assert ROLES[f"/virtmig.v1.Migration/{name}"] is Role.WRITE
    assert ROLES["/virtmig.v1.Host/OpenSession"] is Role.WRITE


# --- DN lists ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dn", "allowed", "readonly", "access"), [
    # an empty full list: any certificate the CA signed
    ("O=virtmig,CN=a", (), (), Access.FULL),
    ("O=virtmig,CN=a", ("O=virtmig,CN=a",), (), Access.FULL),
    ("O=virtmig,CN=b", ("O=virtmig,CN=a",), (), Access.NONE),
    # libvirt's wildcards: * any run (none included), ? one character, over the whole DN
    ("O=virtmig,CN=host-a", ("O=virtmig,CN=host-*",), (), Access.FULL),
    ("O=virtmig,CN=host-", ("O=virtmig,CN=host-*",), (), Access.FULL),
    ("O=virtmig,CN=host-a,OU=x", ("O=virtmig,CN=host-?",), (), Access.NONE),
    ("O=virtmig,CN=host-ab", ("O=virtmig,CN=host-?",), (), Access.NONE),
    ("C=GB,O=virtmig,CN=a", ("O=virtmig,CN=a",), (), Access.NONE),  # anchored at the start
    ("O=virtmig,CN=a", ("*",), (), Access.FULL),
    # the read-only list
    ("O=virtmig,CN=mon", ("O=virtmig,CN=a",), ("O=virtmig,CN=mon",), Access.READ_ONLY),
    ("O=virtmig,CN=x", ("O=virtmig,CN=a",), ("O=virtmig,CN=mon",), Access.NONE),
    ("O=virtmig,CN=x", (), ("O=virtmig,CN=mon",), Access.FULL),
    # a DN on the read-only list is read-only, whatever the full list says
    ("O=virtmig,CN=mon", ("O=virtmig,CN=*",), ("O=virtmig,CN=mon",), Access.READ_ONLY),
    ("O=virtmig,CN=mon", (), ("*",), Access.READ_ONLY),
])
def test_dn_lists(dn: str, allowed: tuple[str, ...], readonly: tuple[str, ...],
                  access: Access) -> None:
    assert tls_access(dn, allowed, readonly) is access


def test_access_permits() -> None:
    assert Access.FULL.permits(Role.WRITE) and Access.FULL.permits(Role.READ)
    assert Access.READ_ONLY.permits(Role.READ) and not Access.READ_ONLY.permits(Role.WRITE)
    assert not Access.NONE.permits(Role.READ)


# --- a listener's policy -------------------------------------------------------------------------

DEFINE = "/virtmig.v1.Domains/Define"
LIST = "/virtmig.v1.Domains/List"
PLAIN = {"transport_security_type": [b"insecure"]}


def tls_auth(cn: str | None, version: bytes = b"TLSv1.3") -> dict[str, list[bytes]]:
    """An ``auth_context()`` as gRPC gives it for a TLS client with a certificate for ``cn``."""
    auth = {"transport_security_type": [b"ssl"], "ssl_tls_version": [version]}
    if cn is not None:
        cert = (session_pki().client(cn) / "clientcert.pem").read_bytes()
        # gRPC's own subject string is reversed: the policy must not read it.
        auth |= {"x509_pem_cert": [cert], "x509_subject": [f"CN={cn},O=virtmig".encode()]}
    return auth


def refusal(policy: Policy, method: str, auth: dict[str, list[bytes]]) -> str | None:
    try:
        policy.check(method, auth)
    except PermissionDenied as exc:
        return exc.message
    return None


def test_plain_listeners_of_the_main_server_have_full_access() -> None:
    # The main unix socket, and plain TCP the operator asked for; the DN lists do not apply.
    policy = Policy(allowed_dns=("O=virtmig,CN=nobody",))
    assert refusal(policy, DEFINE, PLAIN) is None
    assert refusal(policy, DEFINE, {}) is None


def test_the_read_only_socket_allows_read_calls_only() -> None:
    policy = Policy(read_only=True)
    assert refusal(policy, LIST, PLAIN) is None
    assert refusal(policy, DEFINE, PLAIN) == (
        "access denied: read-only socket: Define is not a read call")
    # whatever the connection says of itself
    assert refusal(policy, DEFINE, tls_auth("admin")) is not None


def test_tls_callers_by_their_certificate() -> None:
    policy = Policy(allowed_dns=("O=virtmig,CN=admin",), readonly_dns=("O=virtmig,CN=viewer",))
    assert refusal(policy, DEFINE, tls_auth("admin")) is None
    assert refusal(policy, LIST, tls_auth("viewer")) is None
    assert refusal(policy, DEFINE, tls_auth("viewer")) == (
        "access denied: client 'O=virtmig,CN=viewer' has read-only access "
        "(tls_readonly_dn_list): Define is not a read call")
    assert refusal(policy, LIST, tls_auth("stranger")) == (
        "access denied: client 'O=virtmig,CN=stranger' is not on the list of allowed clients "
        "(tls_allowed_dn_list)")
    assert refusal(policy, LIST, tls_auth(None)) == (
        "access denied: the client presented no certificate")


def test_tls_older_than_1_3_is_refused() -> None:
    assert refusal(Policy(), LIST, tls_auth("admin", b"TLSv1.2")) == (
        "access denied: TLS 1.3 is required, the connection uses TLSv1.2")
    auth = tls_auth("admin")
    del auth["ssl_tls_version"]
    assert refusal(Policy(), LIST, auth) == (
        "access denied: TLS 1.3 is required, the connection uses an unknown version")


def test_a_method_without_a_role_is_refused() -> None:
    assert refusal(Policy(), "/virtmig.v1.Domains/Reboot", PLAIN) == (
        "access denied: /virtmig.v1.Domains/Reboot has no role in the authorization table")


GET_XML = "/virtmig.v1.Domains/GetXML"


def test_asking_for_secrets_is_a_write_call() -> None:
    # dumpxml --security-info (the VNC passwords): libvirt refuses VIR_DOMAIN_XML_SECURE on a
    # read-only connection
    plain, secure = pb.GetXMLRequest(), pb.GetXMLRequest(secure=True)
    assert role_of(GET_XML, plain) is Role.READ and role_of(GET_XML, secure) is Role.WRITE
    assert role_of(GET_XML) is Role.READ and role_of(LIST, secure) is Role.READ
    assert set(SECRET_FIELDS) <= set(ROLES)
    for method, name in SECRET_FIELDS.items():  # each names a boolean field of its request
        request = {GET_XML: pb.GetXMLRequest}[method]()
        assert getattr(request, name) is False
    read_only = Policy(read_only=True)
    read_only.check(GET_XML, PLAIN, plain)  # (raises when refused)
    with pytest.raises(PermissionDenied, match="read-only socket: GetXML with secure is not a "
                                               "read call"):
        read_only.check(GET_XML, PLAIN, secure)
    viewer = Policy(readonly_dns=("O=virtmig,CN=viewer",))
    with pytest.raises(PermissionDenied, match=r"read-only access .*GetXML with secure"):
        viewer.check(GET_XML, tls_auth("viewer"), secure)
    viewer.check(GET_XML, tls_auth("admin"), secure)


async def test_the_interceptor_refuses_secrets_to_read_only_callers() -> None:
    ran: list[object] = []

    async def behaviour(request: object, context: object) -> object:
        ran.append(request)
        return pb.GetXMLReply()

    wrapped: Any = wrap_handler(grpc.unary_unary_rpc_method_handler(behaviour), GET_XML,
                                Policy(read_only=True))
    await wrapped.unary_unary(pb.GetXMLRequest(), Context(PLAIN))
    ctx = Context(PLAIN)
    with pytest.raises(grpc.aio.AbortError):
        await wrapped.unary_unary(pb.GetXMLRequest(secure=True), ctx)
    assert ctx.aborted is not None and ctx.aborted[0] is grpc.StatusCode.PERMISSION_DENIED
    assert len(ran) == 1


# --- the interceptor refuses before the handler runs ---------------------------------------------


async def test_a_refused_call_never_reaches_its_handler(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[object] = []

    async def behaviour(request: object, context: object) -> object:
        ran.append(request)
        return None

    async def stream(request: Any, context: object) -> Any:
        ran.append(request)
        yield None

    policy = Policy(allowed_dns=("O=virtmig,CN=admin",))
    caplog.set_level(logging.INFO, logger=interceptor.__name__)
    handlers: list[Any] = [grpc.unary_unary_rpc_method_handler(behaviour),
                           grpc.stream_stream_rpc_method_handler(stream)]
    for handler in handlers:
        ctx = Context(tls_auth("stranger"))
        wrapped: Any = wrap_handler(handler, DEFINE, policy)
        with pytest.raises(grpc.aio.AbortError):
            if handler.unary_unary is not None:
                await wrapped.unary_unary("request", ctx)
            else:
                async for _ in wrapped.stream_stream("requests", ctx):
                    pass
        assert ctx.aborted == (grpc.StatusCode.PERMISSION_DENIED,
                               "access denied: client 'O=virtmig,CN=stranger' is not on the list "
                               "of allowed clients (tls_allowed_dn_list)")
        assert ctx.trailers == ((ERROR_METADATA_KEY, "PermissionDenied"),)
    assert ran == []
    # Logged once per refusal, as a warning naming the call, the peer and the DN.
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "refused Define from unix:: access denied: client "
                          "'O=virtmig,CN=stranger' is not on the list of allowed clients "
                          "(tls_allowed_dn_list)")] * 2
    # The same call from a listed client runs.
    ctx = Context(tls_auth("admin"))
    ok: Any = wrap_handler(grpc.unary_unary_rpc_method_handler(behaviour), DEFINE, policy)
    await ok.unary_unary("ok", ctx)
    assert ran == ["ok"] and ctx.aborted is None
