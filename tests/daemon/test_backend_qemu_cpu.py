"""The qemu backend without QEMU: vCPUs, CPU models, clock, boot, features, lifecycle actions
(domain XML -> command line, and each refusal), the emulator probe's parsing, and machine type
pinning."""

from __future__ import annotations

import pytest

from tests.daemon.backend_qemu_helpers import guest_xml, make_spec
from virtmig.daemon.backend.qemu import GuestFiles, QemuSettings, parse_config
from virtmig.daemon.backend.qemu.caps import EmulatorCaps, parse_cpu_help, parse_machine_help
from virtmig.daemon.backend.qemu.config import canonical_xml
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.errors import ConfigUnsupported

EMULATOR = "/usr/bin/qemu-system-x86_64"
SETTINGS = QemuSettings(emulators=(EMULATOR,))
CAPS = EmulatorCaps(
    machines=frozenset({"pc", "q35", "pc-i440fx-7.2", "pc-q35-7.2"}),
    aliases={"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"},
    cpu_models=frozenset({"qemu64", "Nehalem", "Skylake-Client", "host", "max", "base"}),
    cpu_flags=frozenset({"x2apic", "sse4.2", "lahf-lm", "avx"}),
)


def _xml(extra: str = "", *, vcpu: str = "<vcpu>1</vcpu>", domain_type: str = "qemu",
         os_extra: str = "") -> str:
    xml = guest_xml(domain_type=domain_type, os_extra=os_extra)
    return xml.replace("<vcpu>1</vcpu>", vcpu).replace("<devices>", f"{extra}<devices>")


def _argv(xml: str) -> list[str]:
    cfg = parse_config(make_spec(xml), {EMULATOR: CAPS}, SETTINGS)
    return cfg.argv(GuestFiles(), incoming=False)


def _opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_vcpus_topology_and_current() -> None:
    argv = _argv(_xml("<cpu><topology sockets='2' dies='1' cores='3' threads='2'/></cpu>",
                      vcpu="<vcpu placement='static' current='4'>12</vcpu>"))
    assert _opt(argv, "-smp") == "4,maxcpus=12,sockets=2,dies=1,cores=3,threads=2"
    assert "-cpu" not in argv  # a topology alone keeps QEMU's default model
    flat = _argv(_xml(vcpu="<vcpu current='1'>3</vcpu>"))
    assert _opt(flat, "-smp") == "1,maxcpus=3,sockets=3,dies=1,cores=1,threads=1"
    no_dies = _argv(_xml("<cpu><topology sockets='1' cores='2' threads='1'/></cpu>",
                         vcpu="<vcpu>2</vcpu>"))
    assert _opt(no_dies, "-smp") == "2,maxcpus=2,sockets=1,dies=1,cores=2,threads=1"


def test_custom_model_and_features() -> None:
    argv = _argv(_xml("<cpu mode='custom' match='exact' check='partial'>"
                      "<model fallback='forbid'>Nehalem</model>"
                      "<feature policy='require' name='x2apic'/>"
                      "<feature policy='disable' name='sse4.2'/>"
                      "<feature policy='force' name='lahf_lm'/>"
                      "<feature policy='forbid' name='avx'/></cpu>"))
    assert _opt(argv, "-cpu") == "Nehalem,x2apic=on,sse4.2=off,lahf-lm=on,avx=off,enforce=on"
    unchecked = _argv(_xml("<cpu check='none'><model>qemu64</model></cpu>"))
    assert _opt(unchecked, "-cpu") == "qemu64"  # check='none': QEMU may drop what it cannot do


def test_modes() -> None:
    assert _opt(_argv(_xml("<cpu mode='maximum' migratable='on'/>")), "-cpu") == \
        "max,migratable=on"
    kvm = _argv(_xml("<cpu mode='host-passthrough'><feature policy='disable' name='avx'/></cpu>",
                     domain_type="kvm"))
    assert _opt(kvm, "-cpu") == "host,avx=off"


