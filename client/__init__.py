"""virtmig's client library: connect to daemons, manage domains, migrate them.

``AsyncConnection`` is the asyncio core; ``Connection`` is a synchronous facade over it for scripts
(it runs its own event loop on a background thread), the way libvirt-python is used.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from virtmig.client.connection import (
    AsyncConnection,
    Domain,
    DomainInfo,
    DomainKey,
    HostInfo,
    JobInfo,
)
from virtmig.proto.errors import VirtmigError
from virtmig.proto.flags import DomainState, JobType, MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams

__all__ = [
    "AsyncConnection",
    "Connection",
    "Domain",
    "DomainInfo",
    "DomainState",
    "HostInfo",
    "JobInfo",
    "JobType",
    "MigrateFlags",
    "MigrateParam",
    "TypedParams",
    "VirtmigError",
    "open",
]

T = TypeVar("T")


class Connection:
    """Synchronous facade: each method runs the same-named ``AsyncConnection`` method."""

    def __init__(self, uri: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="virtmig-client")
        self._thread.start()
        try:
            self.aconn: AsyncConnection = self._run(AsyncConnection.open(uri))
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

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

    def host(self) -> HostInfo:
        return self._run(self.aconn.host(refresh=True))

    def lookup(self, key: DomainKey) -> Domain:
        return self._run(self.aconn.lookup(key))

    def define(self, xml: str) -> Domain:
        return self._run(self.aconn.define(xml))

    def undefine(self, key: DomainKey) -> None:
        self._run(self.aconn.undefine(key))

    def start(self, key: DomainKey, *, paused: bool = False) -> Domain:
        return self._run(self.aconn.start(key, paused=paused))

    def destroy(self, key: DomainKey) -> None:
        self._run(self.aconn.destroy(key))

    def suspend(self, key: DomainKey) -> None:
        self._run(self.aconn.suspend(key))

    def resume(self, key: DomainKey) -> None:
        self._run(self.aconn.resume(key))

    def list_domains(self, *, active: bool = True, inactive: bool = False) -> list[Domain]:
        return self._run(self.aconn.list_domains(active=active, inactive=inactive))

    def xml_desc(self, key: DomainKey, *, inactive: bool = False,
                 migratable: bool = False) -> str:
        return self._run(self.aconn.xml_desc(key, inactive=inactive, migratable=migratable))

    def info(self, key: DomainKey) -> DomainInfo:
        return self._run(self.aconn.info(key))

    def state(self, key: DomainKey) -> tuple[DomainState, int, str]:
        return self._run(self.aconn.state(key))

    def job_info(self, key: DomainKey, *, completed: bool = False) -> JobInfo:
        return self._run(self.aconn.job_info(key, completed=completed))

    def migrate3(self, key: DomainKey, dconn: Connection, params: TypedParams,
                 flags: int | MigrateFlags) -> Domain:
        # Both connections' channels belong to their own loops: run the driver on ours, with a
        # connection to the destination opened on this loop.
        async def go() -> Domain:
            async with await AsyncConnection.open(str(dconn.aconn.uri)) as d:
                return await self.aconn.migrate3(key, d, params, flags)

        return self._run(go())

    def migrate_to_uri3(self, key: DomainKey, dconnuri: str | None, params: TypedParams,
                        flags: int | MigrateFlags) -> None:
        self._run(self.aconn.migrate_to_uri3(key, dconnuri, params, flags))


def open(uri: str | None = None) -> Connection:
    """``virtmig.client.open(uri)``, like ``libvirt.open``."""
    return Connection(uri)
