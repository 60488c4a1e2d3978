"""``virtmig.testing``'s loopback ports: below the kernel's ephemeral range (where the source
port of any outgoing connection may land between a port's release and its bind), one share per
xdist worker, handed out in turn, never one that is bound."""

from __future__ import annotations

import socket

import pytest

from virtmig.testing import free_port, free_port_range, ports


def ephemeral_low() -> int:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        return int(f.read().split()[0])


def test_ports_lie_below_the_ephemeral_range_and_differ() -> None:
    got = [free_port() for _ in range(20)]
    assert len(set(got)) == 20  # none twice before its caller binds it
    assert all(ports.LOWEST <= p < ephemeral_low() for p in got)
    lo, hi = map(int, free_port_range(8).split("-"))
    assert hi - lo == 7 and lo >= ports.LOWEST and hi < ephemeral_low()


def test_a_bound_port_is_skipped() -> None:
    """The next candidate, bound by someone else meanwhile, is not handed out; nor is a range
    that contains it."""
    first = int(free_port_range(16).split("-")[0])  # 16 ports free now

    def fresh() -> ports._Ports:
        p = ports._Ports()
        p._share, p._next = range(first, first + 16), 0
        return p

    taken = fresh()
    assert taken.take(1) == first
    with socket.socket() as s:
        s.bind(("127.0.0.1", first + 1))
        s.listen()
        assert taken.take(1) == first + 2
        assert fresh().take(4) == first + 4  # first .. first + 3 holds the bound port


def test_each_xdist_worker_has_its_own_share(monkeypatch: pytest.MonkeyPatch) -> None:
    shares = []
    for worker in ("gw0", "gw1", "gw2"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
        shares.append(set(ports._share()))
    assert all(shares) and not (shares[0] & shares[1] or shares[1] & shares[2]
                                or shares[0] & shares[2])
    monkeypatch.delenv("PYTEST_XDIST_WORKER")
    assert set().union(*shares) <= set(ports._share())
