"""The property tests' harness: two daemons on a loop thread, one example's calls, and the
invariants checked after every example.

The daemons (``test`` backend, loopback, mutual TLS, from :func:`virtmig.testing.start_host`) run
in an event loop of their own thread for a whole test module; each hypothesis example is a
coroutine submitted to it with a bounded wait (:meth:`Env.run`), so a daemon that stops answering
fails the example instead of hanging it.

What an example may legitimately leave: nothing.  It opens its own connections (and sessions,
when it draws them), and :func:`cleanup` then does what a careful caller would, through the
public API only: close those connections, so their sessions end (a job the session owned must
then end by itself, the daemon's rule); wait for the daemon to roll back every job no session
owns (its ``incoming_job_timeout`` is :data:`INCOMING_JOB_TIMEOUT_S` here); destroy and undefine
every domain.  After that both daemons must be back where every example starts
(:func:`check_invariants`): ``list`` answers within :data:`LIST_DEADLINE_S` and is empty, no job,
no guest and no migration (live or holding a guest) in the backend, no migration port taken, no
file in the state dir, no daemon bug logged, and this process's RSS within
:data:`RSS_BOUND_BYTES` of what it was at the start.

The daemons' guest memory limits (:data:`MAX_MEMORY_MIB`): small on the source, so the guests
examples migrate stay cheap; large on the destination, so huge declared guests are defined and
started there (the test backend's memory is sparse: a guest costs what it writes).

Every status an example gets is checked as it arrives (:func:`check_status`): a typed virtmig
error is fine, and so is gRPC's own refusal of a request over its message size limit; UNKNOWN,
or INTERNAL that is not a typed error either (an ``InternalError`` is a daemon bug: a caller's bad
cookie is a ``CookieError``, INVALID_ARGUMENT), fails the example.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Awaitable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from tests.fuzz.strategies import expand
from virtmig.client.rpc import SESSION_METADATA_KEY, RpcConnection
from virtmig.daemon.backend.test import TestBackend
from virtmig.daemon.job import Phase
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import ERROR_METADATA_KEY, VirtmigError
from virtmig.testing import Host, start_host, teardown_hosts, wait_until

T = TypeVar("T")

# The daemons' `incoming_job_timeout`: a job no session owns (a caller that never opened one)
# is rolled back by the daemon itself after this long idle, and the check waits for that.
INCOMING_JOB_TIMEOUT_S = 0.5
# The daemons' `test_max_memory_mib` (see the module docstring).
MAX_MEMORY_MIB = {"src": 64, "dst": 64 * 1024}
# The daemons' `completion_timeout_per_gib`: a migration that never converges (a guest dirtying
# faster than the link) is aborted by the daemon itself, within MIGRATING_DEADLINE_S even for the
# largest guest the source takes (64 MiB: 16 s), not by the caller's deadline.
COMPLETION_TIMEOUT_PER_GIB_S = 256.0

CALL_DEADLINE_S = 15.0  # any single call of an example
MIGRATING_DEADLINE_S = 30.0  # a call that migrates (Perform) or waits for the end (Confirm)
WAIT_DEADLINE_S = 1.5  # a call that may wait for a stream that never comes (Finish)
LIST_DEADLINE_S = 10.0  # `list` after an example: "promptly", on a loaded machine
CLEANUP_DEADLINE_S = 20.0  # the daemon's own rollback of a job whose session ended
EXAMPLE_DEADLINE_S = 120.0
RSS_BOUND_BYTES = 512 * 1024 * 1024

# Calls that wait for the incoming stream (Finish): a caller's deadline may end them.
WAITING_METHODS = frozenset({"Finish3", "Finish3Params", "Finish2"})
MIGRATING_METHODS = frozenset({"Perform3", "Perform3Params", "Perform", "Confirm3",
                               "Confirm3Params"})

# gRPC's own refusal of a request larger than the daemon's receive limit (4 MiB): no handler
# runs, so it carries no virtmig error class; it is a clean refusal of the caller's input.
GRPC_TOO_LARGE = re.compile(r"^(SERVER: )?Received message larger than max \(\d+ vs\. \d+\)$")


class DaemonBug(AssertionError):
    """What a property test reports: an invariant the daemon broke."""


def check_status(method: str, exc: grpc.aio.AioRpcError) -> None:
    """Whether a failed call's status is a clean, typed refusal (else DaemonBug)."""
    check_code(method, exc.code(), exc.details() or "", exc.trailing_metadata())


