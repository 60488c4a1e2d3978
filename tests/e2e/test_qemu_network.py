"""End to end: a guest with a NIC keeps its network across a live migration (issue 12's proof).

The test guest (:mod:`virtmig.testing.guest`) gets an ``<interface type='user'>`` (virtio) and
the kernel command line ``net=udp:10.0.2.2:PORT``: its /init loads the NIC's driver, configures
eth0 and sends every heartbeat line as a UDP datagram to 10.0.2.2, QEMU user networking's
address of the host, which QEMU delivers to the host's 127.0.0.1:PORT, where this test listens.
Nothing leaves the machine: the guest sends only inside QEMU's internal network 10.0.2.0/24
(its /init refuses anything else) and QEMU's slirp turns 10.0.2.2 into the loopback address.

The datagrams keep arriving across the migration, the counter going on, and they now come from
the destination's QEMU: the UDP socket they come from belongs to that process (read from
``/proc``), and they carry the same heartbeats as the destination's serial console.  The
interface is defined without a MAC: the one the daemon generated at define is in ``dumpxml``,
is the NIC's in QEMU, and stays the same on the destination.

The guest's network and its disk log (``disklog``, :mod:`tests.e2e.test_qemu_disk_migration`)
work together too: one guest booted with both sends its heartbeats and writes their records.

Under load a dirtying TCG migration sometimes crashes the destination guest's kernel (see
:mod:`tests.e2e.test_qemu_migration`): such a test is run once more.
"""

from __future__ import annotations

import asyncio
import os
import re
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.e2e.test_qemu_migration import (
    BOOT_TIMEOUT,
    KERNEL_CRASH,
    TCG_RERUNS,
    TcgGuestBroken,
    heartbeats,
    serial_tail,
    wait_heartbeat,
)
from virtmig.client.migrate import migrate3
from virtmig.daemon.backend.qemu import QemuBackend
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    GuestImage,
    Host,
    daemon_settings,
    disk_records,
    hosts,
    qemu_domain_xml,
    qemu_required,
    wait_until,
)

pytestmark = [pytest.mark.qemu, TCG_RERUNS]

DATAGRAM = re.compile(rb"HEARTBEAT n=(\d+) sum=([0-9a-f]+) ok=([01])\n")
SERIAL_BEAT = re.compile(rb"HEARTBEAT n=(\d+) sum=([0-9a-f]+) ok=([01])")


@dataclass
class Beat:
    n: int
    line: bytes  # the heartbeat as sent
    sender: tuple[str, int]  # (address, port) on the host


@dataclass
class Listener(asyncio.DatagramProtocol):
    """The host's end: every heartbeat datagram, in arrival order."""

    beats: list[Beat] = field(default_factory=list)
    junk: list[bytes] = field(default_factory=list)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        m = DATAGRAM.fullmatch(data)
        if m is None:
            self.junk.append(data)
        else:
            self.beats.append(Beat(int(m.group(1)), data.rstrip(b"\n"), addr))


