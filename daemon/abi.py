"""The migration ABI check: the destination's definition must describe the guest the source runs.

libvirt's ``virDomainDefCheckABIStability`` in the subset virtmig models: identity, virtualization
type, memory, vCPUs, OS type, architecture, machine type, the count of each device kind, and the
network cards' MACs.  Host-side details (disk source paths, the emulator) may differ.
"""

from __future__ import annotations

from virtmig.daemon.domxml import DomainDef, device_counts, interface_macs
from virtmig.proto.errors import ConfigUnsupported

__all__ = ["check_abi_stability"]


def check_abi_stability(src: DomainDef, dst: DomainDef) -> None:
    """Raise ConfigUnsupported (libvirt's wording) at the first guest-visible difference.

    Host-side details such as disk source paths may differ.  Device kinds are compared by count
    on the migratable forms, so an implicit controller on one side only does not matter; the
    network cards' MACs one by one.
    """
    if dst.name != src.name:
        raise ConfigUnsupported(
            f"Target domain name '{dst.name}' does not match source '{src.name}'"
        )
    if dst.uuid != src.uuid:
        raise ConfigUnsupported(f"Target domain uuid {dst.uuid} does not match source {src.uuid}")
    if dst.domain_type != src.domain_type:
        raise ConfigUnsupported(
            f"Target domain virt type {dst.domain_type} does not match source {src.domain_type}"
        )
    if dst.memory_kib != src.memory_kib:
        raise ConfigUnsupported(
            f"Target domain max memory {dst.memory_kib} does not match source {src.memory_kib}"
        )
    if dst.vcpus != src.vcpus:
        raise ConfigUnsupported(
            f"Target domain vCPU max {dst.vcpus} does not match source {src.vcpus}"
        )
    if dst.os_type != src.os_type:
        raise ConfigUnsupported(
            f"Target domain OS type {dst.os_type} does not match source {src.os_type}"
        )
    if dst.arch != src.arch:
        raise ConfigUnsupported(
            f"Target domain architecture {dst.arch} does not match source {src.arch}"
        )
    if dst.machine != src.machine:
        raise ConfigUnsupported(
            f"Target domain machine type {dst.machine} does not match source {src.machine}"
        )
    src_counts = device_counts(src)
    dst_counts = device_counts(dst)
    for kind in [*src_counts, *(k for k in dst_counts if k not in src_counts)]:
        theirs, ours = dst_counts.get(kind, 0), src_counts.get(kind, 0)
        if theirs != ours:
            raise ConfigUnsupported(
                f"Target domain {kind} device count {theirs} does not match source {ours}"
            )
    for our_mac, their_mac in zip(interface_macs(src), interface_macs(dst), strict=False):
        if their_mac != our_mac:
            raise ConfigUnsupported(
                f"Target network card MAC {their_mac} does not match source {our_mac}")