def check_code(method: str, code: grpc.StatusCode, details: str, trailers: Any) -> None:
    """:func:`check_status` for a call's final code, details and trailing metadata."""
    cls = dict(trailers or ()).get(ERROR_METADATA_KEY)
    if cls is not None and cls != "InternalError":
        return
    if cls is None and code is grpc.StatusCode.RESOURCE_EXHAUSTED and GRPC_TOO_LARGE.match(
            details):
        return
    if cls is None and code is grpc.StatusCode.DEADLINE_EXCEEDED and method in WAITING_METHODS:
        return
    if cls is None and code is grpc.StatusCode.CANCELLED:
        return  # the example cancelled it
    raise DaemonBug(f"{method}: unexpected status {code.name} ({cls}): {details}")


def expanded(msg: Any) -> Any:
    """``msg`` with the huge-string markers of its string fields expanded (see
    :mod:`tests.fuzz.strategies`); a copy when there are any, so the message hypothesis keeps
    stays small."""
    if not _has_marker(msg):
        return msg
    out = type(msg)()
    out.CopyFrom(msg)
    _expand_in(out)
    return out


def _has_marker(msg: Message) -> bool:
    for field, value in msg.ListFields():
        values = value if field.is_repeated else (value,)
        if field.type == FieldDescriptor.TYPE_STRING and any("\u27e6" in v for v in values):
            return True
        if field.message_type is not None and any(_has_marker(v) for v in values):
            return True
    return False


def _expand_in(msg: Message) -> None:
    for field, value in msg.ListFields():
        if field.message_type is not None:
            for v in value if field.is_repeated else (value,):
                _expand_in(v)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                value[:] = [expand(v) for v in value]
            else:
                setattr(msg, field.name, expand(value))


