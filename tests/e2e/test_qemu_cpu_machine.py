"""Two ``qemu`` daemons: a guest with a CPU topology, hot-pluggable vCPUs, a custom CPU model
and a pinned machine type runs with exactly that (read back from QMP), and a live migration
gives the destination the same vCPUs, CPU and machine.  A ``host-passthrough`` guest (KVM)
migrates only to a host with the same CPU (the source's digest of it travels in cookie A).

The guest is tiny and idle (SeaBIOS only, TCG): no kernel, so no guest kernel can crash under
a TCG migration, and it starts in well under a second.
"""

from __future__ import annotations

import textwrap
import uuid as uuidlib
from pathlib import Path
from typing import Any

import pytest

from virtmig.client.migrate import migrate3
from virtmig.daemon.backend.qemu.confine import ROOT_USER, kvm_refusal, run_as
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.errors import OperationInvalid
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import Host, guest_or_skip, hosts, kvm_usable, qemu_binary_or_skip
from virtmig.testing.qemu import kvm_boots
from virtmig.testing.qemu_user import qemu_settings

pytestmark = pytest.mark.qemu

PINNED = "pc-i440fx-7.2"  # what QEMU 7.2's "pc" stands for


def guest_xml(uuid: str) -> str:
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>cpus</name>
          <uuid>{uuid}</uuid>
          <memory unit='MiB'>64</memory>
          <vcpu placement='static' current='2'>4</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type><boot dev='hd'/></os>
          <features><acpi/><apic/></features>
          <cpu mode='custom' match='exact' check='full'>
            <model fallback='forbid'>Nehalem</model>
            <feature policy='disable' name='sse4.2'/>
            <topology sockets='2' dies='1' cores='2' threads='1'/>
          </cpu>
          <clock offset='utc'><timer name='hpet' present='no'/></clock>
          <on_reboot>restart</on_reboot>
          <devices><memballoon model='none'/></devices>
        </domain>
        """)


async def readback(host: Host, uuid: str) -> dict[str, Any]:
    """What QEMU says it runs: vCPUs (online and pluggable), CPU model and flag, machine."""
    q = host.daemon.backend.query  # type: ignore[attr-defined]
    online = await q(uuid, "query-cpus-fast")
    pluggable = await q(uuid, "query-hotpluggable-cpus")
    cpu0 = online[0]["qom-path"]
    return {
        "online": sorted((c["props"]["socket-id"], c["props"]["core-id"]) for c in online),
        "slots": sorted((c["props"]["socket-id"], c["props"]["core-id"], "qom-path" in c)
                        for c in pluggable),
        "cpu_type": await q(uuid, "qom-get", {"path": cpu0, "property": "type"}),
        "sse4.2": await q(uuid, "qom-get", {"path": cpu0, "property": "sse4.2"}),
        "machine": await q(uuid, "qom-get", {"path": "/machine", "property": "type"}),
        "acpi": await q(uuid, "qom-get", {"path": "/machine", "property": "acpi"}),
        "hpet": await q(uuid, "qom-get", {"path": "/machine", "property": "hpet"}),
        "boot": await q(uuid, "qom-get", {"path": "/machine", "property": "boot"}),
    }


async def test_cpu_topology_model_and_pinned_machine_survive_migration(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        uuid = str(uuidlib.uuid4())
        await src.conn.define(guest_xml(uuid))
        stored = parse_domain_xml(await src.conn.xml_desc("cpus", inactive=True))
        assert stored.machine == PINNED  # pinned at define, shown by dumpxml
        await src.conn.start("cpus")

        before = await readback(src, uuid)
        assert before["online"] == [(0, 0), (0, 1)]  # current='2' of sockets=2 x cores=2
        assert before["slots"] == [(0, 0, True), (0, 1, True), (1, 0, False), (1, 1, False)]
        assert before["cpu_type"] == "Nehalem-x86_64-cpu" and before["sse4.2"] is False
        assert before["machine"] == f"{PINNED}-machine"
        assert (before["acpi"], before["hpet"]) == ("on", False)
        assert before["boot"]["order"] == "c"

        migratable = parse_domain_xml(await src.conn.xml_desc("cpus", migratable=True))
        assert migratable.machine == PINNED  # what the destination is told to run
        dom = await migrate3(src.conn, "cpus", dst.conn, TypedParams(), MigrateFlags.LIVE)
        assert dom.uuid == uuid
        assert (await dst.conn.state("cpus"))[0] is DomainState.RUNNING
        assert await readback(dst, uuid) == before
        live = parse_domain_xml(await dst.conn.xml_desc("cpus"))
        assert live.machine == PINNED


PASSTHROUGH_XML = """\
<domain type='kvm'>
  <name>pt</name>
  <uuid>{uuid}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <cpu mode='host-passthrough' migratable='on'/>
  <devices><memballoon model='none'/></devices>
</domain>
"""


async def test_host_passthrough_moves_only_to_a_host_with_the_same_cpu(tmp_path: Path) -> None:
    qemu_binary_or_skip()
    if not kvm_usable() or not kvm_boots(guest_or_skip()):
        # (a nested KVM may open and answer, yet run no guest: here QEMU aborted setting an MSR)
        pytest.skip("host-passthrough needs a KVM that runs guests (virtmig.testing.qemu)")
    # KVM is usable here, but maybe not by QEMU's test user (a /dev/kvm of root:root 0600, no
    # group kvm): then QEMU runs as root in this test, which is about the CPU check, not about
    # confinement (the daemon's own judgement, kvm_refusal, is what would refuse the guest).
    confined = not kvm_refusal(run_as(qemu_settings()))
    settings: dict[str, object] = {} if confined else {"qemu_user": ROOT_USER}
    async with hosts(tmp_path, "qemu", ("src", settings), ("dst", settings)) as (src, dst):
        uuid = str(uuidlib.uuid4())
        await src.conn.define(PASSTHROUGH_XML.format(uuid=uuid))
        await src.conn.start("pt")
        dst.daemon.backend._cpu_digest = "0" * 64  # type: ignore[attr-defined]  # another CPU
        with pytest.raises(OperationInvalid, match="this host's CPU differs from the source"):
            await migrate3(src.conn, "pt", dst.conn, TypedParams(), MigrateFlags.LIVE)
        assert (await src.conn.state("pt"))[0] is DomainState.RUNNING
        assert await dst.conn.list_domains(active=True, inactive=True) == []  # none left

        dst.daemon.backend._cpu_digest = ""  # type: ignore[attr-defined]  # its own, read again
        await migrate3(src.conn, "pt", dst.conn, TypedParams(), MigrateFlags.LIVE)
        assert (await dst.conn.state("pt"))[0] is DomainState.RUNNING
        cpus = await dst.daemon.backend.query(uuid, "query-cpus-fast")  # type: ignore[attr-defined]
        assert await dst.daemon.backend.query(  # type: ignore[attr-defined]
            uuid, "qom-get", {"path": cpus[0]["qom-path"], "property": "type"}) == \
            "host-x86_64-cpu"
