"""The ``test`` backend: guests that live inside the daemon, migrated over a real TCP stream."""

from __future__ import annotations

from virtmig.daemon.backend.test.backend import TestBackend
from virtmig.daemon.backend.test.guest import FAULT_CORRUPT_STREAM
from virtmig.daemon.backend.test.memory import MIB, PAGE_SIZE, digest_of, page_bytes, page_hash
from virtmig.daemon.backend.test.wire import HANDSHAKE_TIMEOUT, MAGIC, PROTOCOL_VERSION

__all__ = [
    "FAULT_CORRUPT_STREAM",
    "HANDSHAKE_TIMEOUT",
    "MAGIC",
    "MIB",
    "PAGE_SIZE",
    "PROTOCOL_VERSION",
    "TestBackend",
    "digest_of",
    "page_bytes",
    "page_hash",
]

# What the test suite reaches for under the name the single-module backend had.
_digest_of = digest_of
