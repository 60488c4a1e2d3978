"""Moved: the QEMU test guest and its builder are :mod:`virtmig.testing.guest` now."""
