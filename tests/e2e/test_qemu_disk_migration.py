"""End to end: a guest keeps writing to a qcow2 disk on shared storage across a live migration.

The test guest (:mod:`virtmig.testing.guest`) booted with ``disklog=/dev/vda`` writes each
heartbeat's record (counter, memory checksum, the record's own checksum) to sector n-1 of its
virtio disk with O_DIRECT|O_SYNC, before printing the heartbeat (the disk is ``vdb`` in the
XML; the guest's kernel names its only virtio disk ``vda`` whatever the target says).  The disk
is a qcow2 image in a folder both daemons have among their ``storage_dirs`` (shared storage), with
``cache='none'``, so the migration is safe without ``VIR_MIGRATE_UNSAFE``.  After the migration
and a few heartbeats on the destination, the destination guest is stopped and the image read
back (``qemu-img convert``): its records must run from 1 without a gap past the switchover,
every one intact and equal to the heartbeat both serial consoles printed for it.

The rerun rule of :mod:`tests.e2e.test_qemu_migration` applies (a destination guest kernel
that crashes under TCG load is QEMU's, not virtmig's).
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.test_qemu_migration import (
    BOOT_TIMEOUT,
    TCG_RERUNS,
    assert_memory_ok,
    lives_on,
    wait_heartbeat,
)
from virtmig.client.migrate import migrate3
from virtmig.client.sequence import Trace
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.testing import (
    DiskRecord,
    GuestImage,
    Host,
    daemon_settings,
    disk_records,
    hosts,
    qemu_domain_xml,
)

pytestmark = [pytest.mark.qemu, TCG_RERUNS]

LOG_DISK_MIB = 4  # 8192 records: over two hours of heartbeats
BEAT = re.compile(rb"HEARTBEAT n=(\d+) sum=([0-9a-f]+) ok=[01]")


def log_disk(path: Path) -> str:
    return ("<disk type='file' device='disk'>"
            "<driver name='qemu' type='qcow2' cache='none' io='native'/>"
            f"<source file='{path}'/><target dev='vdb' bus='virtio'/>"
            "<serial>heartbeat-log</serial></disk>")


def guest_xml(image: GuestImage, uuid: str, image_path: Path) -> str:
    return qemu_domain_xml(image, "vm1", 256, uuid=uuid, dirty_mb=64, dirty_rate=4,
                           devices=log_disk(image_path), disklog="/dev/vda")


def beats(path: Path) -> dict[int, int]:
    """Counter -> memory checksum of every heartbeat line in a serial log."""
    return {int(m.group(1)): int(m.group(2), 16) for m in BEAT.finditer(path.read_bytes())}


def read_records(image_path: Path) -> list[DiskRecord]:
    raw = image_path.with_suffix(".raw")
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image_path),
                    str(raw)], check=True, timeout=60)
    return disk_records(raw.read_bytes())


@pytest.fixture
async def shared_pair(tmp_path: Path, guest_image: GuestImage,
                      ) -> AsyncIterator[tuple[Host, Host, Path]]:
    """Two qemu daemons with a shared storage folder holding an empty qcow2 log disk."""
    del guest_image  # skips without QEMU or the guest
    storage = tmp_path / "shared"
    storage.mkdir(mode=0o755)
    image = storage / "log.qcow2"
    await asyncio.to_thread(subprocess.run, [
        "qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{LOG_DISK_MIB}M"],
        check=True, timeout=60)
    settings = daemon_settings(storage)
    async with hosts(tmp_path, "qemu", ("src", settings), ("dst", settings)) as (src, dst):
        yield src, dst, image


async def test_qcow2_disk_log_continues_across_the_migration(
    shared_pair: tuple[Host, Host, Path], guest_image: GuestImage
) -> None:
    src, dst, image = shared_pair
    uuid = str(uuidlib.uuid4())
    xml = guest_xml(guest_image, uuid, image)
    await src.conn.define(xml)
    await src.conn.start("vm1")
    src_serial, dst_serial = src.serial_log(uuid), dst.serial_log(uuid)
    await wait_heartbeat(src_serial, 2, BOOT_TIMEOUT)
    assert b"DISKLOG-READY dev=/dev/vda" in src_serial.read_bytes()

    trace = Trace()
    await migrate3(src.conn, "vm1", dst.conn, TypedParams.of({MigrateParam.DEST_XML: xml}),
                   MigrateFlags.LIVE, trace=trace)  # cache='none': safe, no UNSAFE needed
    assert trace.calls == ["begin", "prepare", "perform", "finish", "confirm"]
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    last_src = max(beats(src_serial))
    await lives_on(dst, uuid, dst_serial, last_src + 2, 60)
    await dst.conn.destroy("vm1")  # the image at rest, then read back

    records = await asyncio.to_thread(read_records, image)
    assert [r.n for r in records] == list(range(1, len(records) + 1)), "a gap in the disk log"
    assert all(r.intact for r in records)
    assert len(records) >= last_src + 3  # written on both sides of the switchover
    written = {r.n: r.sum for r in records}
    for serial in (src_serial, dst_serial):  # every heartbeat printed has its record
        printed = beats(serial)
        assert printed and all(written.get(n) == total for n, total in printed.items()), \
            f"{serial}: heartbeats {printed} vs disk records"
    assert min(beats(dst_serial)) <= last_src + 2  # the destination went on from the source
    assert_memory_ok(src_serial)
    assert_memory_ok(dst_serial, destination=True)
