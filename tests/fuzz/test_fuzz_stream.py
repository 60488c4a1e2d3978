"""Hostile test-backend migration streams in format 2 (issue 17): generated sequences of RUN,
DISCARD and garbage records, then a VERSIONS SWITCH or the end of the stream, against a real
destination.

Whatever arrives, the destination answers ACK exactly when a model of the stream says every page
arrived as its version's bytes and the digest is of those versions, and otherwise refuses it
with a typed reason (malformed, digest mismatch, ended early): never an internal error, never a
hang.
"""

from __future__ import annotations

import asyncio
import struct
from array import array
from dataclasses import dataclass, field

from hypothesis import event, given
from hypothesis import strategies as st

from tests.daemon.backend_test_helpers import LOOPBACK, make_spec, within
from tests.daemon.test_backend_test_stream import header
from virtmig.daemon.backend.base import MigrationFailed
from virtmig.daemon.backend.test import PAGE_SIZE, TestBackend
from virtmig.daemon.backend.test.memory import run_bytes, versions_digest
from virtmig.daemon.backend.test.sparse import Versions

NPAGES = 256  # a 1 MiB guest
SEED = 42
OFFER = b"I" + struct.pack("<IB", 1, 2)


@dataclass
class Model:
    """What the destination should conclude from the records so far."""

    versions: dict[int, int] = field(default_factory=dict)
    received: set[int] = field(default_factory=set)
    odd: set[int] = field(default_factory=set)
    refused: bool = False  # a malformed record: the stream ends there

    def digest(self) -> bytes:
        versions = Versions(NPAGES)
        for i, v in self.versions.items():
            versions[i] = v
        return versions_digest(SEED, NPAGES, versions.written_chunks())


@st.composite
def good_run(draw: st.DrawFn) -> tuple[str, int, list[int], int | None]:
    first = draw(st.integers(0, NPAGES - 1))
    count = draw(st.integers(1, NPAGES - first))
    versions = draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
    corrupt = draw(st.one_of(st.none(), st.integers(first, first + count - 1)))
    return ("run", first, versions, corrupt)


records = st.one_of(
    good_run(),
    st.tuples(st.just("discard"), st.lists(st.integers(0, NPAGES - 1), min_size=1,
                                           max_size=8)),
    st.tuples(st.just("bad-run"), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=16)),
)


def encode(record: tuple[object, ...], model: Model) -> bytes:
    """The bytes of ``record``; the model follows what the destination should do with them."""
    kind = record[0]
    if kind == "run":
        _, first, versions, corrupt = record
        assert isinstance(first, int) and isinstance(versions, list)
        pages = run_bytes(SEED, first, array("I", versions))
        for k, v in enumerate(versions):
            model.versions[first + k] = v
            model.received.add(first + k)
            model.odd.discard(first + k)
        if isinstance(corrupt, int):
            pages[(corrupt - first) * PAGE_SIZE] ^= 0x5A
            model.odd.add(corrupt)
        return (b"G" + struct.pack("<II", first, len(versions))
                + struct.pack(f"<{len(versions)}I", *versions) + bytes(pages))
    if kind == "discard":
        indices = record[1]
        assert isinstance(indices, list)
        for i in indices:
            if i in model.received:
                model.received.discard(i)
                model.odd.discard(i)
        return b"D" + struct.pack(f"<I{len(indices)}I", len(indices), *indices)
    if kind == "bad-run":
        _, first, count = record
        assert isinstance(first, int) and isinstance(count, int)
        model.refused = True  # out of bounds: malformed; else its body is missing: ended early
        return b"G" + struct.pack("<II", first, count)
    data = record[1]
    assert isinstance(data, bytes)
    model.refused = True  # whatever it is, the stream is cut after it
    return data


async def run_stream(stream: bytes) -> tuple[bytes, BaseException | None]:
    dst = TestBackend()
    try:
        spec = make_spec(1)
        port = await dst.incoming_start(spec, LOOPBACK)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(header(spec) + OFFER + stream)
        try:
            writer.write_eof()
            answer = await within(reader.read())
        except ConnectionResetError:  # (it refused the stream with bytes of it unread)
            answer = b""
        finally:
            writer.close()
        try:
            await within(dst.incoming_wait(spec.uuid))
        except MigrationFailed as e:
            return answer, e
        return answer, None
    finally:
        await within(dst.close())


@given(full=st.booleans(), recs=st.lists(records, max_size=6),
       switch=st.sampled_from(["right", "wrong", "none"]))
def test_hostile_runs(full: bool, recs: list[tuple[object, ...]], switch: str) -> None:
    model = Model()
    stream = b""
    if full:  # every page first, so that the rest decides
        recs = [("run", 0, [0] * NPAGES, None), *recs]
    for record in recs:
        stream += encode(record, model)
        if model.refused:
            break
    if not model.refused and switch != "none":
        stream += b"W" + (model.digest() if switch == "right" else bytes(32))
    answer, error = asyncio.run(run_stream(stream))
    ok = (not model.refused and switch == "right" and len(model.received) == NPAGES
          and not model.odd)
    event("accepted" if ok else "refused")
    if ok:
        assert error is None and answer.endswith(b"A"), (answer, error)
        return
    assert isinstance(error, MigrationFailed), answer
    assert "internal error" not in str(error)
    assert any(words in str(error) for words in (
        "malformed migration stream", "digest mismatch at switchover", "ended early")), error
