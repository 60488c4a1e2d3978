"""systemd's readiness protocol (``sd_notify``), for a unit of ``Type=notify``.

When systemd starts the daemon it sets ``$NOTIFY_SOCKET`` to a datagram unix socket (a path, or
``@name`` in the abstract namespace); :func:`notify` sends it one datagram of ``KEY=VALUE``
lines: ``READY=1`` once every listener serves, ``RELOADING=1`` / ``READY=1`` around a SIGHUP
reload, ``STOPPING=1`` when shutting down.  Without the variable it does nothing.  A failure to
send is logged and otherwise ignored: readiness is a courtesy to the service manager, never a
reason to stop serving.  The protocol is a few lines (systemd documents it as stable), so no
library is needed for it.
"""

from __future__ import annotations

import os
import socket

from virtmig.proto import logsafe

log = logsafe.logger(__name__)


def notify(*lines: str) -> bool:
    """Send ``lines`` (``"READY=1"``, ...) to ``$NOTIFY_SOCKET``; True if sent."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd through %s: %s", target, exc)
        return False
    return True
