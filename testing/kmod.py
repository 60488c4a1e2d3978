"""Kernel modules for the QEMU test guest: which ``.ko`` files it needs, in load order.

Concern: the Debian kernel builds the drivers of the test guest's devices as modules: the NICs
(``virtio_net``, ``e1000``, ``8139cp``, and ``virtio_pci`` under them, :data:`NIC_MODULES`) and
the virtio block device its heartbeat log disk is on (``virtio_blk``, :data:`DISK_MODULES`).
So the test guest's initramfs carries them and its /init loads them (``finit_module``) when
asked for its network or its log disk.  This module reads a module's dependencies from its own
``.modinfo`` ELF section (the ``.deb`` ships no ``modules.dep``: ``depmod`` makes it at install),
resolves :data:`GUEST_MODULES` to the closure of their dependencies, and takes those files from
the kernel's ``.deb`` (read as a stream, nothing installed, :func:`extract_modules`) or from a
folder of ``.ko`` files (:func:`folder_modules`, for ``$VIRTMIG_GUEST_MODULES``).
"""

from __future__ import annotations

import re
import struct
import subprocess
import tarfile
from collections.abc import Callable, Generator, Iterable, Mapping
from pathlib import Path

# The guest's NIC drivers (virtio-net-pci, e1000, rtl8139) and virtio's PCI transport.
NIC_MODULES = ("virtio_pci", "virtio_net", "e1000", "8139cp")  # QEMU's rtl8139 is a C+
# The driver of the guest's log disk (virtio-blk-pci).
DISK_MODULES = ("virtio_pci", "virtio_blk")
# Every module the test guest carries (before their dependencies).
GUEST_MODULES = tuple(dict.fromkeys((*NIC_MODULES, *DISK_MODULES)))
_KO_RE = re.compile(r"(\./)?lib/modules/[^/]+/kernel/.+/([^/]+)\.ko")


class ModuleError(Exception):
    """The modules cannot be had from this package; ``str()`` says why."""


def module_name(filename: str) -> str:
    """A module's name from its file name (``8139too.ko`` -> ``8139too``; ``-`` reads ``_``)."""
    return filename.removesuffix(".ko").replace("-", "_")


def modinfo(data: bytes) -> dict[str, str]:
    """The ``key=value`` strings of an ELF64 module's ``.modinfo`` section (first of each)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ModuleError("not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:  # name offset, file offset, size
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", names_at + name_off)
        if data[names_at + name_off:end] == b".modinfo":
            info: dict[str, str] = {}
            for item in data[offset:offset + size].split(b"\0"):
                key, sep, value = item.decode(errors="replace").partition("=")
                if sep and key not in info:
                    info[key] = value
            return info
    raise ModuleError("no .modinfo section")


def depends(data: bytes) -> tuple[str, ...]:
    """The modules a module needs loaded first."""
    return tuple(d for d in modinfo(data).get("depends", "").split(",") if d)


def load_order(roots: Iterable[str], deps: Mapping[str, tuple[str, ...]]) -> list[str]:
    """``roots`` and everything they depend on, each after its dependencies."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise ModuleError(f"module dependency cycle through {name}")
        if name not in deps:
            raise ModuleError(f"module {name} is not in the package")
        visiting.add(name)
        for dep in deps[name]:
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(root)
    return order


def deb_members(deb: Path, want: Callable[[str], bool]) -> Generator[tuple[str, bytes], None, None]:
    """(path, content) of each regular file of the ``.deb``'s data that ``want`` selects."""
    try:
        proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        raise ModuleError("dpkg-deb is not installed") from None
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                if member.isfile() and want(member.name):
                    f = tar.extractfile(member)
                    if f is not None:
                        yield member.name, f.read()
    finally:
        proc.stdout.close()
        proc.kill()
        proc.wait()


def extract_modules(deb: Path, roots: Iterable[str] = GUEST_MODULES) -> list[tuple[str, bytes]]:
    """(name, ``.ko`` content) of ``roots`` and their dependencies, in load order.

    Two passes over the package: the first reads every module's dependencies (keeping the
    roots'), the second fetches the dependencies' files.
    """
    roots = tuple(roots)
    deps: dict[str, tuple[str, ...]] = {}
    kept: dict[str, bytes] = {}
    for path, data in deb_members(deb, lambda p: bool(_KO_RE.fullmatch(p))):
        name = module_name(path.rsplit("/", 1)[-1])
        deps[name] = depends(data)
        if name in roots:
            kept[name] = data
    order = load_order(roots, deps)
    missing = set(order) - set(kept)
    if missing:
        for path, data in deb_members(deb, lambda p: bool(
                (m := _KO_RE.fullmatch(p)) and module_name(m.group(2)) in missing)):
            kept[module_name(path.rsplit("/", 1)[-1])] = data
    lost = [name for name in order if name not in kept]
    if lost:
        raise ModuleError(f"{deb.name}: cannot read module(s) {', '.join(lost)}")
    return [(name, kept[name]) for name in order]


def folder_modules(folder: Path, roots: Iterable[str] = GUEST_MODULES) -> list[tuple[str, bytes]]:
    """(name, ``.ko`` content) of those of ``roots`` found in ``folder`` (searched through its
    subfolders; a root not there is taken to be built into the kernel) and their dependencies
    (which must be there), in load order."""
    if not folder.is_dir():
        raise ModuleError(f"{folder} is not a folder")
    paths: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.ko")):
        if path.is_file():
            paths.setdefault(module_name(path.name), path)
    found = [root for root in roots if root in paths]
    kept: dict[str, bytes] = {}
    deps: dict[str, tuple[str, ...]] = {}
    todo = list(found)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept[name] = paths[name].read_bytes()
        deps[name] = depends(kept[name])
        for dep in deps[name]:
            if dep not in paths:
                raise ModuleError(f"module {dep} (needed by {name}) is not in {folder}")
            todo.append(dep)
    order = load_order(found, deps)
    return [(name, kept[name]) for name in order]
