"""A test-backend migration stream's socket, off asyncio: blocking I/O in two worker threads.

Issue 17: asyncio's streams cost the data plane more than its protocol did (a ``StreamReader``
copies every byte twice, and every read and write is a trip through the event loop), and both
ends of a stream then share one thread.  A :class:`Channel` takes the connected socket out of
asyncio and puts it in blocking mode: its *writer thread* sends what :meth:`Channel.write`
queued (several buffers in one ``sendmsg``), its *reader thread* serves reads (a small read
buffer for headers; a large body goes straight from the socket into its own buffer, one
``recv_into(MSG_WAITALL)``), and the event loop keeps the protocol's state: every page count,
bound and reply is still decided there or, for the framing a read needs (how many bytes a record
has), by the same checks in the reader thread before it reads a byte of the body (:mod:`.wire`).
The threads release the GIL in their system calls, so sending, receiving and the loop's work
overlap.

The opening exchange (the stream-token proof, the HEADER and its reply: a few small messages,
each waiting for the other end's) runs on the event loop, the socket non-blocking, before any
thread starts: through the threads each of its round trips cost ~0.3 ms of wake-ups (and the
first one two thread starts per end), on the loop ~30 µs.  The channel leaves the loop for good
at the first operation that needs its threads (:meth:`Channel.call`, :meth:`Channel.start_frames`,
:meth:`Channel.start_tls`, a write with a ``sent`` callback or larger than :data:`LOOP_WRITE_MAX`,
a write the socket cannot take at once, a read or write before :meth:`Channel.admit`): what was
read ahead goes to the reader thread's buffer, what was not sent yet to the writer thread, and a
read waiting on the loop goes on in the reader thread.

TLS (``VIR_MIGRATE_TLS``) is the ``ssl`` module's :class:`ssl.SSLObject` over memory BIOs: the
TLS calls of both threads take one lock (an SSL object is not safe to use from two threads at
once), the socket I/O happens outside it, so a blocked read never holds up a write.

Stopping: :meth:`Channel.abort` shuts the socket down (``SHUT_RDWR`` wakes a thread blocked in
``recv`` or ``send``) and wakes idle threads; :meth:`Channel.close` sends what is queued first
(TLS: then ``close_notify``), bounded by :data:`CLOSE_TIMEOUT`, then does the same.  The socket is
closed once both threads have ended; :meth:`Channel.wait_closed` waits for that, so that a
migration's end leaves no thread behind.  The threads are named ``virtmig-stream-*``
(:data:`THREAD_PREFIX`).

A bound on the threads: a channel given :class:`StreamSlots` starts none before it holds one of
their slots (:meth:`Channel.admit`, first come, first served; the wait is a plain await, so
cancelling the task that waits -- ``domjobabort``, a timeout -- ends it), and gives the slot back
once its threads have ended.  The test backend has one set of slots for its outgoing streams
and one for its incoming ones (``test_stream_threads``): a stream waiting for a slot on one
daemon never holds one that a stream it waits for needs, whichever way migrations go.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

from virtmig.daemon.backend.test.sockio import MAX_IOV, BlockingReader, PlainIO, TlsIO

T = TypeVar("T")

THREAD_PREFIX = "virtmig-stream"
CLOSE_TIMEOUT = 10.0  # seconds close() may spend sending what is queued before it aborts
HIGH_WATER = 4 * 1024 * 1024  # drain() waits while more than this is queued (STREAM_LIMIT)
LOW_WATER = HIGH_WATER // 4
_CLOSE = object()  # the writer's last item: close gracefully
LOOP_WRITE_MAX = 64 * 1024  # a larger write leaves the loop phase (the threads send it)
LOOP_READ = 64 * 1024  # bytes a read on the loop takes from the socket at most


class ByteReader(Protocol):
    """What the stream's decoders read from: a :class:`Channel` (or a ``StreamReader``)."""

    async def readexactly(self, n: int) -> bytes: ...


