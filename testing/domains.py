"""Domain XML for test guests: a ``test`` backend guest, and a ``qemu`` guest running the test
guest image (:mod:`virtmig.testing.guest`)."""

from __future__ import annotations

import textwrap

from virtmig.testing.guest import GuestImage
from virtmig.testing.qemu import guest_domain_type


def domain_xml(name: str = "vm1", memory_mib: int = 64, *, uuid: str | None = None,
               dirty_rate_mib: int = 0, extra_options: str = "") -> str:
    """A ``test`` backend guest; ``dirty_rate_mib``: MiB/s it writes to its memory while it runs;
    ``extra_options``: more attributes of its ``<virtmig:guest>`` element (``fault=...``)."""
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    opts = f'dirty-rate-mib="{dirty_rate_mib}" ' if dirty_rate_mib else ""
    return textwrap.dedent(f"""\
        <domain type='test'>
          <name>{name}</name>
          {uuid_el}
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64' machine='pc'>hvm</type></os>
          <metadata>
            <virtmig:guest xmlns:virtmig="urn:virtmig:domain:1" {opts}{extra_options}/>
          </metadata>
          <devices>
            <serial type='pty'><target port='0'/></serial>
          </devices>
        </domain>
        """)


def firmware_guest_xml(name: str) -> str:
    """A ``qemu`` (TCG) guest of 64 MiB with a serial console and nothing to boot: it sits in
    its firmware (SeaBIOS), for tests about QEMU processes rather than guests."""
    return textwrap.dedent(f"""\
        <domain type='qemu'>
          <name>{name}</name>
          <memory unit='MiB'>64</memory>
          <devices><serial type='pty'><target port='0'/></serial></devices>
        </domain>
        """)


def qemu_domain_xml(image: GuestImage, name: str = "vm1", memory_mib: int = 256, *,
                    uuid: str | None = None, dirty_mb: int = 64, dirty_rate: int = 0,
                    domain_type: str | None = None, devices: str = "",
                    disklog: str = "", udp_port: int = 0, nic_model: str = "virtio",
                    mac: str | None = "52:54:00:00:00:01", pti: bool = True) -> str:
    """A ``qemu`` domain running the test guest ``image``.

    ``domain_type``: ``kvm`` or ``qemu`` (TCG); by default KVM where this machine runs the
    guest with it (:func:`~virtmig.testing.qemu.guest_domain_type`).  ``devices``: more
    devices (disks...); ``disklog``: the guest device its /init logs heartbeats to.
    ``udp_port``: the guest has an ``<interface type='user'>`` (``nic_model``; ``mac``, None:
    no ``<mac>``, the daemon generates one at define) and sends its heartbeat to the host's
    ``127.0.0.1:udp_port`` through it too.  Both as :meth:`GuestImage.cmdline` says, and
    combinable.  ``pti``: the kernel runs with ``pti=on`` (:meth:`GuestImage.cmdline`: under
    TCG it keeps a dirtying guest from breaking after a live migration); ``False``: the plain
    default kernel, which one test module keeps so that it stays covered
    (``tests/e2e/test_qemu_network.py``).  Its serial console goes to the log file in the
    guest's folder on whichever host runs it (:meth:`Host.serial_log`; the confined backend
    refuses serial files outside that folder).
    """
    uuid_el = f"<uuid>{uuid}</uuid>" if uuid else ""
    console = "<serial type='pty'><target port='0'/></serial>"
    mac_el = f"<mac address='{mac}'/>" if mac else ""
    nic = (f"<interface type='user'>{mac_el}<model type='{nic_model}'/></interface>"
           if udp_port else "")
    cmdline = image.cmdline(dirty_mb, dirty_rate, udp_port=udp_port, disklog=disklog, pti=pti)
    return textwrap.dedent(f"""\
        <domain type='{domain_type or guest_domain_type(image)}'>
          <name>{name}</name>
          {uuid_el}
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os>
            <type arch='x86_64' machine='pc'>hvm</type>
            <kernel>{image.kernel}</kernel>
            <initrd>{image.initrd}</initrd>
            <cmdline>{cmdline}</cmdline>
          </os>
          <features><acpi/><apic/></features>
          <devices>
            {console}{nic}{devices}
            <memballoon model='none'/>
          </devices>
        </domain>
        """)
