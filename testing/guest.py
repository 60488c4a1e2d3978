"""Build and cache the QEMU test guest: a Debian kernel, an initramfs whose /init dirties memory.

Concern: tests that migrate a real guest need a kernel and an initramfs; this module produces
them once per machine, in a cache folder, and says clearly (:class:`GuestUnavailable`) when it
cannot.

* The kernel is the ``vmlinuz`` of the Debian package ``linux-image-amd64`` depends on
  (``apt-get download``; the package is never installed, only its ``boot/vmlinuz-*`` member and
  some modules are extracted).
* The modules: the drivers of the guest's NICs and of its virtio log disk, which Debian builds
  as modules (:data:`~virtmig.testing.kmod.GUEST_MODULES`: virtio-net, e1000, 8139cp,
  virtio-blk), and their dependencies, extracted from the same package into
  ``modules-<version>/`` beside the kernel, with an ``order`` file (:mod:`virtmig.testing.kmod`).
* ``$VIRTMIG_GUEST_KERNEL`` names a kernel to use instead, and ``$VIRTMIG_GUEST_MODULES`` (only
  with it) a folder of that kernel's uncompressed ``.ko`` files, searched through its subfolders
  (this cache's ``modules-<version>/``, or an unpacked ``/lib/modules/<version>/kernel``): those
  of :data:`~virtmig.testing.kmod.GUEST_MODULES` found there go in, with their dependencies
  (which must be there too); one not found is taken to be built into the kernel.  Without
  ``$VIRTMIG_GUEST_MODULES`` there are none.  :attr:`GuestImage.has_net` says whether virtio-net
  is in (the network tests skip otherwise); ``disklog`` needs virtio-blk as a module here or
  built into the kernel.
* The initramfs is a newc cpio written here: ``/dev/console`` (c 5 1), ``/proc``, the modules
  as ``/lib/modules/<name>.ko`` with ``/lib/modules/order``, and ``/init``, the static binary
  compiled from ``dirty.c`` (shipped beside this module; ``$CC``, default ``gcc``,
  ``-static``).
* The kernel booted is the ELF ``vmlinux`` inside the bzImage (:func:`pvh_kernel`), where its
  payload is xz-compressed (Debian's is) and it has a PVH entry point (Debian's has, for Xen):
  QEMU loads it directly and starts it in 32-bit mode, skipping the real-mode setup and the
  decompression, which take most of a boot under TCG (on a loaded 2-core machine, 2026-12-02:
  the first kernel line after 2 s instead of 29 s, DIRTY-READY after 12 s instead of 39 s).
  It is written once per kernel beside it, ``vmlinux-<hash>`` (66 MB for Debian's 6.1);
  ``$VIRTMIG_GUEST_PVH=0`` boots the bzImage instead.  Under UEFI (OVMF) only a bzImage boots:
  no test boots this kernel under OVMF.
* Cache folder: ``$VIRTMIG_GUEST_CACHE`` or ``~/.cache/virtmig/guest``.  The initramfs's name
  carries the hash of its inputs (``dirty.c``, this builder's layout version, the kernel, the
  modules): ``initrd-<hash>.cpio``, built only when no file of that name is there (written
  whole, then renamed into place).  So checkouts of different inputs sharing the cache never
  replace the initramfs a running test uses; one unused for a week is removed at the next
  build.  A file lock serialises concurrent builds.

The guest's kernel command line (:meth:`GuestImage.cmdline`): ``console=ttyS0 quiet panic=-1
dirty_mb=N dirty_rate=R``; /init prints ``DIRTY-READY`` once its memory is filled, then every
second ``HEARTBEAT n=<counter> sum=<checksum> ok=<1|0>`` (see ``dirty.c``).  Two optional
features, independent and combinable; either makes /init load the modules first:

* ``net=udp:10.0.2.2:PORT`` (:data:`SLIRP_HOST`: QEMU user networking's address of the host,
  which QEMU delivers to the host's 127.0.0.1): /init configures ``eth0`` as
  :data:`SLIRP_GUEST`/24 and sends each heartbeat line as a UDP datagram to that port too (only
  to an address inside QEMU's user network, 10.0.2.0/24; IPv6 is off).
* ``disklog=/dev/vdX``: /init writes each heartbeat's checksummed record to sector n-1 of that
  raw block device (:func:`disk_records` reads them back).

``pti=on`` (``cmdline(pti=True)``; the default of :func:`~virtmig.testing.qemu_domain_xml`)
forces the kernel's page table isolation on (the default CPU, qemu64, claims to be AMD, so the
kernel leaves it off).  Under QEMU 7.2's TCG a dirtying guest migrated live sometimes breaks
right after the switchover (missed dirty pages, see ``tests/e2e/test_qemu_migration.py``); with
``pti=on`` it did not once in an A/B run under load (0 of 70, against 8 of 69 without; see
``bench/README.md``).  PTI switches CR3 at every kernel entry and exit, and QEMU flushes its
whole software TLB at every CR3 write, so a TLB entry that stopped tracking dirty writes lives
much shorter.

Skipping a test without QEMU or the guest, and finding KVM, is :mod:`virtmig.testing.qemu`'s.

Run ``python -m virtmig.testing`` to build ahead of the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from virtmig.testing.kmod import (
    GUEST_MODULES,
    ModuleError,
    deb_members,
    extract_modules,
    folder_modules,
)

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "dirty.c"
LAYOUT_VERSION = 3  # bump when the initramfs layout or the build flags change
INITRD_DIGEST = 16  # hex digits of the inputs' hash in the initramfs's name
PRUNE_AFTER_S = 7 * 24 * 3600.0  # an initramfs of other inputs unused this long is removed
MODULE_ORDER = "order"  # in a modules folder: the names, one a line, in load order
SLIRP_HOST = "10.0.2.2"  # QEMU user networking: the host (delivered to its 127.0.0.1)
SLIRP_GUEST = "10.0.2.15"  # QEMU user networking: the guest's default address
KERNEL_META_PACKAGE = "linux-image-amd64"
COMMAND_TIMEOUT = 600.0
SECTOR = 512
RECORD_MAGIC = b"VMHB"
PVH_ENV = "VIRTMIG_GUEST_PVH"  # "0": boot the compressed kernel even where a PVH one is made
_XZ_MAGIC = b"\xfd7zXZ\x00"
# The ELF note of a kernel that QEMU can boot through PVH: name "Xen", type 18
# (XEN_ELFNOTE_PHYS32_ENTRY), the 32-bit entry point as its 4- or 8-byte descriptor.
_PVH_NOTES = tuple(struct.pack("<III", 4, size, 18) + b"Xen\x00" for size in (4, 8))


class GuestUnavailable(Exception):
    """The guest cannot be built here; ``str()`` says why."""


@dataclass(frozen=True)
class GuestImage:
    """The built guest: boot ``kernel`` with ``initrd`` and :meth:`cmdline`."""

    kernel: Path
    initrd: Path
    modules: tuple[str, ...] = ()  # the modules in the initramfs, in load order

    @property
    def has_net(self) -> bool:
        """Whether the initramfs has virtio-net, the test guest's NIC (``net=`` works)."""
        return "virtio_net" in self.modules

    @staticmethod
    def cmdline(dirty_mb: int = 64, dirty_rate: int = 0, *, udp_port: int = 0,
                disklog: str = "", pti: bool = False) -> str:
        """The kernel command line: serial console, no reboot delay, /init's parameters.

        ``udp_port``: also send the heartbeat to the host's ``127.0.0.1:udp_port`` through QEMU
        user networking (needs :attr:`has_net` and an ``<interface type='user'>``).
        ``disklog``: the guest's raw block device to log heartbeats to, e.g. ``/dev/vda``.
        ``pti``: ``pti=on``, the kernel's page table isolation forced on (see the module
        docstring: it keeps TCG guests from breaking after a migration)."""
        line = f"console=ttyS0 quiet panic=-1 dirty_mb={dirty_mb} dirty_rate={dirty_rate}"
        if pti:
            line += " pti=on"
        if udp_port:
            line += f" ipv6.disable=1 net=udp:{SLIRP_HOST}:{udp_port}"
        if disklog:
            line += f" disklog={disklog}"
        return line


