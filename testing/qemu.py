"""QEMU on this machine, for tests: is it there, may guests use KVM, and the clean-up net.

* Skip rules (:func:`qemu_binary_or_skip`, :func:`guest_or_skip`): when QEMU or the test guest
  is unavailable, the calling pytest test is skipped with the reason, unless
  ``VIRTMIG_REQUIRE_QEMU=1``, in which case it fails.  pytest is imported only then: this
  package does not depend on it.  The guest is looked up (and built) once per process.
* Acceleration (:func:`guest_domain_type`): test guests run under KVM where it runs them, else
  under TCG.  Where it runs them: ``/dev/kvm`` opens read-write and answers
  ``KVM_GET_API_VERSION`` (:func:`kvm_usable`), and the test guest, booted once with
  ``-accel kvm``, reaches its /init (:func:`kvm_boots`).  The second check is needed: a KVM
  can pass the first and still not run a stock kernel (a nested, paravirtual KVM such as PVM
  hangs it in the switch to protected mode).  That boot's answer is kept in the guest's cache
  folder (``kvm.json``, keyed by host kernel, QEMU binary and guest image; delete it to ask
  again).  ``$VIRTMIG_GUEST_ACCEL`` (``kvm`` or ``tcg``) decides instead.
* :func:`kill_leftover_qemus`: the finalizers' safety net for QEMU processes a test left behind.
* :func:`device_set`: what a running guest's QEMU says its machine is (PCI devices and slots,
  block devices, named peripherals and their types, vCPUs and CPU type, machine type), as one
  comparable value: a migration's source and destination must give the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NoReturn

from virtmig.testing.guest import GuestImage, GuestUnavailable, cache_lock, ensure_guest
from virtmig.testing.wait import WaitTimeout, wait_until_sync

QEMU_BINARY = "qemu-system-x86_64"
REQUIRE_ENV = "VIRTMIG_REQUIRE_QEMU"
ACCEL_ENV = "VIRTMIG_GUEST_ACCEL"
KVM_DEVICE = "/dev/kvm"
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_API_VERSION = 12  # the only stable version there has been
KVM_BOOT_TIMEOUT = 30.0  # the test guest reaches /init in about a second under a working KVM


def qemu_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _skip_or_fail(reason: str) -> NoReturn:
    import pytest

    if qemu_required():
        pytest.fail(f"{reason} (and {REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason)


def qemu_binary_or_skip() -> str:
    """The QEMU binary's path; skips the test without it (fails with VIRTMIG_REQUIRE_QEMU=1)."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        _skip_or_fail(f"{QEMU_BINARY} is not installed")
    return path


# What ensure_guest() answered in this process, by the environment that decides it: it asks
# apt-cache which kernel package is current, seconds on a loaded machine, and a test may call
# guest_or_skip() several times.
_GUEST_ENV = ("VIRTMIG_GUEST_CACHE", "VIRTMIG_GUEST_KERNEL", "VIRTMIG_GUEST_MODULES",
              "VIRTMIG_GUEST_PVH")
_guests: dict[tuple[str | None, ...], GuestImage | str] = {}


def guest_or_skip() -> GuestImage:
    """The built test guest; skips the test if it cannot be built (fails when required).

    Built or found once per process (and environment, :data:`_GUEST_ENV`): later calls give the
    same answer without asking apt again."""
    key = tuple(os.environ.get(name) for name in _GUEST_ENV)
    found = _guests.get(key)
    if found is None:
        try:
            found = ensure_guest()
        except GuestUnavailable as exc:
            found = str(exc)
        _guests[key] = found
    if isinstance(found, str):
        _skip_or_fail(f"cannot build the QEMU test guest: {found}")
    return found


