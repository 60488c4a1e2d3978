"""The ``qemu`` backend's network interfaces: ``<interface>`` -> command line (fast, no QEMU),
and real QEMUs reading each model and MAC back, taps and bridges created and removed.

The real-QEMU tests create taps and a throw-away bridge, so they need root (CAP_NET_ADMIN):
without it they are skipped, unless ``VIRTMIG_REQUIRE_QEMU=1`` (then they fail).  Every tap and
bridge they make has a name of their own (``vmq...``) and is removed by name in a ``finally``,
even when the test fails; no traffic is sent anywhere.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import guest_xml, make_spec, to, within
from virtmig.daemon.backend.base import BackendError, MigrationStatus, MigrationTuning
from virtmig.daemon.backend.qemu import GuestFiles, QemuBackend, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.caps import EmulatorCaps
from virtmig.daemon.backend.qemu.config import canonical_xml
from virtmig.daemon.backend.qemu.net import NicConfig, assign_macs, generate_mac
from virtmig.daemon.backend.qemu.tap import bridge_refusal
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported
from virtmig.testing import free_port, qemu_required, wait_until

backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src
dst = backend_qemu_helpers.dst

MAC = "52:54:00:12:34:56"
SETTINGS = QemuSettings(emulators=("/usr/bin/qemu-system-x86_64",))


def iface(kind: str = "user", body: str = "", mac: str | None = MAC, attrs: str = "") -> str:
    mac_el = f"<mac address='{mac}'/>" if mac is not None else ""
    return f"<interface type='{kind}'{attrs}>{mac_el}{body}</interface>"


def nics(*interfaces: str) -> tuple[NicConfig, ...]:
    return parse_config(make_spec(guest_xml(devices="".join(interfaces))), None, SETTINGS).nics


def argv(*interfaces: str, fds: tuple[int, ...] | None = None) -> list[str]:
    cfg = parse_config(make_spec(guest_xml(devices="".join(interfaces))), None, SETTINGS)
    files = GuestFiles(nics=fds if fds is not None else tuple(
        20 + i if n.needs_tap else -1 for i, n in enumerate(cfg.nics)))
    return cfg.argv(files, incoming=False)


# --- parsing and the command line ----------------------------------------------------------------


def test_user_networking_models_and_macs() -> None:
    line = argv(iface(mac="52:54:00:AB:cd:01"),
                iface(body="<model type='virtio'/>", mac="52:54:00:00:00:02"),
                iface(body="<model type='e1000'/>", mac="52:54:00:00:00:03"),
                iface(body="<model type='rtl8139'/>", mac="02:00:00:00:00:04"))
    pairs = [(line[i], line[i + 1]) for i in range(len(line) - 1)
             if line[i] in ("-netdev", "-device") and "net" in line[i + 1]]
    assert pairs == [
        ("-netdev", "user,id=hostnet0"),
        # default model; PCI slots from 0x03 (pci.py: 0x01 PIIX3, 0x02 kept for video)
        ("-device", "rtl8139,netdev=hostnet0,id=net0,mac=52:54:00:ab:cd:01,bus=pci.0,addr=0x03"),
        ("-netdev", "user,id=hostnet1"),
        ("-device", "virtio-net-pci,netdev=hostnet1,id=net1,mac=52:54:00:00:00:02,bus=pci.0,"
                    "addr=0x04"),
        ("-netdev", "user,id=hostnet2"),
        ("-device", "e1000,netdev=hostnet2,id=net2,mac=52:54:00:00:00:03,bus=pci.0,addr=0x05"),
        ("-netdev", "user,id=hostnet3"),
        ("-device", "rtl8139,netdev=hostnet3,id=net3,mac=02:00:00:00:00:04,bus=pci.0,addr=0x06"),
    ]


def test_taps_are_descriptors() -> None:
    line = " ".join(argv(iface("ethernet", "<target dev='tap-web.1'/><model type='virtio'/>"),
                         iface("bridge", "<source bridge='br0'/>", mac="52:54:00:00:00:09")))
    assert "-netdev tap,id=hostnet0,fd=20 -device virtio-net-pci,netdev=hostnet0" in line
    assert "-netdev tap,id=hostnet1,fd=21 -device rtl8139,netdev=hostnet1" in line
    # QEMU never names, creates or configures a tap, and runs no script
    assert "ifname" not in line and "script" not in line and "br0" not in line
    assert "tap-web.1" not in line
    with pytest.raises(ValueError, match="needs its tap's descriptor"):
        argv(iface("ethernet"), fds=(-1,))
    with pytest.raises(ValueError):  # one descriptor per interface
        argv(iface("ethernet"), fds=())


def test_files_pass_the_taps() -> None:
    assert GuestFiles(disks=(3,), nics=(-1, 7, 8)).fds == (3, 7, 8)


def test_nic_values() -> None:
    user, eth, named, bridged = nics(
        iface(body="<link state='down'/>"),
        iface("ethernet", "<target dev='vnet7'/><model type='virtio'/><link state='up'/>",
              mac="52:54:00:00:00:01"),
        iface("ethernet", "<target dev='web0'/>", mac="52:54:00:00:00:02"),
        iface("bridge", "<source bridge='virbr0'/><target dev='web1'/>",
              mac="52:54:00:00:00:03"))
    assert (user.kind, user.link_up, user.needs_tap, user.id) == ("user", False, False, "net0")
    assert (eth.tap, eth.tap_name, eth.vnet_hdr, eth.link_up) == ("", "vnet%d", True, True)
    assert (named.tap, named.tap_name, named.vnet_hdr, named.bridge) == ("web0", "web0", False, "")
    assert (bridged.kind, bridged.bridge, bridged.tap, bridged.index) == \
        ("bridge", "virbr0", "web1", 3)


REFUSED = [
    ("network", "<interface type='network'><mac address='52:54:00:00:00:01'/>"
                "<source network='default'/></interface>", "type 'network'"),
    ("no-type", "<interface><mac address='52:54:00:00:00:01'/></interface>", "needs a type"),
    ("direct", iface("direct"), "type 'direct'"),
    ("vhostuser", iface("vhostuser"), "type 'vhostuser'"),
    ("mac-empty", iface(body="", mac=""), "<mac address=''> is not a MAC address"),
    ("mac-no-address", iface(body="<mac/>", mac=None), "<mac address=''> is not a MAC address"),
    ("mac-form", iface(mac="52:54:00:12:34"), "'52:54:00:12:34'> is not a MAC address"),
    ("mac-multicast", iface(mac="01:00:5e:00:00:01"), "is a multicast address"),
    ("mac-zero", iface(mac="00:00:00:00:00:00"), "all zeros"),
    ("mac-type", "<interface type='user'><mac address='52:54:00:00:00:01' type='static'/>"
                 "</interface>", "attribute 'type' of <mac>"),
    ("mac-check", "<interface type='user'><mac address='52:54:00:00:00:01' check='no'/>"
                  "</interface>", "attribute 'check' of <mac>"),
    ("mac-twice", iface() + iface(), "<mac address='52:54:00:12:34:56'> used twice"),
    ("two-macs", iface(body="<mac address='52:54:00:00:00:02'/>"), "element <mac> given twice"),
    ("model", iface(body="<model type='ne2k_pci'/>"), "<model type='ne2k_pci'>"),
    ("model-empty", iface(body="<model/>"), "<model type=''>"),
    ("link", iface(body="<link state='flapping'/>"), "<link state='flapping'>"),
    ("interface-attr", iface(attrs=" trustGuestRxFilters='yes'"),
     "attribute 'trustGuestRxFilters' of <interface>"),
    ("address", iface(body="<address type='drive' controller='0'/>"),
     "attribute 'controller' of <address>"),
    ("alias", iface(body="<alias name='net0'/>"), "element <alias>"),
    ("boot", iface(body="<boot order='1'/>"), "element <boot>"),
    ("driver", iface(body="<driver name='vhost' queues='4'/>"), "element <driver>"),
    ("script", iface("ethernet", "<script path='/tmp/x.sh'/>"), "element <script>"),
    ("bandwidth", iface(body="<bandwidth><inbound average='1'/></bandwidth>"),
     "element <bandwidth>"),
    ("mtu", iface(body="<mtu size='9000'/>"), "element <mtu>"),
    ("rom", iface(body="<rom bar='off'/>"), "element <rom>"),
    ("ip", iface(body="<ip address='10.0.2.15' prefix='24'/>"), "element <ip>"),
    ("portforward", iface(body="<portForward proto='tcp'/>"), "element <portForward>"),
    ("namespaced", iface(body="<x:tune xmlns:x='urn:x'/>"), "element <{urn:x}tune>"),
    ("user-source", iface(body="<source bridge='br0'/>"),
     "element <source> (not for type 'user')"),
    ("user-target", iface(body="<target dev='tap0'/>"), "element <target> (not for type 'user')"),
    ("ethernet-source", iface("ethernet", "<source dev='eth0'/>"),
     "element <source> (not for type 'ethernet')"),
    ("target-managed", iface("ethernet", "<target dev='tap0' managed='no'/>"),
     "attribute 'managed' of <target>"),
    ("target-name", iface("ethernet", "<target dev='../eth0'/>"),
     "<target dev='../eth0'> is not an interface name"),
    ("target-long", iface("ethernet", "<target dev='abcdefghijklmnop'/>"),
     "is not an interface name"),
    ("target-template", iface("ethernet", "<target dev='tap%d'/>"), "is not an interface name"),
    ("target-twice", iface("ethernet", "<target dev='web0'/>")
     + iface("ethernet", "<target dev='web0'/>", mac="52:54:00:00:00:02"),
     "<target dev='web0'> used twice"),
    ("bridge-missing", iface("bridge"), "needs <source bridge=...>"),
    ("bridge-name", iface("bridge", "<source bridge='br 0'/>"), "<source bridge='br 0'>"),
    ("bridge-network", iface("bridge", "<source bridge='br0' network='x'/>"),
     "attribute 'network' of <source>"),
    ("nested", iface(body="<model type='virtio'><driver/></model>"), "element <model><driver>"),
    ("text", iface(body="<model type='virtio'>fast</model>"), "text in <model>"),
    ("text-interface", iface(body="<model type='virtio'/>fast"), "text in <interface>"),
]


@pytest.mark.parametrize(("devices", "message"), [r[1:] for r in REFUSED],
                         ids=[r[0] for r in REFUSED])
def test_refused_naming_it(devices: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        QemuBackend(SETTINGS).validate(make_spec(guest_xml(devices=devices)))
    assert "unsupported device <interface" in str(info.value)
    assert message in str(info.value)


def test_generated_macs() -> None:
    rng = random.Random(7)
    macs = {generate_mac(rng=rng) for _ in range(50)}
    assert all(m.startswith("52:54:00:") and len(m) == 17 for m in macs)
    assert len(macs) > 40
    taken = [generate_mac(rng=random.Random(1))]
    assert generate_mac(taken, random.Random(1)) != taken[0]  # a taken one is drawn again

    root = etree.fromstring(guest_xml(devices=iface(mac=None) + iface(body="<mac/>", mac=None)
                                      + iface(mac="52:54:00:00:00:01")))
    assert assign_macs(root, random.Random(3))
    got = [m.get("address") for m in root.findall("devices/interface/mac")]
    assert got[2] == "52:54:00:00:00:01" and len(set(got)) == 3
    assert all(str(m).startswith("52:54:00:") for m in got)
    assert not assign_macs(root)  # nothing left to fill
    # the filled-in definition is accepted
    nics(*(etree.tostring(i).decode() for i in root.findall("devices/interface")))


def test_macs_generated_at_define() -> None:
    # canonical_xml (Backend.canonicalize: define, Prepare, Begin) writes a MAC into each
    # interface without one; the machine type is pinned in the same pass.
    xml = guest_xml(devices="<!-- kept -->" + iface(mac=None) + iface(mac="52:54:00:00:00:01")
                    + iface("ethernet", "<model type='virtio'/>", mac=None))
    spec = make_spec(xml)
    caps = {SETTINGS.emulators[0]: EmulatorCaps(frozenset({"pc-i440fx-7.2"}),
                                                {"pc": "pc-i440fx-7.2"})}
    stored = canonical_xml(spec, caps, SETTINGS)
    root = etree.fromstring(stored)
    got = [str(m.get("address")) for m in root.findall("devices/interface/mac")]
    assert len(got) == 3 and got[1] == "52:54:00:00:00:01" and len(set(got)) == 3
    assert all(re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", m) for m in got)
    assert "<!-- kept -->" in stored
    assert parse_domain_xml(stored).machine == "pc-i440fx-7.2"
    cfg = parse_config(make_spec(stored), None, SETTINGS)
    assert [n.mac for n in cfg.nics] == got
    # Stable: canonicalising again (Prepare, Begin) changes nothing.
    assert canonical_xml(make_spec(stored), caps, SETTINGS) == stored
    assert canonical_xml(make_spec(stored), None, SETTINGS) == stored
    # Random: another definition gets other MACs.
    again = etree.fromstring(canonical_xml(spec, None, SETTINGS))
    assert [m.get("address") for m in again.findall("devices/interface/mac")] != got
    # Without that step (no daemon), QEMU picks the MAC: nothing is invented per start.
    line = argv(iface(mac=None))
    assert "rtl8139,netdev=hostnet0,id=net0,bus=pci.0,addr=0x03" in line
    assert not any("mac=" in a for a in line)


def test_bridge_refusal(tmp_path: Path) -> None:
    (tmp_path / "br0" / "bridge").mkdir(parents=True)
    (tmp_path / "eth0").mkdir()
    assert bridge_refusal("br0", str(tmp_path)) == ""
    assert bridge_refusal("eth0", str(tmp_path)) == "'eth0' is not a bridge"
    assert bridge_refusal("br1", str(tmp_path)) == "bridge 'br1' does not exist on this host"


# --- real QEMU: models read back, taps and bridges -----------------------------------------------

# (vendor, device) of each model's PCI function
PCI_IDS = {"virtio": (0x1AF4, 0x1000), "e1000": (0x8086, 0x100E), "rtl8139": (0x10EC, 0x8139)}


def need_root() -> None:
    if os.geteuid() != 0:
        reason = "creating taps and bridges needs root (CAP_NET_ADMIN)"
        if qemu_required():
            pytest.fail(f"{reason} (and VIRTMIG_REQUIRE_QEMU=1)", pytrace=False)
        pytest.skip(reason)


def ifname() -> str:
    return f"vmq{secrets.token_hex(4)}"  # ours: removed by name


def exists(name: str) -> bool:
    return os.path.lexists(f"/sys/class/net/{name}")


def sysfs(name: str, attr: str) -> str:
    """An attribute of interface ``name`` from ``/sys/class/net``."""
    return Path(f"/sys/class/net/{name}/{attr}").read_text().strip()


def add_bridge(name: str, mtu: int = 1500) -> None:
    subprocess.run(["ip", "link", "add", "name", name, "mtu", str(mtu), "type", "bridge"],
                   check=True, capture_output=True)


@contextlib.contextmanager
def removed_after(*names: str) -> Iterator[None]:
    """Whatever happens, the interfaces named are deleted afterwards."""
    try:
        yield
    finally:
        for name in names:
            if exists(name):
                subprocess.run(["ip", "link", "delete", name], check=False,
                               capture_output=True)


async def qom_mac(backend: QemuBackend, uuid: str, dev: str) -> Any:
    return await backend.query(uuid, "qom-get",
                               {"path": f"/machine/peripheral/{dev}", "property": "mac"})


@pytest.mark.qemu
async def test_models_and_macs_read_back(src: QemuBackend) -> None:
    models = list(PCI_IDS)
    watched: list[tuple[str, Any]] = []
    run = src._exec_any

    async def watch(guest: Any, command: str, args: Any = None, *a: Any, **k: Any) -> object:
        watched.append((command, args))
        return await run(guest, command, args, *a, **k)

    src._exec_any = watch  # type: ignore[method-assign]
    devices = "".join(iface(body=f"<model type='{m}'/>" + ("<link state='down'/>" if i else ""),
                            mac=f"52:54:00:00:01:{i:02x}") for i, m in enumerate(models))
    spec = make_spec(guest_xml(devices=devices))
    await within(src.start(spec, paused=True))
    pci = await src.query(spec.uuid, "query-pci")
    found = {d["qdev_id"]: (d["id"]["vendor"], d["id"]["device"])
             for bus in pci for d in bus["devices"] if d.get("qdev_id")}
    for i, model in enumerate(models):
        assert found[f"net{i}"] == PCI_IDS[model]
        assert await qom_mac(src, spec.uuid, f"net{i}") == f"52:54:00:00:01:{i:02x}"
    hmp = await src.query(spec.uuid, "human-monitor-command", {"command-line": "info network"})
    assert hmp.count("type=user") == 3
    # <link state='down'>: set before the vCPUs ever ran, and QEMU took it
    links = [a for c, a in watched if c == "set_link"]
    assert links == [{"name": "net1", "up": False}, {"name": "net2", "up": False}]


@pytest.mark.qemu
async def test_ethernet_tap_created_and_removed(src: QemuBackend) -> None:
    need_root()
    named = ifname()
    with removed_after(named):
        devices = (iface("ethernet", f"<target dev='{named}'/><model type='virtio'/>")
                   + iface("ethernet", mac="52:54:00:00:00:02"))
        spec = make_spec(guest_xml(devices=devices))
        before = set(os.listdir("/sys/class/net"))
        await within(src.start(spec, paused=True))
        new = set(os.listdir("/sys/class/net")) - before
        assert named in new
        generated = [n for n in new if n.startswith("vnet")]
        assert len(generated) == 1, new
        for tap, mac in ((named, MAC), (generated[0], "52:54:00:00:00:02")):
            assert int(sysfs(tap, "tun_flags"), 16) & 0x0002  # IFF_TAP
            assert sysfs(tap, "address") == "fe" + mac[2:]
            assert int(sysfs(tap, "flags"), 16) & 1  # up
        assert int(sysfs(named, "tun_flags"), 16) & 0x4000  # IFF_VNET_HDR: virtio
        assert not int(sysfs(generated[0], "tun_flags"), 16) & 0x4000  # rtl8139
        assert "fd=" in (await src.query(spec.uuid, "human-monitor-command",
                                         {"command-line": "info network"}))
        # a second guest asking for the same tap name is refused, nothing left behind
        other = make_spec(guest_xml(name="other", devices=iface(
            "ethernet", f"<target dev='{named}'/>", mac="52:54:00:00:00:03")))
        with pytest.raises(BackendError, match=f"'{named}' already exists"):
            await within(src.start(other, paused=True))

        await within(src.destroy(spec.uuid))
        assert not exists(named) and not exists(generated[0])  # gone with QEMU


@pytest.mark.qemu
async def test_bridge_tap_attached_and_missing_bridge_refused(src: QemuBackend) -> None:
    need_root()
    bridge, tap = ifname(), ifname()
    with removed_after(tap, bridge):
        missing = make_spec(guest_xml(devices=iface("bridge", f"<source bridge='{bridge}'/>")))
        with pytest.raises(BackendError, match=f"bridge '{bridge}' does not exist"):
            await within(src.start(missing, paused=True))
        assert src.state(missing.uuid).value == "shutoff"

        add_bridge(bridge, mtu=1400)
        spec = make_spec(guest_xml(devices=iface(
            "bridge", f"<source bridge='{bridge}'/><target dev='{tap}'/><model type='e1000'/>")))
        await within(src.start(spec, paused=False))
        assert os.listdir(f"/sys/class/net/{bridge}/brif") == [tap]
        assert sysfs(tap, "mtu") == "1400"  # the bridge's
        assert await qom_mac(src, spec.uuid, "net0") == MAC
        await within(src.destroy(spec.uuid))
        await wait_until(lambda: not exists(tap), timeout=10, what=f"tap {tap} to go")
        assert os.listdir(f"/sys/class/net/{bridge}/brif") == []
        assert exists(bridge)  # not ours to delete: the test's

        not_bridge = make_spec(guest_xml(devices=iface("bridge", "<source bridge='lo'/>")))
        with pytest.raises(BackendError, match="'lo' is not a bridge"):
            await within(src.start(not_bridge, paused=True))


@pytest.mark.qemu
async def test_migration_recreates_the_tap_on_the_destination_bridge(
    src: QemuBackend, dst: QemuBackend
) -> None:
    """The definition travels; the destination creates its own tap on its bridge of that name
    (here the same host: the destination's definition names another tap)."""
    need_root()
    bridge, src_tap, dst_tap = ifname(), ifname(), ifname()
    with removed_after(src_tap, dst_tap, bridge):
        add_bridge(bridge)
        brif = f"/sys/class/net/{bridge}/brif"

        def nic(tap: str) -> str:
            return iface("bridge", f"<source bridge='{bridge}'/><target dev='{tap}'/>"
                                   "<model type='virtio'/>")

        spec = make_spec(guest_xml(devices=nic(src_tap)))
        await within(src.start(spec, paused=False))
        assert os.listdir(brif) == [src_tap]
        dst_spec = make_spec(guest_xml(uuid=spec.uuid, devices=nic(dst_tap)))
        port = await within(dst.incoming_start(dst_spec, to(free_port())))
        assert sorted(os.listdir(brif)) == sorted([src_tap, dst_tap])
        out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning(max_downtime_ms=50)))
        assert out.status is MigrationStatus.COMPLETED
        assert (await within(dst.incoming_wait(spec.uuid))).status is MigrationStatus.COMPLETED
        assert await qom_mac(dst, spec.uuid, "net0") == MAC
        await within(src.destroy(spec.uuid))
        await wait_until(lambda: os.listdir(brif) == [dst_tap], timeout=10,
                         what="only the destination's tap on the bridge")
        assert not exists(src_tap)
        await within(dst.destroy(spec.uuid))
        await wait_until(lambda: not exists(dst_tap), timeout=10, what="the tap to go")
