"""``<cpu mode='host-model'>`` on the qemu backend: accepted at define, expanded before it runs
to a named model plus required features (the definition rewritten as libvirt shows a running
host-model guest), refused when asked to run unexpanded; and the probe against the real
emulator (deterministic, a model QEMU runs with ``enforce=on``)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from lxml import etree

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import PARSE_ONLY, guest_xml, make_spec, parse_only, within
from virtmig.daemon.backend.base import BackendError, GuestSpec
from virtmig.daemon.backend.qemu import QemuBackend, parse_config
from virtmig.daemon.backend.qemu.caps import probe_emulator
from virtmig.daemon.backend.qemu.hostcpu import CPUINFO as CPUINFO_PATH
from virtmig.daemon.backend.qemu.hostcpu import (
    HostModel,
    expand_host_model,
    host_cpu_digest,
    host_model_xml,
    probe_host_model,
)
from virtmig.daemon.domxml import parse_domain_xml
from virtmig.proto.errors import OperationInvalid
from virtmig.testing import qemu_binary_or_skip, qemu_settings

backends = backend_qemu_helpers.backends
src = backend_qemu_helpers.src

HOST = HostModel(model="Westmere", features=("avx", "avx2", "lahf-lm", "xsave"))
CPU = ("<cpu mode='host-model' check='partial'><feature policy='disable' name='avx2'/>"
       "<topology sockets='1' dies='1' cores='2' threads='1'/></cpu>")


def _xml(cpu: str = CPU) -> str:
    return guest_xml(devices="<memballoon model='none'/>").replace(
        "<vcpu>1</vcpu>", f"<vcpu>2</vcpu>{cpu}")


def test_host_model_is_accepted_at_define() -> None:
    spec = make_spec(_xml())
    cfg = parse_config(spec, settings=PARSE_ONLY)
    assert cfg.cpu.host_model and (cfg.cpu.cores, cfg.cpu.features) == (2, (("avx2", False),))
    parse_only().validate(spec)


@pytest.mark.qemu
async def test_host_model_is_not_run_unexpanded(src: QemuBackend) -> None:
    with pytest.raises(BackendError, match="must be expanded before the guest runs"):
        await within(src.start(make_spec(_xml()), paused=False))


def test_expansion_rewrites_the_cpu() -> None:
    root = etree.fromstring(_xml().encode())
    expand_host_model(root, HOST)
    cpu = root.find("cpu")
    assert cpu is not None
    assert [(k, cpu.get(k)) for k in ("mode", "match", "check", "migratable")] == [
        ("mode", "custom"), ("match", "exact"), ("check", "full"), ("migratable", None)]
    assert [(c.tag, dict(c.attrib), c.text) for c in cpu] == [
        ("model", {"fallback": "forbid"}, "Westmere"),
        ("feature", {"policy": "require", "name": "avx"}, None),
        # avx2: the definition's own feature wins (disabled)
        ("feature", {"policy": "require", "name": "lahf-lm"}, None),
        ("feature", {"policy": "require", "name": "xsave"}, None),
        ("feature", {"policy": "disable", "name": "avx2"}, None),
        ("topology", {"sockets": "1", "dies": "1", "cores": "2", "threads": "1"}, None),
    ]
    cfg = parse_config(make_spec(etree.tostring(root, encoding="unicode")), settings=PARSE_ONLY)
    assert not cfg.cpu.host_model
    assert cfg.cpu.argv()[-1] == "Westmere,avx=on,lahf-lm=on,xsave=on,avx2=off,enforce=on"


async def test_host_model_xml_probes_only_for_a_host_model() -> None:
    asked: list[GuestSpec] = []

    async def probe(spec: GuestSpec) -> HostModel:
        asked.append(spec)
        return HOST

    plain = make_spec(_xml("<cpu><model>qemu64</model></cpu>"))
    assert await host_model_xml(plain, probe) == plain.xml
    named = make_spec(_xml("<cpu><model>qemu64</model></cpu>").replace(
        "<name>tiny</name>", "<name>host-model</name>"))
    assert await host_model_xml(named, probe) == named.xml  # the word, not the mode
    assert asked == []
    spec = make_spec(_xml())
    expanded = parse_domain_xml(await host_model_xml(spec, probe))
    assert asked == [spec]
    assert "<model fallback=\"forbid\">Westmere</model>" in expanded.xml
    assert expanded.uuid == spec.uuid and "host-model" not in expanded.xml


@pytest.mark.qemu
async def test_probe_is_deterministic_and_runnable() -> None:
    binary = qemu_binary_or_skip()
    first, second = await asyncio.gather(probe_host_model(binary, "tcg"),
                                         probe_host_model(binary, "tcg"))
    assert first == second
    caps = await probe_emulator(binary)
    assert caps is not None
    assert first.model in caps.cpu_models and first.model not in ("max", "base", "host")
    assert set(first.features) <= caps.cpu_flags and list(first.features) == sorted(
        first.features)


@pytest.mark.qemu
async def test_expanded_guest_runs_the_model(src: QemuBackend, tmp_path: Path) -> None:
    spec = make_spec(_xml())
    xml = await within(src.expand(spec), 60)
    expanded = make_spec(xml)
    await within(src.start(expanded, paused=False))
    cpus = await src.query(spec.uuid, "query-cpus-fast")
    model = etree.fromstring(xml.encode()).findtext("cpu/model")
    cpu_type = await src.query(spec.uuid, "qom-get", {"path": cpus[0]["qom-path"],
                                                      "property": "type"})
    assert cpu_type == f"{model}-x86_64-cpu"
    assert await src.query(spec.uuid, "qom-get", {"path": cpus[0]["qom-path"],
                                                  "property": "avx2"}) is False
    # Another backend (a destination host with the same emulator) expands it the same way.
    other = QemuBackend(qemu_settings(tmp_path))
    await other.open(tmp_path / "other")
    try:
        assert await within(other.expand(spec), 60) == xml
    finally:
        await other.close()


CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz
stepping\t: 4
microcode\t: 0x2006e05
cpu MHz\t\t: 2095.078
flags\t\t: fpu vme de pse avx avx2
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
cpu MHz\t\t: 1000.000
"""


