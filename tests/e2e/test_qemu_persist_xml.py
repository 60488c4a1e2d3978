"""Two ``qemu`` daemons: the definition given with ``--persistent-xml`` (``VIR_MIGRATE_PARAM_
PERSIST_XML``) is pinned on the destination as a define there would pin it (``pc`` -> the
emulator's concrete machine type, libvirt's default memory balloon written in) before it is
stored.  The guest is tiny and idle (SeaBIOS only, TCG).
"""

from __future__ import annotations

import textwrap
import uuid as uuidlib
from pathlib import Path

import pytest

from virtmig.client.migrate import migrate3
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import hosts, qemu_binary_or_skip

pytestmark = pytest.mark.qemu

PINNED = "pc-i440fx-7.2"  # what QEMU 7.2's "pc" stands for


def guest_xml(uuid: str, machine: str, memory_mib: int) -> str:
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>persist</name>
          <uuid>{uuid}</uuid>
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='{machine}'>hvm</type></os>
          <devices/>
        </domain>
        """)


async def test_persistent_xml_is_canonicalized_on_the_destination(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        uuid = str(uuidlib.uuid4())
        await src.conn.define(guest_xml(uuid, "pc", 64))
        await src.conn.start("persist")
        given = guest_xml(uuid, "pc", 96)  # an alias, no balloon: as a user would write it
        params = TypedParams.of({"persistent_xml": given})
        await migrate3(src.conn, "persist", dst.conn, params,
                       MigrateFlags.LIVE | MigrateFlags.PERSIST_DEST)
        stored = await dst.conn.xml_desc("persist", inactive=True)
        d = parse_domain_xml(stored)
        assert d.memory_kib == 96 * 1024  # the given definition, not the source's
        assert d.machine == PINNED  # pinned, as a define on the destination pins it
        assert "<memballoon model=\"virtio\"><address type=\"pci\"" in stored  # and its slot
        assert parse_domain_xml(await dst.conn.xml_desc("persist")).memory_kib == 64 * 1024
        on_disk = (dst.state_dir / "domains" / f"{uuid}.xml").read_text()
        assert parse_domain_xml(on_disk).machine == PINNED
