"""``dominfo``'s CPU time comes from the backend: a QEMU guest's process CPU time, a test
guest's clock, 0 for a guest that is not running."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace
from typing import Any

from virtmig.daemon.backend.qemu.backend import QemuBackend
from virtmig.daemon.backend.test.backend import TestBackend


def test_qemu_cpu_time_is_the_process_cpu_time() -> None:
    fake: Any = SimpleNamespace(_guests={"me": SimpleNamespace(pid=os.getpid())})
    times = os.times()
    spent = QemuBackend.cpu_time_ns(fake, "me")
    assert spent >= int((times.user + times.system) * 1e9) - 10**7 > 0
    assert QemuBackend.cpu_time_ns(fake, "other") == 0
    gone: Any = SimpleNamespace(_guests={"x": SimpleNamespace(pid=2**22 + 1)})  # no such pid
    assert QemuBackend.cpu_time_ns(gone, "x") == 0


def test_test_guest_cpu_time_is_its_clock() -> None:
    guest: Any = SimpleNamespace(created=time.monotonic() - 2.0)
    fake: Any = SimpleNamespace(_guests={"g": guest})
    assert TestBackend.cpu_time_ns(fake, "g") >= 2 * 10**9
    assert TestBackend.cpu_time_ns(fake, "none") == 0
