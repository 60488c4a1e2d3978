"""The ``qemu`` backend's confinement: each refusal, and a confined QEMU that really runs.

What a domain definition may reach on the host (``virtmig.daemon.backend.qemu.confine``): only
configured emulators, images under ``storage_dirs`` (no ``..`` or symlink out, no file swapped
after the check, no qcow2 header naming another file), serial logs only in the guest's own
folder (no symlink there followed).  Then QEMU itself: the seccomp sandbox on its command line
and in force (``Seccomp: 2``), its user and groups when the daemon is root, its images and logs
handed over as descriptors, KVM refused when QEMU's user cannot open ``/dev/kvm``, and a
migration with all of it on both sides.

The refusals need no QEMU (a fake emulator file stands in); the rest is marked ``qemu``.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import stat
import uuid as uuidlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.daemon.backend_qemu_helpers import guest_xml, make_spec, within
from virtmig.client.migrate import migrate3
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    MigrationTuning,
    StreamAddress,
)
from virtmig.daemon.backend.qemu import QemuBackend, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.confine import (
    SANDBOX,
    RunAs,
    _open_beneath,
    check_settings,
    kvm_refusal,
    open_image,
    open_serial_log,
    postcopy_refusal,
    run_as,
)
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.main import qemu_settings as qemu_settings_of
from virtmig.proto.errors import ConfigUnsupported, InvalidArgument
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import TypedParams
from virtmig.testing import (
    TEST_QEMU_USER,
    Host,
    daemon_settings,
    guest_or_skip,
    hosts,
    kill_leftover_qemus,
    qemu_binary_or_skip,
    qemu_domain_xml,
    qemu_settings,
    start_host,
    wait_until,
)

ROOT = os.geteuid() == 0


@pytest.fixture
def storage(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "disk.img").write_bytes(b"\0" * 65536)
    return folder


@pytest.fixture
def fake_qemu(tmp_path: Path) -> Path:
    """An executable named like QEMU, the one configured emulator of these settings."""
    path = tmp_path / "bin" / "qemu-system-x86_64"
    path.parent.mkdir()
    path.write_text("#!/bin/sh\nexit 1\n")
    path.chmod(0o755)
    return path


def settings_for(emulator: Path, storage: Path) -> QemuSettings:
    return QemuSettings(emulators=(str(emulator),), storage_dirs=(str(storage),))


def refused(xml: str, settings: QemuSettings, guests: Path | None = None) -> str:
    """The detail of the refusal (after the class's "unsupported configuration: ")."""
    with pytest.raises(ConfigUnsupported) as info:
        parse_config(make_spec(xml), None, settings, guests)
    return info.value.detail


def disk(path: str | Path, fmt: str = "raw", cache: str = "") -> str:
    mode = f" cache='{cache}'" if cache else ""
    return (f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'{mode}/>"
            f"<source file='{path}'/><target dev='vda' bus='virtio'/></disk>")


# --- define time: emulators ----------------------------------------------------------------------


def test_emulator_must_be_a_configured_one(tmp_path: Path, fake_qemu: Path,
                                           storage: Path) -> None:
    settings = settings_for(fake_qemu, storage)
    impostor = tmp_path / "elsewhere" / "qemu-system-x86_64"  # the same name elsewhere
    impostor.parent.mkdir()
    impostor.write_text("#!/bin/sh\n")
    impostor.chmod(0o755)
    for path in ("/any/dir/kvm", "/bin/sh", str(impostor), "kvm", "qemu-system-x86_64"):
        message = refused(guest_xml(devices=f"<emulator>{path}</emulator>"), settings)
        assert f"unsupported emulator <emulator>{path}</emulator>" in message
        assert f"not one of the configured emulators ({fake_qemu})" in message

    # A symlink to a listed emulator is the same program (as Debian's /usr/bin/kvm): accepted,
    # and what runs is the configured path, not the caller's link.
    link = tmp_path / "elsewhere" / "kvm"
    link.symlink_to(fake_qemu)
    cfg = parse_config(make_spec(guest_xml(devices=f"<emulator>{link}</emulator>")), None,
                       settings)
    assert cfg.emulator == str(fake_qemu)
    assert parse_config(make_spec(guest_xml()), None, settings).emulator == str(fake_qemu)
    with pytest.raises(ConfigUnsupported, match="no emulator for the qemu backend: none is "
                       r"configured \(emulators\)"):
        parse_config(make_spec(guest_xml()), None, QemuSettings(emulators=()))


def test_default_emulator_is_the_one_on_path_at_start(
    tmp_path: Path, fake_qemu: Path, storage: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ``emulators`` configured: the backend takes ``qemu-system-x86_64`` from ``PATH`` when
    it is made (the daemon's start), by absolute path (a relative ``PATH`` entry included), and
    keeps it whatever ``PATH`` says later."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", os.pathsep.join((str(tmp_path / "none"), "bin")))
    backend = QemuBackend(QemuSettings(storage_dirs=(str(storage),)))
    assert backend.settings.emulators == (str(fake_qemu),)
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert backend.settings.emulators == (str(fake_qemu),)
    assert parse_config(make_spec(guest_xml()), None, backend.settings).emulator == str(fake_qemu)
    message = refused(guest_xml(devices="<emulator>/usr/bin/qemu-system-x86_64</emulator>"),
                      backend.settings)
    assert f"not one of the configured emulators ({fake_qemu})" in message
    # None on PATH: no emulator at all, and every definition is refused saying so.
    nothing = QemuBackend(QemuSettings(storage_dirs=(str(storage),)))
    assert nothing.settings.emulators == ()
    assert refused(guest_xml(), nothing.settings) == (
        "no emulator for the qemu backend: none is configured (emulators) and "
        "qemu-system-x86_64 is not on PATH")


def test_settings_are_checked_at_start(tmp_path: Path, fake_qemu: Path) -> None:
    check_settings(QemuSettings(emulators=(str(fake_qemu),)))
    with pytest.raises(InvalidArgument, match="emulators: 'bin/qemu' is not an absolute path"):
        check_settings(QemuSettings(emulators=("bin/qemu",)))
    with pytest.raises(InvalidArgument, match=f"emulators: '{tmp_path}/none' is not an "
                       "executable file"):
        check_settings(QemuSettings(emulators=(str(tmp_path / "none"),)))
    with pytest.raises(InvalidArgument, match="storage_dirs: 'images' is not an absolute path"):
        check_settings(QemuSettings(emulators=(str(fake_qemu),), storage_dirs=("images",)))


def test_daemon_settings_reach_the_backend(tmp_path: Path) -> None:
    toml = tmp_path / "virtmigd.toml"
    toml.write_text('emulators = ["/usr/bin/kvm"]\nstorage_dirs = "/srv/images"\n'
                    'qemu_user = "qemu"\nqemu_group = "kvm"\nqemu_sandbox = false\n')
    config = load_config(build_parser().parse_args(["--config", str(toml),
                                                    "--storage-dir", "/a", "--storage-dir", "/b"]))
    assert qemu_settings_of(config) == QemuSettings(
        emulators=("/usr/bin/kvm",), storage_dirs=("/a", "/b"), user="qemu", group="kvm",
        sandbox=False)
    default = load_config(build_parser().parse_args([]))
    assert qemu_settings_of(default) == QemuSettings()  # emulators: found on PATH at start
    assert QemuSettings().storage_dirs == ("/var/lib/virtmig/images",)
    assert QemuSettings().user == "virtmig-qemu" and QemuSettings().sandbox
    for line, message in (('emulators = ["kvm"]', r"invalid emulators \['kvm'\] .*: expected a "
                                                  "list of absolute paths"),
                          ("storage_dirs = 3", "invalid storage_dirs"),
                          ('qemu_user = ""', "invalid qemu_user ''"),
                          ('qemu_sandbox = "off"', "invalid qemu_sandbox 'off' .*: expected true "
                                                   "or false")):
        toml.write_text(line + "\n")
        with pytest.raises(InvalidArgument, match=message):
            load_config(build_parser().parse_args(["--config", str(toml)]))


def test_command_line_flags_reach_the_backend(tmp_path: Path) -> None:
    """Each flag of the qemu backend's settings, repeatable ones twice, wins over the config."""
    toml = tmp_path / "virtmigd.toml"
    toml.write_text('emulators = ["/usr/bin/kvm"]\nqemu_user = "qemu"\nqemu_group = "kvm"\n'
                    'block_devices = ["/dev/sdz"]\n')
    config = load_config(build_parser().parse_args([
        "--config", str(toml), "--emulator", "/opt/q1", "--emulator", "/opt/q2",
        "--qemu-user", "runner", "--qemu-group", "runners",
        "--block-device", "/dev/vdx", "--block-device", "/dev/vdy"]))
    settings = qemu_settings_of(config)
    assert (settings.emulators, settings.user, settings.group, settings.block_devices) == (
        ("/opt/q1", "/opt/q2"), "runner", "runners", ("/dev/vdx", "/dev/vdy"))
    config = load_config(build_parser().parse_args(["--config", str(toml)]))
    settings = qemu_settings_of(config)
    assert (settings.emulators, settings.user, settings.group, settings.block_devices) == (
        ("/usr/bin/kvm",), "qemu", "kvm", ("/dev/sdz",))


# --- define time: images -------------------------------------------------------------------------


def test_disk_outside_the_storage_dirs_is_refused(tmp_path: Path, fake_qemu: Path,
                                                  storage: Path) -> None:
    settings = settings_for(fake_qemu, storage)
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"secret")
    (storage / "escape").symlink_to(outside)  # a symlink inside, pointing out
    (storage / "inside").symlink_to(storage / "disk.img")  # a symlink staying inside
    (storage / "sub").mkdir()
    for path in ("/etc/shadow", outside, f"{storage}/../outside.img",
                 f"{storage}/sub/../../outside.img", storage / "escape", storage):
        message = refused(guest_xml(devices=disk(path)), settings)
        assert message.startswith("unsupported device <disk type='file' device='disk'> for the "
                                  f"qemu backend: source file '{path}' is outside the storage "
                                  f"directories ({storage})"), message
    assert "is not a regular file" in refused(guest_xml(devices=disk(storage / "sub")), settings)
    for path in (storage / "disk.img", storage / "inside", f"{storage}/sub/../disk.img",
                 storage / "not-yet.img"):
        cfg = parse_config(make_spec(guest_xml(devices=disk(path))), None, settings)
        assert cfg.disks[0].path == str(path)
    assert outside.read_bytes() == b"secret"


def test_kernel_and_initrd_outside_the_storage_dirs_are_refused(
    tmp_path: Path, fake_qemu: Path, storage: Path
) -> None:
    settings = settings_for(fake_qemu, storage)
    (storage / "vmlinuz").write_bytes(b"k")
    for tag, os_extra in (
        ("kernel", "<kernel>/boot/vmlinuz</kernel>"),
        ("kernel", f"<kernel>{storage}/../vmlinuz</kernel>"),
        ("initrd", f"<kernel>{storage}/vmlinuz</kernel><initrd>/boot/initrd.img</initrd>"),
    ):
        message = refused(guest_xml(os_extra=os_extra), settings)
        assert message.startswith(f"unsupported <os><{tag}> for the qemu backend: '")
        assert f"is outside the storage directories ({storage})" in message
    cfg = parse_config(make_spec(guest_xml(os_extra=f"<kernel>{storage}/vmlinuz</kernel>")),
                       None, settings)
    assert cfg.kernel == f"{storage}/vmlinuz"


# --- start time: opening images ------------------------------------------------------------------


def test_images_are_opened_without_following_a_swapped_path(tmp_path: Path,
                                                            storage: Path) -> None:
    dirs = (str(storage),)
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"secret")
    fd = open_image("<disk>", str(storage / "disk.img"), dirs, writable=True)
    try:
        assert os.fstat(fd).st_ino == (storage / "disk.img").stat().st_ino
        assert os.get_inheritable(fd) is False and os.get_blocking(fd)
    finally:
        os.close(fd)
    # The check and the open are one act: a path changed after realpath() looked at it (a
    # symlink in its place, last component or folder) is never followed.
    (storage / "swapped.img").symlink_to(outside)
    assert _open_beneath(str(storage), "swapped.img", os.O_RDWR) == -1
    (storage / "dir").symlink_to(tmp_path)
    with pytest.raises(OSError):
        _open_beneath(str(storage), "dir/outside.img", os.O_RDWR)
    os.mkfifo(storage / "fifo.img")  # nothing but a regular file is opened (no blocking)
    with pytest.raises(BackendError, match=f"<disk> '{storage}/fifo.img' is not a regular file"):
        open_image("<disk>", str(storage / "fifo.img"), dirs, writable=False)
    with pytest.raises(BackendError, match=f"<disk> '{storage}/none.img': cannot open: No such"):
        open_image("<disk>", str(storage / "none.img"), dirs, writable=False)
    with pytest.raises(BackendError, match=f"<os><kernel> '{outside}' is outside the storage"):
        open_image("<os><kernel>", str(outside), dirs, writable=False)
    assert outside.read_bytes() == b"secret"


