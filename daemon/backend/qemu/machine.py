"""The domain-level elements -> :class:`MachineConfig` -> ``-machine`` options, ``-rtc``,
``-boot``, ``-action``; and pinning the machine type of a definition.

Concern: what libvirt's domain XML says about the machine as a whole, other than its vCPUs and
devices, and how each becomes part of QEMU's command line (pure values), plus
:func:`pin_machine`, which rewrites ``<os><type machine=>`` to the concrete versioned type the
emulator's alias stands for (``pc`` -> ``pc-i440fx-7.2``), so that every host runs the same one.

* ``<features>``: ``<acpi/>`` -> ``acpi=on``, and without it ``acpi=off`` (libvirt's rule);
  ``<apic/>`` and ``<pae/>`` are what every x86_64 QEMU CPU has (accepted, nothing to add).
* ``<clock offset='utc'|'localtime'>`` -> ``-rtc base=utc|localtime``; timers: ``rtc``
  (``tickpolicy='catchup'`` -> ``driftfix=slew``, ``'delay'``: QEMU's default), ``pit``
  (``tickpolicy='delay'``: the default; under KVM ``'delay'``/``'discard'`` set
  ``kvm-pit.lost_tick_policy``), ``hpet`` (``present='yes'|'no'`` -> ``hpet=on|off``).
* ``<os><boot dev=...>`` -> ``-boot order=`` (hd c, cdrom d, network n, fd a; with a kernel QEMU
  boots the kernel first, as under libvirt); ``<bootmenu enable= timeout=>`` -> ``menu=``,
  ``splash-time=``.
* ``<on_poweroff>destroy`` (QEMU exits; the daemon follows: ``shutoff (shutdown)``) or
  ``restart`` (``-action shutdown=pause``: QEMU stops the guest at its poweroff and the backend
  resets and runs it again, as libvirt's "fake reboot" does; the QEMU process and the guest's
  state in the daemon stay), ``<on_reboot>restart|destroy`` (``destroy``: ``-action
  reboot=shutdown``, QEMU exits at the guest's reboot), ``<on_crash>destroy|preserve`` (there
  is no panic device, so QEMU never reports a crash: both are honoured by doing nothing, as
  under libvirt without a ``<panic>``).  Refused as libvirt's QEMU driver refuses them
  (``qemuValidateLifecycleAction``, with its messages): ``preserve`` for ``on_poweroff`` and
  ``on_reboot``, and ``on_poweroff`` ``restart`` with ``on_reboot`` ``destroy`` (the reboot
  would restart the guest); and, as before, ``rename-restart`` and ``coredump-*`` (the daemon
  takes no core dumps).
* ``<currentMemory>`` equal to ``<memory>`` (anything below needs a balloon);
  ``<seclabel type='none'>`` (no labelling: what the backend does).
"""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from virtmig.proto.errors import ConfigUnsupported

__all__ = ["MachineConfig", "parse_machine", "pin_machine"]

_BOOT_DEVS = {"hd": "c", "cdrom": "d", "network": "n", "fd": "a"}
_ACTIONS = {
    "on_poweroff": ("destroy", "restart"),
    "on_reboot": ("restart", "destroy"),
    "on_crash": ("destroy", "preserve"),
}
# libvirt's QEMU driver's refusals (qemuValidateLifecycleAction), in its words.
_NO_PRESERVE = "qemu driver doesn't support the 'preserve' action for 'on_reboot'/'on_poweroff'"
_NO_RESTART_WITH_DESTROY = ("qemu driver doesn't support 'onReboot' set to 'destroy and "
                            "'onPoweroff' set to 'reboot'")
_MAX_SPLASH_MS = 65535