def socket_inodes(port: int) -> set[str]:
    """The inodes of the host's UDP sockets bound to ``port`` (any local address)."""
    inodes = set()
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def owns_socket(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the UDP socket bound to ``port``."""
    wanted = {f"socket:[{inode}]" for inode in socket_inodes(port)}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def qemu_pid(host: Host, uuid: str) -> int:
    backend = host.daemon.backend
    assert isinstance(backend, QemuBackend)
    return backend.pid(uuid)


def need_net(image: GuestImage) -> None:
    if not image.has_net:
        reason = ("the test guest has no virtio-net module (VIRTMIG_GUEST_KERNEL is set, and "
                  "VIRTMIG_GUEST_MODULES does not hold it)")
        if qemu_required():
            pytest.fail(reason, pytrace=False)
        pytest.skip(reason)


def xml_macs(xml: str) -> list[str]:
    return [str(m.get("address")) for m in etree.fromstring(xml).findall("devices/interface/mac")]


async def qom_mac(host: Host, uuid: str) -> Any:
    backend = host.daemon.backend
    assert isinstance(backend, QemuBackend)
    return await backend.query(uuid, "qom-get",
                               {"path": "/machine/peripheral/net0", "property": "mac"})


async def test_nic_keeps_its_network_across_migration(
    qemu_pair: tuple[Host, Host], guest_image: GuestImage, tmp_path: Path
) -> None:
    need_net(guest_image)
    src, dst = qemu_pair
    loop = asyncio.get_running_loop()
    transport, listener = await loop.create_datagram_endpoint(
        Listener, local_addr=("127.0.0.1", 0))
    try:
        port = transport.get_extra_info("sockname")[1]
        uuid = str(uuidlib.uuid4())
        xml = qemu_domain_xml(guest_image, "vm1", 256, uuid=uuid, dirty_mb=16, dirty_rate=1,
                              udp_port=port, mac=None, pti=False)
        await src.conn.define(xml)
        macs = xml_macs(await src.conn.xml_desc("vm1", inactive=True))  # generated at define
        assert len(macs) == 1 and re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", macs[0]), macs
        await src.conn.start("vm1")
        assert await qom_mac(src, uuid) == macs[0]
        src_serial, dst_serial = src.serial_log(uuid), dst.serial_log(uuid)
        await wait_heartbeat(src_serial, 0, BOOT_TIMEOUT)
        assert b"NET-READY dev=eth0 to=10.0.2.2:" in src_serial.read_bytes(), \
            serial_tail(src_serial)
        await wait_until(lambda: len(listener.beats) >= 2, timeout=30,
                         what=lambda: f"heartbeat datagrams; serial {serial_tail(src_serial)!r}")
        src_pid = qemu_pid(src, uuid)
        src_port = listener.beats[-1].sender[1]
        assert owns_socket(src_pid, src_port)  # sent by the source's QEMU
        before = listener.beats[-1].n

        dest_xml = await src.conn.xml_desc("vm1", migratable=True)  # virsh dumpxml --migratable
        assert xml_macs(dest_xml) == macs
        await migrate3(src.conn, "vm1", dst.conn,
                       TypedParams.of({MigrateParam.DEST_XML: dest_xml}), MigrateFlags.LIVE)
        assert await dst.conn.state("vm1") == (DomainState.RUNNING, 2, "migrated")
        assert xml_macs(await dst.conn.xml_desc("vm1")) == macs  # the same MAC there
        assert await qom_mac(dst, uuid) == macs[0]
        dst_pid = qemu_pid(dst, uuid)

        def from_destination() -> list[Beat]:
            return [b for b in listener.beats if b.sender[1] != src_port]

        def arrived() -> bool:
            if KERNEL_CRASH.search(dst_serial.read_bytes()):
                raise TcgGuestBroken(f"serial tail {serial_tail(dst_serial)!r}")
            return len(from_destination()) >= 3

        await wait_until(arrived, timeout=60,
                         what=lambda: f"datagrams from the destination; {listener.beats[-3:]}")
        moved = from_destination()
        dst_port = moved[0].sender[1]
        assert owns_socket(dst_pid, dst_port), "not sent by the destination's QEMU"
        assert not owns_socket(src_pid, dst_port)
        # The source's datagrams all came before, the destination's after, the counter going on
        # (at most one heartbeat lost in the switchover), never backwards.
        assert all(b.sender == ("127.0.0.1", src_port) for b in listener.beats[:-len(moved)])
        assert all(b.sender == ("127.0.0.1", dst_port) for b in moved)
        last_src = listener.beats[-len(moved) - 1].n
        assert last_src >= before and moved[0].n in (last_src + 1, last_src + 2)
        counters = [b.n for b in listener.beats]
        assert counters == sorted(set(counters))
        # The same guest: the destination's datagrams are its serial console's heartbeats.  The
        # guest sends a heartbeat's datagram before it prints the line (dirty.c's say()), and
        # the emulated UART takes a while to write it: wait until the last one is printed too.
        def printed() -> dict[int, bytes]:
            return {int(m.group(1)): m.group(0) for m in SERIAL_BEAT.finditer(
                dst_serial.read_bytes())}

        await wait_until(lambda: all(b.n in printed() for b in moved), timeout=30,
                         what=lambda: f"{moved} on the serial console: {printed()}")
        serial = printed()
        assert all(serial.get(b.n) == b.line for b in moved), (moved, serial)
        assert all(b.line.endswith(b"ok=1") for b in listener.beats)
        assert all(ok for _, ok in heartbeats(dst_serial))
        assert not listener.junk
    finally:
        transport.close()


async def test_network_and_disk_log_together(tmp_path: Path, guest_image: GuestImage) -> None:
    """One guest with both: its /init loads the modules once, brings eth0 up and opens its log
    disk; every heartbeat goes to the serial console, the UDP listener and the disk."""
    need_net(guest_image)
    storage = tmp_path / "images"
    storage.mkdir(mode=0o755)
    disk = storage / "log.raw"
    disk.write_bytes(bytes(1024 * 1024))
    loop = asyncio.get_running_loop()
    transport, listener = await loop.create_datagram_endpoint(
        Listener, local_addr=("127.0.0.1", 0))
    try:
        async with hosts(tmp_path, "qemu", ("src", daemon_settings(storage))) as (src,):
            uuid = str(uuidlib.uuid4())
            log_disk = (f"<disk type='file' device='disk'><driver name='qemu' type='raw'/>"
                        f"<source file='{disk}'/><target dev='vdb' bus='virtio'/></disk>")
            await src.conn.define(qemu_domain_xml(
                guest_image, "vm1", 256, uuid=uuid, dirty_mb=16, dirty_rate=1,
                udp_port=transport.get_extra_info("sockname")[1], devices=log_disk,
                disklog="/dev/vda", pti=False))
            await src.conn.start("vm1")
            serial = src.serial_log(uuid)
            await wait_heartbeat(serial, 3, BOOT_TIMEOUT)
            out = serial.read_bytes()
            assert b"NET-READY dev=eth0 to=10.0.2.2:" in out, serial_tail(serial)
            assert b"DISKLOG-READY dev=/dev/vda" in out, serial_tail(serial)
            assert not any(e in out for e in (b"MODULE-ERROR", b"NET-ERROR", b"DISKLOG-ERROR")), \
                serial_tail(serial)
            await wait_until(lambda: len(listener.beats) >= 3, timeout=30,
                             what=lambda: f"heartbeat datagrams; serial {serial_tail(serial)!r}")
            await src.conn.destroy("vm1")  # the disk at rest, then read back
            printed = {int(m.group(1)): m for m in SERIAL_BEAT.finditer(serial.read_bytes())}
        records = {r.n: r for r in disk_records(disk.read_bytes())}
        assert sorted(records) == list(range(1, len(records) + 1)), "a gap in the disk log"
        assert all(r.intact for r in records.values())
        # Every heartbeat printed has its record on the disk (written first) and its datagram
        # (sent as it is printed) carries the same line.
        assert len(printed) >= 3
        assert all(n in records and records[n].sum == int(m.group(2), 16)
                   for n, m in printed.items()), (records, printed)
        last = max(printed)  # a datagram is sent just before its line is printed
        assert len(listener.beats) >= 3
        assert all(printed[b.n].group(0) == b.line for b in listener.beats if b.n <= last)
        assert not listener.junk
    finally:
        transport.close()
