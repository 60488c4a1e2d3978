"""The QEMU test guest's network pieces, without QEMU: module metadata, load order, the
initramfs layout and the kernel command line (:mod:`virtmig.testing.kmod`,
:mod:`virtmig.testing.guest`)."""

from __future__ import annotations

import struct

import pytest

from virtmig.testing.guest import GuestImage, initramfs
from virtmig.testing.kmod import ModuleError, depends, load_order, modinfo, module_name


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


def test_cmdline_asks_for_the_network() -> None:
    assert "net=" not in GuestImage.cmdline(16, 1)
    line = GuestImage.cmdline(16, 1, udp_port=4242)
    assert line.endswith(" ipv6.disable=1 net=udp:10.0.2.2:4242")
    assert "dirty_mb=16 dirty_rate=1" in line