def test_kernel_must_be_readable_by_qemus_user(storage: Path) -> None:
    """QEMU 7.2 reopens kernel and initrd (``/proc/self/fd/N``): its user must be able to."""
    kernel = storage / "vmlinuz"
    kernel.write_bytes(b"k")
    kernel.chmod(0o600)
    st = kernel.stat()
    other = RunAs(user="someone", uid=st.st_uid + 4242, gid=st.st_gid + 4242, groups=())
    with pytest.raises(BackendError, match=f"<os><kernel> '{kernel}' is not readable by QEMU's "
                       r"user 'someone' \(-rw-------"):
        open_image("<os><kernel>", str(kernel), (str(storage),), writable=False, reader=other)
    kernel.chmod(0o644)
    os.close(open_image("<os><kernel>", str(kernel), (str(storage),), writable=False,
                        reader=other))


def qcow2_header(backing_offset: int = 0, incompatible: int = 0) -> bytes:
    head = (b"QFI\xfb" + (3).to_bytes(4, "big") + backing_offset.to_bytes(8, "big")
            + bytes(56) + incompatible.to_bytes(8, "big"))
    return head + bytes(512 - len(head))


def test_qcow2_naming_another_file_is_refused(storage: Path) -> None:
    dirs = (str(storage),)
    for name, header, why in (
        ("backing.qcow2", qcow2_header(backing_offset=512), "with a backing file"),
        ("data.qcow2", qcow2_header(incompatible=1 << 2), "with an external data file"),
    ):
        (storage / name).write_bytes(header)
        with pytest.raises(BackendError, match=f"<disk> '{storage}/{name}': qcow2 images {why} "
                           "are not supported"):
            open_image("<disk>", str(storage / name), dirs, writable=True, qcow2=True)
    (storage / "plain.qcow2").write_bytes(qcow2_header())
    os.close(open_image("<disk>", str(storage / "plain.qcow2"), dirs, writable=True, qcow2=True))


