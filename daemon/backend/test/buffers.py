"""Buffers a test-backend migration stream reuses (:class:`BufferPool`), and pools of them kept
per key from one stream to the next (:class:`KeyedPools`): the stream's pages are read into and
sent from them by the channel's threads (:mod:`.channel`)."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class BufferPool:
    """Buffers of one size to reuse: a fresh 1 MiB ``bytearray`` costs its zeroing and, once
    the allocator has given the memory back, 256 page faults.  Any thread may get and put."""

    def __init__(self, size: int, keep: int = 16,
                 new: Callable[[], bytearray] | None = None) -> None:
        self.size = size
        self._keep = keep
        self._new = new or (lambda: bytearray(size))  # what a new buffer holds
        self._free: deque[bytearray] = deque()

    def get(self) -> bytearray:
        try:
            return self._free.pop()
        except IndexError:
            return self._new()

    def put(self, buf: bytes | bytearray | memoryview) -> None:
        """Take ``buf`` back (nothing may use it any more); others than this pool's are left."""
        if type(buf) is bytearray and len(buf) == self.size and len(self._free) < self._keep:
            self._free.append(buf)


class KeyedPools:
    """A :class:`BufferPool` per key for the last ``keys`` keys used (the least recently used
    one dropped beyond), kept from one stream to the next: what a key's new buffer holds
    (``new(key)``) is made once per buffer, not once per stream.  :meth:`pool` is called on the
    event loop; the pools themselves are any thread's."""

    def __init__(self, size: int, *, keep: int, keys: int,
                 new: Callable[[int], bytearray]) -> None:
        self.size, self._keep, self._keys, self._new = size, keep, keys, new
        self._pools: OrderedDict[int, BufferPool] = OrderedDict()

    def pool(self, key: int) -> BufferPool:
        found = self._pools.pop(key, None)
        if found is None:
            new = self._new
            found = BufferPool(self.size, self._keep, lambda: new(key))
        self._pools[key] = found
        while len(self._pools) > self._keys:
            self._pools.popitem(last=False)
        return found
