"""What one emulator offers: its machine types (and their aliases), CPU models and CPU flags.

Concern: asking a ``qemu-system-x86_64`` binary once, at :meth:`QemuBackend.open
<virtmig.daemon.backend.qemu.backend.QemuBackend.open>`, what a definition may name, and keeping
the answer as a value (:class:`EmulatorCaps`) that :mod:`~virtmig.daemon.backend.qemu.config`
checks definitions against.  The probe runs the binary with ``-machine help``, ``-cpu help``
and ``-device help`` (no guest, no QMP); the aliases it reports are how ``pc`` and ``q35`` are
pinned to a concrete versioned machine type at define time (``pc`` -> ``pc-i440fx-7.2`` on QEMU
7.2); the device names say which video cards a definition may name.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from virtmig.proto import logsafe
from virtmig.proto.aio import within

log = logsafe.logger("virtmig.daemon.backend.qemu")

PROBE_TIMEOUT = 30.0
_ALIAS_RE = re.compile(r"\(alias of ([A-Za-z0-9._-]+)\)")
_DEVICE_RE = re.compile(r'^name "([^"]+)"', re.MULTILINE)


@dataclass(frozen=True)
class EmulatorCaps:
    """One emulator's machine types, machine aliases, CPU models and CPU flags.

    An empty ``cpu_models`` or ``cpu_flags`` means "not probed": names are then checked for
    their form only (QEMU refuses an unknown one when it starts).
    """

    machines: frozenset[str]
    aliases: Mapping[str, str] = field(default_factory=dict, hash=False)  # pc -> pc-i440fx-7.2
    cpu_models: frozenset[str] = frozenset()
    cpu_flags: frozenset[str] = frozenset()
    devices: frozenset[str] = frozenset()  # -device help's names (empty: not probed)

    def concrete_machine(self, machine: str) -> str:
        """The versioned machine type ``machine`` stands for (itself if it is no alias)."""
        return self.aliases.get(machine, machine)


#: The capabilities of each configured emulator (None: it could not be probed), or one
#: :class:`EmulatorCaps` (or bare set of machine names) for whichever emulator runs.
Caps = EmulatorCaps | frozenset[str] | Mapping[str, EmulatorCaps | frozenset[str] | None] | None


def caps_for(caps: Caps, emulator: str) -> EmulatorCaps | None:
    """The capabilities of ``emulator`` out of ``caps`` (None: unknown, nothing checked)."""
    one = caps.get(emulator) if isinstance(caps, Mapping) else caps
    if isinstance(one, frozenset):
        return EmulatorCaps(machines=one)
    return one


async def _help(binary: str, *args: str) -> str | None:
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError as exc:
        log.warning("qemu backend: cannot run %s: %s", binary, exc)
        return None
    try:
        out, _ = await within(proc.communicate(), PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return None
    return out.decode(errors="replace") if proc.returncode == 0 else None


def parse_machine_help(text: str) -> tuple[frozenset[str], dict[str, str]]:
    """``-machine help``: the names (aliases included) and each alias's concrete type."""
    names: set[str] = set()
    aliases: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        if not line.strip():
            continue
        name = line.split()[0]
        names.add(name)
        alias = _ALIAS_RE.search(line)
        if alias:
            aliases[name] = alias.group(1)
    return frozenset(names), aliases


def parse_cpu_help(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """``-cpu help``: the CPU model names and the recognized CPUID flag names."""
    models: set[str] = set()
    flags: set[str] = set()
    in_flags = False
    for line in text.splitlines():
        if line.startswith("Recognized CPUID flags:"):
            in_flags = True
        elif in_flags and line.startswith(" "):
            flags.update(line.split())
        elif line.startswith("x86 "):
            in_flags = False
            parts = line.split()
            if len(parts) > 1:
                models.add(parts[1])
        else:
            in_flags = False
    return frozenset(models), frozenset(flags)


def parse_device_help(text: str) -> frozenset[str]:
    """``-device help``: the device names (``name "VGA", bus PCI, ...``)."""
    return frozenset(m.group(1) for m in _DEVICE_RE.finditer(text))


async def probe_emulator(binary: str) -> EmulatorCaps | None:
    """What ``binary`` offers; None if it cannot say (its machine list is unreadable)."""
    machine_help = await _help(binary, "-machine", "help")
    if machine_help is None:
        return None
    machines, aliases = parse_machine_help(machine_help)
    if not machines:
        return None
    cpu_help = await _help(binary, "-cpu", "help")
    models, flags = parse_cpu_help(cpu_help) if cpu_help is not None else (frozenset(),
                                                                           frozenset())
    device_help = await _help(binary, "-device", "help")
    devices = parse_device_help(device_help) if device_help is not None else frozenset()
    return EmulatorCaps(machines=machines, aliases=aliases, cpu_models=models, cpu_flags=flags,
                        devices=devices)