@dataclass(frozen=True)
class MachineConfig:
    """The machine-wide settings of a guest (defaults: a definition without those elements)."""

    acpi: bool = False
    hpet: bool | None = None  # None: the machine type's default
    rtc_base: str = "utc"  # utc | localtime
    rtc_slew: bool = False
    pit_policy: str = ""  # kvm-pit's lost_tick_policy under KVM ("": QEMU's default)
    boot_order: str = ""
    boot_menu: bool | None = None
    splash_ms: int | None = None
    reboot_destroys: bool = False
    poweroff_restarts: bool = False  # <on_poweroff>restart: a guest poweroff resets it instead

    def machine_options(self) -> str:
        """What follows the machine type in ``-machine``."""
        opts = f",acpi={'on' if self.acpi else 'off'}"
        if self.hpet is not None:
            opts += f",hpet={'on' if self.hpet else 'off'}"
        return opts

    def argv(self) -> list[str]:
        args = ["-rtc", f"base={self.rtc_base}" + (",driftfix=slew" if self.rtc_slew else "")]
        if self.pit_policy:
            args += ["-global", f"kvm-pit.lost_tick_policy={self.pit_policy}"]
        boot = []
        if self.boot_order:
            boot.append(f"order={self.boot_order}")
        if self.boot_menu is not None:
            boot.append(f"menu={'on' if self.boot_menu else 'off'}")
        if self.splash_ms is not None:
            boot.append(f"splash-time={self.splash_ms}")
        if boot:
            args += ["-boot", ",".join(boot)]
        if self.reboot_destroys:
            args += ["-action", "reboot=shutdown"]
        if self.poweroff_restarts:  # QEMU stops; the backend resets and runs it again
            args += ["-action", "shutdown=pause"]
        return args


def _refuse(what: str, why: str = "") -> ConfigUnsupported:
    return ConfigUnsupported(f"unsupported {what} for the qemu backend" + (f": {why}" if why
                                                                            else ""))


def parse_machine(root: etree._Element, accel: str, memory_kib: int,
                  current_memory_kib: int) -> MachineConfig:
    """The machine-wide settings of the domain ``root`` (``accel``: ``tcg`` or ``kvm``)."""
    if current_memory_kib not in (0, memory_kib):
        raise _refuse("<currentMemory> below <memory>",
                      "it needs a memory balloon, which the qemu backend does not have")
    _check_seclabels(root)
    _check_actions(root)
    features = root.find("features")
    rtc_base, rtc_slew, pit_policy, hpet = _clock(root.find("clock"), accel)
    boot_order, boot_menu, splash_ms = _boot(root.find("os"))
    reboot, poweroff = root.find("on_reboot"), root.find("on_poweroff")
    return MachineConfig(
        acpi=features is not None and features.find("acpi") is not None,
        hpet=hpet, rtc_base=rtc_base, rtc_slew=rtc_slew, pit_policy=pit_policy,
        boot_order=boot_order, boot_menu=boot_menu, splash_ms=splash_ms,
        reboot_destroys=reboot is not None and _text(reboot) == "destroy",
        poweroff_restarts=poweroff is not None and _text(poweroff) == "restart",
    )


def _text(el: etree._Element) -> str:
    return "".join(str(t) for t in el.itertext()).strip()


def _check_seclabels(root: etree._Element) -> None:
    for label in root.iterfind("seclabel"):
        kind = label.get("type", "dynamic")
        if kind != "none" or label.get("relabel", "no") != "no":
            raise _refuse(f"<seclabel type='{kind}'>",
                          "the qemu backend applies no security labels (type='none' only)")


def _check_actions(root: etree._Element) -> None:
    actions = {tag: _text(el) for tag in _ACTIONS for el in root.iterfind(tag)}
    if "preserve" in (actions.get("on_poweroff"), actions.get("on_reboot")):
        raise ConfigUnsupported(_NO_PRESERVE)
    if actions.get("on_poweroff") == "restart" and actions.get("on_reboot") == "destroy":
        raise ConfigUnsupported(_NO_RESTART_WITH_DESTROY)
    for tag, allowed in _ACTIONS.items():
        for el in root.iterfind(tag):
            value = _text(el)
            if value not in allowed:
                raise _refuse(f"<{tag}>{value}</{tag}>",
                              f"supported: {', '.join(allowed)}")


