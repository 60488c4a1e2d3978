"""The synchronous facade: :class:`Connection` runs :class:`AsyncConnection` on its own loop.

Each ``Connection`` owns an event loop on a background thread; every method submits the
same-named ``AsyncConnection`` coroutine to it and waits, so a ``Connection`` can be used from any
thread (never from its own loop's thread).  The streaming methods (``watch_job``, ``events``) are
plain generators: each item is one step of the async iterator on that loop, and closing the
generator (``break`` out of a ``for``, ``close()``, ``contextlib.closing``) closes the stream.

An interrupted wait (Ctrl-C while a call or a stream waits) cancels the call on the loop too.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import threading
from collections.abc import AsyncIterator, Coroutine, Generator
from typing import Any, TypeVar

from virtmig.client.connection import AsyncConnection
from virtmig.client.sequence import Trace
from virtmig.client.values import (
    Domain,
    DomainInfo,
    DomainKey,
    Event,
    GuestLocation,
    HistoryEntry,
    HostInfo,
    JobInfo,
)
from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.proto.params import TypedParams

T = TypeVar("T")


async def _step(it: AsyncIterator[T]) -> T:
    """The iterator's next item (``StopAsyncIteration`` at its end) as a coroutine."""
    return await anext(it)


async def _aclose(it: AsyncIterator[Any]) -> None:
    if not inspect.isasyncgen(it):
        return
    for _ in range(100):  # a step cancelled by an interrupted wait may still be unwinding
        if not it.ag_running:
            await it.aclose()
            return
        await asyncio.sleep(0.01)


