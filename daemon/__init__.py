"""virtmigd: the daemon.

gRPC's fork handlers are turned off for the daemon's process (``GRPC_ENABLE_FORK_SUPPORT``,
unless set already): the daemon never forks a process that uses gRPC, it starts QEMU and probes
(fork, then exec).  With the handlers on, a fork made by libuv (``event_loop = "uvloop"``
starting a QEMU) runs them while other threads use gRPC, and the daemon's TLS connections break
("Decryption error: TSI_DATA_CORRUPTED").  gRPC reads the variable when it is imported: set here,
before any of the daemon's modules imports it.
"""

import os as _os
import sys as _sys

#: Whether gRPC was imported with its fork handlers off (what ``event_loop = "uvloop"`` needs).
GRPC_FORK_HANDLERS_OFF = "grpc" not in _sys.modules and _os.environ.setdefault(
    "GRPC_ENABLE_FORK_SUPPORT", "false").strip().lower() in ("false", "0", "no")
