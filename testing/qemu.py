"""QEMU on this machine, for tests: is it there, may guests use KVM, and the clean-up net.

* Skip rules (:func:`qemu_binary_or_skip`, :func:`guest_or_skip`): when QEMU or the test guest
  is unavailable, the calling pytest test is skipped with the reason, unless
  ``VIRTMIG_REQUIRE_QEMU=1``, in which case it fails.  pytest is imported only then: this
  package does not depend on it.
* Acceleration (:func:`kvm_usable`, :func:`guest_domain_type`): test guests run under KVM when
  ``/dev/kvm`` opens read-write and answers ``KVM_GET_API_VERSION`` (asked once per process),
  else under TCG.  ``$VIRTMIG_GUEST_ACCEL`` (``kvm`` or ``tcg``) decides instead.
* :func:`kill_leftover_qemus`: the finalizers' safety net for QEMU processes a test left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import shutil
import signal
from pathlib import Path
from typing import NoReturn

from virtmig.testing.guest import GuestImage, GuestUnavailable, ensure_guest
from virtmig.testing.wait import wait_until_sync

QEMU_BINARY = "qemu-system-x86_64"
REQUIRE_ENV = "VIRTMIG_REQUIRE_QEMU"
ACCEL_ENV = "VIRTMIG_GUEST_ACCEL"
KVM_DEVICE = "/dev/kvm"
_KVM_GET_API_VERSION = 0xAE00  # _IO(KVMIO, 0x00)
_KVM_API_VERSION = 12  # the only stable version there has been


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


def guest_or_skip() -> GuestImage:
    """The built test guest; skips the test if it cannot be built (fails when required)."""
    try:
        return ensure_guest()
    except GuestUnavailable as exc:
        _skip_or_fail(f"cannot build the QEMU test guest: {exc}")


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


def guest_domain_type() -> str:
    """The ``<domain type=...>`` of test guests: ``kvm`` where usable, else ``qemu`` (TCG).

    ``$VIRTMIG_GUEST_ACCEL=tcg`` or ``=kvm`` decides instead (``kvm`` without a usable KVM
    makes QEMU fail to start, which says why).
    """
    forced = os.environ.get(ACCEL_ENV, "")
    if forced not in ("", "kvm", "tcg"):
        raise ValueError(f"{ACCEL_ENV}={forced}: expected kvm or tcg")
    if forced:
        return "kvm" if forced == "kvm" else "qemu"
    return "kvm" if kvm_usable() else "qemu"


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
