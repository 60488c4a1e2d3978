"""Confinement of QEMU: which emulators run, which host files a guest reaches, who QEMU runs as.

Concern: the rules that keep a domain definition within what the host's administrator allowed
(:class:`QemuSettings`, from the daemon's ``emulators``, ``storage_dirs``, ``block_devices``,
``qemu_user``, ``qemu_group``, ``qemu_sandbox`` and ``vnc_*`` settings), and the acts that apply
them: opening a guest's files for QEMU, and knowing whom QEMU runs as.

* **Emulators.** ``<emulator>`` must resolve (``realpath``) to one of the configured emulators
  (default: the ``qemu-system-x86_64`` on ``PATH`` when the daemon starts, by absolute path); the
  configured path is what runs.  A symlink to a listed emulator (Debian's ``/usr/bin/kvm``) is
  the same program and is accepted; a program of the same name elsewhere is not.
* **Images.** A disk's ``<source file=>`` and ``<os><kernel>``/``<initrd>`` must lie under one of
  ``storage_dirs`` after ``realpath`` (so ``..`` and symlinks pointing out are refused).  The daemon
  opens them itself when QEMU starts (:func:`open_image`): from the storage folder down, one
  component at a time without following symlinks, so a path swapped after the check cannot lead
  out, and only a regular file is opened.  QEMU gets the descriptor, never the path (a disk's
  descriptor carries the daemon's access; kernel and initrd, which QEMU 7.2 reopens through
  ``/proc/self/fd``, must be readable by QEMU's user).  A qcow2 image that names another file in
  its header (a backing file, an external data file) is refused.
* **Block devices.** A ``<disk type='block'>``'s ``<source dev=>`` must be a block device that
  either lies under one of ``storage_dirs`` (a device node the administrator put there; opened
  like an image, from the folder down, no symlink followed) or is one of ``block_devices`` (paths
  the administrator allowed one by one, compared after ``realpath``; opened by that resolved
  path, no symlink followed); anything but a block device is refused (:func:`block_refusal`,
  :func:`open_image` with ``block=True``).  QEMU gets the descriptor, never the path.
* **Serial logs.** A serial port writes to ``serialN.log`` in the guest's own folder, a file the
  daemon creates (:func:`open_serial_log`, no symlink followed, mode 0600) and passes as a
  descriptor; a ``<source path=>`` naming any other file is refused (:func:`serial_path_refusal`).
* **QEMU's own folder.** QEMU binds a VNC unix socket itself (``-vnc`` takes no descriptor):
  :func:`make_qemu_dir` makes ``vnc`` in the guest's folder at each start of such a guest
  (without following a symlink, 0750, QEMU's user's), the one place there QEMU may create a
  file; :func:`remove_qemu_dir` removes it when QEMU exits.
* **Migration TLS credentials.** QEMU's ``tls-creds-x509`` reads certificates and key from a
  folder by path; :func:`write_tls_creds` copies the host's PKI files into ``migrate-tls`` in the
  guest's folder (made without following a symlink, 0700, files 0400, all QEMU's user's, named
  to QEMU relative to its working directory) and :func:`remove_tls_creds` removes it as soon as
  QEMU loaded them, and at every start, exit and take-over of the guest.
* **The process.** QEMU runs under ``-sandbox`` (:data:`SANDBOX`: seccomp; no obsolete system
  calls, no privilege elevation, no fork/exec, no scheduler or affinity changes), and, when the
  daemon runs as root, as ``qemu_user`` (default ``virtmig-qemu``) with ``qemu_group`` (default:
  that user's primary group) and that user's supplementary groups (:func:`run_as`; a missing user
  or group is refused when the daemon starts, naming the setting; ``qemu_user = "root"`` is the
  explicit way to keep QEMU root), started through util-linux's ``setpriv`` (see
  :meth:`RunAs.command`) with ``no_new_privs``.  A daemon that is not root runs QEMU as itself.
* **Post-copy.** QEMU 7.2 calls ``userfaultfd(2)`` itself, which the kernel refuses to an
  unprivileged process unless ``vm.unprivileged_userfaultfd = 1``: without it, an unprivileged
  QEMU takes no post-copy migration (:func:`postcopy_refusal`; the daemon says so at start).
* **KVM.** QEMU opens ``/dev/kvm`` itself (QEMU 7.2 cannot be handed a KVM descriptor), so a
  ``type='kvm'`` domain is refused at start when QEMU's user cannot open it
  (:func:`kvm_refusal`); ``type='qemu'`` (TCG) domains need nothing from the host.

Refusals name the element and the path: at define time as ``ConfigUnsupported`` (by
:mod:`~virtmig.daemon.backend.qemu.config`), at start as :class:`BackendError`.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from virtmig.daemon.backend.base import BackendError, StreamTls
from virtmig.daemon.settings import held
from virtmig.proto import logsafe
from virtmig.proto.errors import InvalidArgument

DEFAULT_BINARY = "qemu-system-x86_64"
DEFAULT_STORAGE_DIR = "/var/lib/virtmig/images"
DEFAULT_QEMU_USER: str = held("qemu_user")  # the settings schema's, as the ones below
ROOT_USER = "root"  # qemu_user = "root": QEMU keeps the daemon's root identity (opt-out)
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
KVM_DEVICE = "/dev/kvm"
UFFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
SERIAL_LOG = "serial{port}.log"
TLS_CREDS_DIR = "migrate-tls"  # in the guest's folder, while QEMU loads a migration's credentials
VNC_SOCKET_DIR = "vnc"  # in the guest's folder, QEMU's own: where it binds a VNC unix socket
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_EXTERNAL_DATA = 1 << 2  # incompatible feature bit: the data lives in another file

log = logsafe.logger("virtmig.daemon.backend.qemu")


@dataclass(frozen=True)
class QemuSettings:
    """What the host allows the ``qemu`` backend (the daemon's settings of the same names)."""

    emulators: tuple[str, ...] = ()  # absolute paths; (): DEFAULT_BINARY on PATH (resolved())
    storage_dirs: tuple[str, ...] = (DEFAULT_STORAGE_DIR,)
    block_devices: tuple[str, ...] = held("block_devices")  # what a <disk type='block'> may name
    user: str = DEFAULT_QEMU_USER  # when the daemon runs as root
    group: str = held("qemu_group")  # "": the user's primary group
    sandbox: bool = held("qemu_sandbox")
    # The ports an autoport VNC server takes from (libvirt's range).
    vnc_port_min: int = held("vnc_port_min")
    vnc_port_max: int = held("vnc_port_max")
    vnc_remote_listen: bool = held("vnc_remote_listen")  # VNC may listen on a non-loopback address

    def resolved(self) -> QemuSettings:
        """These settings with the default emulator filled in (``()`` if none is on PATH)."""
        if self.emulators:
            return self
        found = shutil.which(DEFAULT_BINARY)
        return replace(self, emulators=(os.path.abspath(found),) if found else ())


def check_settings(settings: QemuSettings) -> None:
    """Refuse settings that cannot work (when the daemon starts), naming the setting."""
    for path in settings.emulators:
        if not os.path.isabs(path):
            raise InvalidArgument(f"emulators: '{path}' is not an absolute path")
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise InvalidArgument(f"emulators: '{path}' is not an executable file")
    for folder in settings.storage_dirs:
        if not os.path.isabs(folder):
            raise InvalidArgument(f"storage_dirs: '{folder}' is not an absolute path")
    for device in settings.block_devices:
        if not os.path.isabs(device):
            raise InvalidArgument(f"block_devices: '{device}' is not an absolute path")
    if not 5900 <= settings.vnc_port_min <= settings.vnc_port_max <= 65535:
        raise InvalidArgument(f"vnc_port_min/vnc_port_max: {settings.vnc_port_min}-"
                              f"{settings.vnc_port_max} is not a range within 5900-65535")


# --- who QEMU runs as ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """The unprivileged identity QEMU runs as (a root daemon's ``qemu_user``/``qemu_group``)."""

    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups: the user's own, never root's
    setpriv: str = "setpriv"  # util-linux's, by absolute path

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run as this identity, through ``setpriv``.

        Not by switching identity in the forked child (``subprocess``' ``user=``): that makes
        Python fork instead of vfork, and the child of a forked gRPC daemon runs gRPC's fork
        handlers, which crashed it before exec.  ``setpriv`` is exec'd straight from a vfork,
        drops to the identity and execs QEMU in the same process.
        """
        groups = (["--groups", ",".join(map(str, self.groups))] if self.groups
                  else ["--clear-groups"])
        return [self.setpriv, f"--reuid={self.uid}", f"--regid={self.gid}", *groups,
                "--no-new-privs", "--", *argv]


def run_as(settings: QemuSettings) -> RunAs | None:
    """Whom QEMU runs as: None for the daemon's own identity (not root, or ``qemu_user =
    "root"``); ``InvalidArgument`` naming the setting when the user or group does not exist."""
    if os.geteuid() != 0 or settings.user == ROOT_USER:
        return None
    try:
        pw = pwd.getpwnam(settings.user)
    except KeyError:
        raise InvalidArgument(
            f"qemu_user '{settings.user}' does not exist: create it (useradd --system "
            f"--no-create-home --user-group {settings.user}), name another user, or set "
            f'qemu_user = "{ROOT_USER}" to run QEMU as root'
        ) from None
    gid = pw.pw_gid
    if settings.group:
        try:
            gid = grp.getgrnam(settings.group).gr_gid
        except KeyError:
            raise InvalidArgument(f"qemu_group '{settings.group}' does not exist") from None
    groups = tuple(g for g in os.getgrouplist(settings.user, gid) if g != gid)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        raise InvalidArgument(f"qemu_user '{settings.user}': setpriv (util-linux), which starts "
                              "QEMU as that user, is not on PATH")
    return RunAs(user=settings.user, uid=pw.pw_uid, gid=gid, groups=groups,
                 setpriv=os.path.abspath(setpriv))


def postcopy_refusal(who: RunAs | None, sysctl: str = UFFD_SYSCTL) -> str:
    """Why QEMU running as ``who`` cannot take post-copy migrations (``""``: it can)."""
    if who is None:
        return ""
    try:
        with open(sysctl) as f:
            if f.read().strip() == "1":
                return ""
    except OSError:
        pass
    return (f"QEMU runs as '{who.user}' and {sysctl} is not 1: post-copy migrations need "
            "userfaultfd, which QEMU 7.2 opens itself (sysctl vm.unprivileged_userfaultfd=1)")


def kvm_refusal(who: RunAs | None, device: str = KVM_DEVICE) -> str:
    """Why QEMU running as ``who`` cannot use KVM (``""``: it can).

    Judged from the device's owner and mode bits (as Debian's udev rule sets them: ``root:kvm``,
    0660); ACLs are not consulted.
    """
    try:
        st = os.stat(device)
    except OSError as exc:
        return f"KVM is not available: {device}: {exc.strerror or exc}"
    if who is None:
        ok = os.access(device, os.R_OK | os.W_OK)
        name = pwd.getpwuid(os.geteuid()).pw_name if not ok else ""
    else:
        ok = _allows(who, st, stat.S_IRUSR | stat.S_IWUSR)
        name = who.user
    if ok:
        return ""
    return (f"KVM is not usable by QEMU's user '{name}': it cannot open {device} "
            f"({stat.filemode(st.st_mode)} {_owner(st)}); give that user access to {device} "
            "(e.g. group kvm, mode 0660) or use <domain type='qemu'>")


def _allows(who: RunAs, st: os.stat_result, bits: int) -> bool:
    """Whether ``who`` has ``bits`` (owner-class, e.g. ``S_IRUSR``) on a file: by the class
    that applies to it (owner, else group, else others); ACLs are not consulted."""
    if st.st_uid == who.uid:
        shift = 0
    elif st.st_gid in (who.gid, *who.groups):
        shift = 3
    else:
        shift = 6
    return st.st_mode & (bits >> shift) == bits >> shift


def _owner(st: os.stat_result) -> str:
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{user}:{group}"


# --- define time: the rules as refusals ----------------------------------------------------------


def check_emulator(path: str, emulators: tuple[str, ...]) -> str:
    """The configured emulator ``path`` stands for; ``ValueError`` says why there is none."""
    real = os.path.realpath(path) if os.path.isabs(path) else ""
    for emulator in emulators:
        if real and os.path.realpath(emulator) == real:
            return emulator
    raise ValueError(f"'{path}' is not one of the configured emulators "
                     f"({', '.join(emulators) or 'none'})")


def image_refusal(path: str, storage_dirs: tuple[str, ...]) -> str:
    """Why ``path`` may not be given to QEMU (``""``: it may, as far as can be told now)."""
    if not os.path.isabs(path):
        return f"'{path}' is not an absolute path"
    if _storage_root(path, storage_dirs) is None:
        return (f"'{path}' is outside the storage directories "
                f"({', '.join(storage_dirs) or 'none configured'})")
    real = os.path.realpath(path)
    if os.path.lexists(real) and not os.path.isfile(real):
        return f"'{path}' is not a regular file"
    return ""


def block_refusal(path: str, storage_dirs: tuple[str, ...],
                  block_devices: tuple[str, ...]) -> str:
    """Why a ``<disk type='block'>`` may not use ``path`` (``""``: it may, as far as can be told
    now: a device that does not exist yet is refused when QEMU starts)."""
    if not os.path.isabs(path):
        return f"'{path}' is not an absolute path"
    if _allowed_device(path, block_devices) is None and _storage_root(path, storage_dirs) is None:
        return (f"'{path}' is neither under the storage directories "
                f"({', '.join(storage_dirs) or 'none configured'}) nor one of the allowed "
                f"block devices ({', '.join(block_devices) or 'none configured'})")
    real = os.path.realpath(path)
    if os.path.lexists(real) and not stat.S_ISBLK(os.stat(real).st_mode):
        return f"'{path}' is not a block device"
    return ""


def _allowed_device(path: str, block_devices: tuple[str, ...]) -> str | None:
    """The resolved path of the allowed block device ``path`` stands for, if any."""
    real = os.path.realpath(path)
    for device in block_devices:
        if os.path.realpath(device) == real:
            return real
    return None


def serial_path_refusal(path: str, log_dir: Path | None, port: int) -> str:
    """Why a file serial port may not write to ``path`` (``""``: it is the port's own log)."""
    if log_dir is None:
        return f"source path '{path}': the qemu backend is not open"
    own = log_dir / SERIAL_LOG.format(port=port)
    if os.path.isabs(path) and os.path.realpath(path) == os.path.realpath(own):
        return ""
    return (f"source path '{path}' is not this guest's serial log '{own}' (the qemu backend "
            "writes a serial port only to its own file in the guest's folder)")


def _storage_root(path: str, storage_dirs: tuple[str, ...]) -> str | None:
    """The storage folder (resolved) that ``path`` lies under after realpath, if any."""
    real = os.path.realpath(path)
    for folder in storage_dirs:
        root = os.path.realpath(folder)
        if real != root and os.path.commonpath([real, root]) == root:
            return root
    return None


# --- start time: opening what QEMU gets ----------------------------------------------------------


def open_image(what: str, path: str, storage_dirs: tuple[str, ...], *, writable: bool,
               qcow2: bool = False, reader: RunAs | None = None, block: bool = False,
               block_devices: tuple[str, ...] = ()) -> int:
    """Open a guest's image for QEMU (close-on-exec; the caller passes and closes it).

    ``what`` names the element in refusals (``<disk>``, ``<os><kernel>``).  The path is checked
    and opened in one act: from its storage folder down without following a symlink, then the
    regular file found is reopened through ``/proc/self/fd`` with the access QEMU needs.
    ``reader``: QEMU's user, when QEMU itself reopens the file (kernel and initrd: QEMU 7.2
    reads them with ``fopen``, here of ``/proc/self/fd/N``, which checks the file's mode).
    ``block``: a block device (under a storage folder, or one of ``block_devices``) instead.
    """
    access = os.O_RDWR if writable else os.O_RDONLY
    if block:
        fd = _open_block(what, path, storage_dirs, block_devices, access)
    else:
        why = image_refusal(path, storage_dirs)
        root = _storage_root(path, storage_dirs)
        if why or root is None:
            raise BackendError(f"{what} {why}")
        rel = os.path.relpath(os.path.realpath(path), root)
        try:
            fd = _open_beneath(root, rel, access)
        except OSError as exc:
            raise BackendError(f"{what} '{path}': cannot open: {_reason(exc)}") from None
        if fd < 0:
            raise BackendError(f"{what} '{path}' is not a regular file")
    st = os.fstat(fd)
    if reader is not None and not _allows(reader, st, stat.S_IRUSR):
        os.close(fd)
        raise BackendError(f"{what} '{path}' is not readable by QEMU's user '{reader.user}' "
                           f"({stat.filemode(st.st_mode)} {_owner(st)}): QEMU opens it itself")
    if qcow2:
        try:
            _check_qcow2(fd)
        except ValueError as exc:
            os.close(fd)
            raise BackendError(f"{what} '{path}': {exc}") from None
    return fd


def _open_block(what: str, path: str, storage_dirs: tuple[str, ...],
                block_devices: tuple[str, ...], access: int) -> int:
    """A block device for ``<disk type='block'>``: an allowed device by its resolved path, or
    one under a storage folder from the folder down (no symlink followed either way)."""
    why = block_refusal(path, storage_dirs, block_devices)
    if why:
        raise BackendError(f"{what} {why}")
    allowed = _allowed_device(path, block_devices)
    if allowed is not None:
        root, rel = os.path.dirname(allowed), os.path.basename(allowed)
    else:
        root = _storage_root(path, storage_dirs) or "/"
        rel = os.path.relpath(os.path.realpath(path), root)
    try:
        fd = _open_beneath(root, rel, access, stat.S_ISBLK)
    except OSError as exc:
        raise BackendError(f"{what} '{path}': cannot open: {_reason(exc)}") from None
    if fd < 0:
        raise BackendError(f"{what} '{path}' is not a block device")
    return fd


def _open_beneath(root: str, rel: str, access: int,
                  kind: Callable[[int], bool] = stat.S_ISREG) -> int:
    """``root/rel`` opened with ``access``, no symlink followed below ``root``; -1 when it is
    not of ``kind`` (a regular file by default; nothing else is opened for real)."""
    flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
    folder = os.open(root, flags | os.O_DIRECTORY)
    try:
        *parents, name = rel.split(os.sep)
        for part in parents:
            inner = os.open(part, flags | os.O_DIRECTORY, dir_fd=folder)
            os.close(folder)
            folder = inner
        handle = os.open(name, flags, dir_fd=folder)
    finally:
        os.close(folder)
    try:
        if not kind(os.fstat(handle).st_mode):
            return -1
        return os.open(f"/proc/self/fd/{handle}", access | os.O_CLOEXEC | os.O_NOCTTY)
    finally:
        os.close(handle)


def _check_qcow2(fd: int) -> None:
    """Refuse a qcow2 header that names another file (QEMU would open it by path)."""
    header = os.pread(fd, 80, 0)
    if len(header) < 80 or header[:4] != _QCOW2_MAGIC:
        return  # not qcow2: QEMU says so itself
    version = int.from_bytes(header[4:8], "big")
    if int.from_bytes(header[8:16], "big"):
        raise ValueError("qcow2 images with a backing file are not supported")
    if version >= 3 and int.from_bytes(header[72:80], "big") & _QCOW2_EXTERNAL_DATA:
        raise ValueError("qcow2 images with an external data file are not supported")


def open_serial_log(log_dir: Path, port: int, *, append: bool, owner: RunAs | None) -> int:
    """Create (or truncate, or append to) serial port ``port``'s log in ``log_dir``, for QEMU.

    No symlink is followed; a new file is 0600, owned by the daemon, group ``owner``'s.
    """
    path = log_dir / SERIAL_LOG.format(port=port)
    flags = (os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
             | (os.O_APPEND if append else os.O_TRUNC))
    try:
        fd = os.open(path, flags | os.O_NONBLOCK, 0o600)
    except OSError as exc:
        raise BackendError(f"serial log '{path}': cannot open: {_reason(exc)}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BackendError(f"serial log '{path}' is not a regular file")
    os.set_blocking(fd, True)
    if owner is not None:
        with contextlib.suppress(OSError):
            os.fchown(fd, -1, owner.gid)
    return fd


def prepare_guest_dir(gdir: Path, owner: RunAs | None) -> None:
    """The guest's folder: the daemon's; QEMU's group may look in but not create anything.

    A migration TLS credentials folder an earlier instance left behind goes."""
    gdir.mkdir(parents=True, exist_ok=True)
    if owner is not None:
        os.chown(gdir, -1, owner.gid)
    os.chmod(gdir, 0o750)
    remove_tls_creds(gdir)


# --- migration TLS: the credentials QEMU loads ---------------------------------------------------


def write_tls_creds(gdir: Path, tls: StreamTls, *, server: bool, owner: RunAs | None) -> str:
    """Copy the host's PKI files into ``gdir/TLS_CREDS_DIR`` in ``tls-creds-x509``'s layout.

    The folder is made fresh (a leftover one goes first), without following a symlink: mode
    0700, its files 0400, all owned by QEMU's user (``owner``; the daemon's own when None), so
    that only QEMU (and root) can read the private key.  Every source file is read before
    anything is written.  Returns the folder's name relative to ``gdir``, QEMU's working
    directory: QEMU's user need not be able to reach ``gdir`` from ``/``.  ``BackendError``
    names the file that cannot be read or written; nothing is left behind then.
    """
    role = "server" if server else "client"
    wanted = {"ca-cert.pem": tls.ca_cert, f"{role}-cert.pem": tls.cert,
              f"{role}-key.pem": tls.key}
    contents: dict[str, bytes] = {}
    for name, source in wanted.items():
        try:
            contents[name] = Path(source).read_bytes()
        except OSError as exc:
            raise BackendError(f"migration TLS: cannot read '{source}': "
                               f"{exc.strerror or exc}") from None
    remove_tls_creds(gdir)
    parent = os.open(gdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.mkdir(TLS_CREDS_DIR, 0o700, dir_fd=parent)
        folder = os.open(TLS_CREDS_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                         | os.O_CLOEXEC, dir_fd=parent)
        try:
            for name, data in contents.items():
                _write_private(folder, name, data, owner)
            if owner is not None:
                os.fchown(folder, owner.uid, owner.gid)
            os.fchmod(folder, 0o700)
        finally:
            os.close(folder)
    except OSError as exc:
        remove_tls_creds(gdir)
        raise BackendError(f"migration TLS: cannot write QEMU's credentials in "
                           f"'{gdir / TLS_CREDS_DIR}': {_reason(exc)}") from None
    finally:
        os.close(parent)
    return TLS_CREDS_DIR


def _write_private(folder: int, name: str, data: bytes, owner: RunAs | None) -> None:
    """A new file ``name`` in the open ``folder`` (no symlink followed), 0400, ``owner``'s."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o400, dir_fd=folder)
    try:
        if owner is not None:
            os.fchown(fd, owner.uid, owner.gid)
        os.fchmod(fd, 0o400)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def remove_tls_creds(gdir: Path) -> None:
    """Remove ``gdir/TLS_CREDS_DIR`` if it is there; a symlink in its place is removed, never
    followed (``shutil.rmtree`` works on descriptors)."""
    _remove_tree(gdir / TLS_CREDS_DIR, "the migration TLS credentials")


# --- a folder QEMU may write: its VNC unix socket ------------------------------------------------


def make_qemu_dir(gdir: Path, name: str, owner: RunAs | None) -> Path:
    """A fresh folder ``name`` in the guest's folder ``gdir`` that QEMU (``owner``; the
    daemon's user when None) may create files in -- a unix socket QEMU binds itself, its VNC
    server's -- and nothing else of the guest's folder: made without following a symlink (a
    leftover goes first), 0750, QEMU's user and group.  ``BackendError`` names it when it
    cannot be made."""
    remove_qemu_dir(gdir, name)
    parent = os.open(gdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.mkdir(name, 0o700, dir_fd=parent)
        folder = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                         dir_fd=parent)
        try:
            if owner is not None:
                os.fchown(folder, owner.uid, owner.gid)
            os.fchmod(folder, 0o750)
        finally:
            os.close(folder)
    except OSError as exc:
        raise BackendError(f"cannot make QEMU's folder '{gdir / name}': {_reason(exc)}") from None
    finally:
        os.close(parent)
    return gdir / name


def remove_qemu_dir(gdir: Path, name: str) -> None:
    """Remove the folder ``name`` :func:`make_qemu_dir` made (whatever QEMU put in it; a
    symlink is removed, never followed)."""
    _remove_tree(gdir / name, "QEMU's folder")


def _remove_tree(path: Path, what: str) -> None:
    try:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("qemu backend: cannot remove %s %s: %s", what, path, exc)


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:  # a symlink where none may be: it changed after the check
        return "a symlink is in the way"
    return exc.strerror or str(exc)
