"""``<vcpu>`` and ``<cpu>`` -> :class:`CpuConfig` -> ``-smp`` and ``-cpu``.

Concern: the guest's vCPUs (how many are online at start, how many at most, their topology) and
its CPU model, as libvirt's domain XML describes them, checked against what the emulator offers
(:class:`~virtmig.daemon.backend.qemu.caps.EmulatorCaps`).  Pure values.

* ``<vcpu current='N'>M</vcpu>``: ``-smp N,maxcpus=M``; the ``M - N`` others are hot-pluggable
  (``query-hotpluggable-cpus`` lists them).  ``placement='static'`` only (no ``cpuset``).
* ``<cpu><topology sockets= dies= cores= threads=/>``: ``sockets``/``cores``/``threads`` are
  required, ``dies`` defaults to 1; their product must be the maximum vCPU count (libvirt's rule
  and message).  Without a topology, one core per socket (what libvirt passes too).
* ``mode='custom'`` (the default with a ``<model>``): ``-cpu MODEL,FEATURE=on|off,...``; the
  model must be one the emulator knows; ``<feature policy='require'|'force'>`` turns a CPUID flag
  on, ``'disable'|'forbid'`` off (``'optional'`` is refused: it would depend on the host);
  ``check='partial'|'full'`` (the default) adds ``enforce=on``: QEMU refuses to start a CPU it
  cannot provide exactly rather than drop features silently; ``check='none'`` does not.
* ``mode='host-passthrough'`` (KVM only; ``-cpu host``) and ``mode='maximum'`` (``-cpu max``),
  with ``migratable='on'|'off'``.
* ``mode='host-model'`` (with ``<feature>``s and a ``<topology>``, no model name) is accepted
  at define and expanded before every start to a named model plus features
  (:mod:`.hostcpu`); a configuration still host-model when it is run is refused
  (:attr:`CpuConfig.host_model`).
* ``match='exact'`` only (``minimum``/``strict`` depend on libvirt's CPU map).
* ``<features><hyperv mode='custom'>`` basics, the Hyper-V enlightenments a Windows guest wants
  first (they are properties of QEMU's CPU, so they go on ``-cpu`` as libvirt puts them):
  ``<relaxed state='on'/>`` -> ``hv-relaxed=on``, ``<vapic state='on'/>`` -> ``hv-vapic=on``,
  ``<spinlocks state='on' retries='N'/>`` -> ``hv-spinlocks=0xN`` (N at least 4095, libvirt's
  rule and messages); ``state='off'`` adds nothing (QEMU's default).  Without a CPU model they
  go on ``qemu64``, QEMU's default x86_64 model (as libvirt does).  Any other enlightenment is
  refused (:mod:`.xmltable`), as is ``mode='passthrough'`` (it would depend on the host).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lxml import etree

from virtmig.daemon.backend.qemu.caps import EmulatorCaps
from virtmig.proto.errors import ConfigUnsupported

__all__ = ["CpuConfig", "parse_cpu"]

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ON = frozenset({"require", "force"})
_OFF = frozenset({"disable", "forbid"})
_NOT_CUSTOM = frozenset({"host", "max", "base"})  # QEMU models that are modes in libvirt
_MODES = {"host-passthrough": "host", "maximum": "max"}
_DEFAULT_MODEL = "qemu64"  # QEMU's default x86_64 CPU model: what -cpu names for hv-* alone
_HV_SPINLOCKS_MIN = 4095
_HV_SPINLOCKS_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class CpuConfig:
    """The vCPUs and the CPU model of a guest."""

    vcpus: int = 1  # online at start
    max_vcpus: int = 1
    sockets: int = 0  # 0: no <topology> (one core per socket)
    dies: int = 1
    cores: int = 1
    threads: int = 1
    model: str = ""  # "": QEMU's default CPU; "host", "max" or a named model
    features: tuple[tuple[str, bool], ...] = ()  # (QEMU flag name, on)
    enforce: bool = False
    migratable: bool | None = None  # host/max only; None: QEMU's default
    host_model: bool = False  # mode='host-model' not expanded yet (hostcpu.py): not runnable
    hyperv: tuple[str, ...] = ()  # QEMU's hv-* CPU properties (hv-relaxed=on, ...)

    def argv(self) -> list[str]:
        sockets = self.sockets or self.max_vcpus
        smp = (f"{self.vcpus},maxcpus={self.max_vcpus},sockets={sockets},dies={self.dies},"
               f"cores={self.cores},threads={self.threads}")
        args = ["-smp", smp]
        if self.model or self.hyperv:
            opts = [self.model or _DEFAULT_MODEL,
                    *(f"{name}={'on' if on else 'off'}" for name, on in self.features),
                    *self.hyperv]
            if self.migratable is not None:
                opts.append(f"migratable={'on' if self.migratable else 'off'}")
            if self.enforce:
                opts.append("enforce=on")
            args += ["-cpu", ",".join(opts)]
        return args


def parse_cpu(root: etree._Element, max_vcpus: int, accel: str,
              caps: EmulatorCaps | None) -> CpuConfig:
    """The vCPUs (``<vcpu>``) and CPU (``<cpu>``) of the domain ``root``; ``max_vcpus`` is
    ``<vcpu>``'s count (parsed by domxml), ``accel`` ``tcg`` or ``kvm``."""
    vcpus = _current_vcpus(root.find("vcpu"), max_vcpus)
    hyperv = _hyperv(root.find("features/hyperv"))
    cpu = root.find("cpu")
    if cpu is None:
        return CpuConfig(vcpus=vcpus, max_vcpus=max_vcpus, hyperv=hyperv)
    sockets, dies, cores, threads = _topology(cpu.find("topology"), max_vcpus)
    model, migratable, enforce = _model(cpu, accel, caps)
    features = _features(cpu, caps)
    if cpu.get("mode") == "host-model":
        return CpuConfig(vcpus=vcpus, max_vcpus=max_vcpus, sockets=sockets, dies=dies,
                         cores=cores, threads=threads, features=features, host_model=True,
                         hyperv=hyperv)
    if features and not model:
        raise ConfigUnsupported("unsupported <cpu><feature> for the qemu backend: features "
                                "need a <model> (or mode='host-passthrough'/'maximum')")
    return CpuConfig(vcpus=vcpus, max_vcpus=max_vcpus, sockets=sockets, dies=dies, cores=cores,
                     threads=threads, model=model, features=features, enforce=enforce,
                     migratable=migratable, hyperv=hyperv)


