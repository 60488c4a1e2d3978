"""The kernel the QEMU test guest boots, without QEMU: the PVH ``vmlinux`` taken out of an
xz-compressed bzImage (:func:`virtmig.testing.guest.pvh_kernel`), and the guest looked up once per
process (:func:`virtmig.testing.guest_or_skip`)."""

from __future__ import annotations

import lzma
import os
import shutil
import struct
from pathlib import Path

import pytest

from virtmig.testing import guest, qemu
from virtmig.testing.guest import GuestImage, GuestUnavailable, ensure_guest, pvh_elf, pvh_kernel

DIGEST = "0123456789abcdef" * 4


def pvh_note(descsz: int) -> bytes:
    """An ELF note "Xen", type 18 (XEN_ELFNOTE_PHYS32_ENTRY), with a ``descsz``-byte entry."""
    entry = b"\x50\x08\x00\x01" + b"\0" * (descsz - 4)
    return struct.pack("<III", 4, descsz, 18) + b"Xen\0" + entry


def elf(note: bytes = pvh_note(8)) -> bytes:
    return b"\x7fELF\x02\x01\x01" + b"\0" * 57 + b"text" * 100 + note + b"data" * 100


def bzimage(payload: bytes) -> bytes:
    """Real-mode setup and decompressor, the xz payload, then the tail a bzImage has."""
    return b"MZ" + b"\0" * 510 + b"HdrS" + b"\x90" * 2000 + lzma.compress(
        payload, format=lzma.FORMAT_XZ) + b"\0" * 64


def test_pvh_elf_is_the_uncompressed_kernel_with_a_pvh_entry() -> None:
    assert pvh_elf(bzimage(elf())) == elf()
    assert pvh_elf(bzimage(elf(pvh_note(4)))) == elf(pvh_note(4))


@pytest.mark.parametrize("image", [
    bzimage(elf(b"")),  # no PVH entry: only the real-mode path boots it
    bzimage(elf(struct.pack("<III", 4, 8, 17) + b"Xen\0" + b"\0" * 8)),  # another Xen note
    bzimage(b"\x7fELF\x01\x01\x01" + pvh_note(8)),  # a 32-bit ELF
    bzimage(b"not an ELF at all" + pvh_note(8)),
    b"MZ" + b"\x1f\x8b\x08\x00" + b"\0" * 100,  # gzip or another compression
    b"MZ" + b"\xfd7zXZ\x00" + b"garbage" * 10,  # a broken xz stream
], ids=["no-note", "other-note", "elf32", "no-elf", "not-xz", "broken-xz"])
def test_pvh_elf_refuses_what_qemu_could_not_boot_through_pvh(image: bytes) -> None:
    assert pvh_elf(image) is None


def test_pvh_kernel_is_written_once_beside_the_kernel(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(guest.PVH_ENV, raising=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(elf()))
    cache = tmp_path / "cache"
    cache.mkdir()
    boot = pvh_kernel(kernel, cache, DIGEST)
    assert boot == cache / f"vmlinux-{DIGEST[:16]}" and boot.read_bytes() == elf()
    inode = boot.stat().st_ino
    assert pvh_kernel(kernel, cache, DIGEST) == boot and boot.stat().st_ino == inode  # kept
    assert not list(cache.glob("*.part"))
    monkeypatch.setenv(guest.PVH_ENV, "0")  # opted out: the bzImage
    assert pvh_kernel(kernel, cache, DIGEST) == kernel


def test_a_kernel_without_pvh_is_booted_as_it_is(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(guest.PVH_ENV, raising=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(elf(b"")))
    assert pvh_kernel(kernel, tmp_path, DIGEST) == kernel
    assert not list(tmp_path.glob("vmlinux-*"))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds /init with gcc")
def test_ensure_guest_boots_the_pvh_kernel(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(guest.PVH_ENV, raising=False)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(bzimage(elf()))
    monkeypatch.setenv("VIRTMIG_GUEST_KERNEL", str(kernel))
    monkeypatch.delenv("VIRTMIG_GUEST_MODULES", raising=False)
    image = ensure_guest(tmp_path / "cache")
    assert image.kernel.parent == tmp_path / "cache" and image.kernel.name.startswith("vmlinux-")
    assert image.kernel.read_bytes() == elf()
    monkeypatch.setenv(guest.PVH_ENV, "0")
    assert ensure_guest(tmp_path / "cache") == GuestImage(kernel, image.initrd)  # same initrd


def test_guest_or_skip_asks_once_per_process_and_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu, "_guests", {})
    monkeypatch.delenv(qemu.REQUIRE_ENV, raising=False)
    monkeypatch.delenv(guest.PVH_ENV, raising=False)
    calls: list[str | None] = []
    image = GuestImage(tmp_path / "vmlinux", tmp_path / "initrd.cpio")

    def ensure() -> GuestImage:
        calls.append(os.environ.get(guest.PVH_ENV))
        if os.environ.get("VIRTMIG_GUEST_KERNEL") == "missing":
            raise GuestUnavailable("no such kernel")
        return image

    monkeypatch.setattr(qemu, "ensure_guest", ensure)
    assert qemu.guest_or_skip() is image and qemu.guest_or_skip() is image
    assert calls == [None]
    monkeypatch.setenv(guest.PVH_ENV, "0")  # another environment: asked again
    assert qemu.guest_or_skip() is image
    assert calls == [None, "0"]
    monkeypatch.setenv("VIRTMIG_GUEST_KERNEL", "missing")  # a failure is kept too
    for _ in range(2):
        with pytest.raises(pytest.skip.Exception, match="no such kernel"):
            qemu.guest_or_skip()
    assert calls == [None, "0", "0"]
