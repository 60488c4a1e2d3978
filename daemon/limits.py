"""Limits on clients and on their concurrent calls: libvirt's ``max_clients`` and
``max_client_requests``, as virtmig's ``max_clients`` and ``max_calls_per_client`` settings.

A *client* is one gRPC connection, told apart by its peer address (``context.peer()``:
``ipv4:10.1.2.3:51234``, a port per connection).  It counts while it has a call in flight (a
unary call, or a stream: a session, a job watch, events, a tunnel); gRPC shows a handler no
idle connection, and an idle connection costs the daemon no handler.  Every call takes a slot
(:meth:`CallLimits.admit`) before its handler runs and gives it back (:meth:`Slot.release`,
idempotent) however it ends: completed, failed, or cancelled by the caller.

* ``max_clients``: clients with calls in flight, all listeners together (the read-only socket's
  too).  A call from a new client beyond it is refused.
* ``max_calls_per_client``: calls in flight on one connection; one more is refused.

Refusals are :class:`~virtmig.proto.errors.ResourceExhausted` (RESOURCE_EXHAUSTED, "resource
busy: ...") naming the setting and its value.

Unix sockets: gRPC gives every connection over a unix socket the same peer (``unix:``), so its
connections cannot be told apart.  Each call over one then counts as a client of its own: the
calls of all local callers together are bounded by ``max_clients``, and ``max_calls_per_client``,
which cannot see their connections, does not apply to them.
"""

from __future__ import annotations

import itertools

from virtmig.daemon import settings
from virtmig.proto.errors import ResourceExhausted

#: Defaults (the settings schema's ``max_clients``, ``max_calls_per_client``).  A CLI ``virtmig
#: migrate --verbose --postcopy-after-precopy --timeout N`` holds at most 6 calls at once on the
#: source's connection (its session, job watch and events streams, one sequence call, the
#: timeout's or the switch's call, Ctrl-C's abort; a test holds it to 8): the per-client default
#: leaves room for a library user watching several domains on one connection.
DEFAULT_MAX_CLIENTS: int = settings.held("max_clients")
DEFAULT_MAX_CALLS_PER_CLIENT: int = settings.held("max_calls_per_client")


class Slot:
    """One admitted call; :meth:`release` gives its slot back (once, however often called)."""

    def __init__(self, limits: CallLimits, client: str) -> None:
        self._limits: CallLimits | None = limits
        self.client = client

    def release(self) -> None:
        if self._limits is not None:
            self._limits._release(self.client)
            self._limits = None


class CallLimits:
    """The daemon's count of clients and their calls in flight, shared by all its servers."""

    def __init__(self, max_clients: int = DEFAULT_MAX_CLIENTS,
                 max_calls_per_client: int = DEFAULT_MAX_CALLS_PER_CLIENT) -> None:
        if max_clients < 1 or max_calls_per_client < 1:
            raise ValueError("call limits must be at least 1")
        self.max_clients = max_clients
        self.max_calls_per_client = max_calls_per_client
        self._calls: dict[str, int] = {}  # client -> calls in flight (> 0)
        self._unnamed = itertools.count(1)
        self.refused = 0  # calls refused so far

    @property
    def clients(self) -> int:
        """Clients with calls in flight now."""
        return len(self._calls)

    @property
    def calls(self) -> int:
        """Calls in flight now, all clients together."""
        return sum(self._calls.values())

    def admit(self, peer: str) -> Slot:
        """A slot for a call from ``peer``, or ResourceExhausted naming the limit reached."""
        client = peer if peer and not peer.startswith("unix:") else (
            f"{peer or 'unknown'}#{next(self._unnamed)}")
        held = self._calls.get(client, 0)
        if not held and len(self._calls) >= self.max_clients:
            self.refused += 1
            raise ResourceExhausted(
                f"too many clients: {len(self._calls)} have calls in flight, the limit "
                f"max_clients is {self.max_clients}")
        if held >= self.max_calls_per_client:
            self.refused += 1
            raise ResourceExhausted(
                f"too many concurrent calls from this client: {held} in flight, the limit "
                f"max_calls_per_client is {self.max_calls_per_client}")
        self._calls[client] = held + 1
        return Slot(self, client)

    def _release(self, client: str) -> None:
        held = self._calls.get(client, 0) - 1
        if held > 0:
            self._calls[client] = held
        else:
            self._calls.pop(client, None)
