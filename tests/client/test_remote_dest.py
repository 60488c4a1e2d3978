"""The destination party of the client's (and the peer-to-peer source's) sequence driver.

A destination whose session ended before Prepare (its daemon went away and perhaps came back:
the connection reconnects by itself, the session does not) gets no Prepare: an incoming job no
session owns would be left to ``incoming_job_timeout``.  Found by the fault matrix
(``p2p-kill-dst-after-begin``: the migration went on to the restarted destination).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from virtmig.client.migrate import RemoteDest
from virtmig.proto.errors import OperationFailed
from virtmig.proto.params import TypedParams


class _Stub:
    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    def __getattr__(self, name: str) -> str:
        return name


class _Conn:
    """Just what RemoteDest touches before the wire: the session flag and the calls made."""

    def __init__(self) -> None:
        self.session_lost = asyncio.Event()
        self.calls: list[str] = []
        self.migration_stub = _Stub(self.calls)

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        self.calls.append(method)
        raise RuntimeError("reached the wire")


@pytest.mark.parametrize("params_api", [True, False])
async def test_prepare_is_refused_once_the_destination_session_is_lost(params_api: bool) -> None:
    conn = _Conn()
    dest = RemoteDest(conn, params_api)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="reached the wire"):  # alive: Prepare is sent
        await dest.prepare(TypedParams(), b"", 0)
    assert conn.calls == ["Prepare3Params" if params_api else "Prepare3"]
    conn.session_lost.set()
    with pytest.raises(OperationFailed, match="Lost connection to destination host"):
        await dest.prepare(TypedParams(), b"", 0)
    with pytest.raises(OperationFailed, match="Lost connection to destination host"):
        await dest.prepare2(TypedParams(), 0)
    assert len(conn.calls) == 1  # nothing more reached the destination