CPU_REFUSED = [
    ("topology-product", "<cpu><topology sockets='2' cores='2' threads='1'/></cpu>",
     "<vcpu>2</vcpu>", "CPU topology doesn't match maximum vcpu count"),
    ("topology-missing", "<cpu><topology sockets='1' threads='1'/></cpu>", "<vcpu>1</vcpu>",
     "Missing required attribute 'cores' in element 'topology'"),
    ("topology-zero", "<cpu><topology sockets='0' cores='1' threads='1'/></cpu>",
     "<vcpu>1</vcpu>", "Invalid value for attribute 'sockets' in element 'topology': '0'"),
    ("current-above-max", "", "<vcpu current='3'>2</vcpu>",
     "maxvcpus must not be less than current vcpus (2 < 3)"),
    ("placement-auto", "", "<vcpu placement='auto'>1</vcpu>", "<vcpu placement='auto'>"),
    ("unknown-model", "<cpu><model>Pentium9000</model></cpu>", "<vcpu>1</vcpu>",
     "CPU model <cpu><model>Pentium9000</model>"),
    ("model-host", "<cpu mode='custom'><model>host</model></cpu>", "<vcpu>1</vcpu>",
     "<model>host</model>"),
    ("unknown-feature", "<cpu><model>qemu64</model><feature name='warp-drive'/></cpu>",
     "<vcpu>1</vcpu>", "<cpu><feature name='warp-drive'>"),
    ("optional-feature", "<cpu><model>qemu64</model><feature policy='optional' name='avx'/>"
     "</cpu>", "<vcpu>1</vcpu>", "<cpu><feature policy='optional' name='avx'>"),
    ("feature-twice", "<cpu><model>qemu64</model><feature name='avx'/>"
     "<feature policy='disable' name='avx'/></cpu>", "<vcpu>1</vcpu>", "more than once"),
    ("feature-no-model", "<cpu><feature name='avx'/></cpu>", "<vcpu>1</vcpu>",
     "features need a <model>"),
    ("host-model-named", "<cpu mode='host-model'><model>qemu64</model></cpu>", "<vcpu>1</vcpu>",
     "<cpu mode='host-model'><model>"),
    ("host-model-migratable", "<cpu mode='host-model' migratable='on'/>", "<vcpu>1</vcpu>",
     "<cpu mode='host-model' migratable>"),
    ("passthrough-tcg", "<cpu mode='host-passthrough'/>", "<vcpu>1</vcpu>",
     "<cpu mode='host-passthrough'> needs KVM"),
    ("match-minimum", "<cpu match='minimum'><model>qemu64</model></cpu>", "<vcpu>1</vcpu>",
     "<cpu match='minimum'>"),
    ("vendor", "<cpu><model>qemu64</model><vendor>Intel</vendor></cpu>", "<vcpu>1</vcpu>",
     "unsupported element <cpu><vendor>"),
    ("cache", "<cpu><cache mode='passthrough'/></cpu>", "<vcpu>1</vcpu>",
     "unsupported element <cpu><cache>"),
]


@pytest.mark.parametrize(("extra", "vcpu", "message"), [r[1:] for r in CPU_REFUSED],
                         ids=[r[0] for r in CPU_REFUSED])
