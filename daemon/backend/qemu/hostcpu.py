"""``<cpu mode='host-model'>``: the host's CPU as a named model plus features, found by asking
QEMU, and the definition rewritten to it (as libvirt shows a running host-model guest).

Concern: what "the host's CPU" is for one emulator and accelerator (:class:`HostModel`), how it is
found (:func:`probe_host_model`: a QEMU with no machine, QMP on its stdio), and
:func:`expand_host_model`, which rewrites a definition's host-model ``<cpu>`` to
``mode='custom' match='exact' check='full'`` with that model and those features, so that the
running guest's XML -- and so the migratable XML a destination receives -- names a concrete CPU
that QEMU enforces (``enforce=on``) on every host.

The expansion is deterministic for a QEMU build and accelerator:

* the host CPU is QEMU's ``max`` model under TCG (what the build emulates) and ``host`` under
  KVM, expanded with ``query-cpu-model-expansion`` type ``static`` (``base`` plus every CPUID
  flag on or off);
* the model is, among the named models ``query-cpu-definitions`` reports runnable here (no
  unavailable features, migration-safe, not deprecated, not a ``-vN`` version name), the one
  whose own static expansion turns on the most flags while every one of them is on in the host
  CPU (ties: the first name in sorted order);
* the features are the host CPU's flags that model lacks (``policy='require'``), in sorted
  order; flags of the model the host lacks cannot occur (the model is runnable).

``<cpu mode='host-passthrough'>`` (KVM) shows the guest this host's CPU itself, so such a guest
may only move to a host with the same CPU: :func:`host_cpu_digest` is the digest of what
identifies it (``/proc/cpuinfo``'s vendor, family, model, model name, stepping, microcode and
flags of the first processor), which the source sends in cookie A and the destination compares
with its own (:meth:`QemuBackend.check_host_cpu
<virtmig.daemon.backend.qemu.backend.QemuBackend.check_host_cpu>`).

libvirt picks the model through its own CPU map instead; the result differs in name, not in
kind: a named model plus required features that the destination must provide.  The host-model
definition itself is kept as given (``dumpxml --inactive``), as libvirt keeps it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lxml import etree

from virtmig.daemon.backend.base import GuestSpec
from virtmig.proto import logsafe
from virtmig.proto.aio import within

__all__ = ["CPUINFO", "HostModel", "ProbeError", "expand_host_model", "host_cpu_digest",
           "host_model_xml", "probe_host_model"]

log = logsafe.logger("virtmig.daemon.backend.qemu")

PROBE_TIMEOUT = 60.0
_VERSIONED_RE = re.compile(r".*-v\d+")


@dataclass(frozen=True)
class HostModel:
    """The host CPU of one emulator and accelerator: a named model and the flags it lacks."""

    model: str
    features: tuple[str, ...] = ()


class ProbeError(Exception):
    """The emulator could not say what its host CPU is."""


async def _qmp_session(binary: str, accel: str, commands: list[dict[str, Any]]
                       ) -> list[Any]:
    """Run ``commands`` on a QEMU with no machine (QMP on stdio); their results in order."""
    proc = await asyncio.create_subprocess_exec(
        binary, "-machine", "none", "-accel", accel, "-nodefaults", "-display", "none", "-S",
        "-no-user-config", "-qmp", "stdio",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        await _reply(proc.stdout)  # the greeting
        results = []
        for command in [{"execute": "qmp_capabilities"}, *commands]:
            proc.stdin.write(json.dumps(command).encode() + b"\n")
            await proc.stdin.drain()
            reply = await _reply(proc.stdout)
            if "error" in reply:
                raise ProbeError(f"{command['execute']}: {reply['error'].get('desc', reply)}")
            results.append(reply.get("return"))
        return results[1:]
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _reply(stream: asyncio.StreamReader) -> dict[str, Any]:
    """The next QMP message that is not an event."""
    while True:
        line = await stream.readline()
        if not line:
            raise ProbeError("QEMU exited")
        message = json.loads(line)
        if isinstance(message, dict) and "event" not in message:
            return message


def _on(expansion: Any) -> frozenset[str]:
    props = expansion["model"]["props"]
    return frozenset(k for k, v in props.items() if v is True)


async def probe_host_model(binary: str, accel: str) -> HostModel:
    """The host CPU of ``binary`` under ``accel`` (``tcg`` or ``kvm``); :class:`ProbeError` when
    QEMU cannot say."""
    host = "host" if accel == "kvm" else "max"

    def expansion(name: str) -> dict[str, Any]:
        return {"execute": "query-cpu-model-expansion",
                "arguments": {"type": "static", "model": {"name": name}}}

    try:
        first = await within(_qmp_session(
            binary, accel, [expansion(host), {"execute": "query-cpu-definitions"}]),
            PROBE_TIMEOUT)
        flags = _on(first[0])
        names = sorted(d["name"] for d in first[1]
                       if not d.get("unavailable-features") and d.get("migration-safe")
                       and not d.get("deprecated") and not _VERSIONED_RE.fullmatch(d["name"])
                       and d["name"] not in ("max", "host", "base"))
        models = await within(_qmp_session(
            binary, accel, [expansion(n) for n in names]), PROBE_TIMEOUT)
    except (OSError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise ProbeError(str(exc) or type(exc).__name__) from None
    best, best_on = "", frozenset[str]()
    for name, result in zip(names, models, strict=True):
        on = _on(result)
        if on <= flags and (not best or len(on) > len(best_on)):
            best, best_on = name, on
    if not best:
        raise ProbeError(f"no named CPU model runs under {accel}")
    log.info("qemu backend: %s under %s: host-model is %s", binary, accel, best)
    return HostModel(model=best, features=tuple(sorted(flags - best_on)))


async def host_model_xml(spec: GuestSpec,
                         host_model: Callable[[GuestSpec], Awaitable[HostModel]]) -> str:
    """``spec``'s XML with a host-model ``<cpu>`` expanded to ``host_model(spec)``; unchanged
    (and ``host_model`` not called) without one."""
    if not spec.xml or "host-model" not in spec.xml:
        return spec.xml
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False,
                             huge_tree=False)
    root = etree.fromstring(spec.xml.encode("utf-8"), parser)
    cpu = root.find("cpu")
    if cpu is None or cpu.get("mode") != "host-model":
        return spec.xml
    expand_host_model(root, await host_model(spec))
    return etree.tostring(root.getroottree(), encoding="unicode")  # comments kept


def expand_host_model(root: etree._Element, host: HostModel) -> None:
    """Rewrite ``root``'s host-model ``<cpu>`` (in place) to ``host``'s model and features:
    ``mode='custom' match='exact' check='full'``, ``<model fallback='forbid'>``, a
    ``<feature policy='require'>`` per flag; the definition's own ``<feature>`` elements (which
    win over the host's) and ``<topology>`` stay."""
    cpu = root.find("cpu")
    if cpu is None:
        return
    own = {f.get("name", "").replace("_", "-") for f in cpu.iterfind("feature")}
    for attr in ("mode", "check", "match", "migratable"):
        if attr in cpu.attrib:
            del cpu.attrib[attr]
    cpu.set("mode", "custom")
    cpu.set("match", "exact")
    cpu.set("check", "full")
    for old in cpu.findall("model"):
        cpu.remove(old)
    model = etree.Element("model", fallback="forbid")
    model.text = host.model
    cpu.insert(0, model)
    at = 1
    for flag in host.features:
        if flag not in own:
            cpu.insert(at, etree.Element("feature", policy="require", name=flag))
            at += 1


CPUINFO = Path("/proc/cpuinfo")
_CPU_FIELDS = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode",
               "flags")


def host_cpu_digest(cpuinfo: str) -> str:
    """The SHA-256 (hex) of the identity of the first processor in ``cpuinfo`` (the text of
    ``/proc/cpuinfo``): two hosts with the same digest show a ``host-passthrough`` guest the
    same CPU."""
    fields: dict[str, str] = {}
    for line in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in _CPU_FIELDS:
            fields[key.strip()] = " ".join(value.split())
    text = "\n".join(f"{key}={fields.get(key, '')}" for key in _CPU_FIELDS)
    return hashlib.sha256(text.encode()).hexdigest()