# --- define time: serial logs --------------------------------------------------------------------


def test_serial_log_only_in_the_guest_folder(tmp_path: Path, fake_qemu: Path,
                                             storage: Path) -> None:
    settings = settings_for(fake_qemu, storage)
    guests = tmp_path / "guests"
    uuid = str(uuidlib.uuid4())
    own = guests / uuid / "serial0.log"
    victim = tmp_path / "victim"
    for kind in ("serial", "console"):
        for path in (victim, "/etc/passwd", guests / uuid / "qemu.log",
                     guests / uuid / "serial1.log", f"{guests}/{uuid}/../x/serial0.log"):
            xml = guest_xml(uuid=uuid, devices=f"<{kind} type='file'><source path='{path}'/>"
                                                "<target port='0'/></" + kind + ">")
            message = refused(xml, settings, guests)
            assert message.startswith(f"unsupported device <{kind} type='file'> for the qemu "
                                      f"backend: source path '{path}' is not this guest's "
                                      f"serial log '{own}'"), message
    with_console = guest_xml(uuid=uuid, devices=(
        f"<serial type='file'><source path='{own}' append='on'/><target port='0'/></serial>"
        f"<console type='file'><source path='{victim}'/><target port='0'/></console>"))
    assert f"source path '{victim}'" in refused(with_console, settings, guests)
    ok = parse_config(make_spec(guest_xml(uuid=uuid, devices=(
        f"<serial type='file'><source path='{own}' append='on'/><target port='0'/></serial>"
        "<serial type='pty'><target port='1'/></serial>"))), None, settings, guests)
    assert [(s.port, s.append) for s in ok.serials] == [(0, True), (1, False)]
    closed = guest_xml(uuid=uuid, devices=f"<serial type='file'><source path='{own}'/></serial>")
    assert "the qemu backend is not open" in refused(closed, settings)


