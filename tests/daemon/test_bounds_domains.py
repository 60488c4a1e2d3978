"""Bounds on what callers may ask of a daemon about domains, through the client: names, how many
domains, how big a reply, how big a guest -- each refused with a typed error, nothing changed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from tests.daemon.migration_helpers import assert_rolled_back, migrate, running_guest
from virtmig.client.migrate import RemoteDest
from virtmig.daemon.backend.base import DEFAULT_MAX_VCPUS, GuestSpec, host_memory_bytes
from virtmig.daemon.backend.qemu.backend import QemuBackend
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.domxml import MAX_NAME_BYTES, MAX_XML_BYTES
from virtmig.daemon.registry import MAX_DOMAINS
from virtmig.daemon.wire import LIST_CHUNK, LIST_REPLY_MAX
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import (
    ConfigUnsupported,
    InvalidArgument,
    NoDomain,
    ResourceExhausted,
    XMLError,
)
from virtmig.proto.flags import REASONS, DomainState
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import Host, domain_xml, hosts, start_host, stop_host

GRPC_MESSAGE_LIMIT = 4 * 1024 * 1024  # gRPC's default on both ends


@pytest.fixture
async def host(tmp_path: Path) -> Host:  # type: ignore[misc]
    h = await start_host(tmp_path, "solo", max_domains=3, test_max_memory_mib=512,
                         test_max_vcpus=8)
    yield h
    await stop_host(h)


def named(name: str, memory_mib: int = 16, vcpus: int = 1, uuid: str | None = None) -> str:
    xml = domain_xml("PLACEHOLDER", memory_mib, uuid=uuid).replace(
        "<vcpu>1</vcpu>", f"<vcpu>{vcpus}</vcpu>")
    return xml.replace("PLACEHOLDER", name)


# --- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a" * 256, "domain name is too long: 256 bytes, the limit is 255 bytes"),
        ("é" * 128, "domain name is too long: 256 bytes, the limit is 255 bytes"),
        ("x" * 1_000_000, "domain name is too long: 1000000 bytes"),
        ("a\x85b", "invalid char in name: 0x85"),  # C1 control (NEL)
        ("a\x7fb", "invalid char in name: 0x7f"),
        ("a/b", "name a/b cannot contain '/'"),
    ],
)
async def test_define_refuses_bad_names(host: Host, name: str, message: str) -> None:
    with pytest.raises(XMLError, match=re.escape(message)) as info:
        await host.conn.define(named(name))
    assert len(str(info.value)) < 200  # the name is not echoed back
    assert await host.conn.list_domains(active=True, inactive=True) == []


async def test_longest_names_are_accepted(host: Host) -> None:
    for name in ("a" * MAX_NAME_BYTES, "€" * (MAX_NAME_BYTES // 3)):  # 255 bytes either way
        await host.conn.define(named(name))
        assert (await host.conn.lookup(name)).name == name


async def test_lookups_refuse_overlong_names(host: Host) -> None:
    long = "x" * 1_000_000
    for call in (host.conn.lookup, host.conn.start, host.conn.destroy, host.conn.xml_desc,
                 host.conn.job_info):
        with pytest.raises(InvalidArgument, match="domain name is too long") as info:
            await call(long)
        assert len(str(info.value)) < 200
    with pytest.raises(NoDomain):  # at the limit: an ordinary lookup
        await host.conn.lookup("x" * MAX_NAME_BYTES)


async def test_lookup_by_overlong_uuid_is_refused(host: Host) -> None:
    with pytest.raises(InvalidArgument, match="domain uuid is too long: 100000 characters"):
        host.daemon.registry.by_uuid("a" * 100_000)


@pytest.mark.parametrize("dname", ["n" * 256, "a/b", "a\x01b"])
async def test_migration_refuses_bad_new_names(pair: tuple[Host, Host], dname: str) -> None:
    src, dst = pair
    await running_guest(src)
    params = TypedParams.of({MigrateParam.DEST_NAME: dname})
    with pytest.raises(InvalidArgument):
        await migrate(src, dst, params=params)
    await assert_rolled_back(src, dst)
    with pytest.raises(InvalidArgument):  # Finish too, before it looks anything up
        await RemoteDest(dst.conn, True).finish(params, b"", 0, False)


# --- how many domains, how big a reply -----------------------------------------------------------


def test_worst_case_list_reply_fits_in_one_message() -> None:
    """LIST_REPLY_MAX domains with the longest names, ids and reasons: one List reply (and
    a ListStream chunk, LIST_CHUNK of them, is far smaller)."""
    reason = max((reason_name.name for e in REASONS.values() for reason_name in e),
                 key=len).lower()
    worst = pb.Domain(name="€" * (MAX_NAME_BYTES // 3), uuid="0" * 36, id=-1, persistent=True,
                      state=DomainState.PMSUSPENDED, reason=2**31 - 1,  # type: ignore[arg-type]
                      reason_name=reason)
    assert len(worst.name.encode()) == MAX_NAME_BYTES
    reply = pb.ListReply(domains=[worst] * LIST_REPLY_MAX)
    assert reply.ByteSize() < GRPC_MESSAGE_LIMIT
    assert LIST_CHUNK < LIST_REPLY_MAX


def test_max_domains_setting_is_bounded(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    for value in (0, MAX_DOMAINS + 1, '"many"'):
        cfg.write_text(f"max_domains = {value}\n")
        with pytest.raises(InvalidArgument,
                           match=r"invalid max_domains .*: expected (an integer|a whole number)"):
            load_config(build_parser().parse_args(["--config", str(cfg)]))
    cfg.write_text("max_domains = 5\ntest_max_memory_mib = 1024\ntest_max_vcpus = 2\n")
    config = load_config(build_parser().parse_args(["--config", str(cfg)]))
    assert (config.max_domains, config.test_max_memory_mib, config.test_max_vcpus) == (5, 1024, 2)


async def test_define_beyond_max_domains_is_refused(host: Host) -> None:
    names = [c * MAX_NAME_BYTES for c in "abc"]
    for name in names:
        await host.conn.define(named(name))
    with pytest.raises(ResourceExhausted, match=r"the limit \(max_domains\) is 3"):
        await host.conn.define(named("d"))
    uuid = (await host.conn.lookup(names[0])).uuid
    await host.conn.define(named(names[0], memory_mib=32, uuid=uuid))  # redefining adds none
    listed = await host.conn.list_domains(active=True, inactive=True)
    assert sorted(d.name for d in listed) == names
    await host.conn.undefine(names[2])
    await host.conn.define(named("d"))  # room again


async def test_prepare_beyond_max_domains_is_refused(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {"max_domains": 1})) as (src, dst):
        await dst.conn.define(named("resident"))
        await running_guest(src)
        with pytest.raises(ResourceExhausted, match="max_domains"):
            await migrate(src, dst)
        assert (await src.conn.state("vm1"))[0] is DomainState.RUNNING
        assert [d.name for d in await dst.conn.list_domains(inactive=True)] == ["resident"]
        assert not dst.daemon.ports._used


async def test_xml_that_grows_when_normalised_is_refused(host: Host) -> None:
    """A definition within the size limit whose stored form (what GetXML returns) would not be:
    '>' in text is written back as '&gt;'."""
    text = ">" * (MAX_XML_BYTES // 2)
    xml = named("vm1").replace("<vcpu>", f"<description>{text}</description>\n  <vcpu>")
    assert len(xml.encode()) < MAX_XML_BYTES
    with pytest.raises(XMLError, match="domain XML is too large once normalised"):
        await host.conn.define(xml)
    xml = named("vm1").replace("<vcpu>", f"<description>{text[:1000]}</description><vcpu>")
    await host.conn.define(xml)
    assert len((await host.conn.xml_desc("vm1")).encode()) <= MAX_XML_BYTES


# --- guest memory and vCPUs ----------------------------------------------------------------------


async def test_define_refuses_guests_bigger_than_the_backend_hosts(host: Host) -> None:
    with pytest.raises(ConfigUnsupported, match=re.escape(
            "Maximum memory 525312 KiB greater than the test backend's limit of 524288 KiB "
            "(test_max_memory_mib)")):
        await host.conn.define(named("big", memory_mib=513))
    with pytest.raises(ConfigUnsupported, match=re.escape(
            "Maximum CPUs 9 greater than the test backend's limit of 8 (test_max_vcpus)")):
        await host.conn.define(named("wide", vcpus=9))
    await host.conn.define(named("vm1", memory_mib=512, vcpus=8))  # at the limits
    assert [d.name for d in await host.conn.list_domains(inactive=True)] == ["vm1"]


async def test_start_checks_the_limits_in_force(tmp_path: Path) -> None:
    first = await start_host(tmp_path, "solo")
    try:
        await first.conn.define(named("vm1", memory_mib=256))
    finally:
        await stop_host(first)
    again = await start_host(tmp_path, "solo", test_max_memory_mib=128)
    try:
        with pytest.raises(ConfigUnsupported, match="test_max_memory_mib"):
            await again.conn.start("vm1")
        assert (await again.conn.state("vm1"))[0] is DomainState.SHUTOFF
    finally:
        await stop_host(again)


async def test_prepare_refuses_a_guest_bigger_than_the_destination_hosts(tmp_path: Path) -> None:
    async with hosts(tmp_path, "test", ("src", {}),
                     ("dst", {"test_max_memory_mib": 32})) as (src, dst):
        await running_guest(src, memory_mib=64)
        with pytest.raises(ConfigUnsupported, match="Maximum memory 65536 KiB greater"):
            await migrate(src, dst)
        await assert_rolled_back(src, dst)


async def test_default_memory_limit_is_the_hosts_ram(tmp_path: Path) -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert host_memory_bytes() == ram
    spec = GuestSpec(uuid="u", name="n", memory_bytes=1, vcpus=1)
    assert TestBackend().limits(spec).max_memory_bytes == ram
    h = await start_host(tmp_path, "solo")
    try:
        mib = ram // 2**20 + 1024
        with pytest.raises(ConfigUnsupported, match=r"\(the host's RAM\)"):
            await h.conn.define(named("big", memory_mib=mib))
    finally:
        await stop_host(h)


async def test_default_vcpu_limit_is_4096(tmp_path: Path) -> None:
    assert DEFAULT_MAX_VCPUS == 4096
    h = await start_host(tmp_path, "solo")  # test_max_vcpus unset
    try:
        with pytest.raises(ConfigUnsupported, match=re.escape(
                "Maximum CPUs 4097 greater than the test backend's limit of 4096 "
                "(test_max_vcpus)")):
            await h.conn.define(named("wide", vcpus=4097))
        with pytest.raises(ConfigUnsupported, match="Maximum CPUs 4294967295 greater"):
            await h.conn.define(named("wide", vcpus=2**32 - 1))  # the most the XML takes
        assert await h.conn.list_domains(inactive=True) == []
        await h.conn.define(named("vm1", vcpus=4096))
    finally:
        await stop_host(h)


@pytest.mark.parametrize(("machine", "vcpus"),
                         [("", 255), ("pc", 255), ("pc-i440fx-7.2", 255), ("q35", 288),
                          ("pc-q35-7.2", 288)])
def test_qemu_vcpu_limit_follows_the_machine_type(machine: str, vcpus: int) -> None:
    spec = GuestSpec(uuid="u", name="n", memory_bytes=1, vcpus=1, machine=machine)
    limits = QemuBackend().limits(spec)
    assert limits.max_vcpus == vcpus
    assert limits.max_memory_bytes == host_memory_bytes()
    assert f"machine type '{machine or 'pc'}'" in limits.vcpus_source
