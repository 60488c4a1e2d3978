"""What ``virtmig migrate`` loads and how it connects (issue 17: the whole command's cost; nothing
here times anything): a regular migration opens the destination's connection while the source's
connection and domain lookup are under way, and both daemons' sessions at once, with failures
still reported in the order of the steps; ``migrate`` (regular and peer-to-peer) and ``list``
load no value they do not build (:mod:`virtmig.client.records`), nor ``uuid`` (and ``platform``
behind it), nor X.509 or XML code, and the dataclasses they load are all records
(:mod:`virtmig.proto.record`), none compiled at import; a domain key is told from a UUID as
``uuid.UUID`` would.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, domain_xml, ok, virtmig
from tests.client.test_cli_startup import (
    PROTOBUF_PURE_PYTHON,
    dialed_before,
    imported_by,
    run_reporting,
)
from virtmig.client import migrate
from virtmig.client.cli import migration
from virtmig.client.cli.base import CliError
from virtmig.client.rpc import canonical_uuid
from virtmig.proto.errors import ConnectionFailed
from virtmig.testing import free_port
from virtmig.testing.pki import session_pki

daemons = cli_helpers.daemons

# Loaded by no command that only lists, asks for the host or migrates without --verbose.
NOT_NEEDED = {"virtmig.client.records", "uuid", "platform", "virtmig.proto.pki",
              *PROTOBUF_PURE_PYTHON}


def _define_and_start(src: Daemon, tmp_path: Path, name: str) -> None:
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, 16))
    ok(src.uri, "define", str(xml))
    ok(src.uri, "start", name)


@pytest.mark.parametrize("p2p", [False, True])
def test_migrate_loads_only_what_it_uses(daemons: tuple[Daemon, Daemon], tmp_path: Path,
                                         p2p: bool) -> None:
    src, dst = daemons
    _define_and_start(src, tmp_path, "vm1")
    pki = session_pki().client()
    status, modules = imported_by("-q", "-c", f"{src.uri}?pkipath={pki}", "migrate", "--live",
                                  *(["--p2p"] if p2p else []), "vm1", dst.uri)
    assert status == 0
    assert "vm1" in ok(dst.uri, "list")  # (it did migrate)
    assert not modules & NOT_NEEDED
    assert not {m.split(".")[0] for m in modules} & {"cryptography", "lxml", "xml", "psutil"}
    assert not [m for m in modules if m.startswith("virtmig.daemon")]


@pytest.mark.parametrize("p2p", [False, True])
def test_migrate_dials_its_daemons_before_loading_the_client_library(
        daemons: tuple[Daemon, Daemon], tmp_path: Path, p2p: bool) -> None:
    """(issue 17) A regular migration's two channels, a peer-to-peer one's source channel, are
    connecting (TCP, TLS, on gRPC's threads) while protobuf, the messages, the RPC layer and
    the drivers are imported."""
    src, dst = daemons
    _define_and_start(src, tmp_path, "vm1")
    pki = session_pki().client()
    status, channels = dialed_before("-q", "-c", f"{src.uri}?pkipath={pki}", "migrate",
                                     "--live", *(["--p2p"] if p2p else []), "vm1", dst.uri)
    assert status == 0
    assert "vm1" in ok(dst.uri, "list")
    before = {"virtmig.proto.virtmig_pb2": False, "google.protobuf.descriptor_pool": False,
              "virtmig.client.rpc": False}
    assert channels == [before] * (1 if p2p else 2)


@pytest.mark.parametrize("p2p", [False, True])
def test_migrate_compiles_no_dataclass_as_it_loads(daemons: tuple[Daemon, Daemon],
                                                   tmp_path: Path, p2p: bool) -> None:
    """(issue 17) A frozen dataclass compiles six methods from source text at import, ~3.5
    million instructions: every dataclass of virtmig a migration loads (its tables of
    parameters, flag rules and options, URI and PKI values, the client's values and the
    sequence's trace) is a record, whose methods are written once."""
    src, dst = daemons
    _define_and_start(src, tmp_path, "vm1")
    pki = session_pki().client()
    report = ('sorted((f"{m}.{k}", "_record" in vars(v))'
              ' for m, mod in list(sys.modules.items()) if m.startswith("virtmig")'
              ' for k, v in vars(mod).items() if isinstance(v, type) and v.__module__ == m'
              ' and "__dataclass_fields__" in vars(v))')
    status, built = run_reporting(("-q", "-c", f"{src.uri}?pkipath={pki}", "migrate", "--live",
                                   *(["--p2p"] if p2p else []), "vm1", dst.uri), "", report)
    assert status == 0
    assert "vm1" in ok(dst.uri, "list")  # (it did migrate)
    assert len(built) >= 15
    assert [name for name, is_record in built if not is_record] == []


def test_list_loads_no_job_values_nor_uuid(daemons: tuple[Daemon, Daemon]) -> None:
    src, _dst = daemons
    status, modules = imported_by("-q", "-c", f"{src.uri}?pkipath={session_pki().client()}",
                                  "list", "--all")
    assert status == 0
    assert not modules & NOT_NEEDED


def test_an_unreachable_destination_is_still_reported(daemons: tuple[Daemon, Daemon],
                                                      tmp_path: Path) -> None:
    src, _dst = daemons
    _define_and_start(src, tmp_path, "vm1")
    closed = f"virtmig+tls://127.0.0.1:{free_port()}"
    res = virtmig(src.uri, "migrate", "--live", "vm1", closed)
    assert res.returncode == 1
    assert res.stderr.splitlines()[0] == f"error: failed to connect to the destination '{closed}'"
    # A missing domain is the first failure, as when the steps ran one after the other.
    res = virtmig(src.uri, "migrate", "--live", "no-such-vm", closed)
    assert res.returncode == 1
    assert res.stderr == "error: failed to get domain 'no-such-vm'\n"
    assert "running" in ok(src.uri, "domstate", "vm1")  # nothing happened


class _Gate:
    """Fake connections whose steps wait for each other: each step names what must have
    started before it may finish (so a sequential caller times out)."""

    def __init__(self) -> None:
        self.started: dict[str, asyncio.Event] = {}

    def event(self, name: str) -> asyncio.Event:
        return self.started.setdefault(name, asyncio.Event())

    async def step(self, name: str, after: str | None = None) -> None:
        self.event(name).set()
        if after is not None:
            await asyncio.wait_for(self.event(after).wait(), 5)


async def test_the_destination_is_opened_while_the_source_connects() -> None:
    gate = _Gate()

    class Conn:
        def __init__(self, name: str) -> None:
            self.name = name

        async def lookup(self, key: str) -> str:
            await gate.step("lookup", after="open dst")
            return f"domain {key}"

        def start_session(self) -> None:
            pass

    class FakeSession:
        async def conn(self) -> Conn:
            await gate.step("open src")
            return Conn("src")

        async def open(self, uri: str, what: str) -> Conn:
            await gate.step("open dst", after="lookup")
            return Conn(uri)

    session: Any = FakeSession()
    got: Any = await migration._connect_both(session, "vm1", "dst")
    assert (got[0].name, got[1], got[2].name) == ("src", "domain vm1", "dst")


async def test_a_failed_source_cancels_the_destination_and_is_reported() -> None:
    cancelled = asyncio.Event()

    class FakeSession:
        async def conn(self) -> object:
            await asyncio.sleep(0)
            raise CliError("failed to connect to the hypervisor", "down")

        async def open(self, uri: str, what: str) -> object:
            try:
                await asyncio.Event().wait()  # until cancelled
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return object()

    session: Any = FakeSession()
    with pytest.raises(CliError) as err:
        await migration._connect_both(session, "vm1", "dst")
    assert err.value.lines == ("failed to connect to the hypervisor", "down")
    assert cancelled.is_set()


async def test_both_sessions_open_at_once_and_the_source_fails_first() -> None:
    gate = _Gate()

    class Conn:
        def __init__(self, name: str, other: str, error: Exception | None = None) -> None:
            self.name, self.other, self.error = name, other, error

        async def open_session(self) -> str:
            await gate.step(self.name, after=self.other)
            if self.error is not None:
                raise self.error
            return self.name

    src: Any = Conn("src", "dst")
    dst: Any = Conn("dst", "src")
    await migrate.open_sessions(src, dst)
    gate.started.clear()
    src = Conn("src", "dst", ConnectionFailed("source"))
    dst = Conn("dst", "src", ConnectionFailed("destination"))
    with pytest.raises(ConnectionFailed, match="source"):
        await migrate.open_sessions(src, dst)


@pytest.mark.parametrize("text", [
    "12345678-1234-5678-1234-567812345678", "{12345678123456781234567812345678}",
    "urn:uuid:12345678-1234-5678-1234-56781234567F", "12345678123456781234567812345678",
    "vm1", "", "1234567812345678123456781234567g", "12345678-1234-5678-1234-5678123456789",
    "+2345678123456781234567812345678", "1_345678123456781234567812345678",
    "0x345678123456781234567812345678", "-" * 40, "٣" * 32,
])
def test_a_uuid_is_recognised_as_uuid_does(text: str) -> None:
    try:
        want = str(uuid.UUID(text))
    except ValueError:
        want = ""
    assert canonical_uuid(text) == want


def test_the_program_collects_garbage_again_once_connected() -> None:
    """(The program pauses the collector for its start-up only, and then leaves the objects
    the start-up made out of its collections: frozen, they are not walked again.)"""
    import gc

    from virtmig.client.cli import base

    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
    base.pause_gc_for_startup()
    try:
        assert not gc.isenabled()
        base._startup_over()
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
        frozen = gc.get_freeze_count()
        base._startup_over()  # (a second time changes nothing)
        assert gc.isenabled()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()  # (this test's process is not the program)
        gc.enable()


async def test_each_daemons_session_starts_opening_once_its_connection_is_up() -> None:
    """The migration needs a session on both daemons: each starts opening as soon as its
    connection is up, the source's while the domain is looked up (not after both connections
    and the lookup, one round trip later)."""
    events: list[str] = []
    looked_up = asyncio.Event()

    class Conn:
        def __init__(self, name: str) -> None:
            self.name = name

        async def lookup(self, key: str) -> str:
            events.append("lookup sent")
            events.append("lookup answered")
            looked_up.set()
            return f"domain {key}"

        def start_session(self) -> None:
            events.append(f"session {self.name}")

    class FakeSession:
        async def conn(self) -> Conn:
            return Conn("src")

        async def open(self, uri: str, what: str) -> Conn:
            await looked_up.wait()
            return Conn(uri)

    session: Any = FakeSession()
    got: Any = await migration._connect_both(session, "vm1", "dst")
    assert (got[0].name, got[1], got[2].name) == ("src", "domain vm1", "dst")
    assert events == ["session src", "lookup sent", "lookup answered", "session dst"]
