"""Two ``qemu`` daemons: a guest with a pty console, a guest-agent channel, VNC, a video card and
NICs is defined (PCI addresses and the channel's socket pinned, ``dumpxml --inactive`` shows
them), started (its live XML shows the pty QEMU allocated and the VNC port it took, which
``virtmig ttyconsole`` reads) and live-migrated: the destination runs the same PCI layout and
writes its own pty and VNC port into its live XML.

The guest is tiny and idle (SeaBIOS only, TCG): no kernel, no TCG kernel crash.
"""

from __future__ import annotations

import os
import textwrap
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from virtmig.client.cli.domains import console_tty
from virtmig.client.migrate import migrate3
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, hosts, qemu_binary_or_skip

pytestmark = pytest.mark.qemu


def guest_xml(uuid: str) -> str:
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>devs</name>
          <uuid>{uuid}</uuid>
          <memory unit='MiB'>64</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <devices>
            <serial type='pty'><target port='0'/></serial>
            <console type='pty'><target type='serial' port='0'/></console>
            <channel type='unix'>
              <target type='virtio' name='org.qemu.guest_agent.0'/>
            </channel>
            <interface type='user'><model type='virtio'/></interface>
            <interface type='user'><model type='e1000'/></interface>
            <graphics type='vnc' autoport='yes'/>
            <video><model type='vga'/></video>
          </devices>
        </domain>
        """)


async def pci_layout(host: Host, uuid: str) -> dict[str, tuple[int, int, int]]:
    pci = await host.daemon.backend.query(uuid, "query-pci")  # type: ignore[attr-defined]
    return {d["qdev_id"]: (d["slot"], d["id"]["vendor"], d["id"]["device"])
            for bus in pci for d in bus["devices"] if d.get("qdev_id")}


def value(xml: str, path: str, name: str) -> Any:
    el = etree.fromstring(xml.encode()).find(path)
    assert el is not None, path
    return el.get(name)


async def test_devices_defined_started_and_migrated(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        uuid = str(uuidlib.uuid4())
        await src.conn.define(guest_xml(uuid))
        stored = await src.conn.xml_desc("devs", inactive=True)
        slots = {tag: value(stored, f"devices/{tag}/address", "slot")
                 for tag in ("video", "interface", "controller")}
        assert slots == {"video": "0x02", "interface": "0x04", "controller": "0x03"}
        assert value(stored, "devices/channel/source", "path") == \
            str(src.state_dir / "backend" / "qemu" / uuid / "channel0.sock")
        assert value(stored, "devices/console", "tty") is None  # nothing runs yet
        await src.conn.start("devs")

        live = await src.conn.xml_desc("devs")
        tty = console_tty(live)
        assert tty.startswith("/dev/pts/") and os.path.exists(tty)  # noqa: ASYNC240
        assert value(live, "devices/serial/source", "path") == tty
        vnc = await src.daemon.backend.query(uuid, "query-vnc")  # type: ignore[attr-defined]
        assert value(live, "devices/graphics", "port") == vnc["service"]
        before = await pci_layout(src, uuid)
        assert set(before) == {"video0", "virtio-serial0", "net0", "net1", "usb", "balloon0"}

        dom = await migrate3(src.conn, "devs", dst.conn, TypedParams(), MigrateFlags.LIVE)
        assert dom.uuid == uuid
        assert (await dst.conn.state("devs"))[0] is DomainState.RUNNING
        assert await pci_layout(dst, uuid) == before
        dst_live = await dst.conn.xml_desc("devs")
        dst_tty = console_tty(dst_live)
        assert dst_tty.startswith("/dev/pts/") and dst_tty != tty  # its own pty
        dst_vnc = await dst.daemon.backend.query(uuid, "query-vnc")  # type: ignore[attr-defined]
        assert value(dst_live, "devices/graphics", "port") == dst_vnc["service"]
        assert value(dst_live, "devices/channel/source", "path") == \
            str(dst.state_dir / "backend" / "qemu" / uuid / "channel0.sock")
