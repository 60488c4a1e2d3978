"""What a caller may ask Prepare (v3 and v2) to bind (issue 11): a ``uri_in`` port inside the
configured migration port range, and a ``listen_address`` of the destination host's own.
Anything else is a typed error before anything changes: no incoming domain, no port, no
listening socket.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from tests.daemon.migration_helpers import begun_xml_and_cookie, running_guest
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.migration.uri import _SHOWN, _shown, dst_check_listen, host_addresses
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import InvalidArgument, NoDomain
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.wire import to_wire
from virtmig.testing import Host, free_port, hosts

F = MigrateFlags
P = MigrateParam


@pytest.fixture
async def ranged(tmp_path: Path) -> AsyncIterator[tuple[Host, Host, int]]:
    """A source, and a destination whose migration port range is the one port returned."""
    port = free_port()
    async with hosts(tmp_path, "test", ("src", {}),
                     ("dst", {"migration_port_min": port, "migration_port_max": port})
                     ) as (src, dst):
        await running_guest(src)
        yield src, dst, port


FORMS = ["Prepare3Params", "Prepare3", "Prepare2"]


async def prepare(dst: Host, xml: str, cookie: bytes, params: TypedParams, form: str) -> None:
    """Prepare by hand, as a client that skips the library would: Prepare3Params, or Prepare3
    or (protocol v2, no cookie) Prepare2 with the URI in ``uri_in``."""
    conn = dst.conn
    if form == "Prepare2":
        await conn._call(conn.migration_stub.Prepare2, pb.Prepare2Request(
            flags=F.LIVE, dom_xml=xml, uri_in=params.get_str(P.URI)))
        return
    if form == "Prepare3":
        await conn._call(conn.migration_stub.Prepare3, pb.Prepare3Request(
            cookie_in=cookie, flags=F.LIVE, dom_xml=xml, uri_in=params.get_str(P.URI)))
        return
    await conn._call(conn.migration_stub.Prepare3Params, pb.Prepare3ParamsRequest(
        cookie_in=cookie, flags=F.LIVE,
        params=to_wire(TypedParams([*TypedParams.of({P.DEST_XML: xml}), *params]))))


async def assert_nothing_prepared(dst: Host) -> None:
    with pytest.raises(NoDomain):
        await dst.conn.lookup("vm1")
    assert not list(dst.daemon.registry)
    assert not dst.daemon.ports._used
    backend = dst.daemon.backend
    assert isinstance(backend, TestBackend) and not backend._incoming


@pytest.mark.parametrize("form", FORMS)
async def test_a_port_outside_the_range_is_refused(ranged: tuple[Host, Host, int],
                                                   form: str) -> None:
    src, dst, port = ranged
    xml, cookie = await begun_xml_and_cookie(src)
    for bad in (1, port - 1, port + 1, 65535):
        with pytest.raises(InvalidArgument, match=(
                f"^invalid argument: migration port {bad} is outside the migration port range "
                f"{port}-{port} \\(migration_ports\\)$")):
            await prepare(dst, xml, cookie, TypedParams.of({P.URI: f"tcp://127.0.0.1:{bad}"}),
                          form)
        await assert_nothing_prepared(dst)


async def test_a_port_inside_the_range_is_used(ranged: tuple[Host, Host, int]) -> None:
    src, dst, port = ranged
    dom = await src.conn.migrate3("vm1", dst.conn, TypedParams.of(
        {P.URI: f"tcp://127.0.0.1:{port}"}), F.LIVE)
    assert (await dst.conn.state(dom.name))[0] is DomainState.RUNNING
    assert not dst.daemon.ports._used


def foreign_address() -> str:
    """An IPv4 address (TEST-NET-2) that none of this host's interfaces has."""
    local = host_addresses()
    return next(str(a) for a in ipaddress.ip_network("198.51.100.0/24").hosts()
                if a not in local)


@pytest.mark.parametrize("form", FORMS)
async def test_a_listen_address_not_of_this_host_is_refused(pair: tuple[Host, Host],
                                                            form: str) -> None:
    src, dst = pair
    await running_guest(src)
    xml, cookie = await begun_xml_and_cookie(src)
    address = foreign_address()
    params = TypedParams.of({P.LISTEN_ADDRESS: address})
    legacy = form != "Prepare3Params"
    if legacy:  # Prepare3/2 have no listen address: they bind migration_address; the URI's host
        # is only handed back, so a foreign one is not refused, but its port still is
        params = TypedParams.of({P.URI: f"tcp://{address}:1"})
    message = ("migration port 1 is outside" if legacy else
               f"^invalid argument: listen address '{re.escape(address)}' is not an address of "
               r"this host \(one of its interfaces, the configured migration_address, or a "
               r"wildcard\)$")
    with pytest.raises(InvalidArgument, match=message):
        await prepare(dst, xml, cookie, params, form)
    await assert_nothing_prepared(dst)


async def test_the_own_listen_address_migrates(pair: tuple[Host, Host]) -> None:
    src, dst = pair
    await running_guest(src)
    await src.conn.migrate3("vm1", dst.conn, TypedParams.of({P.LISTEN_ADDRESS: "127.0.0.1"}),
                            F.LIVE)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING


async def test_a_name_is_resolved_to_the_addresses_it_stands_for() -> None:
    # "127.1" is not an address ipaddress reads, but the resolver reads it as 127.0.0.1 without
    # any lookup: it is loopback's, so this host's own, though not the configured one.
    await dst_check_listen("127.1", "10.1.2.3")
    with pytest.raises(InvalidArgument, match=r"'198\.51\.1' is not an address of this host"):
        await dst_check_listen("198.51.1", "10.1.2.3")  # 198.51.0.1: no interface has it


async def test_which_listen_addresses_are_the_hosts_own() -> None:
    # An interface's address (loopback's: every host has it), though not the configured one.
    await dst_check_listen("127.0.0.1", "10.1.2.3")
    for wildcard in ("0.0.0.0", "::"):
        await dst_check_listen(wildcard, "127.0.0.1")
    await dst_check_listen("host-b.example", "host-b.example")  # the configured one, as it is
    for bad, message in (
        (foreign_address(), "is not an address of this host"),
        ("224.0.0.1", "is not an address of this host"),  # bindable, but not the host's
        # Names that cannot be resolved fail before any lookup leaves the host.
        ("x" * 64 + ".example", "cannot resolve listen address"),
        ("bad\0name", "cannot resolve listen address"),
        ("y" * 5000, "cannot resolve listen address '" + "y" * 80 + r"\.\.\.'"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            await dst_check_listen(bad, "127.0.0.1")


def test_an_unreadable_interface_address_hides_none_of_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An interface address that does not parse is skipped, and the addresses listed after it
    still count as the host's own (mutation testing: ``break`` instead of ``continue``)."""
    listed = {"eth0": [SimpleNamespace(family=socket.AF_INET6, address="not-an-address"),
                       SimpleNamespace(family=socket.AF_INET, address="192.0.2.7"),
                       SimpleNamespace(family=socket.AF_INET6, address="2001:db8::7")]}
    monkeypatch.setattr(psutil, "net_if_addrs", lambda: listed)
    assert host_addresses() == {ipaddress.ip_address("192.0.2.7"),
                                ipaddress.ip_address("2001:db8::7")}


def test_a_string_of_the_shown_length_is_shown_whole() -> None:
    """A caller's string goes into a message whole up to ``_SHOWN`` characters, then cut
    (mutation testing: ``<``)."""
    assert _shown("a" * _SHOWN) == "a" * _SHOWN
    assert _shown("a" * (_SHOWN + 1)) == "a" * _SHOWN + "..."