def _current_vcpus(vcpu: etree._Element | None, max_vcpus: int) -> int:
    if vcpu is None:
        return max_vcpus
    placement = vcpu.get("placement", "static")
    if placement != "static":
        raise ConfigUnsupported(f"unsupported <vcpu placement='{placement}'> for the qemu "
                                "backend (static only)")
    raw = vcpu.get("current")
    if raw is None:
        return max_vcpus
    current = _uint(raw.strip(), "current", "vcpu")
    if current > max_vcpus:
        raise ConfigUnsupported(
            f"maxvcpus must not be less than current vcpus ({max_vcpus} < {current})"
        )
    return current


def _uint(raw: str, attr: str, element: str) -> int:
    """A non-zero unsigned attribute value (libvirt's wording when it is not one)."""
    if not raw.isascii() or not raw.isdigit() or len(raw) > 10 or int(raw) == 0:
        raise ConfigUnsupported(f"Invalid value for attribute '{attr}' in element "
                                f"'{element}': '{raw}'. Expected non-zero value")
    return int(raw)


def _topology(topo: etree._Element | None, max_vcpus: int) -> tuple[int, int, int, int]:
    if topo is None:
        return 0, 1, 1, 1
    values = []
    for attr in ("sockets", "dies", "cores", "threads"):
        raw = topo.get(attr)
        if raw is None:
            if attr == "dies":
                values.append(1)
                continue
            raise ConfigUnsupported(
                f"Missing required attribute '{attr}' in element 'topology'"
            )
        values.append(_uint(raw.strip(), attr, "topology"))
    sockets, dies, cores, threads = values
    if sockets * dies * cores * threads != max_vcpus:
        raise ConfigUnsupported("CPU topology doesn't match maximum vcpu count")
    return sockets, dies, cores, threads