@functools.cache
def kvm_usable() -> bool:
    """Whether this process can run KVM guests: ``/dev/kvm`` opens read-write and speaks API 12."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def kvm_boots(image: GuestImage) -> bool:
    """Whether the test guest ``image`` boots under KVM here (see the module docstring).

    Asked once per machine: the answer is kept in the guest's cache folder.
    """
    binary = shutil.which(QEMU_BINARY)
    if binary is None or not kvm_usable():
        return False
    return _kvm_boots(image, binary)


@functools.cache
def _kvm_boots(image: GuestImage, binary: str) -> bool:
    qemu = os.stat(binary)
    key = {
        "host": os.uname().release,
        "qemu": [binary, qemu.st_size, qemu.st_mtime_ns],
        "guest": [str(image.kernel), str(image.initrd), image.initrd.stat().st_mtime_ns],
    }
    cache = image.initrd.parent / "kvm.json"
    with cache_lock(image.initrd.parent):
        with contextlib.suppress(OSError, ValueError):
            known = json.loads(cache.read_text())
            if known.get("key") == key:
                return bool(known["boots"])
        boots = _boot_once(image, binary)
        with contextlib.suppress(OSError):  # (not kept: asked again by the next process)
            cache.write_text(json.dumps({"key": key, "boots": boots}, indent=1))
        return boots


def _boot_once(image: GuestImage, binary: str) -> bool:
    """Boot ``image`` with ``-accel kvm``: does its /init say DIRTY-READY in time?"""
    with tempfile.TemporaryDirectory(prefix="virtmig-kvm-") as tmp:
        log = Path(tmp) / "serial.log"
        proc = subprocess.Popen(
            [binary, "-accel", "kvm", "-machine", "pc", "-m", "128", "-no-user-config",
             "-nodefaults", "-display", "none", "-kernel", str(image.kernel),
             "-initrd", str(image.initrd), "-append", image.cmdline(dirty_mb=1, dirty_rate=1),
             "-serial", f"file:{log}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

        def ready() -> bool:
            return log.exists() and b"DIRTY-READY" in log.read_bytes()

        try:
            wait_until_sync(lambda: ready() or proc.poll() is not None, timeout=KVM_BOOT_TIMEOUT,
                            interval=0.05, what="the test guest to boot under KVM")
        except WaitTimeout:
            return False
        finally:
            proc.kill()
            proc.wait()
        return ready()


def guest_domain_type(image: GuestImage) -> str:
    """The ``<domain type=...>`` of test guests: ``kvm`` where it runs ``image``, else ``qemu``
    (TCG).

    ``$VIRTMIG_GUEST_ACCEL=tcg`` or ``=kvm`` decides instead (``kvm`` without a usable KVM
    makes QEMU fail to start, which says why).
    """
    forced = os.environ.get(ACCEL_ENV, "")
    if forced not in ("", "kvm", "tcg"):
        raise ValueError(f"{ACCEL_ENV}={forced}: expected kvm or tcg")
    if forced:
        return "kvm" if forced == "kvm" else "qemu"
    return "kvm" if kvm_boots(image) else "qemu"


def kill_leftover_qemus(root: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL every QEMU a qemu backend left running under ``root`` (by its pid files); reap.

    A test's safety net: a backend's ``close()`` leaves guests running on purpose.  Only a
    process whose working directory is the pid file's folder is killed.  Returns the pids.
    """
    killed = []
    for pid_file in root.rglob("pid"):
        try:
            pid = int(pid_file.read_text().strip())
            if os.readlink(f"/proc/{pid}/cwd") != str(pid_file.parent.resolve()):
                continue
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue
        killed.append(pid)

    def all_reaped() -> bool:
        for pid in killed:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # ours: reap (asyncio's watcher may be first)
        return not any(os.path.exists(f"/proc/{pid}") for pid in killed)

    wait_until_sync(all_reaped, timeout=timeout, what=f"killed QEMU processes {killed} to go")
    return killed


#: One QMP command on one guest: ``(command, arguments) -> QEMU's result``.
Query = Callable[[str, "dict[str, object] | None"], Awaitable[Any]]


async def device_set(query: Query) -> dict[str, Any]:
    """The guest's device set as QEMU reports it: ``query-pci`` (bus, slot, function, vendor and
    device ids, qdev id), ``query-block`` (device, qdev path, medium inserted, driver,
    read-only), ``qom-list /machine/peripheral`` (names and types, and the types of the
    anonymous ones), ``query-cpus-fast`` (index, socket, die, core, thread), the vCPUs' QOM type
    and the machine type (``qom-get``)."""
    pci = sorted(
        (bus["bus"], d["slot"], d["function"], d["id"]["vendor"], d["id"]["device"],
         d.get("qdev_id", ""))
        for bus in await query("query-pci", None) for d in bus["devices"])
    block = sorted(
        (b.get("device", ""), b.get("qdev", ""), "inserted" in b,
         b.get("inserted", {}).get("drv", ""), b.get("inserted", {}).get("ro", False))
        for b in await query("query-block", None))
    named = sorted((c["name"], c["type"]) for c in
                   await query("qom-list", {"path": "/machine/peripheral"})
                   if c["type"].startswith("child<"))
    anon = sorted(c["type"] for c in
                  await query("qom-list", {"path": "/machine/peripheral-anon"})
                  if c["type"].startswith("child<"))
    cpus = await query("query-cpus-fast", None)
    return {
        "pci": pci,
        "block": block,
        "peripheral": named,
        "peripheral-anon": anon,
        "cpus": sorted((c["cpu-index"], c["props"].get("socket-id"), c["props"].get("die-id"),
                        c["props"].get("core-id"), c["props"].get("thread-id")) for c in cpus),
        "cpu-type": await query("qom-get", {"path": cpus[0]["qom-path"], "property": "type"}),
        "machine": await query("qom-get", {"path": "/machine", "property": "type"}),
    }
