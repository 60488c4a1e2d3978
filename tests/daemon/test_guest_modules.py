"""The QEMU test guest's network and disk pieces, without QEMU: module metadata, load order,
modules from a folder, the ``$VIRTMIG_GUEST_*`` overrides, the initramfs layout and the kernel
command line (:mod:`virtmig.testing.kmod`, :mod:`virtmig.testing.guest`)."""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest

from virtmig.testing import guest, qemu_domain_xml
from virtmig.testing.guest import (
    GuestImage,
    GuestUnavailable,
    ensure_guest,
    fetch_kernel,
    initramfs,
)
from virtmig.testing.kmod import (
    DISK_MODULES,
    GUEST_MODULES,
    NIC_MODULES,
    ModuleError,
    depends,
    folder_modules,
    load_order,
    modinfo,
    module_name,
)


def elf_module(modinfo_strings: list[str], other: bytes = b"\0junk=1\0") -> bytes:
    """A minimal ELF64 with a ``.text`` and a ``.modinfo`` section."""
    shstrtab = b"\0.shstrtab\0.text\0.modinfo\0"
    info = b"".join(s.encode() + b"\0" for s in modinfo_strings)
    body = bytearray(64)
    sections = []
    for name_off, data in ((1, shstrtab), (11, other), (17, info)):
        sections.append((name_off, len(body), len(data)))
        body += data
    shoff = len(body)
    body += bytes(64)  # the null section
    for name_off, offset, size in sections:
        body += struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, offset, size, 0, 0, 1, 0)
    body[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", body, 0x28, shoff)
    struct.pack_into("<HHH", body, 0x3A, 64, 4, 1)
    return bytes(body)


def test_modinfo_and_depends() -> None:
    ko = elf_module(["license=GPL", "depends=virtio_ring,virtio,net_failover", "name=virtio_net",
                     "alias=virtio:d00000001v*", "alias=second"])
    info = modinfo(ko)
    assert info["name"] == "virtio_net" and info["alias"] == "virtio:d00000001v*"
    assert "junk" not in info  # another section's strings
    assert depends(ko) == ("virtio_ring", "virtio", "net_failover")
    assert depends(elf_module(["depends=", "name=e1000"])) == ()
    with pytest.raises(ModuleError, match="ELF64"):
        modinfo(b"#!/bin/sh\n" + bytes(100))
    with pytest.raises(ModuleError, match=r"no \.modinfo"):
        modinfo(elf_module([]).replace(b".modinfo", b".modinfx"))


def test_load_order_puts_dependencies_first() -> None:
    deps = {"virtio_net": ("virtio_ring", "virtio", "net_failover"), "virtio": ("virtio_ring",),
            "virtio_ring": (), "net_failover": ("failover",), "failover": (),
            "virtio_pci": ("virtio_ring", "virtio"), "e1000": (), "unused": ()}
    order = load_order(["virtio_pci", "virtio_net", "e1000"], deps)
    assert order == ["virtio_ring", "virtio", "virtio_pci", "failover", "net_failover",
                     "virtio_net", "e1000"]
    with pytest.raises(ModuleError, match="mii is not in the package"):
        load_order(["8139cp"], {"8139cp": ("mii",)})
    with pytest.raises(ModuleError, match="cycle"):
        load_order(["a"], {"a": ("b",), "b": ("a",)})
    assert module_name("8139cp.ko") == "8139cp" and module_name("snd-hda.ko") == "snd_hda"


def test_initramfs_carries_the_modules_in_order() -> None:
    archive = initramfs(b"\x7fELF init", [("virtio", b"V" * 5), ("virtio_net", b"N" * 7)])
    files = dict(_entries(archive))
    assert files["lib/modules/virtio.ko"] == b"VVVVV"
    assert files["lib/modules/virtio_net.ko"] == b"N" * 7
    assert files["lib/modules/order"] == b"virtio\nvirtio_net\n"
    assert files["init"] == b"\x7fELF init"
    assert "lib/modules/order" not in dict(_entries(initramfs(b"init")))  # no modules, no net


def _entries(archive: bytes) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    at = 0
    while True:
        size, namesize = int(archive[at + 54:at + 62], 16), int(archive[at + 94:at + 102], 16)
        name = archive[at + 110:at + 110 + namesize - 1].decode()
        start = (at + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out.append((name, archive[start:start + size]))
        at = (start + size + 3) & ~3


def test_cmdline_asks_for_the_network_and_the_log_disk() -> None:
    assert "net=" not in GuestImage.cmdline(16, 1)
    assert "disklog=" not in GuestImage.cmdline(16, 1)
    line = GuestImage.cmdline(16, 1, udp_port=4242)
    assert line.endswith(" ipv6.disable=1 net=udp:10.0.2.2:4242")
    assert "dirty_mb=16 dirty_rate=1" in line
    assert GuestImage.cmdline(16, 1, disklog="/dev/vda").endswith(" disklog=/dev/vda")
    both = GuestImage.cmdline(16, 1, udp_port=4242, disklog="/dev/vdb").split()
    assert {"net=udp:10.0.2.2:4242", "disklog=/dev/vdb", "ipv6.disable=1"} <= set(both)


def test_cmdline_forces_page_table_isolation_only_when_asked() -> None:
    assert "pti" not in GuestImage.cmdline(16, 1)
    assert GuestImage.cmdline(16, 1, pti=True).endswith(" dirty_rate=1 pti=on")


def test_test_guests_run_with_page_table_isolation_unless_told_not_to() -> None:
    image = GuestImage(Path("k"), Path("i"))

    def cmdline(xml: str) -> list[str]:
        return xml.split("<cmdline>")[1].split("</cmdline>")[0].split()

    assert "pti=on" in cmdline(qemu_domain_xml(image, domain_type="qemu"))
    plain = cmdline(qemu_domain_xml(image, domain_type="qemu", pti=False))
    assert not [opt for opt in plain if opt.startswith("pti")]
    assert "dirty_mb=64" in plain


def test_one_module_set_for_nics_and_disk() -> None:
    assert set(GUEST_MODULES) == {*NIC_MODULES, *DISK_MODULES}
    assert "virtio_blk" in GUEST_MODULES and "virtio_net" in GUEST_MODULES
    assert len(GUEST_MODULES) == len(set(GUEST_MODULES))
    image = GuestImage(Path("k"), Path("i"), ("virtio", "virtio_pci", "virtio_blk"))
    assert not image.has_net
    assert GuestImage(Path("k"), Path("i"), (*NIC_MODULES, "virtio_blk")).has_net
    assert GuestImage(Path("k"), Path("i"), ("virtio_ring", "virtio_net")).has_net


def _module_tree(root: Path) -> None:
    """A folder like /lib/modules/<version>/kernel: e1000 is left out (built in)."""
    for rel, deps in (("drivers/virtio/virtio_ring.ko", ""),
                      ("drivers/virtio/virtio.ko", "virtio_ring"),
                      ("drivers/virtio/virtio_pci.ko", "virtio_ring,virtio"),
                      ("drivers/net/virtio_net.ko", "virtio_ring,virtio,net_failover"),
                      ("drivers/net/net_failover.ko", "failover"),
                      ("net/core/failover.ko", ""),
                      ("drivers/net/ethernet/realtek/8139cp.ko", "mii"),
                      ("drivers/net/mii.ko", ""),
                      ("drivers/block/virtio_blk.ko", "virtio,virtio_ring"),
                      ("sound/snd.ko", "")):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(elf_module([f"depends={deps}", f"name={path.stem}"]))


def test_modules_from_a_folder(tmp_path: Path) -> None:
    _module_tree(tmp_path)
    got = folder_modules(tmp_path)
    names = [name for name, _ in got]
    assert set(names) == {"virtio_ring", "virtio", "virtio_pci", "virtio_net", "net_failover",
                          "failover", "8139cp", "mii", "virtio_blk"}  # no e1000, no snd
    for name, data in got:
        assert all(names.index(dep) < names.index(name) for dep in depends(data))
    assert dict(got)["virtio_blk"] == (tmp_path / "drivers/block/virtio_blk.ko").read_bytes()
    (tmp_path / "drivers/net/mii.ko").unlink()
    with pytest.raises(ModuleError, match=r"module mii \(needed by 8139cp\) is not in"):
        folder_modules(tmp_path)
    with pytest.raises(ModuleError, match="is not a folder"):
        folder_modules(tmp_path / "none")


def test_kernel_and_modules_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    _module_tree(tmp_path / "mods")
    monkeypatch.setenv("VIRTMIG_GUEST_KERNEL", str(kernel))
    monkeypatch.delenv("VIRTMIG_GUEST_MODULES", raising=False)
    assert fetch_kernel(tmp_path / "cache") == (kernel, [])  # no modules: none go in
    monkeypatch.setenv("VIRTMIG_GUEST_MODULES", str(tmp_path / "mods"))
    path, modules = fetch_kernel(tmp_path / "cache")
    assert path == kernel and modules == folder_modules(tmp_path / "mods")
    monkeypatch.setenv("VIRTMIG_GUEST_MODULES", str(tmp_path / "nowhere"))
    with pytest.raises(GuestUnavailable, match=r"VIRTMIG_GUEST_MODULES=.*nowhere"):
        fetch_kernel(tmp_path / "cache")
    monkeypatch.delenv("VIRTMIG_GUEST_KERNEL")
    with pytest.raises(GuestUnavailable, match="without VIRTMIG_GUEST_KERNEL"):
        fetch_kernel(tmp_path / "cache")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds /init with gcc")
def test_builds_of_other_inputs_never_replace_each_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"kernel")
    _module_tree(tmp_path / "mods")
    monkeypatch.setenv("VIRTMIG_GUEST_KERNEL", str(kernel))
    monkeypatch.setenv("VIRTMIG_GUEST_MODULES", str(tmp_path / "mods"))
    cache = tmp_path / "cache"
    first = ensure_guest(cache)
    assert first.initrd.name.startswith("initrd-") and first.has_net
    assert "virtio_blk" in first.modules
    files = dict(_entries(first.initrd.read_bytes()))
    assert files["lib/modules/order"].decode().split() == list(first.modules)
    inode = first.initrd.stat().st_ino
    assert ensure_guest(cache) == first and first.initrd.stat().st_ino == inode  # not rebuilt
    os.utime(first.initrd, (0, 0))
    ensure_guest(cache)  # used again: kept fresh, so never pruned while in use
    assert first.initrd.stat().st_mtime > 0

    # Another checkout (other inputs) sharing the cache builds beside it, never over it.
    stale = cache / "initrd-0123456789abcdef.cpio"
    stale.write_bytes(b"old")
    os.utime(stale, (0, 0))  # unused for ages: pruned at the next build
    monkeypatch.setattr(guest, "LAYOUT_VERSION", guest.LAYOUT_VERSION + 100)
    other = ensure_guest(cache)
    assert other.initrd != first.initrd and first.initrd.stat().st_ino == inode
    assert not stale.exists()
    monkeypatch.delenv("VIRTMIG_GUEST_MODULES")  # no modules: no network
    bare = ensure_guest(cache)
    assert bare.modules == () and not bare.has_net
    assert "lib/modules/order" not in dict(_entries(bare.initrd.read_bytes()))
