"""The qemu backend's honour-or-refuse table: what it does with each element of a domain.

Concern: one table (:data:`TABLE`) that says, for every element of libvirt's domain XML the qemu
backend may meet (by its path below ``<domain>``), whether it is

* **honoured** -- it changes the command line or the daemon's behaviour; the rule names the
  parser that honours it and lists the attributes it honours (any other attribute is refused);
* **metadata** -- it has no effect on the guest (``<title>``, ``<description>``,
  ``<metadata>``): its whole subtree is kept and never looked into;
* **delegated** -- a device whose whole subtree its own parser checks with an explicit
  allow-list (``<disk>``, ``<interface>``, ``<serial>``, ``<console>``, ``<channel>``,
  ``<graphics>``, ``<video>``): the rule names that parser;

and :func:`check_tree`, which walks a definition against it: any element or attribute the table
does not name is refused with ``ConfigUnsupported`` naming its path (``<cpu><numa>``, attribute
``'cpuset'`` of ``<vcpu>``).  Values are the parsers' concern (``cpu.py``, ``machine.py``,
``config.py``): the table only decides which names reach them.

:data:`REFUSED_NAMES` and :data:`DELEGATED_NAMES` record a decision for every other element name
of libvirt's domain schema (tests/daemon/data/libvirt_domain_elements.txt): a name the schema
gains must be decided on (honoured here, delegated or refused) before the tests pass again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from virtmig.proto.errors import ConfigUnsupported

__all__ = ["DELEGATED_NAMES", "REFUSED_NAMES", "TABLE", "Kind", "Rule", "check_tree",
           "element_label", "table_names", "unsupported_device"]


class Kind(enum.Enum):
    HONOURED = "honoured"
    METADATA = "metadata"
    DELEGATED = "delegated"


@dataclass(frozen=True)
class Rule:
    kind: Kind
    by: str  # the parser that honours the element, or the delegate that checks its subtree
    attrs: frozenset[str] = frozenset()  # the attributes honoured (HONOURED only)


def _h(by: str, *attrs: str) -> Rule:
    return Rule(Kind.HONOURED, by, frozenset(attrs))


_META = Rule(Kind.METADATA, "kept as is, no effect on the guest")
_PCI_ADDRESS = ("type", "domain", "bus", "slot", "function")

#: Element path below the root (``domain/cpu/topology``) -> what the backend does with it.
TABLE: Mapping[str, Rule] = {
    # ``id`` is a running domain's number in dumpxml output: libvirt ignores it on define.
    "domain": _h("config.parse_config", "type", "id"),
    "domain/name": _h("domxml.parse_domain_xml"),
    "domain/uuid": _h("domxml.parse_domain_xml"),
    "domain/title": _META,
    "domain/description": _META,
    "domain/metadata": _META,
    "domain/memory": _h("domxml.parse_domain_xml", "unit"),
    "domain/currentMemory": _h("machine.parse_machine", "unit"),
    "domain/vcpu": _h("cpu.parse_cpu", "placement", "current"),
    "domain/os": _h("config._parse_os", "firmware"),
    "domain/os/loader": _h("firmware.parse_firmware", "readonly", "type", "secure"),
    "domain/os/nvram": _h("firmware.parse_firmware", "template"),
    "domain/os/type": _h("config.parse_config", "arch", "machine"),
    "domain/os/kernel": _h("config._parse_os"),
    "domain/os/initrd": _h("config._parse_os"),
    "domain/os/cmdline": _h("config._parse_os"),
    "domain/os/boot": _h("machine.parse_machine", "dev"),
    "domain/os/bootmenu": _h("machine.parse_machine", "enable", "timeout"),
    "domain/features": _h("machine.parse_machine"),
    "domain/features/acpi": _h("machine.parse_machine"),
    "domain/features/apic": _h("machine.parse_machine"),
    "domain/features/pae": _h("machine.parse_machine"),
    "domain/features/smm": _h("firmware.parse_firmware", "state"),
    "domain/features/hyperv": _h("cpu.parse_cpu", "mode"),
    "domain/features/hyperv/relaxed": _h("cpu.parse_cpu", "state"),
    "domain/features/hyperv/vapic": _h("cpu.parse_cpu", "state"),
    "domain/features/hyperv/spinlocks": _h("cpu.parse_cpu", "state", "retries"),
    "domain/cpu": _h("cpu.parse_cpu", "mode", "match", "check", "migratable"),
    "domain/cpu/model": _h("cpu.parse_cpu", "fallback"),
    "domain/cpu/feature": _h("cpu.parse_cpu", "policy", "name"),
    "domain/cpu/topology": _h("cpu.parse_cpu", "sockets", "dies", "cores", "threads"),
    "domain/clock": _h("machine.parse_machine", "offset"),
    "domain/clock/timer": _h("machine.parse_machine", "name", "tickpolicy", "present"),
    "domain/on_poweroff": _h("machine.parse_machine"),
    "domain/on_reboot": _h("machine.parse_machine"),
    "domain/on_crash": _h("machine.parse_machine"),
    "domain/seclabel": _h("machine.parse_machine", "type", "model", "relabel"),
    "domain/devices": _h("config._parse_devices"),
    "domain/devices/emulator": _h("config._emulator"),
    "domain/devices/disk": Rule(Kind.DELEGATED, "disks.parse_disk"),
    "domain/devices/interface": Rule(Kind.DELEGATED, "net.parse_interface"),
    "domain/devices/serial": Rule(Kind.DELEGATED, "chardev.parse_serial"),
    "domain/devices/console": Rule(Kind.DELEGATED, "chardev.parse_serial"),
    "domain/devices/channel": Rule(Kind.DELEGATED, "chardev.parse_channel"),
    "domain/devices/controller": _h("config._check_controller", "type", "index", "model"),
    "domain/devices/controller/address": _h("pci.check_address", *_PCI_ADDRESS),
    "domain/devices/input": _h("misc._input", "type", "bus"),
    "domain/devices/memballoon": _h("misc._balloon", "model", "autodeflate"),
    "domain/devices/memballoon/address": _h("pci.check_address", *_PCI_ADDRESS),
    "domain/devices/rng": _h("misc._rng", "model"),
    "domain/devices/rng/backend": _h("misc._rng", "model"),
    "domain/devices/rng/rate": _h("misc._rng", "bytes", "period"),
    "domain/devices/rng/address": _h("pci.check_address", *_PCI_ADDRESS),
    "domain/devices/watchdog": _h("misc._watchdog", "model", "action"),
    "domain/devices/watchdog/address": _h("pci.check_address", *_PCI_ADDRESS),
    "domain/devices/graphics": Rule(Kind.DELEGATED, "graphics.parse_graphics"),
    "domain/devices/video": Rule(Kind.DELEGATED, "graphics.parse_video"),
}

#: Element names of libvirt's domain schema that appear only inside the delegated devices
#: (``<disk>``, ``<interface>``, the character devices, ``<graphics>``): their parsers
#: honour or refuse them.
DELEGATED_NAMES = frozenset({
    "backenddomain", "backingStore", "blockio", "clusterSize", "coalesce", "compat",
    "downscript", "extended_l2", "filterref", "format", "frames", "geometry", "group_name",
    "guest", "inbound", "iotune", "lazy_refcounts", "link", "listen", "local", "mac",
    "max_size", "source", "target",
    "metadata_cache", "mirror", "mtu", "outbound", "parameter", "parameters", "port",
    "portForward", "range", "read_bytes_sec", "read_bytes_sec_max",
    "read_bytes_sec_max_length", "read_iops_sec", "read_iops_sec_max",
    "read_iops_sec_max_length", "rx", "script", "size_iops_sec", "sndbuf", "tag",
    "total_bytes_sec", "total_bytes_sec_max", "total_bytes_sec_max_length", "total_iops_sec",
    "total_iops_sec_max", "total_iops_sec_max_length", "transient", "tune", "tx", "usecs",
    "virtualport", "vlan", "write_bytes_sec", "write_bytes_sec_max",
    "write_bytes_sec_max_length", "write_iops_sec", "write_iops_sec_max",
    "write_iops_sec_max_length", "wwn"
})

#: Every other element name of libvirt's domain schema: refused wherever the table meets it.
REFUSED_NAMES = frozenset({
    "acceleration", "access", "active_pcr_banks", "adapter", "add", "alias",
    "alignsize", "allocation", "arch", "arg", "audio", "audit_control", "audit_write", "auth",
    "avic", "bandwidth", "baseBoard", "baselabel", "binary", "bios", "blkiotune",
    "block", "block_suspend", "bootloader", "bootloader_args", "cache", "cachetune",
    "capabilities", "catchup", "cbitpos", "ccf-assist", "cell", "certificate", "cfpc",
    "char", "chassis", "chown", "cid", "cipher", "clipboard", "codec",
    "commandline", "config", "cookie", "cookies", "counter", "cputune", "current",
    "dac_override", "dac_read_search", "database", "datacenterpath", "defaultiothread", "del",
    "deprecation", "device", "dhCert", "direct", "dirty-ring", "discard", "distances",
    "driver", "dtb", "e820_host", "emulator_period", "emulator_quota", "emulatorpin",
    "emulatorsched", "encryption", "entry", "env", "event", "evmcs", "fibrechannel",
    "filesystem", "filetransfer", "firmware", "fowner", "frequencies", "frontend", "fsetid",
    "genid", "gic", "gid", "gl", "global_period", "global_quota", "group",
    "handle", "hap", "hard_limit", "hidden", "hint-dedicated", "host", "hostdev", "hpt", "htm",
    "hub", "hugepages", "ibs", "identity", "idmap", "image", "imagelabel",
    "inactiveDomain", "init", "initarg", "initdir", "initenv", "initgroup", "initiator",
    "inituser", "interconnects", "ioapic", "iommu", "iothread", "iothread_period",
    "iothread_quota", "iothreadids", "iothreadpin", "iothreads", "iothreadsched", "ip",
    "ipc_lock", "ipc_owner", "ipi", "iqn", "ivgen", "jpeg", "key", "keywrap", "kill", "kvm",
    "label", "latency", "launchSecurity", "lease", "line", "linux_immutable",
    "lock", "locked", "lockspace", "log", "mac_admin", "mac_override", "master",
    "maxMemory", "maxpagesize", "maxphysaddr", "memnode", "memoryBacking", "memorytune",
    "memtune", "microcode", "min_guarantee", "mknod", "mode", "monitor", "mouse", "msi",
    "msrs", "namespace", "nested-hv", "net_admin", "net_bind_service", "net_broadcast",
    "net_raw", "node", "nodemask", "nonpae", "nosharepages", "numa", "numatune",
    "oemStrings", "on_lockfailure", "output", "override", "owner", "page", "pages", "pagesize",
    "panic", "parallel", "parentaddr", "partition", "passthrough", "path", "pcihole64", "perf",
    "period", "permissions", "playback", "pm", "pmem", "pmu", "policy", "poll-control",
    "privateData", "privnet", "product", "property", "protocol", "pv-ipi", "pvspinlock",
    "quota", "readahead", "readonly", "reconnect", "redirdev", "redirfilter",
    "reducedPhysBits", "reenlightenment", "requested", "reservations", "reset",
    "resolution", "resource", "rom", "root", "route", "runtime", "sandbox", "sbbc",
    "secret", "server", "session", "setfcap", "setgid", "setpcap", "settings", "setuid",
    "sha1", "sha256", "sha384", "sha512", "shareable", "shareipc", "sharenet", "shares",
    "shareuts", "shmem", "sibling", "signature", "size", "slice", "slices", "smartcard",
    "smbios", "snapshot", "soft_limit", "sound", "space_hard_limit", "space_soft_limit",
    "ssl", "stats", "stimer", "streaming", "suspend-to-disk", "suspend-to-mem",
    "svm", "swap_hard_limit", "synic", "sys_admin", "sys_boot", "sys_chroot", "sys_module",
    "sys_nice", "sys_pacct", "sys_ptrace", "sys_rawio", "sys_resource", "sys_time",
    "sys_tty_config", "sysinfo", "syslog", "system", "table", "tb-cache", "tcg", "teaming",
    "thread_pool", "timeout", "tlbflush", "tpm", "tseg", "uid", "usbdev", "vcpupin",
    "vcpus", "vcpusched", "vendor", "vendor_id", "viridian", "vmcoreinfo", "vmport", "vmx",
    "vpindex", "vsock", "wake_alarm", "weight", "xen", "zlib", "zpci"
})

_DEVICES = "domain/devices"


def table_names() -> frozenset[str]:
    """The element names :data:`TABLE` has a rule for (under any parent)."""
    return frozenset(path.rsplit("/", 1)[-1] for path in TABLE)


def element_label(el: etree._Element) -> str:
    """``<tag type='x' device='y'>``: how a device element is named in a refusal."""
    tag = etree.QName(el).localname
    attrs = "".join(f" {k}='{el.get(k)}'" for k in ("type", "device", "model") if el.get(k))
    return f"<{tag}{attrs}>"


def unsupported_device(el: etree._Element, why: str = "") -> ConfigUnsupported:
    """The refusal of a device (or of a part of it), naming it and saying why."""
    detail = f": {why}" if why else ""
    return ConfigUnsupported(
        f"unsupported device {element_label(el)} for the qemu backend{detail}"
    )


def _path_label(path: str) -> str:
    """``domain/cpu/numa`` -> ``<cpu><numa>``."""
    parts = path.split("/")[1:] or ["domain"]
    return "".join(f"<{p}>" for p in parts)


def check_tree(root: etree._Element) -> None:
    """Refuse the first element or attribute of the domain ``root`` that :data:`TABLE` does not
    name (``ConfigUnsupported`` naming its path); metadata and delegated subtrees are not
    entered."""
    _check(root, "domain")


def _check(el: etree._Element, path: str) -> None:
    rule = TABLE.get(path)
    if rule is None:
        if path.rsplit("/", 1)[0] == _DEVICES:
            raise unsupported_device(el)
        raise ConfigUnsupported(f"unsupported element {_path_label(path)} for the qemu backend")
    if rule.kind is not Kind.HONOURED:
        return
    for key in el.attrib:
        name = key if isinstance(key, str) else key.decode()
        if name not in rule.attrs:  # namespaced attributes ({ns}name) included
            raise ConfigUnsupported(
                f"unsupported attribute '{name}' of {_path_label(path)} for the qemu backend"
            )
    for child in el:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        qname = etree.QName(child)
        if qname.namespace is not None:
            raise ConfigUnsupported(
                f"unsupported element <{qname.text}> in {_path_label(path)} for the qemu "
                "backend"
            )
        _check(child, f"{path}/{qname.localname}")