@dataclass(frozen=True)
class DiskRecord:
    """One heartbeat record /init wrote to its log disk."""

    n: int
    sum: int
    intact: bool  # the record's own checksum matches


def disk_records(raw: bytes) -> list[DiskRecord]:
    """The heartbeat records at the start of a log disk's raw content, up to the first sector
    that holds none (a zero sector: never written).  Record (little-endian, one per 512-byte
    sector n-1): ``VMHB``, u32 version 1, u64 n, u64 sum, u64 check (FNV-1a 64 of the 24
    bytes before it)."""
    out: list[DiskRecord] = []
    for offset in range(0, len(raw) - SECTOR + 1, SECTOR):
        sector = raw[offset:offset + SECTOR]
        if sector[:4] != RECORD_MAGIC:
            break
        n, total, check = (int.from_bytes(sector[i:i + 8], "little") for i in (8, 16, 24))
        out.append(DiskRecord(n, total, check == fnv1a64(sector[:24])))
    return out


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for byte in data:
        h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def cache_dir() -> Path:
    env = os.environ.get("VIRTMIG_GUEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "virtmig" / "guest"


# --- newc cpio -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpioEntry:
    name: str  # without leading "/"
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def newc_archive(entries: list[CpioEntry]) -> bytes:
    """A ``newc`` (SVR4, no CRC) cpio archive of ``entries``, as the kernel's initramfs reads it."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, CpioEntry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        is_trailer = entry.name == "TRAILER!!!"
        fields = (
            0 if is_trailer else ino,  # ino
            entry.mode,
            0,  # uid
            0,  # gid
            1 if is_trailer else (2 if entry.mode & 0o170000 == 0o040000 else 1),  # nlink
            0,  # mtime: reproducible archives
            len(entry.data),
            0,  # dev major
            0,  # dev minor
            entry.rdev[0],
            entry.rdev[1],
            len(name),
            0,  # check
        )
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields))
        out.extend(name)
        pad4()
        out.extend(entry.data)
        pad4()
    return bytes(out)


def initramfs(init: bytes, modules: Sequence[tuple[str, bytes]] = ()) -> bytes:
    """The archive: /dev/console, /proc, the ``(name, .ko)`` modules in /lib/modules (with
    their load ``order``), and /init."""
    mods = [CpioEntry("lib", 0o040755), CpioEntry("lib/modules", 0o040755),
            *(CpioEntry(f"lib/modules/{name}.ko", 0o100644, data) for name, data in modules),
            CpioEntry(f"lib/modules/{MODULE_ORDER}", 0o100644,
                      "".join(f"{name}\n" for name, _ in modules).encode())] if modules else []
    return newc_archive([
        CpioEntry("dev", 0o040755),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("proc", 0o040755),
        *mods,
        CpioEntry("init", 0o100755, init),
    ])


# --- building ------------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise GuestUnavailable(f"{cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise GuestUnavailable(f"{' '.join(cmd)} timed out") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise GuestUnavailable(
            f"{' '.join(cmd)} failed (exit {done.returncode}): "
            + (" / ".join(detail[-3:]) or "no output")
        )
    return done.stdout


def kernel_package() -> str:
    """The versioned package ``linux-image-amd64`` depends on (linux-image-6.1.0-56-amd64)."""
    out = _run(["apt-cache", "depends", KERNEL_META_PACKAGE])
    for line in out.splitlines():
        m = re.match(r"\s*Depends:\s*(linux-image-\S+-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise GuestUnavailable(f"apt-cache knows no kernel package behind {KERNEL_META_PACKAGE}")


def fetch_kernel(cache: Path) -> tuple[Path, list[tuple[str, bytes]]]:
    """The kernel, and the modules for the initramfs: (name, ``.ko``) in load order.

    Downloads the kernel package once and extracts only its vmlinuz and those modules into
    ``cache``; or ``$VIRTMIG_GUEST_KERNEL`` and ``$VIRTMIG_GUEST_MODULES``."""
    override = os.environ.get("VIRTMIG_GUEST_KERNEL")
    folder = os.environ.get("VIRTMIG_GUEST_MODULES")
    if override:
        path = Path(override)
        if not path.is_file():
            raise GuestUnavailable(f"VIRTMIG_GUEST_KERNEL={override} is not a file")
        try:
            return path, folder_modules(Path(folder)) if folder else []
        except (ModuleError, OSError) as exc:
            raise GuestUnavailable(f"VIRTMIG_GUEST_MODULES={folder}: {exc}") from None
    if folder:
        raise GuestUnavailable("VIRTMIG_GUEST_MODULES is set without VIRTMIG_GUEST_KERNEL (the "
                               "modules must be that kernel's)")
    try:
        package = kernel_package()
    except GuestUnavailable:
        cached = sorted(cache.glob("vmlinuz-*-amd64"))
        if cached:  # no apt here, but a kernel (and its modules) from an earlier build
            mods = cache / cached[-1].name.replace("vmlinuz-", "modules-", 1)
            return cached[-1], read_modules(mods) if (mods / MODULE_ORDER).is_file() else []
        raise
    version = package.removeprefix("linux-image-")
    target, mods = cache / f"vmlinuz-{version}", cache / f"modules-{version}"
    if not (target.is_file() and _has_modules(mods)):
        _download(package, cache, target, mods)
    return target, read_modules(mods)


def _download(package: str, cache: Path, target: Path, mods: Path) -> None:
    """``package``'s vmlinuz to ``target`` and its modules to the folder ``mods`` (those
    missing)."""
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt sandbox user writes here when it can
        _run(["apt-get", "download", "-q", package], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise GuestUnavailable(f"apt-get download {package} produced no .deb")
        if not target.is_file():
            part = target.with_name(target.name + ".part")
            part.write_bytes(_extract_vmlinuz(debs[0]))
            part.replace(target)
        if not _has_modules(mods):
            _write_modules(debs[0], mods, work / "modules")


def _has_modules(folder: Path) -> bool:
    """Whether the modules folder holds every one of :data:`GUEST_MODULES` (one an earlier
    layout extracted, with fewer, is extracted again)."""
    try:
        return set(GUEST_MODULES) <= set((folder / MODULE_ORDER).read_text().split())
    except OSError:
        return False


def _extract_vmlinuz(deb: Path) -> bytes:
    """The ``./boot/vmlinuz-*`` member of a kernel .deb (via ``dpkg-deb --fsys-tarfile``)."""
    try:
        with contextlib.closing(deb_members(deb, lambda name: bool(
                re.fullmatch(r"(\./)?boot/vmlinuz-[^/]+", name)))) as members:
            for _, data in members:
                return data
    except ModuleError as exc:
        raise GuestUnavailable(str(exc)) from None
    raise GuestUnavailable(f"{deb.name} holds no boot/vmlinuz-*")


def _write_modules(deb: Path, target: Path, work: Path) -> None:
    """The guest's modules from ``deb`` and their ``order`` file, into the folder ``target``."""
    try:
        modules = extract_modules(deb)
    except ModuleError as exc:
        raise GuestUnavailable(f"cannot extract the guest's kernel modules: {exc}") from None
    work.mkdir()
    for name, data in modules:
        (work / f"{name}.ko").write_bytes(data)
    (work / MODULE_ORDER).write_text("".join(f"{name}\n" for name, _ in modules))
    if target.exists():  # an incomplete or older one
        shutil.rmtree(target)
    work.rename(target)