class Connection:
    """Synchronous facade: each method runs the same-named ``AsyncConnection`` method."""

    def __init__(self, uri: str | None = None, *,
                 pki_dir: str | os.PathLike[str] | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="virtmig-client")
        self._thread.start()
        try:
            self.aconn: AsyncConnection = self._run(AsyncConnection.open(uri, pki_dir=pki_dir))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def open(cls, uri: str | None = None, *,
             pki_dir: str | os.PathLike[str] | None = None) -> Connection:
        return cls(uri, pki_dir=pki_dir)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # an interrupted wait: stop the call too (no-op once it is done)
            raise

    def _iterate(self, it: AsyncIterator[T]) -> Generator[T, None, None]:
        """The async iterator as a generator; closing it closes the async iterator."""
        try:
            while True:
                try:
                    item = self._run(_step(it))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self._loop.is_closed():
                self._run(_aclose(it))

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        self._run(self.aconn.close())
        self._stop_loop()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_session(self) -> str:
        return self._run(self.aconn.open_session())

    # --- host and domains -------------------------------------------------------------------

    def host(self) -> HostInfo:
        return self._run(self.aconn.host(refresh=True))

    def lookup(self, key: DomainKey) -> Domain:
        return self._run(self.aconn.lookup(key))

    def define(self, xml: str) -> Domain:
        return self._run(self.aconn.define(xml))

    def undefine(self, key: DomainKey) -> None:
        self._run(self.aconn.undefine(key))

    def start(self, key: DomainKey, *, paused: bool = False, force: bool = False) -> Domain:
        return self._run(self.aconn.start(key, paused=paused, force=force))

    def resolve_migration(self, key: DomainKey, dest_uri: str = ""
                          ) -> tuple[DomainState, int, str, str]:
        return self._run(self.aconn.resolve_migration(key, dest_uri))

    def state_detail(self, key: DomainKey) -> tuple[DomainState, int, str, str]:
        return self._run(self.aconn.state_detail(key))

    def guest_location(self, uuid: str, migration_id: str = "", *,
                       timeout: float | None = None) -> GuestLocation:
        return self._run(self.aconn.guest_location(uuid, migration_id, timeout=timeout))

    def destroy(self, key: DomainKey) -> None:
        self._run(self.aconn.destroy(key))

    def suspend(self, key: DomainKey) -> None:
        self._run(self.aconn.suspend(key))

    def resume(self, key: DomainKey) -> None:
        self._run(self.aconn.resume(key))

    def list_domains(self, *, active: bool = True, inactive: bool = False) -> list[Domain]:
        return self._run(self.aconn.list_domains(active=active, inactive=inactive))

    def list_domain_msgs(self, *, active: bool = True,
                         inactive: bool = False) -> list[pb.Domain]:
        return self._run(self.aconn.list_domain_msgs(active=active, inactive=inactive))

    def xml_desc(self, key: DomainKey, *, inactive: bool = False,
                 migratable: bool = False, secure: bool = False) -> str:
        return self._run(self.aconn.xml_desc(key, inactive=inactive, migratable=migratable,
                                             secure=secure))

    def info(self, key: DomainKey) -> DomainInfo:
        return self._run(self.aconn.info(key))

    def state(self, key: DomainKey) -> tuple[DomainState, int, str]:
        return self._run(self.aconn.state(key))

    def events(self, key: DomainKey | None = None) -> Generator[Event, None, None]:
        """Domain events as they happen, for one domain or all; runs until the caller stops."""
        return self._iterate(self.aconn.events(key))

    # --- jobs -------------------------------------------------------------------------------

    def job_info(self, key: DomainKey, *, completed: bool = False) -> JobInfo:
        return self._run(self.aconn.job_info(key, completed=completed))

    def watch_job(self, key: DomainKey) -> Generator[JobInfo, None, None]:
        """The job's info each time it changes, then its final record."""
        return self._iterate(self.aconn.watch_job(key))

    def abort_job(self, key: DomainKey, *, postcopy: bool = False) -> None:
        self._run(self.aconn.abort_job(key, postcopy=postcopy))

    def set_max_downtime(self, key: DomainKey, downtime_ms: int) -> None:
        self._run(self.aconn.set_max_downtime(key, downtime_ms))

    def get_max_downtime(self, key: DomainKey) -> int:
        return self._run(self.aconn.get_max_downtime(key))

    def set_max_speed(self, key: DomainKey, bandwidth_mib: int, *,
                      postcopy: bool = False) -> None:
        self._run(self.aconn.set_max_speed(key, bandwidth_mib, postcopy=postcopy))

    def get_max_speed(self, key: DomainKey, *, postcopy: bool = False) -> int:
        return self._run(self.aconn.get_max_speed(key, postcopy=postcopy))

    def get_compression_cache(self, key: DomainKey) -> int:
        return self._run(self.aconn.get_compression_cache(key))

    def set_compression_cache(self, key: DomainKey, size: int) -> None:
        self._run(self.aconn.set_compression_cache(key, size))

    def start_postcopy(self, key: DomainKey) -> None:
        self._run(self.aconn.start_postcopy(key))

    def migration_history(self, domain: str = "", *, limit: int = 0) -> list[HistoryEntry]:
        return self._run(self.aconn.migration_history(domain, limit=limit))

    # --- migration --------------------------------------------------------------------------

    def migrate3(self, key: DomainKey, dconn: Connection, params: TypedParams,
                 flags: int | MigrateFlags, *, trace: Trace | None = None) -> Domain:
        # Both connections' channels belong to their own loops: run the driver on ours, with a
        # connection to the destination opened on this loop.
        async def go() -> Domain:
            async with await AsyncConnection.open(str(dconn.aconn.uri)) as d:
                return await self.aconn.migrate3(key, d, params, flags, trace=trace)

        return self._run(go())

    def migrate_to_uri3(self, key: DomainKey, dconnuri: str | None, params: TypedParams,
                        flags: int | MigrateFlags, *, trace: Trace | None = None) -> None:
        self._run(self.aconn.migrate_to_uri3(key, dconnuri, params, flags, trace=trace))


def open(uri: str | None = None, *,
         pki_dir: str | os.PathLike[str] | None = None) -> Connection:
    """``virtmig.client.open(uri)``, like ``libvirt.open``; ``pki_dir``: the PKI dir of a
    ``virtmig+tls`` URI without ``?pkipath=``."""
    return Connection(uri, pki_dir=pki_dir)
