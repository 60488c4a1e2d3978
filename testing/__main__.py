"""``python -m virtmig.testing``: build the QEMU test guest (or find it in the cache) now."""

from __future__ import annotations

import sys

from virtmig.testing.guest import GuestUnavailable, ensure_guest


def main() -> int:
    try:
        image = ensure_guest()
    except GuestUnavailable as exc:
        print(f"guest unavailable: {exc}", file=sys.stderr)
        return 1
    print(f"kernel {image.kernel}\ninitrd {image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