def _clock(clock: etree._Element | None, accel: str) -> tuple[str, bool, str, bool | None]:
    """``-rtc`` base, RTC drift fix, kvm-pit's lost tick policy, HPET on/off."""
    if clock is None:
        return "utc", False, "", None
    offset = clock.get("offset", "utc")
    if offset not in ("utc", "localtime"):
        raise _refuse(f"<clock offset='{offset}'>", "utc or localtime only")
    slew, pit, hpet = False, "", None
    seen: set[str] = set()
    for timer in clock.iterfind("timer"):
        name, policy, present = timer.get("name", ""), timer.get("tickpolicy"), \
            timer.get("present")
        label = f"<clock><timer name='{name}'>"
        if name in seen:
            raise _refuse(label, "given twice")
        seen.add(name)
        if name == "hpet":
            if policy is not None or present not in (None, "yes", "no"):
                raise _refuse(label, "present='yes'|'no' only")
            hpet = None if present is None else present == "yes"
        elif name in ("rtc", "pit"):
            if present not in (None, "yes"):
                raise _refuse(label, f"the {name} cannot be removed")
            if name == "rtc" and policy not in (None, "delay", "catchup"):
                raise _refuse(label, f"tickpolicy '{policy}' (delay or catchup)")
            slew = slew or (name == "rtc" and policy == "catchup")
            if name == "pit":
                pit = _pit_policy(label, policy, accel)
        else:
            raise _refuse(label)
    return offset, slew, pit, hpet


def _pit_policy(label: str, policy: str | None, accel: str) -> str:
    if policy in (None, "delay"):
        return "delay" if accel == "kvm" and policy else ""
    if policy == "discard" and accel == "kvm":
        return "discard"
    raise _refuse(label, f"tickpolicy '{policy}' (delay; discard under KVM)")


def _boot(os_el: etree._Element | None) -> tuple[str, bool | None, int | None]:
    if os_el is None:
        return "", None, None
    order = ""
    for boot in os_el.iterfind("boot"):
        dev = boot.get("dev", "")
        letter = _BOOT_DEVS.get(dev)
        if letter is None:
            raise _refuse(f"<os><boot dev='{dev}'>", "hd, cdrom, network or fd")
        if letter in order:
            raise _refuse(f"<os><boot dev='{dev}'>", "given twice")
        order += letter
    menu_el = os_el.find("bootmenu")
    if menu_el is None:
        return order, None, None
    enable = menu_el.get("enable", "")
    if enable not in ("yes", "no"):
        raise _refuse(f"<os><bootmenu enable='{enable}'>", "yes or no")
    raw = menu_el.get("timeout")
    splash = None
    if raw is not None:
        if not raw.isascii() or not raw.isdigit() or int(raw) > _MAX_SPLASH_MS:
            raise _refuse(f"<os><bootmenu timeout='{raw}'>", f"0-{_MAX_SPLASH_MS} ms")
        splash = int(raw)
    return order, enable == "yes", splash


def pin_machine(xml: str, machine: str) -> str:
    """``xml`` with ``<os><type machine='MACHINE'>`` (the ``<os><type>`` is added if missing)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False, remove_blank_text=False)
    root = etree.fromstring(xml.encode("utf-8"), parser)
    os_el = root.find("os")
    if os_el is None:
        os_el = etree.SubElement(root, "os")
    type_el = os_el.find("type")
    if type_el is None:
        type_el = etree.Element("type")
        type_el.text = "hvm"
        os_el.insert(0, type_el)
    type_el.set("machine", machine)
    return etree.tostring(root.getroottree(), encoding="unicode")  # comments around it kept
