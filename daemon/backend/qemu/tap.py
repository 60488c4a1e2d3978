"""The taps of ``<interface type='ethernet'|'bridge'>``: created by the daemon, handed to QEMU.

Concern: the host side of a guest's tap interface, done by the daemon (which has
``CAP_NET_ADMIN``) so that QEMU, unprivileged and sandboxed, only ever gets a descriptor.

:func:`open_tap` creates the tap through ``/dev/net/tun`` (``TUNSETIFF``; ``IFF_TAP |
IFF_NO_PI``, with ``IFF_VNET_HDR`` for virtio), sets its MAC to the guest's with the first octet
``fe`` (so a bridge never takes the tap's address as its own), gives it its bridge's MTU and
attaches it to that bridge (``SIOCBRADDIF``), and brings it up.  The tap is not persistent: the
kernel deletes it (and takes it off its bridge) when its last descriptor closes -- the daemon
closes its own once QEMU has inherited it, so the tap goes when the guest's QEMU exits, however
it exits, and a crashed daemon leaves none behind.  A name that already exists is refused (it
would be someone else's interface), as is a bridge that does not exist, naming it (at start,
or on the destination of a migration, at prepare).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from virtmig.daemon.backend.base import BackendError
from virtmig.daemon.backend.qemu.net import NicConfig

__all__ = ["Tap", "bridge_refusal", "open_tap"]

TUN_DEVICE = "/dev/net/tun"
SYS_NET = "/sys/class/net"

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
IFF_UP = 0x0001
IFF_TAP = 0x0002
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
SIOCGIFINDEX = 0x8933
SIOCBRADDIF = 0x89A2
ARPHRD_ETHER = 1
_IFREQ = 40  # struct ifreq: 16-byte name, 24-byte union


@dataclass(frozen=True)
class Tap:
    """A tap the daemon created: its descriptor (the daemon's to pass, then close) and name."""

    fd: int
    name: str


def bridge_refusal(bridge: str, sys_net: str = SYS_NET) -> str:
    """Why a tap cannot join ``bridge`` on this host (``""``: it can)."""
    path = os.path.join(sys_net, bridge)
    if not os.path.exists(path):
        return f"bridge '{bridge}' does not exist on this host"
    if not os.path.isdir(os.path.join(path, "bridge")):
        return f"'{bridge}' is not a bridge"
    return ""


def open_tap(nic: NicConfig) -> Tap:
    """Create ``nic``'s tap (see the module docstring); ``BackendError`` names what failed."""
    what = f"<interface type='{nic.kind}'> {nic.id}"
    if nic.bridge:
        why = bridge_refusal(nic.bridge)
        if why:
            raise BackendError(f"{what}: {why}")
    if nic.tap and os.path.lexists(os.path.join(SYS_NET, nic.tap)):
        raise BackendError(f"{what}: an interface named '{nic.tap}' already exists (a tap "
                           "the daemon creates needs a free name)")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise BackendError(f"{what}: cannot open {TUN_DEVICE}: {exc.strerror or exc}") from None
    try:
        name = _create(fd, nic, what)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            _configure(sock, name, nic, what)
    except BaseException:
        os.close(fd)  # the tap goes with it
        raise
    return Tap(fd=fd, name=name)


def _create(fd: int, nic: NicConfig, what: str) -> str:
    """TUNSETIFF: the tap's name as the kernel made it; refuses an existing persistent tap."""
    flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if nic.vnet_hdr else 0)
    try:
        got = fcntl.ioctl(fd, TUNSETIFF, _ifreq(nic.tap_name, struct.pack("H", flags)))
        name = got[:16].split(b"\0", 1)[0].decode()
        now = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ))
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EINVAL, errno.EEXIST):
            raise BackendError(f"{what}: cannot create tap '{nic.tap_name}': the name is taken "
                               f"({exc.strerror})") from None
        raise BackendError(f"{what}: cannot create tap '{nic.tap_name}': "
                           f"{exc.strerror or exc}") from None
    if struct.unpack_from("H", now, 16)[0] & IFF_PERSIST:
        raise BackendError(f"{what}: '{name}' is an existing persistent tap, not one the daemon "
                           "creates")
    return name


def _configure(sock: socket.socket, name: str, nic: NicConfig, what: str) -> None:
    """The tap's MAC (``fe`` + the guest's last five octets), its bridge (and the bridge's MTU),
    then up."""
    step = "set its MAC address"
    try:
        mac = bytes([0xFE, *(int(x, 16) for x in nic.mac.split(":")[1:])])
        fcntl.ioctl(sock, SIOCSIFHWADDR, _ifreq(name, struct.pack("H", ARPHRD_ETHER) + mac))
        if nic.bridge:
            step = f"give it bridge '{nic.bridge}''s MTU"
            with open(os.path.join(SYS_NET, nic.bridge, "mtu")) as f:
                mtu = int(f.read().strip())
            fcntl.ioctl(sock, SIOCSIFMTU, _ifreq(name, struct.pack("i", mtu)))
            step = f"attach it to bridge '{nic.bridge}'"
            index = struct.unpack_from("i", fcntl.ioctl(sock, SIOCGIFINDEX, _ifreq(name)), 16)[0]
            fcntl.ioctl(sock, SIOCBRADDIF, _ifreq(nic.bridge, struct.pack("i", index)))
        step = "bring it up"
        flags = struct.unpack_from("H", fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq(name)), 16)[0]
        fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq(name, struct.pack("H", flags | IFF_UP)))
    except (OSError, ValueError) as exc:
        raise BackendError(f"{what}: tap '{name}': cannot {step}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from None


def _ifreq(name: str, data: bytes = b"") -> bytes:
    """A ``struct ifreq`` for interface ``name`` with ``data`` at the start of its union."""
    raw = name.encode()
    if len(raw) >= 16:
        raise BackendError(f"interface name '{name}' is too long")
    return raw.ljust(16, b"\0") + data.ljust(_IFREQ - 16, b"\0")
