"""The qemu backend's firmware without QEMU: SeaBIOS and OVMF/UEFI (domain XML -> command line,
each refusal, the confinement of firmware paths) and the guest's NVRAM file made from its
template (Debian's ``ovmf`` package: ``.ci/run`` installs it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.daemon.backend_qemu_helpers import guest_xml, make_spec
from virtmig.daemon.backend.qemu import GuestFiles, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.firmware import (
    NVRAM_NAME,
    OVMF_CODE,
    OVMF_VARS,
    Firmware,
    open_firmware,
)
from virtmig.proto.errors import ConfigUnsupported

EMULATOR = "/usr/bin/qemu-system-x86_64"
SETTINGS = QemuSettings(emulators=(EMULATOR,), storage_dirs=("/srv",))
UUID = "8f7d5c1e-2f4e-4f39-9c8e-1c2b3a4d5e6f"
NONE = "<memballoon model='none'/>"


def _cfg(os_extra: str, *, machine: str = "pc", firmware: str = "",
         top: str = "<features><acpi/></features>",
         devices: str = NONE) -> Firmware:
    xml = guest_xml(uuid=UUID, machine=machine, os_extra=os_extra, devices=devices)
    if firmware:
        xml = xml.replace("<os>", f"<os firmware='{firmware}'>")
    xml = xml.replace("<devices>", f"{top}<devices>")
    return parse_config(make_spec(xml), None, SETTINGS).firmware


def _argv(fw: Firmware, fds: tuple[int, ...] = (20, 21)) -> tuple[str, list[str]]:
    args, last = fw.argv(fds, 0)
    return fw.machine_options(), [*args, f"last={last}"]


def _refused(message: str, os_extra: str, **kwargs: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        _cfg(os_extra, **kwargs)
    assert message in str(info.value), str(info.value)


def test_seabios_is_the_default() -> None:
    fw = _cfg("")
    assert fw == Firmware()
    assert _argv(fw, ()) == ("", ["last=0"])
    assert _cfg("", firmware="bios") == Firmware()


def test_seabios_rom_from_the_firmware_folder() -> None:
    fw = _cfg("<loader readonly='yes' type='rom'>/usr/share/seabios/bios-256k.bin</loader>")
    assert fw.rom == "/usr/share/seabios/bios-256k.bin"
    assert _argv(fw, (9,)) == ("", ["-bios", "/proc/self/fd/9", "last=0"])


def test_efi_default_ovmf_as_two_pflash_drives() -> None:
    fw = _cfg("", firmware="efi")
    assert (fw.kind, fw.code, fw.template, fw.secure) == ("efi", OVMF_CODE, OVMF_VARS, False)
    opts, args = _argv(fw)
    assert opts == ",pflash0=pflash0-format,pflash1=pflash1-format"
    assert args == [
        "-add-fd", "fd=20,set=1,opaque=pflash0",
        "-blockdev", '{"driver":"file","filename":"/dev/fdset/1","node-name":"pflash0-storage",'
                     '"read-only":true}',
        "-blockdev", '{"driver":"raw","file":"pflash0-storage","node-name":"pflash0-format",'
                     '"read-only":true}',
        "-add-fd", "fd=21,set=2,opaque=pflash1",
        "-blockdev", '{"driver":"file","filename":"/dev/fdset/2","node-name":"pflash1-storage",'
                     '"read-only":false}',
        "-blockdev", '{"driver":"raw","file":"pflash1-storage","node-name":"pflash1-format",'
                     '"read-only":false}',
        "last=2",
    ]


def test_efi_loader_and_template_named() -> None:
    fw = _cfg("<loader readonly='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE.fd</loader>"
              "<nvram template='/usr/share/OVMF/OVMF_VARS.fd'/>")
    assert (fw.kind, fw.code, fw.template) == ("efi", "/usr/share/OVMF/OVMF_CODE.fd",
                                               "/usr/share/OVMF/OVMF_VARS.fd")


def test_efi_whole_command_line_puts_disks_after_the_pflash_fd_sets() -> None:
    disk = "<disk type='file'><source file='/srv/a.img'/><target dev='vda'/></disk>"
    xml = guest_xml(uuid=UUID, devices=disk + NONE).replace("<os>", "<os firmware='efi'>")
    xml = xml.replace("<devices>", "<features><acpi/></features><devices>")
    cfg = parse_config(make_spec(xml), None, SETTINGS)
    argv = cfg.argv(GuestFiles(disks=(10,), firmware=(20, 21)), incoming=False)
    line = " ".join(argv)
    assert argv[argv.index("-machine") + 1] == (
        "pc,acpi=on,pflash0=pflash0-format,pflash1=pflash1-format")
    assert "-add-fd fd=21,set=2,opaque=pflash1" in line
    assert "-add-fd fd=10,set=3,opaque=disk-vda" in line
    assert GuestFiles(disks=(10,), firmware=(20, 21)).fds == (10, 20, 21)


def test_secure_boot_on_q35() -> None:
    fw = _cfg("<loader readonly='yes' secure='yes' type='pflash'/>", machine="q35",
              top="<features><acpi/><smm state='on'/></features>")
    assert fw.secure and fw.smm is True
    assert fw.code.endswith("OVMF_CODE_4M.secboot.fd")
    assert fw.template.endswith("OVMF_VARS_4M.ms.fd")
    opts, args = _argv(fw)
    assert opts.endswith(",smm=on")
    assert args[-3:-1] == ["-global", "driver=cfi.pflash01,property=secure,value=on"]
    assert _cfg("", top="<features><smm state='off'/></features>").smm is False


@pytest.mark.parametrize(("message", "os_extra", "kwargs"), [
    ("'/etc/passwd' is outside the firmware directories",
     "<loader type='pflash'>/etc/passwd</loader>", {}),
    ("'/srv/OVMF_CODE.fd' is outside the firmware directories",
     "<loader type='pflash'>/srv/OVMF_CODE.fd</loader>", {}),
    ("'OVMF_CODE.fd' is not an absolute path", "<loader type='pflash'>OVMF_CODE.fd</loader>",
     {}),
    ("'/usr/share/OVMF/../../../etc/shadow' is outside the firmware directories",
     "<loader type='rom'>/usr/share/OVMF/../../../etc/shadow</loader>", {}),
    ("<os><nvram template>", "<nvram template='/tmp/vars.fd'/>", {"firmware": "efi"}),
    ("<os><nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram> for the qemu backend: the "
     "guest's NVRAM is always nvram.fd in its own folder: give no path",
     "<nvram>/var/lib/libvirt/qemu/nvram/x_VARS.fd</nvram>", {"firmware": "efi"}),
    ("secure boot needs a q35 machine", "<loader secure='yes' type='pflash'/>", {}),
    ("secure boot needs SMM", "<loader secure='yes' type='pflash'/>",
     {"machine": "q35", "top": "<features><acpi/><smm state='off'/></features>"}),
    ("UEFI firmware without <features><acpi/>", "", {"firmware": "efi", "top": ""}),
    ("<os firmware='bios'> with a pflash <loader>", "<loader type='pflash'/>",
     {"firmware": "bios"}),
    ("an NVRAM is for UEFI", "<nvram template='/usr/share/OVMF/OVMF_VARS.fd'/>", {}),
    ("<os firmware='xen'>", "", {"firmware": "xen"}),
    ("<os><loader readonly='no'>", "<loader readonly='no' type='pflash'/>", {}),
    ("<os firmware='efi'><loader type='rom'>", "<loader type='rom'/>", {"firmware": "efi"}),
    ("unsupported element <os><firmware>",
     "<firmware><feature enabled='yes' name='secure-boot'/></firmware>", {"firmware": "efi"}),
    ("unsupported attribute 'format' of <os><nvram>", "<nvram format='qcow2'/>",
     {"firmware": "efi"}),
    ("<features><smm state='maybe'>", "", {"top": "<features><smm state='maybe'/></features>"}),
    ("unsupported element <features><smm><tseg>", "",
     {"top": "<features><smm state='on'><tseg unit='MiB'>48</tseg></smm></features>"}),
])
def test_firmware_refusals(message: str, os_extra: str, kwargs: dict[str, str]) -> None:
    _refused(message, os_extra, **kwargs)


def test_nvram_created_from_the_template_then_kept(tmp_path: Path) -> None:
    fw = Firmware(kind="efi", code=OVMF_CODE, template=OVMF_VARS)
    fds = open_firmware(fw, tmp_path, None)
    try:
        code, nvram = fds
        assert os.get_blocking(code) and os.fstat(code).st_size == os.path.getsize(OVMF_CODE)
        assert os.pread(nvram, 16, 0) == Path(OVMF_VARS).read_bytes()[:16]
        os.pwrite(nvram, b"guest-variables!", 0)  # what the guest's firmware writes
    finally:
        for fd in fds:
            os.close(fd)
    made = tmp_path / NVRAM_NAME
    assert made.stat().st_mode & 0o777 == 0o600
    assert made.stat().st_size == os.path.getsize(OVMF_VARS)
    fds = open_firmware(fw, tmp_path, None)  # the next start keeps the guest's variables
    try:
        assert os.pread(fds[1], 16, 0) == b"guest-variables!"
    finally:
        for fd in fds:
            os.close(fd)


def test_nvram_symlink_is_not_followed(tmp_path: Path) -> None:
    (tmp_path / NVRAM_NAME).symlink_to(tmp_path / "elsewhere")
    fw = Firmware(kind="efi", code=OVMF_CODE, template=OVMF_VARS)
    with pytest.raises(Exception, match=r"NVRAM .* cannot open"):
        open_firmware(fw, tmp_path, None)
    assert not (tmp_path / "elsewhere").exists()
