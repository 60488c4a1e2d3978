"""Typed parameters on the wire: the one conversion between
:class:`~virtmig.proto.params.TypedParam` values and ``virtmig.v1.TypedParam`` messages, shared by
the client and the daemon.

The params table and its checks stay free of protobuf (``virtmig.proto.params``); each side's
other message conversions live at its own edge (``virtmig.daemon.wire``, the client library).
"""

from __future__ import annotations

from collections.abc import Iterable

from virtmig.proto import virtmig_pb2 as pb
from virtmig.proto.errors import InvalidArgument
from virtmig.proto.params import ParamType, TypedParam, TypedParams


def to_wire(params: Iterable[TypedParam]) -> list[pb.TypedParam]:
    out = []
    for p in params:
        msg = pb.TypedParam(name=p.name)
        setattr(msg, p.type.value, p.value)
        out.append(msg)
    return out


def from_wire(items: Iterable[pb.TypedParam]) -> TypedParams:
    out = TypedParams()
    for msg in items:
        field = msg.WhichOneof("value")
        if field is None:
            raise InvalidArgument(f"parameter '{msg.name}' has no value")
        out.add(msg.name, getattr(msg, field), ParamType(field))
    return out
