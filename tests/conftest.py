"""Shared fixtures: real daemons in the test's event loop, on loopback, port 0, over mutual TLS
with the session's throw-away PKI (:mod:`virtmig.testing.pki`).

The helpers behind them live in :mod:`virtmig.testing` (daemons, domain XML, the QEMU test
guest, bounded waits); import them from there.  They are re-exported here for the tests that
still import them from ``tests.conftest``.

Fixtures, one meaning each across the suite:

* ``backend``: each backend in turn (``test``, then ``qemu``, which is skipped without QEMU);
* ``pair``: two daemons ``src`` and ``dst`` on the ``test`` backend;
* ``backend_pair``: two daemons ``src`` and ``dst`` on ``backend`` (the test runs on both);
* ``qemu_pair``: two daemons ``src`` and ``dst`` on the ``qemu`` backend (skipped without QEMU
  or the test guest).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from virtmig.daemon import eventloop, settings
from virtmig.proto.pki import PKI_DIR_ENV
from virtmig.testing import (
    ClosedPortDest,
    GuestImage,
    Host,
    connect_uri,
    domain_xml,
    free_port,
    guest_or_skip,
    hosts,
    postcopy_as_root,
    qemu_binary_or_skip,
    qemu_domain_xml,
    release_qemu_user,
    release_session_pki,
    session_pki,
    start_host,
    stop_host,
    teardown_hosts,
)

TEST_LOOP_ENV = "VIRTMIG_TEST_EVENT_LOOP"  # the event loop of the suite's asyncio tests

__all__ = [
    "ClosedPortDest",
    "Host",
    "connect_uri",
    "domain_xml",
    "free_port",
    "hosts",
    "qemu_domain_xml",
    "start_host",
    "stop_host",
    "teardown_hosts",
]


E2E_ENV = "VIRTMIG_E2E"  # set by `make e2e`: collect tests/containers


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    """tests/containers (marker ``containers``) builds images and runs podman as root: only
    ``make e2e`` collects it (``VIRTMIG_E2E=1``), never ``make test``."""
    if collection_path.name == "containers" and collection_path.parent == Path(__file__).parent:
        return os.environ.get(E2E_ENV) != "1" or None
    return None


def _weight(item: pytest.Item) -> int:
    """How long a test runs, roughly: 0 for the end-to-end migrations of the real guest
    (tests/e2e; tens of seconds each), 1 for the other tests that boot QEMU guests or network
    namespaces (seconds), 2 for the rest (most well under a second)."""
    if "tests/e2e/" in item.nodeid:
        return 0
    if item.get_closest_marker("qemu") or item.get_closest_marker("netns"):
        return 1
    return 2


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest tests run first (:func:`_weight`; otherwise in collection order): under
    pytest-xdist (``make test``: ``--dist loadgroup``, each test a unit of its own unless marked
    ``xdist_group``) a worker takes the next test whenever it has fewer than three queued, so
    both workers run the long QEMU and netns tests side by side from the start and end on short
    ones together, instead of one worker finishing a 50 s migration alone at the end.  The order
    is the same on every worker (xdist requires it).  Nothing else depends on it: every test
    makes its own daemons, guests and namespaces (the QEMU test user, the guest cache and the
    namespace names are safe for concurrent sessions and workers).

    The fault matrix (marker ``faults``, ``make faults``) runs only when the ``-m`` expression
    names it: any other selection, ``-m qemu`` included, leaves it out."""
    if "faults" not in (config.getoption("markexpr") or ""):
        matrix = [item for item in items if item.get_closest_marker("faults")]
        if matrix:
            config.hook.pytest_deselected(items=matrix)
            items[:] = [item for item in items if not item.get_closest_marker("faults")]
    items.sort(key=_weight)  # stable: collection order within each weight


def pytest_asyncio_loop_factories(config: pytest.Config,
                                  item: pytest.Item) -> Mapping[str, Any]:
    """Every asyncio test runs on the event loop ``virtmigd`` runs on by default (the daemons
    in a test's loop run as they do in production), or on ``$VIRTMIG_TEST_EVENT_LOOP``'s
    (``uvloop``: the whole suite on uvloop)."""
    name = os.environ.get(TEST_LOOP_ENV) or settings.default("event_loop")
    return {name: eventloop.factory(name) or asyncio.new_event_loop}


@pytest.fixture(autouse=True, scope="session")
def client_pki() -> Iterator[Path]:
    """The session's client dir as ``$VIRTMIG_PKI_DIR``: a connection a test opens by URI
    alone (its own, or a CLI or caller process's) presents ``O=virtmig,CN=admin``.  The session
    PKI is removed as the session ends: a pytest run that mutmut forked ends by ``os._exit``,
    without ``atexit`` (:mod:`virtmig.testing.pki`)."""
    client = session_pki().client()
    old = os.environ.get(PKI_DIR_ENV)
    os.environ[PKI_DIR_ENV] = str(client)
    try:
        yield client
    finally:
        if old is None:
            os.environ.pop(PKI_DIR_ENV, None)
        else:
            os.environ[PKI_DIR_ENV] = old
        release_session_pki()


@pytest.fixture(scope="session", autouse=True)
def _qemu_user_released() -> Iterator[None]:
    """At the end of the session, the QEMU test user goes if the tests created it."""
    yield
    release_qemu_user()


@pytest.fixture(autouse=True)
def _postcopy_qemu_user(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test marked ``postcopy`` runs QEMU as root where only root may use userfaultfd
    (:mod:`virtmig.testing.qemu_user`)."""
    with postcopy_as_root(request.node.get_closest_marker("postcopy") is not None):
        yield


@pytest.fixture(params=["test", pytest.param("qemu", marks=pytest.mark.qemu)])
def backend(request: pytest.FixtureRequest) -> str:
    """Each backend in turn; qemu needs QEMU and the test guest (skipped, or failed under
    VIRTMIG_REQUIRE_QEMU=1, without them)."""
    if request.param == "qemu":
        qemu_binary_or_skip()
        guest_or_skip()
    return str(request.param)


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Host, Host]]:
    """Two daemons on the ``test`` backend."""
    async with hosts(tmp_path, "test", ("src", {}), ("dst", {})) as (src, dst):
        yield src, dst


@pytest.fixture
async def backend_pair(tmp_path: Path, backend: str) -> AsyncIterator[tuple[Host, Host]]:
    """Two daemons on ``backend``: a test using this runs on each backend."""
    async with hosts(tmp_path, backend, ("src", {}), ("dst", {})) as (src, dst):
        yield src, dst


@pytest.fixture(scope="session")
def guest_image() -> GuestImage:
    """The QEMU test guest (built once per machine); skips without QEMU or the guest."""
    qemu_binary_or_skip()
    return guest_or_skip()


@pytest.fixture
async def qemu_pair(tmp_path: Path, guest_image: GuestImage) -> AsyncIterator[tuple[Host, Host]]:
    """Two daemons on the ``qemu`` backend (QEMU and the test guest are there)."""
    async with hosts(tmp_path, "qemu", ("src", {}), ("dst", {})) as (src, dst):
        yield src, dst