def _model(cpu: etree._Element, accel: str, caps: EmulatorCaps | None
           ) -> tuple[str, bool | None, bool]:
    """The QEMU CPU model, its ``migratable`` (host/max) and whether it is enforced."""
    model_el = cpu.find("model")
    name = "".join(str(t) for t in model_el.itertext()).strip() if model_el is not None else ""
    mode = cpu.get("mode", "custom")
    match = cpu.get("match", "exact")
    if match != "exact":
        raise ConfigUnsupported(f"unsupported <cpu match='{match}'> for the qemu backend "
                                "(exact only)")
    check = cpu.get("check", "partial")
    if check not in ("none", "partial", "full"):
        raise ConfigUnsupported(f"unsupported <cpu check='{check}'> for the qemu backend")
    if model_el is not None and model_el.get("fallback", "allow") not in ("allow", "forbid"):
        raise ConfigUnsupported(f"unsupported <cpu><model fallback='{model_el.get('fallback')}'>"
                                " for the qemu backend")
    migratable_attr = cpu.get("migratable")
    if mode == "host-model":
        if name:
            raise ConfigUnsupported("unsupported <cpu mode='host-model'><model> for the qemu "
                                    "backend (a model is for mode='custom')")
        if migratable_attr is not None:
            raise ConfigUnsupported("unsupported <cpu mode='host-model' migratable> for the "
                                    "qemu backend")
        return "", None, False
    if mode in _MODES:
        if mode == "host-passthrough" and accel != "kvm":
            raise ConfigUnsupported(
                "<cpu mode='host-passthrough'> needs KVM (<domain type='kvm'>): under TCG "
                "there is no host CPU to pass through"
            )
        if name:
            raise ConfigUnsupported(f"unsupported <cpu mode='{mode}'><model> for the qemu "
                                    "backend (a model is for mode='custom')")
        if migratable_attr not in (None, "on", "off"):
            raise ConfigUnsupported(f"unsupported <cpu migratable='{migratable_attr}'>")
        migratable = None if migratable_attr is None else migratable_attr == "on"
        return _MODES[mode], migratable, False
    if mode != "custom":
        raise ConfigUnsupported(f"unsupported <cpu mode='{mode}'> for the qemu backend")
    if migratable_attr is not None:
        raise ConfigUnsupported("unsupported <cpu migratable> for the qemu backend: it is for "
                                "mode='host-passthrough'/'maximum'")
    if not name:
        return "", None, False  # QEMU's default CPU model (a topology alone, say)
    known = caps.cpu_models if caps is not None else frozenset()
    if not _NAME_RE.fullmatch(name) or name in _NOT_CUSTOM or (known and name not in known):
        raise ConfigUnsupported(f"unsupported CPU model <cpu><model>{name}</model> for the "
                                "qemu backend: not a CPU model the emulator knows")
    return name, None, check != "none"


def _features(cpu: etree._Element, caps: EmulatorCaps | None) -> tuple[tuple[str, bool], ...]:
    known = caps.cpu_flags if caps is not None else frozenset()
    seen: dict[str, bool] = {}
    for feature in cpu.iterfind("feature"):
        raw = feature.get("name", "")
        policy = feature.get("policy", "require")
        # QEMU spells its flags with '-' where libvirt's CPU map may use '_' (lahf_lm).
        name = raw.replace("_", "-")
        if not _NAME_RE.fullmatch(name) or (known and name not in known):
            raise ConfigUnsupported(f"unsupported CPU feature <cpu><feature name='{raw}'> for "
                                    "the qemu backend: not a CPU flag the emulator knows")
        if policy in _ON:
            on = True
        elif policy in _OFF:
            on = False
        else:
            raise ConfigUnsupported(
                f"unsupported <cpu><feature policy='{policy}' name='{raw}'> for the qemu "
                "backend (require, force, disable or forbid)"
            )
        if name in seen:
            raise ConfigUnsupported(f"CPU feature '{raw}' specified more than once")
        seen[name] = on
    return tuple(seen.items())


def _hyperv(hv: etree._Element | None) -> tuple[str, ...]:
    """``<features><hyperv>``'s enlightenments as QEMU CPU properties (which children and
    attributes may appear is :mod:`.xmltable`'s allow-list)."""
    if hv is None:
        return ()
    mode = hv.get("mode", "custom")
    if mode != "custom":
        raise ConfigUnsupported(f"unsupported <features><hyperv mode='{mode}'> for the qemu "
                                "backend (custom only: passthrough would depend on the host)")
    props: list[str] = []
    seen: set[str] = set()
    for el in hv:
        if not isinstance(el.tag, str):
            continue
        name = etree.QName(el).localname
        if name in seen:
            raise ConfigUnsupported(f"unsupported <features><hyperv><{name}> for the qemu "
                                    "backend: given twice")
        seen.add(name)
        state = el.get("state")
        if state is None:
            raise ConfigUnsupported(
                f"missing 'state' attribute for HyperV Enlightenment feature '{name}'")
        if state not in ("on", "off"):
            raise ConfigUnsupported(f"invalid value of state argument for HyperV Enlightenment "
                                    f"feature '{name}'")
        if state == "off":
            continue
        if name != "spinlocks":
            props.append(f"hv-{name}=on")
            continue
        raw = el.get("retries")
        if raw is None:
            raise ConfigUnsupported("missing HyperV spinlock retry count")
        if not raw.isascii() or not raw.isdigit() or int(raw) > _HV_SPINLOCKS_MAX:
            raise ConfigUnsupported("invalid HyperV spinlock retry count")
        if int(raw) < _HV_SPINLOCKS_MIN:
            raise ConfigUnsupported("HyperV spinlock retry count must be at least 4095")
        props.append(f"hv-spinlocks={int(raw):#x}")
    return tuple(props)
