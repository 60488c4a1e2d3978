"""Domain XML ABI stability checks between a source and a destination definition.
"""

from __future__ import annotations

import re

import pytest

from tests.daemon import domxml_helpers
from tests.daemon.domxml_helpers import REALISTIC, REALISTIC_UUID
from virtmig.daemon.abi import check_abi_stability
from virtmig.daemon.domxml import (
    DomainDef,
    device_counts,
    format_domain_xml,
    parse_domain_xml,
)
from virtmig.proto.errors import ConfigUnsupported

# The shared fixtures, bound here so that pytest finds them.
realistic = domxml_helpers.realistic


# ABI stability


def _variant(old: str, new: str, text: str = REALISTIC) -> DomainDef:
    assert old in text
    return parse_domain_xml(text.replace(old, new, 1))


def test_abi_identical_passes(realistic: DomainDef) -> None:
    check_abi_stability(realistic, realistic)
    check_abi_stability(realistic, parse_domain_xml(format_domain_xml(realistic, migratable=True)))


def test_abi_host_side_differences_pass(realistic: DomainDef) -> None:
    dst = _variant("/var/lib/libvirt/images/web01.qcow2", "/srv/images/web01-copy.qcow2")
    check_abi_stability(realistic, dst)
    check_abi_stability(dst, realistic)


def test_abi_other_host_details_pass(realistic: DomainDef) -> None:
    text = REALISTIC
    for old, new in [
        ("<source path='/dev/pts/4'/>", "<source path='/dev/pts/9'/>"),
        ("<target dev='vnet3'/>", "<target dev='vnet0'/>"),
        ("<emulator>/usr/bin/qemu-system-x86_64</emulator>", ""),
        ("id='7'", "id='12'"),
        ("<alias name='virtio-disk0'/>", ""),
        ("<currentMemory unit='KiB'>2097152</currentMemory>", ""),
        ('workload="web"', 'workload="batch"'),
        ("52:54:00:6b:3c:58", "52:54:00:6B:3C:58"),  # the same MAC, however written
    ]:
        assert old in text
        text = text.replace(old, new)
    check_abi_stability(realistic, parse_domain_xml(text))


def test_abi_implicit_controllers_on_one_side_only_pass(realistic: DomainDef) -> None:
    dst = parse_domain_xml(format_domain_xml(realistic, migratable=True))
    assert device_counts(realistic, migratable=False)["controller"] == 3
    assert device_counts(dst, migratable=False)["controller"] == 1
    check_abi_stability(realistic, dst)
    check_abi_stability(dst, realistic)


ABI_MISMATCHES = [
    (
        "<name>web01</name>",
        "<name>web02</name>",
        "Target domain name 'web02' does not match source 'web01'",
    ),
    (
        "C7A5FDBD-EDAF-9455-926A-D65C16DB1809",
        "c7a5fdbd-edaf-9455-926a-d65c16db1800",
        f"Target domain uuid c7a5fdbd-edaf-9455-926a-d65c16db1800 does not match source "
        f"{REALISTIC_UUID}",
    ),
    (
        "<domain type='kvm'",
        "<domain type='qemu'",
        "Target domain virt type qemu does not match source kvm",
    ),
    (
        "<memory unit='GiB'>4</memory>",
        "<memory unit='MiB'>4097</memory>",
        "Target domain max memory 4195328 does not match source 4194304",
    ),
    (">4</vcpu>", ">8</vcpu>", "Target domain vCPU max 8 does not match source 4"),
    (">hvm</type>", ">exe</type>", "Target domain OS type exe does not match source hvm"),
    (
        "arch='x86_64'",
        "arch='i686'",
        "Target domain architecture i686 does not match source x86_64",
    ),
    (
        "machine='pc-q35-8.2'",
        "machine='pc-q35-9.0'",
        "Target domain machine type pc-q35-9.0 does not match source pc-q35-8.2",
    ),
    (
        "    <serial type='pty'>",
        "    <serial type='null'/>\n    <serial type='pty'>",
        "Target domain serial device count 2 does not match source 1",
    ),
    (
        "    <input type='mouse' bus='ps2'>",
        "    <rng model='virtio'><backend model='random'>/dev/urandom</backend></rng>\n"
        "    <input type='mouse' bus='ps2'>",
        "Target domain rng device count 1 does not match source 0",
    ),
    (
        "<controller type='sata' index='0'>",
        "<controller type='sata' index='0'/><controller type='scsi' index='0'>",
        "Target domain controller device count 2 does not match source 1",
    ),
    (
        "<mac address='52:54:00:6b:3c:58'/>",
        "<mac address='52:54:00:00:00:01'/>",
        "Target network card MAC 52:54:00:00:00:01 does not match source 52:54:00:6b:3c:58",
    ),
]


@pytest.mark.parametrize(
    ("old", "new", "message"), ABI_MISMATCHES, ids=[m[2].split(" does")[0] for m in ABI_MISMATCHES]
)
def test_abi_mismatch(realistic: DomainDef, old: str, new: str, message: str) -> None:
    dst = _variant(old, new)
    with pytest.raises(ConfigUnsupported,
                       match=f"^unsupported configuration: {re.escape(message)}$"):
        check_abi_stability(realistic, dst)


def test_abi_disk_removed(realistic: DomainDef) -> None:
    start = REALISTIC.index("    <disk type='file' device='cdrom'>")
    end = REALISTIC.index("</disk>", start) + len("</disk>\n")
    dst = parse_domain_xml(REALISTIC[:start] + REALISTIC[end:])
    with pytest.raises(
        ConfigUnsupported,
        match=r"^unsupported configuration: Target domain disk device count 1 does not match "
              r"source 2$"
    ):
        check_abi_stability(realistic, dst)


def test_abi_machine_absent_on_one_side(realistic: DomainDef) -> None:
    dst = _variant(" machine='pc-q35-8.2'", "")
    with pytest.raises(
        ConfigUnsupported,
        match=r"^unsupported configuration: Target domain machine type  does not match source "
              r"pc-q35-8.2$"
    ):
        check_abi_stability(realistic, dst)


def test_abi_first_mismatch_wins(realistic: DomainDef) -> None:
    text = REALISTIC.replace("<name>web01</name>", "<name>other</name>").replace(
        "<domain type='kvm'", "<domain type='qemu'"
    )
    with pytest.raises(ConfigUnsupported,
                       match=r"^unsupported configuration: Target domain name 'other'"):
        check_abi_stability(realistic, parse_domain_xml(text))
