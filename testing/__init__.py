"""virtmig.testing: what you need to test code that uses virtmig, and what virtmig's own tests use.

Real daemons in your event loop, guests to migrate, and waits that never hang or sleep blindly::

    from virtmig.testing import domain_xml, hosts, wait_until

    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        await src.conn.define(domain_xml("vm1", dirty_rate_mib=4))
        await src.conn.start("vm1")
        ...

* :mod:`~virtmig.testing.hosts`: daemon pairs on loopback over mutual TLS (:func:`hosts`,
  :func:`start_host`, :class:`Host`), :func:`free_port`, :func:`free_port_range`,
  :class:`ClosedPortDest`;
* :mod:`~virtmig.testing.pki`: the throw-away PKI those daemons and their clients use
  (:func:`session_pki`);
* :mod:`~virtmig.testing.domains`: domain XML for the ``test`` backend (:func:`domain_xml`) and
  for QEMU running the test guest (:func:`qemu_domain_xml`);
* :mod:`~virtmig.testing.guest`: builds and caches that guest (a Debian kernel and an initramfs
  whose /init dirties memory and prints a checked heartbeat, and can send it as UDP through a
  NIC and log it to a disk, :func:`disk_records`; ``python -m virtmig.testing`` builds it ahead
  of the tests); :mod:`~virtmig.testing.kmod` finds the kernel modules of its NIC and disk
  drivers;
* :mod:`~virtmig.testing.qemu`: skip rules for tests that need QEMU, KVM detection, clean-up;
* :mod:`~virtmig.testing.qemu_user`: what a confined test QEMU needs from the host (its
  unprivileged user, created and released; post-copy as root; the guest cache as storage) and
  where a guest's serial log lies;
* :mod:`~virtmig.testing.wait`: :func:`wait_until` and friends, bounded waits on a condition.
* :mod:`~virtmig.testing.vnc`: an RFB handshake with a guest's VNC server (the security types
  it offers, VNC authentication with a password), on a loopback port or a unix socket.

Nothing here needs pytest, except the ``*_or_skip`` functions when they skip.
"""

from __future__ import annotations

from virtmig.testing.domains import domain_xml, firmware_guest_xml, qemu_domain_xml
from virtmig.testing.guest import (
    DiskRecord,
    GuestImage,
    GuestUnavailable,
    cache_dir,
    disk_records,
    ensure_guest,
)
from virtmig.testing.hosts import (
    ClosedPortDest,
    Host,
    connect_uri,
    hosts,
    start_host,
    stop_host,
    teardown_hosts,
)
from virtmig.testing.pki import ThrowawayPki, release_session_pki, session_pki
from virtmig.testing.ports import free_port, free_port_range
from virtmig.testing.qemu import (
    guest_domain_type,
    guest_or_skip,
    kill_leftover_qemus,
    kvm_boots,
    kvm_usable,
    qemu_binary_or_skip,
    qemu_required,
)
from virtmig.testing.qemu_user import (
    TEST_QEMU_USER,
    daemon_settings,
    postcopy_as_root,
    qemu_settings,
    release_qemu_user,
    serial_log,
)
from virtmig.testing.wait import (
    WaitTimeout,
    wait_for_job,
    wait_job_streaming,
    wait_until,
    wait_until_sync,
)

__all__ = [
    "TEST_QEMU_USER",
    "ClosedPortDest",
    "DiskRecord",
    "GuestImage",
    "GuestUnavailable",
    "Host",
    "ThrowawayPki",
    "WaitTimeout",
    "cache_dir",
    "connect_uri",
    "daemon_settings",
    "disk_records",
    "domain_xml",
    "ensure_guest",
    "firmware_guest_xml",
    "free_port",
    "free_port_range",
    "guest_domain_type",
    "guest_or_skip",
    "hosts",
    "kill_leftover_qemus",
    "kvm_boots",
    "kvm_usable",
    "postcopy_as_root",
    "qemu_binary_or_skip",
    "qemu_domain_xml",
    "qemu_required",
    "qemu_settings",
    "release_qemu_user",
    "release_session_pki",
    "serial_log",
    "session_pki",
    "start_host",
    "stop_host",
    "teardown_hosts",
    "wait_for_job",
    "wait_job_streaming",
    "wait_until",
    "wait_until_sync",
]
