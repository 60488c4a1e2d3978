"""Moved to :mod:`virtmig.testing` (the builder is :mod:`virtmig.testing.guest`, the skip rules
:mod:`virtmig.testing.qemu`); these names stay importable from here for tests written against
the old place.  Import them from :mod:`virtmig.testing`."""

from __future__ import annotations

from virtmig.testing.guest import GuestImage, GuestUnavailable, cache_dir, ensure_guest
from virtmig.testing.qemu import (
    QEMU_BINARY,
    REQUIRE_ENV,
    guest_or_skip,
    kill_leftover_qemus,
    qemu_binary_or_skip,
    qemu_required,
)

__all__ = [
    "QEMU_BINARY",
    "REQUIRE_ENV",
    "GuestImage",
    "GuestUnavailable",
    "cache_dir",
    "ensure_guest",
    "guest_or_skip",
    "kill_leftover_qemus",
    "qemu_binary_or_skip",
    "qemu_required",
]
