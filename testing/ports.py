"""Loopback ports for tests that need a port number before anything listens on it: a closed
port to fail against, a daemon's ``--migration-ports``, a listener started later.

A port the kernel picks (``bind`` to port 0) lies in the ephemeral range, where the kernel also
picks the source port of every outgoing connection: between the moment such a port is released
and the moment its user binds it, any connection of the machine may take it ("address already
in use" in a busy run).  So these ports come from below the ephemeral range
(``net.ipv4.ip_local_port_range``), where only an explicit ``bind`` puts a socket; each
pytest-xdist worker takes its own share of it, and hands its ports out in turn from a random
start, so that two callers of one process do not get the same port before either binds it.
Each port handed out was free (bindable) when it was picked.
"""

from __future__ import annotations

import os
import random
import socket
import threading

#: The lowest port handed out (below it: well-known and registered services a host may run).
LOWEST = 10000
#: The highest port handed out when the ephemeral range cannot be read.
_FALLBACK_HIGHEST = 32767


def _highest() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_HIGHEST
    return max(LOWEST + 1000, low - 1)


def _share() -> range:
    """This process's ports: its xdist worker's part of ``LOWEST`` .. below the ephemeral
    range (all of it outside xdist)."""
    ports = range(LOWEST, _highest() + 1)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = os.environ.get("PYTEST_XDIST_WORKER_COUNT", "")
    if worker.startswith("gw") and worker[2:].isdigit() and count.isdigit() and int(count) > 0:
        n, i = int(count), int(worker[2:]) % int(count)
        size = len(ports) // n
        return range(ports.start + i * size, ports.start + (i + 1) * size)
    return ports


class _Ports:
    """The process's next candidate, in turn over its share."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._share: range | None = None
        self._next = 0

    def take(self, count: int) -> int:
        """The first of ``count`` consecutive ports, each bindable on loopback right now."""
        with self._lock:
            if self._share is None:
                self._share = _share()
                self._next = random.randrange(len(self._share))
            share = self._share
            for _ in range(len(share)):
                first = share.start + self._next
                self._next = (self._next + count) % len(share)
                if first + count - 1 >= share.stop:
                    continue
                if all(_bindable(port) for port in range(first, first + count)):
                    return first
        raise RuntimeError(f"no {count} free loopback ports in {share.start}-{share.stop - 1}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_PORTS = _Ports()


def free_port() -> int:
    """A loopback port nobody listens on (see the module docstring)."""
    return _PORTS.take(1)


def free_port_range(count: int = 8) -> str:
    """``LO-HI`` of ``count`` loopback ports free right now: a daemon's ``--migration-ports``."""
    first = _PORTS.take(count)
    return f"{first}-{first + count - 1}"
