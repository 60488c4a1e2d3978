"""Error messages come from one place: each class formats libvirt's message for its code.

A raise site passes only the detail; a message that is already formatted (from the wire, or
stored) is wrapped again without a second prefix; and no raise site in the packages types a
class's prefix by hand.
"""

from __future__ import annotations

import ast
import pickle
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

import virtmig.client
import virtmig.daemon
import virtmig.proto
from virtmig.proto import errors
from virtmig.proto.compat import RULES

# libvirt's virErrorMsg strings (src/util/virerror.c) for the codes virtmig uses: the message with
# a detail, and without one.
LIBVIRT_FORMATS: dict[type[errors.VirtmigError], tuple[str, str]] = {
    errors.InvalidArgument: ("invalid argument: %s", "invalid argument"),
    errors.XMLError: ("XML error: %s", "XML description is invalid or not well formed"),
    errors.Overflow: ("numerical overflow: %s", "numerical overflow"),
    errors.ArgumentUnsupported: ("argument unsupported: %s", "argument unsupported"),
    errors.ConfigUnsupported: ("unsupported configuration: %s", "unsupported configuration"),
    errors.OperationInvalid: ("Requested operation is not valid: %s",
                              "Requested operation is not valid"),
    errors.GuestElsewhere: ("Requested operation is not valid: %s",
                            "Requested operation is not valid"),
    errors.OperationUnsupported: ("Operation not supported: %s", "Operation not supported"),
    errors.NoSupport: ("this function is not supported by the connection driver: %s",
                       "this function is not supported by the connection driver"),
    errors.NoDomain: ("Domain not found: %s", "Domain not found"),
    errors.DomainExists: ("domain %s exists already", "this domain exists already"),
    errors.OperationFailed: ("operation failed: %s", "operation failed"),
    errors.OperationAborted: ("operation aborted: %s", "operation aborted"),
    errors.MigrateFinishOk: ("migration successfully aborted: %s",
                             "migration successfully aborted"),
    errors.MigrateUnsafe: ("Unsafe migration: %s", "Unsafe migration"),
    errors.OperationTimeout: ("Timed out during operation: %s", "Timed out during operation"),
    errors.ResourceExhausted: ("resource busy: %s", "resource busy"),
    errors.PermissionDenied: ("access denied: %s", "access denied"),
    errors.InternalError: ("internal error: %s", "internal error"),
    errors.CookieError: ("internal error: %s", "internal error"),
    errors.InternalInputError: ("internal error: %s", "internal error"),
    errors.PortsExhausted: ("internal error: %s", "internal error"),
    # libvirt's connection failures are RPC/system errors: the bare message.
    errors.ConnectionFailed: ("%s", "RPC error"),
    errors.VirtmigError: ("%s", "unknown error"),
}

CLASSES = sorted(errors.ERROR_CLASSES.values(), key=lambda c: c.__name__)


