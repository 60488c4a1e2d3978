"""Errors and logs: a caller's mistake is a typed status and one escaped, bounded log line
without a traceback; a request gRPC cannot decode is INVALID_ARGUMENT; tracebacks are for the
daemon's own bugs.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

import virtmig.client
import virtmig.daemon
from tests.daemon.test_interceptor import Context, status_of, wrapped
from virtmig.daemon import interceptor
from virtmig.proto import logsafe
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ERROR_METADATA_KEY, CookieError, InternalError
from virtmig.proto.logsafe import LIMIT, safe
from virtmig.testing import Host, domain_xml, start_host, stop_host

# --- the helper ----------------------------------------------------------------------------------


def test_safe_keeps_a_plain_short_string() -> None:
    assert safe("vm-1 is 'fine' (ok)") == "vm-1 is 'fine' (ok)"


@pytest.mark.parametrize(("raw", "escaped"), [
    ("a\nb", "a\\nb"), ("a\r\nb", "a\\r\\nb"), ("\x1b[2J", "\\x1b[2J"), ("x\\n", "x\\\\n"),
    ("\u202eevil", "\\u202eevil"), ("\u2028", "\\u2028"), ("\udcff", "\\udcff"),
    ("\x00", "\\x00"), ("caf\u00e9", "caf\u00e9"),
])
def test_safe_escapes_what_could_forge_or_hide_a_line(raw: str, escaped: str) -> None:
    assert safe(raw) == escaped


def test_safe_truncates_with_a_marker() -> None:
    out = safe("y" * 5000)
    assert out == "y" * LIMIT + "...[+4800 chars]"
    escaped = safe("\n" * 300)  # the limit counts the escaped text
    assert escaped.startswith("\\n" * (LIMIT // 2)) and escaped.endswith("...[+200 chars]")


def test_safe_args_filter_escapes_strings_and_errors_not_numbers(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logsafe.logger("virtmig.test.logsafe")
    caplog.set_level(logging.INFO, logger="virtmig.test.logsafe")
    log.info("%s|%s|%d|%s", "a\nb", ValueError("x\ny"), 7, Path("/p\n"))
    assert caplog.records[-1].getMessage() == "a\\nb|x\\ny|7|/p\\n"


def test_every_module_logs_through_the_safe_logger() -> None:
    """No module of the daemon or the client makes a plain logger (its lines could be
    forged)."""
    offenders = []
    for package in (virtmig.daemon, virtmig.client):
        for root in package.__path__:
            for path in Path(root).rglob("*.py"):
                for node in ast.walk(ast.parse(path.read_text())):
                    if (isinstance(node, ast.Attribute) and node.attr == "getLogger"
                            and isinstance(node.value, ast.Name) and node.value.id == "logging"):
                        offenders.append(str(path))
    assert offenders == []


# --- through a daemon ----------------------------------------------------------------------------


@pytest.fixture
async def host(tmp_path: Path) -> AsyncIterator[Host]:
    h = await start_host(tmp_path, "h")
    try:
        yield h
    finally:
        await stop_host(h)


def _raw(host: Host, method: str, stream: bool = False) -> Any:
    """A call of ``method`` that sends the bytes it is given as they are."""
    channel = host.conn._channel
    make = channel.stream_stream if stream else channel.unary_unary
    return make(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def _failures(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == interceptor.__name__]


def _one_line_no_traceback(record: logging.LogRecord) -> str:
    message = record.getMessage()
    assert "\n" not in message and "\r" not in message
    assert record.exc_info is None and record.levelno in (logging.INFO, logging.WARNING)
    return message


BAD_UTF8_DEFINE = pb.DefineRequest(xml="ab").SerializeToString().replace(b"ab", b"a\xff")


async def test_invalid_utf8_in_a_request_is_invalid_argument(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    code, details, trailers = await status_of(
        _raw(host, "/virtmig.v1.Domains/Define")(BAD_UTF8_DEFINE))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "invalid argument: a string field is not valid UTF-8"
    assert trailers[ERROR_METADATA_KEY] == "InvalidArgument"
    [record] = _failures(caplog)
    assert _one_line_no_traceback(record) == (
        "Define failed: invalid argument: a string field is not valid UTF-8")
    assert not [r for r in caplog.records if r.exc_info is not None]
    assert list(host.daemon.registry) == []


async def test_a_garbled_message_is_invalid_argument(host: Host) -> None:
    code, details, _ = await status_of(_raw(host, "/virtmig.v1.Domains/Lookup")(b"\x0a\x05ab"))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details == "invalid argument: the request message cannot be decoded"


async def test_invalid_utf8_in_a_request_stream_is_invalid_argument(host: Host) -> None:
    call = _raw(host, "/virtmig.v1.Migration/Tunnel", stream=True)()
    chunk = pb.TunnelChunk(dname="ab").SerializeToString().replace(b"ab", b"a\xff")
    await call.write(chunk)
    await call.done_writing()
    code, details, _ = await status_of(call)
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "not valid UTF-8" in details


async def test_a_callers_string_is_escaped_and_truncated_in_the_log(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    name = "evil\nFAKE virtmigd ERROR forged line\x1b[2J" + "y" * 200  # < 255 bytes: a name
    code, details, _ = await status_of(host.conn.domains_stub.Lookup(
        pb.DomainRequest(domain=pb.DomainRef(name=name))))
    assert code is grpc.StatusCode.NOT_FOUND and name in details  # the caller gets it whole
    [record] = _failures(caplog)
    message = _one_line_no_traceback(record)
    assert message.startswith("Lookup failed: Domain not found: no domain with matching name "
                              "'evil\\nFAKE virtmigd ERROR forged line\\x1b[2J")
    assert message.endswith("chars]") and len(message) < LIMIT + 100


async def test_bad_xml_is_one_line_without_traceback(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    code, _details, trailers = await status_of(host.conn.domains_stub.Define(
        pb.DefineRequest(xml="<domain type='test'>\n<name>x\n" + "<a>" * 10)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT and trailers[ERROR_METADATA_KEY] == "XMLError"
    [record] = _failures(caplog)
    assert _one_line_no_traceback(record).startswith("Define failed: XML error: ")


async def test_a_bad_cookie_is_invalid_argument_and_keeps_libvirts_message(
        host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    params = [pb.TypedParam(name="destination_xml", string=domain_xml("vm1"))]
    code, details, trailers = await status_of(host.conn.migration_stub.Prepare3Params(
        pb.Prepare3ParamsRequest(params=params, cookie_in=b"<nope/>\n\x00", flags=1)))
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("internal error: Malformed migration cookie")
    assert trailers[ERROR_METADATA_KEY] == "CookieError"
    [record] = _failures(caplog)
    _one_line_no_traceback(record)
    assert list(host.daemon.registry) == []


def test_a_cookie_error_is_still_an_internal_error_for_callers() -> None:
    err = CookieError("Malformed migration cookie")
    assert isinstance(err, InternalError) and str(err) == (
        "internal error: Malformed migration cookie")


async def test_a_foreseen_internal_error_is_one_warning_line(
        caplog: pytest.LogCaptureFixture) -> None:
    async def behaviour(request: object, context: object) -> object:
        raise InternalError("migration protocol going backwards\nperform3 => begin3")

    ctx = Context()
    caplog.set_level(logging.INFO, logger=interceptor.__name__)
    with pytest.raises(grpc.aio.AbortError):
        await wrapped(grpc.unary_unary_rpc_method_handler(behaviour)).unary_unary(None, ctx)
    assert ctx.aborted is not None and ctx.aborted[0] is grpc.StatusCode.INTERNAL
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert _one_line_no_traceback(record) == (
        "Lookup failed: internal error: migration protocol going backwards\\nperform3 => begin3")