def test_serial_log_is_opened_without_following_a_symlink(tmp_path: Path) -> None:
    """What stands at ``serialN.log`` in the guest's folder is never followed, nor opened unless
    it is a regular file; a new log is 0600."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    (tmp_path / "serial0.log").symlink_to(victim)
    for append in (False, True):
        with pytest.raises(BackendError, match=f"serial log '{tmp_path}/serial0.log': cannot "
                           "open: a symlink is in the way"):
            open_serial_log(tmp_path, 0, append=append, owner=None)
    assert victim.read_bytes() == b"precious\n"
    os.mkfifo(tmp_path / "serial1.log")
    with pytest.raises(BackendError, match=r"serial1\.log': cannot open: No such device"):
        open_serial_log(tmp_path, 1, append=False, owner=None)  # no reader: it does not block
    reader = os.open(tmp_path / "serial1.log", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(BackendError, match=r"serial1\.log' is not a regular file"):
            open_serial_log(tmp_path, 1, append=False, owner=None)
    finally:
        os.close(reader)
    os.close(open_serial_log(tmp_path, 2, append=False, owner=None))
    assert stat.S_IMODE((tmp_path / "serial2.log").stat().st_mode) == 0o600


@pytest.mark.qemu
async def test_old_attack_truncates_nothing(tmp_path: Path) -> None:
    """A serial log path naming an existing file outside: refused, the file untouched."""
    qemu_binary_or_skip()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    host = await start_host(tmp_path, "host", backend="qemu")
    try:
        xml = guest_xml(devices=f"<serial type='file'><source path='{victim}'/>"
                                "<target port='0'/></serial>")
        with pytest.raises(ConfigUnsupported, match=f"source path '{victim}' is not this "
                           "guest's serial log"):
            await host.conn.define(xml)
    finally:
        await host.conn.close()
        await host.running.stop(grace=0.5)
    assert victim.read_bytes() == b"precious\n"


# --- who QEMU runs as ----------------------------------------------------------------------------


@pytest.mark.skipif(not ROOT, reason="QEMU runs as another user only when the daemon is root")
async def test_missing_qemu_user_is_refused_at_start(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="qemu_user 'virtmig-no-such-user' does not exist"):
        run_as(QemuSettings(user="virtmig-no-such-user"))
    with pytest.raises(InvalidArgument, match="qemu_group 'virtmig-no-such-group' does not"):
        run_as(QemuSettings(user=qemu_settings().user, group="virtmig-no-such-group"))
    assert run_as(QemuSettings(user="root")) is None  # the explicit opt-out
    qemu_binary_or_skip()
    with pytest.raises(InvalidArgument, match="qemu_user 'virtmig-no-such-user' does not exist"):
        await start_host(tmp_path, "host", backend="qemu", qemu_user="virtmig-no-such-user")


def test_kvm_refused_when_qemu_user_cannot_open_it(tmp_path: Path) -> None:
    device = tmp_path / "kvm"
    device.write_bytes(b"")
    st = device.stat()
    other = RunAs(user="someone", uid=st.st_uid + 4242, gid=st.st_gid + 4242, groups=())
    device.chmod(0o600)  # crw------- root root, as on these machines
    why = kvm_refusal(other, str(device))
    assert why.startswith(f"KVM is not usable by QEMU's user 'someone': it cannot open {device} "
                          "(-rw-------")
    device.chmod(0o660)  # Debian's udev rule: group kvm, and the user in it
    assert kvm_refusal(other, str(device))
    assert kvm_refusal(RunAs("someone", other.uid, other.gid, (st.st_gid,)), str(device)) == ""
    assert kvm_refusal(RunAs("someone", st.st_uid, other.gid, ()), str(device)) == ""
    assert "KVM is not available" in kvm_refusal(other, str(tmp_path / "none"))


# --- a confined QEMU -----------------------------------------------------------------------------


@pytest.fixture
async def qemu(tmp_path: Path, storage: Path) -> AsyncIterator[QemuBackend]:
    qemu_binary_or_skip()
    backend = QemuBackend(qemu_settings(storage))
    await within(backend.open(tmp_path / "host"))
    try:
        yield backend
    finally:
        for uuid in list(backend._guests):
            await within(backend.destroy(uuid))
        await within(backend.close())
        assert not kill_leftover_qemus(tmp_path), "a test left QEMU processes running"


def cmdline(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


@pytest.mark.qemu
async def test_qemu_runs_confined(qemu: QemuBackend, storage: Path, tmp_path: Path) -> None:
    spec = make_spec(devices=disk(storage / "disk.img")
                     + "<serial type='pty'><target port='0'/></serial>")
    await within(qemu.start(spec, paused=False))
    pid = qemu.pid(spec.uuid)
    argv = cmdline(pid)
    assert argv[argv.index(b"-sandbox") + 1].decode() == SANDBOX
    status = proc_status(pid)
    assert status["Seccomp"] == "2"  # the filter is in force, not only asked for
    if ROOT:
        user = pwd.getpwnam(TEST_QEMU_USER)
        assert status["Uid"].split() == [str(user.pw_uid)] * 4
        assert status["Gid"].split() == [str(user.pw_gid)] * 4
        assert "0" not in status["Groups"].split()  # none of root's groups
    # Its files are descriptors the daemon opened: the image by fd set, the log it created.
    blocks = await qemu.query(spec.uuid, "query-named-block-nodes")
    assert {b["file"] for b in blocks} == {"/dev/fdset/1"}
    gdir = tmp_path / "host" / spec.uuid
    log = gdir / "serial0.log"
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and log.stat().st_uid == os.geteuid()
    assert stat.S_IMODE(gdir.stat().st_mode) == 0o750
    if ROOT:
        assert gdir.stat().st_gid == pwd.getpwnam(TEST_QEMU_USER).pw_gid
    targets = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
    assert str(storage / "disk.img") in targets and str(log) in targets


@pytest.mark.qemu
async def test_sandbox_can_be_turned_off(tmp_path: Path, storage: Path) -> None:
    qemu_binary_or_skip()
    backend = QemuBackend(QemuSettings(storage_dirs=(str(storage),),
                                       user=qemu_settings().user, sandbox=False))
    await within(backend.open(tmp_path / "host"))
    spec = make_spec()
    try:
        await within(backend.start(spec, paused=True))
        pid = backend.pid(spec.uuid)
        assert b"-sandbox" not in cmdline(pid)
        assert proc_status(pid)["Seccomp"] == "0"
    finally:
        await within(backend.destroy(spec.uuid))
        await within(backend.close())


@pytest.mark.qemu
async def test_start_refuses_a_swapped_image(qemu: QemuBackend, storage: Path,
                                             tmp_path: Path) -> None:
    """Accepted at define time, replaced by a symlink out before start: nothing runs."""
    image = storage / "later.img"
    image.write_bytes(b"\0" * 4096)
    spec = make_spec(devices=disk(image))
    qemu.validate(spec)
    image.unlink()
    image.symlink_to(tmp_path / "outside.img")
    with pytest.raises(BackendError, match=f"<disk type='file' device='disk'> for the qemu "
                       f"backend: source file '{image}' is outside the storage"):
        await within(qemu.start(spec, paused=True))
    assert qemu.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.qemu
async def test_kvm_domain_refused_when_qemu_cannot_open_dev_kvm(qemu: QemuBackend) -> None:
    why = kvm_refusal(qemu._owner)
    if not why:
        pytest.skip("QEMU's user can open /dev/kvm here")
    spec = make_spec(domain_type="kvm")
    qemu.validate(spec)  # a definition may name KVM; starting it here cannot work
    with pytest.raises(BackendError, match=r"KVM is not (usable|available).*/dev/kvm"):
        await within(qemu.start(spec, paused=True))
    assert qemu.state(spec.uuid) is GuestRunState.SHUTOFF


@pytest.mark.qemu
async def test_postcopy_refused_up_front_without_userfaultfd(qemu: QemuBackend) -> None:
    """An unprivileged QEMU where the kernel keeps userfaultfd from it: a post-copy migration
    is refused when the destination is prepared, saying why (not by QEMU, mid-stream)."""
    if not postcopy_refusal(qemu._owner):
        pytest.skip("QEMU's user may use userfaultfd here")
    spec = make_spec()
    with pytest.raises(BackendError, match=r"post-copy is not available on this host: .* "
                       r"vm\.unprivileged_userfaultfd=1"):
        await within(qemu.incoming_start(spec, StreamAddress("127.0.0.1", 0),
                                         MigrationTuning(postcopy=True)))
    assert qemu.state(spec.uuid) is GuestRunState.SHUTOFF
    port = await within(qemu.incoming_start(spec, StreamAddress("127.0.0.1", 0)))
    assert port > 0  # pre-copy only: fine


# --- a migration, both sides confined ------------------------------------------------------------


@pytest.fixture
async def confined_pair(tmp_path: Path, storage: Path) -> AsyncIterator[tuple[Host, Host]]:
    """Two qemu daemons sharing ``storage`` (besides the guest cache)."""
    qemu_binary_or_skip()
    guest_or_skip()
    settings = daemon_settings(storage)  # shared storage: both hosts see the same images
    async with hosts(tmp_path, "qemu", ("src", settings), ("dst", settings)) as (src, dst):
        yield src, dst


def good_heartbeats(log: Path) -> list[int]:
    """The counters of the heartbeats with the guest's memory intact (ok=1) so far."""
    data = log.read_bytes() if log.exists() else b""
    return [int(n) for n in re.findall(rb"HEARTBEAT n=(\d+) \S+ ok=1", data)]