def read_modules(folder: Path) -> list[tuple[str, bytes]]:
    """(name, .ko) of a modules folder with its ``order`` file, in load order."""
    names = (folder / MODULE_ORDER).read_text().split()
    return [(name, (folder / f"{name}.ko").read_bytes()) for name in names]


def compile_init(work: Path) -> bytes:
    cc = os.environ.get("CC", "gcc")
    out = work / "init"
    _run([cc, "-static", "-O2", "-Wall", "-o", str(out), str(SOURCE)])
    return out.read_bytes()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Hold the cache folder's lock (one builder or prober at a time, across processes)."""
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_guest(cache: Path | None = None) -> GuestImage:
    """Build the guest into the cache if needed (idempotent); GuestUnavailable says why not."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    with cache_lock(cache):
        kernel, modules = fetch_kernel(cache)
        inputs = {
            "layout": LAYOUT_VERSION,
            "dirty.c": _sha256(SOURCE.read_bytes()),
            "kernel": _sha256(kernel.read_bytes()),
            "modules": [[name, _sha256(data)] for name, data in modules],
        }
        digest = _sha256(json.dumps(inputs, sort_keys=True).encode())[:INITRD_DIGEST]
        initrd = cache / f"initrd-{digest}.cpio"
        boot = pvh_kernel(kernel, cache, str(inputs["kernel"]))
        image = GuestImage(boot, initrd, tuple(name for name, _ in modules))
        if initrd.is_file():  # only ever there whole (renamed into place)
            if time.time() - initrd.stat().st_mtime > PRUNE_AFTER_S / 2:
                os.utime(initrd)  # in use: not pruned (rarely: the KVM probe's key has it)
            return image
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            archive = initramfs(compile_init(Path(tmp)), modules)
        part = initrd.with_name(initrd.name + ".part")
        part.write_bytes(archive)
        part.replace(initrd)
        _prune(cache, keep=initrd)
        return image


def _prune(cache: Path, keep: Path) -> None:
    """Remove the initramfs builds of other inputs, and the PVH kernels of other kernels,
    that nobody used for :data:`PRUNE_AFTER_S`."""
    for old in [*cache.glob("initrd-*.cpio"), *cache.glob("vmlinux-*")]:
        with contextlib.suppress(OSError):
            if old != keep and time.time() - old.stat().st_mtime > PRUNE_AFTER_S:
                old.unlink()


def pvh_kernel(kernel: Path, cache: Path, digest: str) -> Path:
    """The kernel to boot: ``kernel`` (a bzImage) as the uncompressed ELF ``vmlinux`` inside it
    where that can be booted through PVH, else ``kernel`` itself (see the module docstring).

    Made once per kernel, as ``vmlinux-<digest prefix>`` in ``cache`` (written whole, then
    renamed into place; the caller holds the cache lock); ``$VIRTMIG_GUEST_PVH=0``: ``kernel``.
    """
    if os.environ.get(PVH_ENV, "") == "0":
        return kernel
    target = cache / f"vmlinux-{digest[:INITRD_DIGEST]}"
    if target.is_file():
        if time.time() - target.stat().st_mtime > PRUNE_AFTER_S / 2:
            os.utime(target)  # in use: not pruned
        return target
    elf = pvh_elf(kernel.read_bytes())
    if elf is None:
        return kernel
    part = target.with_name(target.name + ".part")
    part.write_bytes(elf)
    part.replace(target)
    return target


def pvh_elf(bzimage: bytes) -> bytes | None:
    """The ELF kernel an xz-compressed bzImage carries, if it has a PVH entry point; else None
    (another compression, no ELF, no PVH note)."""
    start = bzimage.find(_XZ_MAGIC)
    if start < 0:
        return None
    try:  # (the decompressor stops at the end of the xz stream: the bzImage's tail is ignored)
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[start:])
    except lzma.LZMAError:
        return None
    if not elf.startswith(b"\x7fELF\x02\x01") or not any(n in elf for n in _PVH_NOTES):
        return None
    return elf
