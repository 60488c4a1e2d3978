"""The guest's firmware: SeaBIOS or OVMF/UEFI, ``<os><loader>``/``<nvram>`` -> :class:`Firmware`.

Concern: which firmware a definition boots and how it reaches QEMU, and the guest's NVRAM file
(the UEFI variable store).  Firmware files must lie in one of :data:`FIRMWARE_DIRS` (the folders
Debian's ``seabios``, ``qemu-system-data`` and ``ovmf`` packages install; after ``realpath``, no
symlink followed below the folder); QEMU gets each as a descriptor the daemon opened.

* No ``<loader>``, ``<os firmware='bios'>``: SeaBIOS, QEMU's built-in default (nothing added).
  ``<loader type='rom'>PATH</loader>`` (a SeaBIOS image in a firmware folder) ->
  ``-bios /proc/self/fd/N``.
* ``<os firmware='efi'>`` and/or ``<loader readonly='yes' type='pflash'>CODE</loader>`` -> OVMF
  as two pflash drives: ``-blockdev`` (read-only code, writable NVRAM, both ``/dev/fdset/N``)
  and ``-machine pflash0=,pflash1=``.  Without a ``<loader>`` path: :data:`OVMF_CODE` (or
  :data:`OVMF_CODE_SECURE` with ``secure='yes'``).  UEFI needs ``<features><acpi/>`` (OVMF
  hangs without ACPI; libvirt refuses it too).
* ``<nvram template=TEMPLATE/>``: the guest's NVRAM is always ``nvram.fd`` in its folder (a
  path in ``<nvram>`` is refused: it is host-local, and the migratable XML would carry it to a
  destination whose folders differ); when absent at start it is created from the template
  (default :data:`OVMF_VARS`, or :data:`OVMF_VARS_SECURE` with secure boot), 0600, the
  daemon's, QEMU's group.  On migration the destination creates its own from the template and
  QEMU's pflash device sends the variable store with the guest's state (it is RAM in QEMU,
  written back to the destination's file once the guest runs there).
* ``<loader secure='yes'>``: secure boot, q35 only -> ``-machine smm=on`` and
  ``-global driver=cfi.pflash01,property=secure,value=on``; ``<features><smm state='on'>``
  (``'off'`` is refused with secure boot).  ``<os><firmware>`` feature lists (autoselection by
  feature) are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from lxml import etree

from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.backend.qemu.confine import RunAs, image_refusal, open_image
from virtmig.proto.errors import ConfigUnsupported

__all__ = ["FIRMWARE_DIRS", "NVRAM_NAME", "OVMF_CODE", "OVMF_VARS", "Firmware", "open_firmware",
           "parse_firmware"]

FIRMWARE_DIRS = ("/usr/share/OVMF", "/usr/share/qemu", "/usr/share/seabios")
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
OVMF_CODE_SECURE = "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"
OVMF_VARS_SECURE = "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"
NVRAM_NAME = "nvram.fd"


@dataclass(frozen=True)
class Firmware:
    """SeaBIOS (``kind='bios'``, optionally a ``rom`` image) or OVMF (``kind='efi'``)."""

    kind: str = "bios"  # bios | efi
    rom: str = ""  # bios: a SeaBIOS image ("": QEMU's own)
    code: str = ""  # efi: the pflash code image
    template: str = ""  # efi: the NVRAM template
    secure: bool = False
    smm: bool | None = None  # None: the machine's default

    def machine_options(self) -> str:
        opts = ""
        if self.kind == "efi":
            opts += ",pflash0=pflash0-format,pflash1=pflash1-format"
        if self.smm is not None:
            opts += f",smm={'on' if self.smm else 'off'}"
        return opts

    def argv(self, fds: tuple[int, ...], fdset: int) -> tuple[list[str], int]:
        """The firmware's arguments: ``fds`` the ROM's (bios) or the code's and the NVRAM's
        (efi) descriptors; pflash images go in fd sets ``fdset + 1`` onwards; returns them and
        the last fd set used."""
        if self.kind == "bios":
            return (["-bios", f"/proc/self/fd/{fds[0]}"] if self.rom else []), fdset
        args: list[str] = []
        for unit, fd in enumerate(fds):
            fdset += 1
            ro = unit == 0
            args += [
                "-add-fd", f"fd={fd},set={fdset},opaque=pflash{unit}",
                "-blockdev", _json({"driver": "file", "filename": f"/dev/fdset/{fdset}",
                                    "node-name": f"pflash{unit}-storage", "read-only": ro}),
                "-blockdev", _json({"driver": "raw", "file": f"pflash{unit}-storage",
                                    "node-name": f"pflash{unit}-format", "read-only": ro}),
            ]
        if self.secure:
            args += ["-global", "driver=cfi.pflash01,property=secure,value=on"]
        return args, fdset


def _json(value: dict[str, object]) -> str:
    return json.dumps(value, separators=(",", ":"))


def _refuse(what: str, why: str) -> ConfigUnsupported:
    return ConfigUnsupported(f"unsupported {what} for the qemu backend: {why}")


def _text(el: etree._Element) -> str:
    return "".join(str(t) for t in el.itertext()).strip()


def _firmware_path(what: str, path: str) -> str:
    why = image_refusal(path, FIRMWARE_DIRS).replace("storage directories",
                                                      "firmware directories")
    if why:
        raise _refuse(what, why)
    return path


def parse_firmware(root: etree._Element, machine: str) -> Firmware:
    """The firmware of the domain ``root`` (``machine``: its machine type)."""
    os_el = root.find("os")
    smm_el = root.find("features/smm")
    smm = None if smm_el is None else _smm(smm_el)
    if os_el is None:
        return Firmware(smm=smm)
    choice = os_el.get("firmware", "")
    if choice not in ("", "bios", "efi"):
        raise _refuse(f"<os firmware='{choice}'>", "bios or efi")
    loader, nvram = os_el.find("loader"), os_el.find("nvram")
    kind = loader.get("type", "rom") if loader is not None else ""
    if choice == "efi" or kind == "pflash":
        if choice == "bios":
            raise _refuse("<os firmware='bios'> with a pflash <loader>", "pflash is UEFI")
        efi = _efi(loader, nvram, machine, smm)
        if root.find("features/acpi") is None:
            raise _refuse("UEFI firmware without <features><acpi/>", "OVMF needs ACPI (it "
                          "hangs without it; libvirt refuses it too)")
        return efi
    if nvram is not None:
        raise _refuse("<os><nvram>", "an NVRAM is for UEFI (pflash) firmware")
    if loader is None:
        return Firmware(smm=smm)
    if kind != "rom" or loader.get("secure", "no") != "no" or loader.get("readonly") == "no":
        raise _refuse(f"<os><loader type='{kind}'>", "a SeaBIOS rom (type='rom', read-only)")
    return Firmware(rom=_firmware_path("<os><loader>", _text(loader)), smm=smm)


def _smm(el: etree._Element) -> bool:
    state = el.get("state", "on")
    if state not in ("on", "off"):  # (<tseg> is refused by the table)
        raise _refuse(f"<features><smm state='{state}'>", "state='on' or 'off'")
    return state == "on"


def _efi(loader: etree._Element | None, nvram: etree._Element | None, machine: str,
         smm: bool | None) -> Firmware:
    secure = loader is not None and loader.get("secure", "no") == "yes"
    if loader is not None:
        if loader.get("secure", "no") not in ("yes", "no"):
            raise _refuse(f"<os><loader secure='{loader.get('secure')}'>", "yes or no")
        if loader.get("readonly", "yes") != "yes":
            raise _refuse("<os><loader readonly='no'>", "the UEFI code is read-only")
        if loader.get("type", "pflash") != "pflash":
            raise _refuse(f"<os firmware='efi'><loader type='{loader.get('type')}'>",
                          "UEFI firmware is type='pflash'")
    if secure:
        if "q35" not in machine:
            raise _refuse("<os><loader secure='yes'>", "secure boot needs a q35 machine")
        if smm is False:
            raise _refuse("<features><smm state='off'> with secure boot", "secure boot needs "
                          "SMM")
        smm = True
    default_code, default_vars = ((OVMF_CODE_SECURE, OVMF_VARS_SECURE) if secure
                                  else (OVMF_CODE, OVMF_VARS))
    code = _text(loader) if loader is not None else ""
    code = _firmware_path("<os><loader>", code) if code else default_code
    template = default_vars
    if nvram is not None:
        template = _firmware_path("<os><nvram template>",
                                  nvram.get("template", "")) if nvram.get("template") \
            else default_vars
        named = _text(nvram)
        if named:  # a host path: it would travel to a destination whose folders differ
            raise _refuse(f"<os><nvram>{named}</nvram>",
                          f"the guest's NVRAM is always {NVRAM_NAME} in its own folder: give no "
                          "path (<nvram template=...> only)")
    return Firmware(kind="efi", code=code, template=template, secure=secure, smm=smm)


def open_firmware(fw: Firmware, gdir: Path, owner: RunAs | None) -> tuple[int, ...]:
    """The descriptors QEMU gets for ``fw`` (see :meth:`Firmware.argv`): the ROM (readable by
    QEMU's user: QEMU reads ``/proc/self/fd/N`` itself), or the code and the guest's NVRAM in
    ``gdir`` (created from the template when absent).  The caller closes them."""
    if fw.kind == "bios":
        if not fw.rom:
            return ()
        return (open_image("<os><loader>", fw.rom, FIRMWARE_DIRS, writable=False,
                           reader=owner),)
    code = open_image("<os><loader>", fw.code, FIRMWARE_DIRS, writable=False)
    try:
        return code, _open_nvram(fw, gdir / NVRAM_NAME, owner)
    except BaseException:
        os.close(code)
        raise


def _open_nvram(fw: Firmware, path: Path, owner: RunAs | None) -> int:
    """The guest's NVRAM opened read-write (no symlink followed); created from the template
    when absent."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        fd = _create_nvram(fw, path, owner)
    except OSError as exc:
        raise BackendError(f"NVRAM '{path}': cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BackendError(f"NVRAM '{path}' is not a regular file")
    return fd


def _create_nvram(fw: Firmware, path: Path, owner: RunAs | None) -> int:
    template = open_image("<os><nvram template>", fw.template, FIRMWARE_DIRS, writable=False)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        os.close(template)
        raise BackendError(f"NVRAM '{path}': cannot create: {exc.strerror or exc}") from None
    try:
        size = os.fstat(template).st_size
        copied = 0
        while copied < size:
            n = os.sendfile(fd, template, copied, size - copied)
            if n == 0:
                break
            copied += n
        if owner is not None:
            with contextlib.suppress(OSError):
                os.fchown(fd, -1, owner.gid)
    except OSError as exc:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise BackendError(f"NVRAM '{path}': cannot create: {exc.strerror or exc}") from None
    finally:
        os.close(template)
    return fd