def test_every_class_has_its_libvirt_format() -> None:
    assert set(LIBVIRT_FORMATS) == set(CLASSES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_detail_is_formatted_with_the_class_prefix(cls: type[errors.VirtmigError]) -> None:
    msginfo, msg = LIBVIRT_FORMATS[cls]
    err = cls("boom")
    assert err.message == str(err) == msginfo.replace("%s", "boom")
    assert err.detail == "boom"
    bare = cls()
    assert bare.message == str(bare) == msg and bare.detail == ""


def test_the_messages_users_see() -> None:
    assert str(errors.NoDomain("no domain with matching name 'x'")) == (
        "Domain not found: no domain with matching name 'x'")
    assert str(errors.OperationInvalid("domain is not running")) == (
        "Requested operation is not valid: domain is not running")
    assert str(errors.DomainExists("'vm1'")) == "domain 'vm1' exists already"
    assert str(errors.MigrateFinishOk()) == "migration successfully aborted"


def test_a_detail_keeps_percent_signs() -> None:
    assert str(errors.OperationFailed("100%s done")) == "operation failed: 100%s done"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_from_message_does_not_prefix_again(cls: type[errors.VirtmigError]) -> None:
    first = cls("boom")
    again = cls.from_message(first.message)
    assert type(again) is cls
    assert (again.message, again.detail, str(again)) == (first.message, "boom", first.message)
    bare = cls.from_message(cls().message)
    assert (bare.message, bare.detail) == (cls().message, "")


def test_from_message_keeps_a_foreign_message_whole() -> None:
    err = errors.NoSupport.from_message("Method not found!")
    assert (err.message, err.detail) == ("Method not found!", "Method not found!")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_class_round_trips_over_the_status(cls: type[errors.VirtmigError]) -> None:
    sent = cls("x")
    code, details, trailers = errors.to_status(sent)
    assert code is grpc.StatusCode[cls.status_name]
    back = errors.from_status(code, details, trailers)
    assert type(back) is cls
    assert (back.message, back.detail) == (sent.message, sent.detail)
    assert errors.to_status(back) == (code, details, trailers)


def test_an_unexpected_exception_is_prefixed_once() -> None:
    code, details, trailers = errors.to_status(KeyError("x"))
    assert details == "internal error: KeyError: 'x'"
    back = errors.from_status(code, details, trailers)
    assert type(back) is errors.InternalError and back.message == details
    assert back.detail == "KeyError: 'x'"


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_pickling_does_not_prefix_again(cls: type[errors.VirtmigError]) -> None:
    err = cls("x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls and (back.message, back.detail) == (err.message, err.detail)


def test_unavailable_without_class_keeps_its_words() -> None:
    err = errors.from_status(grpc.StatusCode.UNAVAILABLE, "failed to connect", ())
    assert str(err) == "unable to connect to the daemon: failed to connect"


# --- nobody types a prefix by hand -----------------------------------------------------------


def _head(cls: type[errors.VirtmigError]) -> str:
    return cls.msginfo.partition("%s")[0]


def _leading_text(node: ast.expr) -> str | None:
    """The literal text a message expression starts with, if it starts with one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        return _leading_text(node.values[0])
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _leading_text(node.left)
    return None


def _called_class(node: ast.Call) -> type[errors.VirtmigError] | None:
    func = node.func
    name = func.id if isinstance(func, ast.Name) else (
        func.attr if isinstance(func, ast.Attribute) else "")
    return errors.ERROR_CLASSES.get(name)


def _package_files() -> Iterator[Path]:
    for package in (virtmig.proto, virtmig.daemon, virtmig.client):
        for root in package.__path__:
            yield from sorted(Path(root).rglob("*.py"))


def hand_typed_prefixes(source: str, filename: str) -> list[str]:
    """``file:line: Class("<its own prefix>...")`` for each call that types its prefix."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        cls = _called_class(node)
        if cls is None or not _head(cls):  # a bare-message class has no prefix to repeat
            continue
        args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "detail")]
        for arg in args:
            text = _leading_text(arg) or ""
            folded = text.casefold()
            if folded.startswith(_head(cls).casefold()) or folded == cls.msg.casefold():
                found.append(f"{filename}:{node.lineno}: {cls.__name__}({text!r}...)")
    return found


def test_the_prefix_check_catches_what_it_should() -> None:
    source = (
        'OperationInvalid("Requested operation is not valid: domain is not running")\n'
        'errors.NoDomain(f"Domain not found: {name}")\n'
        'OperationFailed("operation failed: x" + y)\n'
        'InternalError(detail="internal error: z")\n'
        'MigrateFinishOk("migration successfully aborted")\n'
        'OperationInvalid("domain is not running")\n'
        'ConnectionFailed("anything")\n'
    )
    assert [f.split(":")[1] for f in hand_typed_prefixes(source, "f")] == ["1", "2", "3", "4", "5"]


def test_no_raise_site_types_its_class_prefix() -> None:
    found = [hit for path in _package_files()
             for hit in hand_typed_prefixes(path.read_text(), str(path))]
    assert found == []


def test_no_compat_rule_types_its_class_prefix() -> None:
    for rule in RULES:
        head = _head(rule.error)
        assert not head or not rule.message.casefold().startswith(head.casefold()), rule