class BugLog(logging.Handler):
    """Collects what only a daemon bug logs: a traceback of a non-virtmig exception, an
    unhandled exception in a task or callback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        exc = record.exc_info[1] if record.exc_info else None
        if record.name.startswith("asyncio") or (exc is not None
                                                 and not isinstance(exc, VirtmigError)):
            self.records.append(f"{record.name}: {record.getMessage()} [{exc!r}]")

    def take(self) -> list[str]:
        out, self.records = self.records, []
        return out


class Env:
    """The module's daemons and the loop they run in."""

    def __init__(self, loop: asyncio.AbstractEventLoop, src: Host, dst: Host, rss_start: int,
                 bugs: BugLog) -> None:
        self.loop, self.src, self.dst = loop, src, dst
        self.rss_start = rss_start
        self.bugs = bugs
        self.stats: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Env({self.src.uri}, {self.dst.uri})"

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.src, self.dst

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = EXAMPLE_DEADLINE_S) -> T:
        """Run ``coro`` in the daemons' loop; fail if it does not end within ``timeout``."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()
            raise DaemonBug(f"an example did not end within {timeout:g} s") from None

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def daemon_env(tmp: Path, **settings: object) -> Iterator[Env]:
    """Two daemons (``src``, ``dst``) in a loop thread; stopped, with their guests, at the end."""
    settings.setdefault("incoming_job_timeout", INCOMING_JOB_TIMEOUT_S)
    settings.setdefault("completion_timeout_per_gib_s", COMPLETION_TIMEOUT_PER_GIB_S)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-daemons", daemon=True)
    thread.start()
    bugs = BugLog()
    for name in ("virtmig", "asyncio", "grpc"):
        logging.getLogger(name).addHandler(bugs)

    def run(coro: Awaitable[T]) -> T:
        async def wrapped() -> T:
            return await coro
        return asyncio.run_coroutine_threadsafe(wrapped(), loop).result(120)

    started: list[Host] = []
    try:
        for name in ("src", "dst"):
            own = {"test_max_memory_mib": MAX_MEMORY_MIB[name], **settings}
            started.append(run(start_host(tmp, name, **own)))  # type: ignore[arg-type]
        yield Env(loop, started[0], started[1], rss_bytes(), bugs)
    finally:
        try:
            run(teardown_hosts(tmp, *started))
        finally:
            for name in ("virtmig", "asyncio", "grpc"):
                logging.getLogger(name).removeHandler(bugs)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
            loop.close()


class Caller:
    """One example's own connections to both daemons, and its sessions (when it opens them)."""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.conns: dict[str, RpcConnection] = {}
        self.sessions: dict[str, str] = {}

    async def open(self, *, sessions: bool) -> Caller:
        for role, host in zip(("src", "dst"), self.env.hosts, strict=True):
            self.conns[role] = await RpcConnection.open(host.uri)
            if sessions:
                self.sessions[role] = await self.conns[role].open_session()
        return self

    def stub(self, role: str, service: str) -> Any:
        conn = self.conns[role]
        return {"Host": conn.host_stub, "Domains": conn.domains_stub,
                "Migration": conn.migration_stub}[service]

    async def call(self, role: str, service: str, method: str, request: Any, *,
                   session: str | None = None, timeout: float | None = None) -> Any:
        """One unary call; a refusal returns None after :func:`check_status` accepted it.
        ``session``: "own" (the caller's, if it opened one), "foreign" (a random id), None."""
        sid = {"own": self.sessions.get(role, ""), "foreign": secrets.token_hex(16)}.get(
            session or "", "")
        metadata = ((SESSION_METADATA_KEY, sid),) if sid else None
        if timeout is None:
            timeout = (WAIT_DEADLINE_S if method in WAITING_METHODS else MIGRATING_DEADLINE_S
                       if method in MIGRATING_METHODS else CALL_DEADLINE_S)
        try:
            reply = await getattr(self.stub(role, service), method)(
                expanded(request), timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            check_status(method, exc)
            self.env.count(f"{method}:{exc.code().name}: {(exc.details() or '')[:70]}")
            return None
        self.env.count(f"{method}:OK")
        return reply

    async def stream(self, role: str, service: str, method: str, request: Any, *,
                     reads: int = 2, timeout: float = 0.3) -> list[Any]:
        """A server stream: read up to ``reads`` messages, each within ``timeout``, then
        cancel it."""
        call = getattr(self.stub(role, service), method)(expanded(request))
        got: list[Any] = []
        try:
            for _ in range(reads):
                msg = await asyncio.wait_for(call.read(), timeout)
                if msg is grpc.aio.EOF:  # type: ignore[attr-defined]
                    break
                got.append(msg)
        except TimeoutError:
            pass
        except grpc.aio.AioRpcError as exc:
            check_status(method, exc)
        finally:
            call.cancel()
        return got

    async def close(self) -> None:
        for conn in self.conns.values():
            await conn.close()
        self.conns.clear()


# --- after every example -----------------------------------------------------------------------


async def cleanup(env: Env, caller: Caller) -> None:
    """Undo what the example did through the public API, as its caller would (see module doc);
    a job whose session ended must end by itself."""
    await caller.close()
    for host in env.hosts:
        await _wait_no_owned_jobs(host)
    for host in env.hosts:
        await _wait_unowned_jobs_rolled_back(host)
    admin = await Caller(env).open(sessions=False)
    try:
        for role, host in (("src", env.src), ("dst", env.dst)):
            for dom in await host.conn.list_domains(active=True, inactive=True):
                ref = pb.DomainRequest(domain=pb.DomainRef(uuid=dom.uuid))
                if dom.id >= 0:
                    await _must(admin.call(role, "Domains", "Destroy", ref), f"destroy {dom}")
                if dom.persistent:
                    await _must(admin.call(role, "Domains", "Undefine", ref),
                                f"undefine {dom}")
    finally:
        await admin.close()


async def _wait_no_owned_jobs(host: Host) -> None:
    def done() -> bool:
        return not _owned_jobs(host)

    def what() -> str:
        return f"{host.daemon.hostname}: jobs of ended sessions to end: {_owned_jobs(host)}"

    await wait_until(done, timeout=CLEANUP_DEADLINE_S, what=what)


async def _must(call: Awaitable[Any], what: str) -> None:
    if await call is None:
        raise DaemonBug(f"cleanup through the public API failed: {what}")


def _owned_jobs(host: Host) -> list[str]:
    return [f"{d.name}: {d.job.kind.value} {d.job.phase.label}" for d in host.daemon.registry
            if d.job is not None and d.job.owner and d.job.phase < Phase.POSTCOPY_FAILED]


async def _wait_unowned_jobs_rolled_back(host: Host) -> None:
    """A job no session owns is rolled back by the daemon itself (its reaper), on either side;
    only a failed post-copy job stays (nothing can roll it back: destroying the guest ends it)."""
    def left() -> list[str]:
        return [f"{d.name}: {d.job.kind.value} {d.job.phase.label}" for d in host.daemon.registry
                if d.job is not None and d.job.phase < Phase.POSTCOPY_FAILED]

    await wait_until(lambda: not left(), timeout=CLEANUP_DEADLINE_S,
                     what=lambda: f"{host.daemon.hostname}: the daemon to roll back the jobs no "
                                  f"session owns: {left()}")


async def check_invariants(env: Env) -> None:
    """Both daemons as every example starts: see the module docstring."""
    for host in env.hosts:
        name = host.daemon.hostname
        listed = await asyncio.wait_for(
            host.conn.list_domains(active=True, inactive=True), LIST_DEADLINE_S)
        if listed:
            raise DaemonBug(f"{name}: domains left behind: {[d.name for d in listed]}")
        left = [(d.name, d.job) for d in host.daemon.registry]
        if left:
            raise DaemonBug(f"{name}: registry holds unlisted domains: {left}")
        backend = host.daemon.backend
        assert isinstance(backend, TestBackend)
        if backend._guests:
            raise DaemonBug(f"{name}: backend guests left: {list(backend._guests)}")
        if backend._incoming or backend._progress:
            raise DaemonBug(f"{name}: migrations (and their guests) still held: "
                            f"{list(backend._incoming)} {list(backend._progress)}")
        ports = host.daemon.ports
        if len(ports.candidates()) != ports.hi - ports.lo + 1:
            raise DaemonBug(f"{name}: migration ports still taken")
        files = [p.name for sub in ("domains", "status")
                 for p in (host.state_dir / sub).glob("*.xml")]
        if files:
            raise DaemonBug(f"{name}: state files left: {files}")
    bugs = env.bugs.take()
    if bugs:
        raise DaemonBug("the daemon logged a bug: " + "\n".join(bugs))
    grown = rss_bytes() - env.rss_start
    if grown > RSS_BOUND_BYTES:
        raise DaemonBug(f"RSS grew by {grown // 2**20} MiB (bound {RSS_BOUND_BYTES // 2**20})")


async def finish_example(env: Env, caller: Caller) -> None:
    try:
        await cleanup(env, caller)
    finally:
        await caller.close()
    await check_invariants(env)


__all__ = ["Caller", "DaemonBug", "Env", "check_invariants", "cleanup", "daemon_env",
           "expanded", "finish_example", "start_host"]