async def heartbeat_above(log: Path, above: int, timeout: float = 90) -> int:
    def above_it() -> int | None:
        beats = good_heartbeats(log)
        return beats[-1] if beats and beats[-1] > above else None

    return await wait_until(above_it, timeout=timeout, interval=0.1,
                            what=f"a heartbeat above {above} in {log}")


@pytest.mark.qemu
async def test_migration_with_both_sides_confined(
    confined_pair: tuple[Host, Host], storage: Path,
) -> None:
    src, dst = confined_pair
    xml = qemu_domain_xml(guest_or_skip(), "vm1", 256, dirty_mb=16, dirty_rate=1).replace(
        "<memballoon", disk(storage / "disk.img", cache="none") + "\n    <memballoon")
    await src.conn.define(xml)
    await src.conn.start("vm1")
    uuid = (await src.conn.lookup("vm1")).uuid
    before = await heartbeat_above(src.serial_log(uuid), 0)
    await asyncio.wait_for(migrate3(src.conn, "vm1", dst.conn, TypedParams(),
                                    MigrateFlags.LIVE), 120)
    assert (await dst.conn.state("vm1"))[0] is DomainState.RUNNING
    assert (await src.conn.state("vm1"))[0] is DomainState.SHUTOFF
    await heartbeat_above(dst.serial_log(uuid), before, 30)  # the guest goes on, memory ok
    backend = dst.daemon.backend
    assert isinstance(backend, QemuBackend)
    status = proc_status(backend.pid(uuid))
    assert status["Seccomp"] == "2"
    if ROOT:
        assert status["Uid"].split()[0] == str(pwd.getpwnam(TEST_QEMU_USER).pw_uid)
        assert grp.getgrgid(int(status["Gid"].split()[0])).gr_name == TEST_QEMU_USER
    blocks = await backend.query(uuid, "query-named-block-nodes")
    assert {b["file"] for b in blocks} == {"/dev/fdset/1"}
