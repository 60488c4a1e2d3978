"""Build and cache the QEMU test guest: a Debian kernel, an initramfs whose /init dirties memory.

Concern: tests that migrate a real guest need a kernel and an initramfs; this module produces
them once per machine, in a cache folder, and says clearly (:class:`GuestUnavailable`) when it
cannot.

* The kernel is the ``vmlinuz`` of the Debian package ``linux-image-amd64`` depends on
  (``apt-get download``; the package is never installed, only its ``boot/vmlinuz-*`` member and
  the virtio block driver's modules (:data:`MODULES`, which Debian builds as modules) are
  extracted, into ``modules-<version>/``).  ``$VIRTMIG_GUEST_KERNEL`` names a kernel to use
  instead, and ``$VIRTMIG_GUEST_MODULES`` a folder holding its :data:`MODULES` (none: the
  kernel must have virtio-blk built in for ``disklog``).
* The initramfs is a newc cpio written here: ``/dev/console`` (c 5 1), ``/proc``, ``/init``,
  the static binary compiled from ``dirty.c`` (shipped beside this module; ``$CC``, default
  ``gcc``, ``-static``), and ``/lib/modules/`` with the modules and ``order``, their load order.
* Cache folder: ``$VIRTMIG_GUEST_CACHE`` or ``~/.cache/virtmig/guest``.  A stamp records the
  hashes of the inputs (``dirty.c``, this builder's layout version, the kernel, the modules); a
  build happens only when it does not match.  A file lock serialises concurrent builds.

The guest's kernel command line (:meth:`GuestImage.cmdline`): ``console=ttyS0 quiet panic=-1
dirty_mb=N dirty_rate=R`` and, to log to a disk, ``disklog=/dev/vdX``; /init prints
``DIRTY-READY`` once its memory is filled, then every second ``HEARTBEAT n=<counter>
sum=<checksum> ok=<1|0>``, and with ``disklog`` writes each heartbeat's record to sector n-1 of
that raw block device (:func:`disk_records` reads them back; see ``dirty.c``).

Skipping a test without QEMU or the guest, and finding KVM, is :mod:`virtmig.testing.qemu`'s.

Run ``python -m virtmig.testing`` to build ahead of the tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "dirty.c"
LAYOUT_VERSION = 2  # bump when the initramfs layout or the build flags change
KERNEL_META_PACKAGE = "linux-image-amd64"
COMMAND_TIMEOUT = 600.0
# The virtio block driver and what it needs, in load order (Debian builds them as modules).
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev",
           "virtio_pci", "virtio_blk")
SECTOR = 512
RECORD_MAGIC = b"VMHB"


class GuestUnavailable(Exception):
    """The guest cannot be built here; ``str()`` says why."""


@dataclass(frozen=True)
class GuestImage:
    """The built guest: boot ``kernel`` with ``initrd`` and :meth:`cmdline`."""

    kernel: Path
    initrd: Path

    @staticmethod
    def cmdline(dirty_mb: int = 64, dirty_rate: int = 0, disklog: str = "") -> str:
        """The kernel command line: serial console, no reboot delay, /init's parameters
        (``disklog``: the guest's raw block device to log heartbeats to, e.g. ``/dev/vda``)."""
        line = f"console=ttyS0 quiet panic=-1 dirty_mb={dirty_mb} dirty_rate={dirty_rate}"
        return f"{line} disklog={disklog}" if disklog else line


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


def initramfs(init: bytes, modules: dict[str, bytes] | None = None) -> bytes:
    """The archive: ``modules`` (name -> ``.ko``) go to ``/lib/modules`` with ``order``, the
    names in :data:`MODULES`' order."""
    modules = modules or {}
    order = [m for m in MODULES if m in modules]
    return newc_archive([
        CpioEntry("dev", 0o040755),
        CpioEntry("dev/console", 0o020600, rdev=(5, 1)),
        CpioEntry("proc", 0o040755),
        CpioEntry("init", 0o100755, init),
        CpioEntry("lib", 0o040755),
        CpioEntry("lib/modules", 0o040755),
        *(CpioEntry(f"lib/modules/{m}.ko", 0o100644, modules[m]) for m in order),
        CpioEntry("lib/modules/order", 0o100644, "".join(f"{m}.ko\n" for m in order).encode()),
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


def fetch_kernel(cache: Path) -> tuple[Path, dict[str, bytes]]:
    """The kernel and its :data:`MODULES` (name -> ``.ko``; the ones found): downloaded once
    and extracted into ``cache``, or ``$VIRTMIG_GUEST_KERNEL``/``$VIRTMIG_GUEST_MODULES``."""
    override = os.environ.get("VIRTMIG_GUEST_KERNEL")
    if override:
        path = Path(override)
        if not path.is_file():
            raise GuestUnavailable(f"VIRTMIG_GUEST_KERNEL={override} is not a file")
        folder = os.environ.get("VIRTMIG_GUEST_MODULES")
        return path, _read_modules(Path(folder)) if folder else {}
    try:
        package = kernel_package()
    except GuestUnavailable:
        cached = sorted(cache.glob("vmlinuz-*-amd64"))
        if cached:  # no apt here, but a kernel from an earlier build
            version = cached[-1].name.removeprefix("vmlinuz-")
            return cached[-1], _read_modules(cache / f"modules-{version}")
        raise
    version = package.removeprefix("linux-image-")
    target, modules_dir = cache / f"vmlinuz-{version}", cache / f"modules-{version}"
    if target.is_file() and (modules_dir / "complete").is_file():
        return target, _read_modules(modules_dir)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)  # apt's _apt sandbox user writes here when it can
        _run(["apt-get", "download", "-q", package], cwd=work)
        debs = sorted(work.glob("*.deb"))
        if not debs:
            raise GuestUnavailable(f"apt-get download {package} produced no .deb")
        vmlinuz, modules = _extract_kernel(debs[0])
        part = target.with_name(target.name + ".part")
        part.write_bytes(vmlinuz)
        part.replace(target)
        modules_dir.mkdir(exist_ok=True)
        for name, data in modules.items():
            (modules_dir / f"{name}.ko").write_bytes(data)
        (modules_dir / "complete").write_text("\n".join(sorted(modules)) + "\n")
    return target, modules


def _read_modules(folder: Path) -> dict[str, bytes]:
    return {m: (folder / f"{m}.ko").read_bytes() for m in MODULES
            if (folder / f"{m}.ko").is_file()}


def _extract_kernel(deb: Path) -> tuple[bytes, dict[str, bytes]]:
    """The ``./boot/vmlinuz-*`` member of a kernel .deb and its :data:`MODULES` (via
    ``dpkg-deb --fsys-tarfile``)."""
    try:
        proc = subprocess.Popen(
            ["dpkg-deb", "--fsys-tarfile", str(deb)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
    except FileNotFoundError:
        raise GuestUnavailable("dpkg-deb is not installed") from None
    assert proc.stdout is not None
    found: bytes | None = None
    modules: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                vmlinuz = re.fullmatch(r"(\./)?boot/vmlinuz-[^/]+", member.name)
                module = re.fullmatch(r"(\./)?lib/modules/[^/]+/kernel/drivers/.*/([^/]+)\.ko",
                                      member.name)
                name = module.group(2) if module else ""
                if not member.isfile() or not (vmlinuz or name in MODULES):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                if vmlinuz:
                    found = f.read()
                else:
                    modules[name] = f.read()
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()
    if found is None:
        raise GuestUnavailable(f"{deb.name} holds no boot/vmlinuz-*")
    return found, modules


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
        initrd = cache / "initrd.cpio"
        stamp_path = cache / "stamp.json"
        inputs = {
            "layout": LAYOUT_VERSION,
            "dirty.c": _sha256(SOURCE.read_bytes()),
            "kernel": _sha256(kernel.read_bytes()),
            "modules": {m: _sha256(data) for m, data in sorted(modules.items())},
        }
        try:
            stamp = json.loads(stamp_path.read_text())
        except (OSError, ValueError):
            stamp = {}
        if (
            stamp.get("inputs") == inputs
            and initrd.is_file()
            and stamp.get("initrd") == _sha256(initrd.read_bytes())
        ):
            return GuestImage(kernel, initrd)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
            archive = initramfs(compile_init(Path(tmp)), modules)
        part = initrd.with_name(initrd.name + ".part")
        part.write_bytes(archive)
        part.replace(initrd)
        stamp_path.write_text(json.dumps({"inputs": inputs, "initrd": _sha256(archive)}, indent=1))
        return GuestImage(kernel, initrd)