def test_host_cpu_digest_names_the_cpu_not_its_state() -> None:
    digest = host_cpu_digest(CPUINFO)
    assert len(digest) == 64 and digest == host_cpu_digest(
        CPUINFO.replace("2095.078", "3000.000").replace("1000.000", "1"))  # clock: not the CPU
    for field, other in (("85", "86"), ("0x2006e05", "0x2006e06"), ("avx avx2", "avx"),
                         ("stepping\t: 4", "stepping\t: 7"), ("GenuineIntel", "AuthenticAMD")):
        assert host_cpu_digest(CPUINFO.replace(field, other, 1)) != digest, field


PASSTHROUGH = "<cpu mode='host-passthrough' migratable='on'/>"


def test_host_passthrough_comes_only_from_the_same_cpu() -> None:
    backend = parse_only()
    passthrough = make_spec(guest_xml(domain_type="kvm").replace(
        "<vcpu>1</vcpu>", f"<vcpu>1</vcpu>{PASSTHROUGH}"))
    ours = backend.host_cpu(passthrough)
    assert ours == host_cpu_digest(CPUINFO_PATH.read_text())
    backend.check_host_cpu(passthrough, ours)
    for source, why in (("0" * 64, "this host's CPU differs from the source host's"),
                        ("", "the source host did not say which it has")):
        with pytest.raises(OperationInvalid) as info:
            backend.check_host_cpu(passthrough, source)
        assert why in str(info.value) and "'host-passthrough'" in str(info.value)
    custom = make_spec(guest_xml())
    assert backend.host_cpu(custom) == ""
    backend.check_host_cpu(custom, "")  # any other CPU mode: nothing to compare
    backend.check_host_cpu(custom, "0" * 64)
