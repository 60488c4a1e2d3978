"""Requests that cannot be decoded are the caller's mistake: INVALID_ARGUMENT, not UNKNOWN.

gRPC calls a method's request deserializer before any handler runs; when it raises (a protobuf
``string`` field holding bytes that are not UTF-8, a truncated or garbled message), gRPC itself
ends the call with UNKNOWN and logs a traceback.  :func:`checked` wraps a deserializer so that it
never raises: a message it cannot decode becomes a :class:`BadRequest` value, which the
interceptor's wrapper turns into :class:`~virtmig.proto.errors.InvalidArgument` before the
handler sees it (:func:`check`), or, in a request stream, when the handler reads that message
(:func:`checked_stream`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from virtmig.proto.errors import InvalidArgument


@dataclass(frozen=True)
class BadRequest:
    """What a request that could not be decoded becomes."""

    reason: str


def checked(deserializer: Callable[[bytes], Any] | None
            ) -> Callable[[bytes], Any] | None:
    """``deserializer`` turned into one that returns :class:`BadRequest` instead of raising."""
    if deserializer is None:
        return None
    inner = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return inner(data)
        except Exception as exc:  # protobuf's DecodeError, UnicodeDecodeError, ...
            return BadRequest(_reason(exc))

    return deserialize


def _reason(exc: Exception) -> str:
    text = str(exc)
    if isinstance(exc, UnicodeError) or "utf-8" in text.lower() or "utf8" in text.lower():
        return "a string field is not valid UTF-8"
    return "the request message cannot be decoded"


def check(request: Any) -> Any:
    """``request``, or InvalidArgument if it could not be decoded."""
    if isinstance(request, BadRequest):
        raise InvalidArgument(request.reason)
    return request


async def checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A request stream whose undecodable message raises InvalidArgument where it is read."""
    async for request in requests:
        yield check(request)
