"""The container run's fixtures: the images, the network and the three containers, once per
session, and everything removed at the end, also when a test fails.

Only ``make e2e`` collects this folder (``VIRTMIG_E2E=1``; ``tests/conftest.py`` skips it
otherwise): it needs root, podman, runc and mmdebstrap, and builds images.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.containers.fleet import HOSTS, Fleet
from tests.containers.images import build_app, build_context, ensure_base
from tests.containers.podman import Podman, kept_sysctls
from virtmig.testing import ensure_guest

KEEP_IMAGE_ENV = "VIRTMIG_E2E_KEEP_IMAGE"


@pytest.fixture(scope="session")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """host-a, host-b and client, running; at the end every container, network, volume and
    image the run made is removed (not the cached base) and the host's sysctls are restored;
    the run fails if podman lists anything that was not there before it (one run at a time)."""
    work = Path(tmp_path_factory.mktemp("fleet"))
    guest = ensure_guest()
    podman = Podman(work, prefix=f"virtmig-e2e-{os.getpid()}")
    keep = os.environ.get(KEEP_IMAGE_ENV) == "1"
    with kept_sysctls():
        ensure_base(podman)  # cached between runs: not the run's
        before = podman.inventory()
        try:
            context = build_context(work / "context")
            image = build_app(podman, context, keep=keep)
            if keep:
                before.add(f"image {podman.text('images', '--format', '{{.ID}}', image).strip()}")
            fleet = Fleet(podman, image, work, guest)
            fleet.start()
            yield fleet
        finally:
            errors = podman.cleanup()
            leftovers = podman.inventory() - before
    assert not errors, errors
    assert not leftovers, f"left behind: {sorted(leftovers)}"


@pytest.fixture(autouse=True)
def _no_guest_left(fleet: Fleet) -> Iterator[None]:
    """After each test, whatever it left (a failed test) is destroyed and undefined, so that
    the next one starts on empty hosts."""
    yield
    for host in HOSTS:
        for name, state in fleet.domains(host).items():
            if state != "shut off":
                fleet.virtmig(host, "destroy", name, check=False)
            fleet.virtmig(host, "undefine", name, check=False)
