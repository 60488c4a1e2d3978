"""The host side of the QEMU tests: whom QEMU runs as, where its files may lie, its serial logs.

Concern: what a test daemon's ``qemu`` backend needs from this machine under its confinement
(``virtmig.daemon.backend.qemu.confine``), and where a guest's output is found.

* **QEMU's user.** Run as root (CI), the backend runs QEMU as an unprivileged user:
  :func:`qemu_user` creates :data:`TEST_QEMU_USER` (``useradd --system --no-create-home
  --user-group``, in group ``kvm`` where there is one) on first need when it is missing, and
  :func:`release_qemu_user` (at the end of the session) removes it again if the tests created
  it.  Several test sessions may run at once on one machine: each holds a shared lock on
  :data:`LOCK_FILE` while it may use the user; :data:`CREATE_LOCK_FILE` serialises the creation
  and says whether the tests created it; only a session that finds no other holder removes it.
  Not root: QEMU runs as the tester, and nothing is created.
* **Post-copy.** QEMU 7.2 calls ``userfaultfd(2)`` itself, which the kernel refuses to an
  unprivileged user unless ``vm.unprivileged_userfaultfd = 1`` (``.ci/run`` sets it).  Where it is
  0, a test marked ``postcopy`` runs QEMU as root instead (:func:`postcopy_as_root`); every
  other test runs it unprivileged.
* **Storage.** The test guest's kernel and initrd lie in the guest cache
  (:func:`virtmig.testing.guest.cache_dir`): every test backend has it among its ``storage_dirs``
  (:func:`qemu_settings`, :func:`daemon_settings`).
* **Serial logs.** A guest's serial port writes to ``serialN.log`` in its folder on whichever host
  runs it: :func:`serial_log` finds it by uuid.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from virtmig.daemon.backend.qemu import QemuSettings
from virtmig.daemon.backend.qemu.confine import UFFD_SYSCTL
from virtmig.testing.guest import cache_dir

TEST_QEMU_USER = "virtmig-test-qemu"
LOCK_FILE = Path(tempfile.gettempdir()) / "virtmig-test-qemu-user.lock"  # shared: in use
CREATE_LOCK_FILE = LOCK_FILE.with_suffix(".create")  # exclusive: creating; says who created it
_CREATED = "created by the virtmig tests\n"


_held: IO[str] | None = None  # this session's (shared) lock on LOCK_FILE
_postcopy_as_root = False  # the running test needs post-copy where only root has it


def unprivileged_userfaultfd() -> bool:
    """Whether an unprivileged QEMU can use post-copy (``vm.unprivileged_userfaultfd``)."""
    try:
        return Path(UFFD_SYSCTL).read_text().strip() == "1"
    except OSError:
        return False


@contextlib.contextmanager
def postcopy_as_root(needed: bool) -> Iterator[None]:
    """While it lasts, daemons started for a post-copy test (``needed``) run QEMU as root when
    only root can use userfaultfd."""
    global _postcopy_as_root
    _postcopy_as_root = needed and os.geteuid() == 0 and not unprivileged_userfaultfd()
    try:
        yield
    finally:
        _postcopy_as_root = False


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def _kvm_group() -> list[str]:
    """``useradd`` options putting the user in group ``kvm`` where there is one: the test guest
    runs under KVM where this machine boots it so (:func:`virtmig.testing.guest_domain_type`),
    and ``/dev/kvm`` is usually ``root:kvm`` 0660."""
    try:
        grp.getgrnam("kvm")
    except KeyError:
        return []
    return ["--groups", "kvm"]


def qemu_user() -> str:
    """The user test daemons run QEMU as; created here when root and missing."""
    global _held
    if _postcopy_as_root:
        return "root"
    if os.geteuid() != 0 or _held is not None:
        return TEST_QEMU_USER
    lock = open(LOCK_FILE, "a+")  # noqa: SIM115 - held until release_qemu_user()
    fcntl.flock(lock, fcntl.LOCK_SH)  # waits only while a session ending removes the user
    _held = lock
    with open(CREATE_LOCK_FILE, "a+") as marker:
        fcntl.flock(marker, fcntl.LOCK_EX)  # one creator at a time
        if not _exists(TEST_QEMU_USER):
            subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                            *_kvm_group(), "--shell", "/usr/sbin/nologin", TEST_QEMU_USER],
                           check=True, capture_output=True)
            marker.seek(0)
            marker.truncate()
            marker.write(_CREATED)
    return TEST_QEMU_USER


def release_qemu_user() -> None:
    """End of the session: remove the user if the tests created it and no other session holds
    it (the last one out removes it)."""
    global _held
    lock, _held = _held, None
    if lock is None:
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another session still runs QEMU as that user
        # No other session holds the user now, and a new one waits for this lock.
        with open(CREATE_LOCK_FILE, "a+") as marker:
            marker.seek(0)
            if marker.read() == _CREATED and _exists(TEST_QEMU_USER):
                subprocess.run(["userdel", TEST_QEMU_USER], check=False, capture_output=True)
                with contextlib.suppress(KeyError):
                    grp.getgrnam(TEST_QEMU_USER)
                    subprocess.run(["groupdel", TEST_QEMU_USER], check=False,
                                   capture_output=True)
            marker.truncate(0)


def qemu_settings(*storage: Path) -> QemuSettings:
    """A test backend's settings: the guest cache and ``storage`` as storage dirs, QEMU's test
    user, the sandbox on."""
    return QemuSettings(storage_dirs=(str(cache_dir()), *map(str, storage)), user=qemu_user())


def daemon_settings(*storage: Path) -> dict[str, object]:
    """The same, as a test daemon's ``DaemonConfig`` settings."""
    settings = qemu_settings(*storage)
    return {"storage_dirs": settings.storage_dirs, "qemu_user": settings.user}


def serial_log(state_dir: Path, uuid: str, port: int = 0) -> Path:
    """A guest's serial log on the host whose daemon keeps its state in ``state_dir``."""
    return state_dir / "backend" / "qemu" / uuid / f"serial{port}.log"