def test_cpu_refusals(extra: str, vcpu: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        _argv(_xml(extra, vcpu=vcpu))
    assert message in str(info.value)


def _hv(children: str, attrs: str = "") -> str:
    return f"<features><acpi/><hyperv{attrs}>{children}</hyperv></features>"


def test_hyperv_basics_go_on_the_cpu() -> None:
    basics = ("<relaxed state='on'/><vapic state='on'/>"
              "<spinlocks state='on' retries='8191'/>")
    alone = _argv(_xml(_hv(basics, " mode='custom'")))
    assert _opt(alone, "-cpu") == "qemu64,hv-relaxed=on,hv-vapic=on,hv-spinlocks=0x1fff"
    modelled = _argv(_xml(_hv("<relaxed state='on'/>") + "<cpu><model>Nehalem</model>"
                          "<feature policy='disable' name='avx'/></cpu>"))
    assert _opt(modelled, "-cpu") == "Nehalem,avx=off,hv-relaxed=on,enforce=on"
    off = _argv(_xml(_hv("<relaxed state='off'/><spinlocks state='off'/>")))
    assert "-cpu" not in off  # nothing to turn on: QEMU's defaults


HYPERV_REFUSED = [
    ("passthrough", _hv("", " mode='passthrough'"), "<features><hyperv mode='passthrough'>"),
    ("no-state", _hv("<relaxed/>"),
     "missing 'state' attribute for HyperV Enlightenment feature 'relaxed'"),
    ("bad-state", _hv("<vapic state='yes'/>"), "feature 'vapic'"),
    ("twice", _hv("<relaxed state='on'/><relaxed state='off'/>"), "given twice"),
    ("no-retries", _hv("<spinlocks state='on'/>"), "missing HyperV spinlock retry count"),
    ("few-retries", _hv("<spinlocks state='on' retries='4094'/>"),
     "HyperV spinlock retry count must be at least 4095"),
    ("bad-retries", _hv("<spinlocks state='on' retries='0x1fff'/>"),
     "invalid HyperV spinlock retry count"),
    ("synic", _hv("<synic state='on'/>"), "unsupported element <features><hyperv><synic>"),
]


@pytest.mark.parametrize(("extra", "message"), [r[1:] for r in HYPERV_REFUSED],
                         ids=[r[0] for r in HYPERV_REFUSED])
def test_hyperv_refusals(extra: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        _argv(_xml(extra))
    assert message in str(info.value)


def test_machine_wide_settings() -> None:
    argv = _argv(_xml("<features><acpi/><apic/><pae/></features>"
                      "<clock offset='localtime'><timer name='rtc' tickpolicy='catchup'/>"
                      "<timer name='pit' tickpolicy='delay'/><timer name='hpet' present='no'/>"
                      "</clock><on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot>"
                      "<on_crash>destroy</on_crash><currentMemory unit='MiB'>64</currentMemory>",
                      os_extra="<boot dev='cdrom'/><boot dev='hd'/><boot dev='network'/>"
                               "<bootmenu enable='yes' timeout='500'/>"))
    assert _opt(argv, "-machine") == "pc,acpi=on,hpet=off"
    assert _opt(argv, "-rtc") == "base=localtime,driftfix=slew"
    assert _opt(argv, "-boot") == "order=dcn,menu=on,splash-time=500"
    assert _opt(argv, "-action") == "reboot=shutdown"
    assert "-global" not in argv  # the PIT's delay policy is TCG's behaviour: nothing to add
    kvm = _argv(_xml("<clock offset='utc'><timer name='pit' tickpolicy='discard'/>"
                     "<timer name='hpet' present='yes'/></clock>", domain_type="kvm"))
    assert _opt(kvm, "-global") == "kvm-pit.lost_tick_policy=discard"
    assert _opt(kvm, "-machine") == "pc,acpi=off,hpet=on"  # no <acpi/>: off, as in libvirt
    plain = _argv(_xml("<on_reboot>restart</on_reboot><on_crash>preserve</on_crash>"))
    assert _opt(plain, "-rtc") == "base=utc"
    assert "-boot" not in plain and "-action" not in plain


MACHINE_REFUSED = [
    ("clock-offset", "<clock offset='variable'/>", "",
     "<clock offset='variable'>"),
    ("timer-kvmclock", "<clock offset='utc'><timer name='kvmclock' present='no'/></clock>", "",
     "<clock><timer name='kvmclock'>"),
    ("rtc-merge", "<clock offset='utc'><timer name='rtc' tickpolicy='merge'/></clock>", "",
     "tickpolicy 'merge'"),
    ("pit-discard-tcg", "<clock offset='utc'><timer name='pit' tickpolicy='discard'/></clock>",
     "", "<clock><timer name='pit'>"),
    ("rtc-absent", "<clock offset='utc'><timer name='rtc' present='no'/></clock>", "",
     "the rtc cannot be removed"),
    ("boot-dev", "", "<boot dev='floppy'/>", "<os><boot dev='floppy'>"),
    ("bootmenu-timeout", "", "<bootmenu enable='yes' timeout='99999'/>", "timeout='99999'"),
    ("poweroff-preserve", "<on_poweroff>preserve</on_poweroff>", "",
     "unsupported configuration: qemu driver doesn't support the 'preserve' action for "
     "'on_reboot'/'on_poweroff'"),
    ("restart-reboot-destroy", "<on_poweroff>restart</on_poweroff><on_reboot>destroy</on_reboot>",
     "", "unsupported configuration: qemu driver doesn't support 'onReboot' set to 'destroy and "
     "'onPoweroff' set to 'reboot'"),
    ("poweroff-rename", "<on_poweroff>rename-restart</on_poweroff>", "",
     "<on_poweroff>rename-restart</on_poweroff> for the qemu backend: supported: destroy, "
     "restart"),
    ("reboot-preserve", "<on_reboot>preserve</on_reboot>", "",
     "qemu driver doesn't support the 'preserve' action for 'on_reboot'/'on_poweroff'"),
    ("crash-restart", "<on_crash>restart</on_crash>", "",
     "<on_crash>restart</on_crash> for the qemu backend: supported: destroy, preserve"),
    ("crash-coredump", "<on_crash>coredump-restart</on_crash>", "",
     "<on_crash>coredump-restart</on_crash>"),
    ("current-memory", "<currentMemory unit='MiB'>32</currentMemory>", "",
     "<currentMemory> below <memory>"),
    ("pm", "<pm><suspend-to-mem enabled='no'/></pm>", "", "unsupported element <pm>"),
]


@pytest.mark.parametrize(("extra", "os_extra", "message"), [r[1:] for r in MACHINE_REFUSED],
                         ids=[r[0] for r in MACHINE_REFUSED])
def test_machine_refusals(extra: str, os_extra: str, message: str) -> None:
    with pytest.raises(ConfigUnsupported) as info:
        _argv(_xml(extra, os_extra=os_extra))
    assert message in str(info.value)


def test_probe_output_parsing() -> None:
    machines, aliases = parse_machine_help(
        "Supported machines are:\n"
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-7.2)\n"
        "pc-i440fx-7.2        Standard PC (i440FX + PIIX, 1996) (default)\n"
        "q35                  Standard PC (Q35 + ICH9, 2009) (alias of pc-q35-7.2)\n"
        "pc-q35-7.2           Standard PC (Q35 + ICH9, 2009)\n"
        "none                 empty machine\n")
    assert machines == {"pc", "pc-i440fx-7.2", "q35", "pc-q35-7.2", "none"}
    assert aliases == {"pc": "pc-i440fx-7.2", "q35": "pc-q35-7.2"}
    models, flags = parse_cpu_help(
        "Available CPUs:\n"
        "x86 486                   (alias configured by machine type)\n"
        "x86 Broadwell-IBRS        (alias of Broadwell-v3)\n"
        "x86 qemu64                QEMU Virtual CPU version 2.5+\n"
        "\n"
        "Recognized CPUID flags:\n"
        "  3dnow abm\n"
        "  sse4.1 x2apic\n")
    assert models == {"486", "Broadwell-IBRS", "qemu64"}
    assert flags == {"3dnow", "abm", "sse4.1", "x2apic"}


def test_machine_pinned_by_canonicalize() -> None:
    caps = {EMULATOR: CAPS}
    for given, pinned in (("pc", "pc-i440fx-7.2"), ("q35", "pc-q35-7.2"),
                          ("pc-i440fx-7.2", "pc-i440fx-7.2")):
        spec = make_spec(guest_xml(machine=given).replace("<name>", "<!-- kept --><name>"))
        d = parse_domain_xml(canonical_xml(spec, caps, SETTINGS))
        assert d.machine == pinned
        assert "<!-- kept -->" in d.xml
    # (a <memballoon> and USB given: canonical_xml adds none; tests/daemon/test_qemu_misc.py)
    bare = guest_xml(devices="<memballoon model='none'/><controller type='usb' model='none'/>"
                     ).replace(" machine='pc'", "")
    d = parse_domain_xml(canonical_xml(make_spec(bare), caps, SETTINGS))
    assert d.machine == "pc-i440fx-7.2"  # no machine= is pc, pinned too
    # Unprobed emulator or a definition the backend refuses: left as it is.
    assert canonical_xml(make_spec(bare), None, SETTINGS) == make_spec(bare).xml
    other = guest_xml(domain_type="test")
    assert canonical_xml(make_spec(other), caps, SETTINGS) == make_spec(other).xml