class ByteWriter(Protocol):
    """What the stream's encoders write to: a :class:`Channel` (or a ``StreamWriter``)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    async def drain(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class StreamSlots:
    """At most ``streams`` channels with threads at once (two threads each), of one kind
    (``out`` or ``in``: it names their threads).  Used from the event loop's thread; a channel
    gives its slot back through the loop."""

    def __init__(self, streams: int, kind: str) -> None:
        if streams < 1:
            raise ValueError(f"streams must be at least 1, not {streams}")
        self.streams = streams
        self.kind = kind
        self._sem = asyncio.Semaphore(streams)
        self.waiting = 0  # channels waiting for a slot

    @property
    def free(self) -> int:
        return self._sem._value  # (asyncio.Semaphore has no public count)

    async def take(self) -> None:
        """A slot: at once, or once a channel gave one back (cancellable)."""
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1

    def give(self) -> None:
        self._sem.release()


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _deliver(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class Channel:
    """One migration stream's connected socket, driven by its reader and writer threads."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop | None = None, *,
                 slots: StreamSlots | None = None, holds: bool = False) -> None:
        """``slots``: no thread starts before :meth:`admit` took one of them (``holds``: the
        caller took it for this channel); None: no bound."""
        self._loop = loop or asyncio.get_running_loop()
        self._slots = slots
        self._slot = slots is None or holds  # threads may start
        self._kind = slots.kind if slots is not None else "any"
        sock.setblocking(False)  # the loop phase; blocking once the threads take over
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self._io: PlainIO | TlsIO = PlainIO(sock)
        self._reader = BlockingReader(self._io)
        mutex = threading.Lock()
        self._lock = threading.Condition(mutex)  # the state; the reader thread waits on it
        self._closing = False  # no new work: the threads end
        self._aborted = False
        self._shut = False
        # writer
        self._wq: deque[Any] = deque()
        self._sent: dict[int, Callable[[Any], None]] = {}  # (by id of the queued buffer)
        self._idle = False  # the writer thread waits for work: ring its bell
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()  # (C: cheap to wait on)
        self._queued = 0
        self._draining: asyncio.Future[None] | None = None
        self._werror: OSError | None = None
        # reader: requests (a function of the BlockingReader, and where its result goes)
        self._rq: deque[tuple[Callable[[BlockingReader], Any], asyncio.Future[Any]]] = deque()
        self._ready: deque[tuple[Any, BaseException | None]] = deque()  # read ahead
        self._frame_waiter: asyncio.Future[None] | None = None  # the loop waits for one
        self._ahead = 0  # how many results the reader may read ahead
        self._want_room = False  # the reader waits for the loop to take one
        self._room: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._sending = self._receiving = False  # the thread was started
        self._alive = 0
        self._threads: list[threading.Thread] = []  # started (joined before the slot goes back)
        self._finished = False
        self._closed: asyncio.Future[None] = self._loop.create_future()
        # the loop phase (the opening exchange, on the event loop: see the module's docstring)
        self._looping = True
        self._lbuf = bytearray()  # read on the loop, not taken yet
        self._lwait: asyncio.Future[None] | None = None  # a read waits for the socket

    @classmethod
    def adopt(cls, writer: asyncio.StreamWriter, slots: StreamSlots | None = None) -> Channel:
        """The socket of an asyncio connection no byte was read from, as a Channel (the
        transport is dropped; with ``slots``, :meth:`admit` before using it)."""
        tsock = writer.get_extra_info("socket")
        sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=os.dup(tsock.fileno()))
        writer.transport.abort()
        return cls(sock, slots=slots)

    async def admit(self) -> None:
        """Hold a slot of the channel's :class:`StreamSlots` (wait for one); at once when it
        holds one or has no bound.  ConnectionAbortedError when the channel ended first."""
        if self._slot:
            return
        assert self._slots is not None
        with self._lock:
            if self._closing:
                raise ConnectionAbortedError("migration stream closed")
        await self._slots.take()
        with self._lock:
            ended = self._finished
            if not ended:
                self._slot = True
        if ended:  # (aborted while it waited: the slot is not this channel's to keep)
            self._slots.give()
            raise ConnectionAbortedError("migration stream closed")

    # -- threads --------------------------------------------------------------------------------

    def _start(self, name: str) -> None:
        """Start the ``send`` or ``recv`` thread unless it runs (or the channel ends)."""
        with self._lock:
            if (self._closing or not self._slot
                    or (self._sending if name == "send" else self._receiving)):
                return
            if name == "send":
                self._sending = True
            else:
                self._receiving = True
            self._alive += 1
        target = self._send_loop if name == "send" else self._recv_loop
        thread = threading.Thread(target=self._run, args=(target,), daemon=True,
                                  name=f"{THREAD_PREFIX}-{self._kind}-{name}")
        self._threads.append(thread)
        thread.start()

    def _run(self, target: Callable[[], None]) -> None:
        try:
            target()
        finally:
            with self._lock:
                self._alive -= 1
                last = self._alive == 0 and self._closing and not self._finished
                if last:
                    self._finished = True
            if last:
                self._finish()

    def _finish(self) -> None:
        """Both threads ended after close or abort: close the socket, wake wait_closed."""
        self._shutdown()
        if self._looping:  # (no thread ever ran) the loop's read ends before the socket closes
            self._call_soon(self._loop_finish)
            return
        self.sock.close()
        self._call_soon(self._gone)

    def _loop_finish(self) -> None:
        self._stop_loop_read()
        self.sock.close()
        self._gone()

    def _gone(self) -> None:
        """On the loop, after :meth:`_finish`: once every thread of the channel has exited
        (the last one called ``_finish`` as it returned: the join is that thread's last
        steps), the slot goes back and ``wait_closed`` wakes.  A slot given back any earlier
        would let a new stream's threads start beside a thread still alive: the bound is on
        threads, not on their work."""
        for thread in self._threads:
            thread.join()
        if self._slots is not None and self._slot:
            self._slots.give()
        _deliver(self._closed, None, None)

    def _shutdown(self) -> None:
        with self._lock:
            if self._shut:
                return
            self._shut = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # (the loop is gone)
            self._loop.call_soon_threadsafe(fn, *args)

    # -- the loop phase ---------------------------------------------------------------------------

    def _leave_loop(self) -> None:
        """The threads take over (on the loop's thread; once): the socket blocks, what was
        read ahead is the reader's, a read waiting on the loop goes on in the reader thread."""
        if not self._looping or self._closing:
            return
        self._looping = False
        self._stop_loop_read()
        self.sock.setblocking(True)
        self._reader.prime(self._lbuf)
        self._lbuf = bytearray()
        # The writer too, idle until needed: a reply it sends later (the destination's ACK)
        # does not wait for a thread to start.
        self._start("send")

    def _stop_loop_read(self) -> None:
        """Wake the read waiting on the loop (it looks again), and stop watching the socket."""
        fut, self._lwait = self._lwait, None
        if fut is not None:
            self._loop.remove_reader(self.sock.fileno())
            _deliver(fut, None, None)

    async def _loop_recv(self, want: int) -> None:
        """Bytes from the socket into the loop phase's buffer, or a wake-up (the phase ended,
        the channel is ending: the caller looks again).  IncompleteReadError at the stream's
        end or once the channel is ending (as the reader thread's read then: its socket was
        shut down), ``want`` being the bytes the read needed."""
        with self._lock:
            closing = self._closing
        data = b""
        if not closing:
            try:
                data = self.sock.recv(LOOP_READ)
            except (BlockingIOError, InterruptedError):
                fut = self._lwait = self._loop.create_future()
                self._loop.add_reader(self.sock.fileno(), self._stop_loop_read)
                try:
                    await fut
                finally:
                    if self._lwait is fut:  # (the caller was cancelled)
                        self._lwait = None
                        self._loop.remove_reader(self.sock.fileno())
                return
        if not data:
            partial = bytes(self._lbuf)
            self._lbuf.clear()
            raise asyncio.IncompleteReadError(partial, want)
        self._lbuf += data

    def _loop_send(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Send ``parts`` on the loop; what the socket does not take at once goes to the
        writer thread (the loop phase ends)."""
        data = b"".join(parts)
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as e:  # as the writer thread: the read side tells why
            with self._lock:
                self._werror = e
            return
        if sent == len(data):
            return
        self._leave_loop()
        with self._lock:
            rest = memoryview(data)[sent:]
            self._wq.append(rest)
            self._queued += len(rest)
        self._start("send")

    # -- writing ---------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview,
              sent: Callable[[Any], None] | None = None) -> None:
        """Queue ``data`` for the writer thread (do not change it); ``sent(data)`` is called in
        that thread once it went out (not when it is dropped)."""
        self.writelines((data,), sent)

    def writelines(self, parts: Sequence[bytes | bytearray | memoryview],
                   sent: Callable[[Any], None] | None = None) -> None:
        """:meth:`write` each of ``parts`` (one wake-up of the writer thread)."""
        if self._looping:
            if (sent is None and self._slot and not self._closing and self._werror is None
                    and sum(len(p) for p in parts) <= LOOP_WRITE_MAX):
                self._loop_send(parts)
                return
            self._leave_loop()
        with self._lock:
            if self._closing or self._werror is not None:
                return
            for data in parts:
                if not data:
                    continue
                self._wq.append(data)
                if sent is not None:
                    self._sent[id(data)] = sent
                self._queued += len(data)
            if self._idle:
                self._idle = False
                self._bell.put(None)
        self._start("send")

    async def drain(self) -> None:
        """Wait while more than :data:`HIGH_WATER` bytes are queued.

        A failed send does not raise here: what is written after it is dropped, and the read
        side tells why the stream broke (the peer's NAK, its EOF or reset), as it would have
        had the send not raced it.  ConnectionAbortedError once the channel is aborted."""
        with self._lock:
            if self._aborted:
                raise ConnectionAbortedError("migration stream aborted")
            if self._queued <= HIGH_WATER or self._werror is not None:
                return
            fut = self._draining = self._loop.create_future()
        await fut

    def _send_loop(self) -> None:
        io = self._io
        while True:
            with self._lock:
                idle = not self._wq and not self._closing
                self._idle = idle
            if idle:
                self._bell.get()
                continue
            with self._lock:
                if not self._wq or self._shut:
                    return
                items: list[Any] = []
                while self._wq and len(items) < MAX_IOV:
                    items.append(self._wq.popleft())
                done = [(cb, i) for i in items if (cb := self._sent.pop(id(i), None))] \
                    if self._sent else []
            last = items[-1] is _CLOSE
            if last:
                items.pop()
            try:
                io = self._io
                if items:
                    io.send(items)
                if last:
                    io.goodbye()
            except (OSError, ValueError) as e:
                # The reader will see the reset or EOF too (see drain): stop sending.
                with self._lock:
                    self._werror = e if isinstance(e, OSError) else OSError(str(e))
                    self._wq.clear()
                    self._sent.clear()
                    self._queued = 0
                    fut, self._draining = self._draining, None
                if fut is not None:
                    self._call_soon(_deliver, fut, None, None)
                if last:
                    self.abort()
                return
            if last:
                with self._lock:
                    self._closing = True
                    self._lock.notify_all()
                self._shutdown()
                return
            for cb, item in done:
                cb(item)
            sent = sum(len(i) for i in items)
            with self._lock:
                self._queued -= sent
                fut = None
                if self._draining is not None and self._queued <= LOW_WATER:
                    fut, self._draining = self._draining, None
            if fut is not None:
                self._call_soon(_deliver, fut, None, None)

    # -- reading ---------------------------------------------------------------------------------

    async def call(self, fn: Callable[[BlockingReader], T]) -> T:
        """Run ``fn`` with the reader in the reader thread; its result or exception."""
        self._leave_loop()
        fut: asyncio.Future[T] = self._loop.create_future()
        with self._lock:
            if self._closing:
                raise ConnectionAbortedError("migration stream closed")
            if not self._slot:
                raise RuntimeError("a read on a channel not admitted (Channel.admit)")
            self._rq.append((fn, fut))
            self._lock.notify_all()
        self._start("recv")
        return await fut

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; IncompleteReadError when the stream ends first."""
        if self._looping and self._slot:
            with self._lock:
                if self._closing:
                    raise ConnectionAbortedError("migration stream closed")
        while self._looping and self._slot:
            if len(self._lbuf) >= n:
                out = bytes(self._lbuf[:n])
                del self._lbuf[:n]
                return out
            await self._loop_recv(n)
        return bytes(await self.call(lambda r: r.exact(n)))

    async def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes already received (kept for the next read), without waiting."""
        if self._looping and self._slot:
            return bytes(self._lbuf[:n])
        return await self.call(lambda r: r.peek(n))

    def start_frames(self, fn: Callable[[BlockingReader], T], last: Callable[[T], bool],
                     ahead: int = 8) -> None:
        """From now on the reader thread reads ahead: ``fn`` again and again, until a result
        ``last`` says ends the stream or an exception, at most ``ahead`` results waiting for
        :meth:`next_frame`.  The loop is woken only when it waits for one."""
        self._leave_loop()
        self._ahead = ahead

        def put(item: tuple[Any, BaseException | None]) -> None:
            with self._lock:
                self._ready.append(item)
                waiter, self._frame_waiter = self._frame_waiter, None
            if waiter is not None:
                self._call_soon(_deliver, waiter, None, None)

        def frames(rd: BlockingReader) -> None:
            while True:
                with self._lock:
                    full = len(self._ready) >= self._ahead and not self._closing
                    self._want_room = full
                if full:
                    self._room.get()
                    continue
                if self._closing:
                    return
                try:
                    item = fn(rd)
                except BaseException as e:
                    put((None, e))
                    return
                put((item, None))
                if last(item):
                    return

        fut: asyncio.Future[None] = self._loop.create_future()
        fut.add_done_callback(_retrieve)
        with self._lock:
            if not self._slot:
                raise RuntimeError("a read on a channel not admitted (Channel.admit)")
            self._rq.append((frames, fut))
            self._lock.notify_all()
        self._start("recv")

    async def next_frame(self) -> Any:
        """The next result of :meth:`start_frames`'s function (or its exception)."""
        while True:
            with self._lock:
                if self._ready:
                    item, exc = self._ready.popleft()
                    room, self._want_room = self._want_room, False
                    break
                waiter = self._frame_waiter = self._loop.create_future()
            await waiter
        if room:
            self._room.put(None)
        if exc is not None:
            raise exc
        return item

    def _recv_loop(self) -> None:
        while True:
            with self._lock:
                while not self._rq and not self._closing:
                    self._lock.wait()
                if self._closing:
                    pending = list(self._rq)
                    self._rq.clear()
                    for _, fut in pending:
                        self._call_soon(_deliver, fut, None,
                                        ConnectionAbortedError("migration stream closed"))
                    return
                fn, fut = self._rq.popleft()
            try:
                result = fn(self._reader)
            except BaseException as e:
                self._call_soon(_deliver, fut, None, e)
            else:
                self._call_soon(_deliver, fut, result, None)

    # -- TLS -------------------------------------------------------------------------------------

    async def start_tls(self, ctx: ssl.SSLContext, *, server_side: bool,
                        server_hostname: str | None = None) -> None:
        """The TLS handshake (in the reader thread); the stream is TLS from here on.  Call it
        before anything is written."""
        self._leave_loop()
        tls = TlsIO(self.sock, ctx, server_side, server_hostname)

        def handshake(rd: BlockingReader) -> None:
            tls.handshake()
            rd.io = self._io = tls

        await self.call(handshake)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._io.obj if isinstance(self._io, TlsIO) else default
        if name == "peername":
            with contextlib.suppress(OSError):
                return self.sock.getpeername()
        return default

    # -- ending ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Send what is queued (TLS: and close_notify), then end; :meth:`abort` after
        :data:`CLOSE_TIMEOUT`."""
        with self._lock:
            if self._closing:
                return
            graceful = self._werror is None and self._slot and (
                self._sending or bool(self._wq) or isinstance(self._io, TlsIO))
            if graceful:
                self._wq.append(_CLOSE)
                if self._idle:
                    self._idle = False
                    self._bell.put(None)
        if not graceful:
            self.abort()
            return
        self._start("send")
        timer = self._loop.call_later(CLOSE_TIMEOUT, self.abort)
        self._closed.add_done_callback(lambda _: timer.cancel())

    def abort(self) -> None:
        """End now: shut the socket down, wake the threads (queued data is dropped).  Any
        thread may call it."""
        with self._lock:
            self._closing = self._aborted = True
            self._lock.notify_all()
            fut, self._draining = self._draining, None
            waiter, self._frame_waiter = self._frame_waiter, None
            if waiter is not None:
                self._ready.append((None, ConnectionAbortedError("migration stream aborted")))
                self._call_soon(_deliver, waiter, None, None)
            finish = self._alive == 0 and not self._finished
            if finish:
                self._finished = True
        if fut is not None:
            self._call_soon(_deliver, fut, None, ConnectionAbortedError("migration stream aborted"))
        self._shutdown()
        self._bell.put(None)
        self._room.put(None)
        if finish:  # no thread runs (or ever ran): close here
            self._finish()

    async def wait_closed(self) -> None:
        """Until both threads have ended and the socket is closed."""
        await asyncio.shield(self._closed)
