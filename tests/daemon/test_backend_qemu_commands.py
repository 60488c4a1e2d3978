"""How a migration's QMP commands go out: independent ones at once (``monitor.answers`` /
``together``: the helpers' rules, and the migration steps that use them; issue 17: each command
waited for alone cost a round trip on the migration's critical path), and none cancelled on its
way when the stream ends (its late answer made qemu.qmp log a warning)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from tests.daemon import backend_qemu_helpers
from tests.daemon.backend_qemu_helpers import running_and_listening, to, within
from virtmig.daemon.backend.base import (
    BackendError,
    GuestRunState,
    MigrationStatus,
    MigrationTuning,
)
from virtmig.daemon.backend.qemu import QemuBackend, QmpCommandFailed
from virtmig.daemon.backend.qemu.monitor import answers, together
from virtmig.testing import wait_until

backends = backend_qemu_helpers.backends
dst = backend_qemu_helpers.dst
src = backend_qemu_helpers.src


class _Answers:
    """Fake commands that are answered in a chosen order: each waits for the one answered before
    it (no timing involved); ``done`` lists the answers as they come."""

    def __init__(self) -> None:
        self.done: list[object] = []
        self._answered: dict[int, asyncio.Event] = {}

    async def answer(self, value: object, after: object = None) -> Any:
        if after is not None:
            await self._event(after).wait()
        self.done.append(value)
        self._event(value).set()
        if isinstance(value, BaseException):
            raise value
        return value

    def _event(self, value: object) -> asyncio.Event:
        return self._answered.setdefault(id(value), asyncio.Event())


async def test_answers_are_in_the_order_given_and_failures_stay_in_place() -> None:
    fake = _Answers()
    refused = QmpCommandFailed("migrate-set-parameters", "no", "GenericError")
    first, last = {"a": 1}, "paused"
    got = await answers(fake.answer(first, after=last), fake.answer(refused),
                        fake.answer(last, after=refused))
    assert got == [first, refused, last]
    assert len(fake.done) == 3


async def test_together_raises_the_first_failure_in_order_once_all_are_answered() -> None:
    fake = _Answers()
    first = QmpCommandFailed("migrate-set-capabilities", "first", "GenericError")
    second = BackendError("second")
    with pytest.raises(QmpCommandFailed) as caught:
        # The second fails sooner; the first in the order given is what is raised, and only
        # once the slow third has been answered too (nothing is left unanswered).
        await together(fake.answer(first, after=second), fake.answer(second),
                       fake.answer("late", after=first))
    assert caught.value is first
    assert fake.done == [second, first, "late"]
    assert await together(fake.answer(1), fake.answer(2)) == [1, 2]


async def test_an_error_that_is_not_the_backends_is_raised_by_answers() -> None:
    fake = _Answers()
    with pytest.raises(RuntimeError, match="bug"):
        await answers(fake.answer("ok"), fake.answer(RuntimeError("bug")))


@pytest.mark.qemu
async def test_a_migrations_independent_commands_go_out_together(
    src: QemuBackend, dst: QemuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Capabilities and parameters on each side, and at the end the final statistics and the
    run status on each side, are asked without waiting for each other: each second command
    goes out while the first is still unanswered (one round trip instead of two)."""
    real = QemuBackend._exec_any
    pending: dict[int, list[str]] = defaultdict(list)
    issued_while: dict[tuple[str, str], list[list[str]]] = defaultdict(list)

    async def watched(self: QemuBackend, guest: Any, command: str,
                      args: dict[str, object] | None = None, timeout: float = 30, *,
                      oob: bool = False) -> object:
        side = "src" if self is src else "dst"
        waiting = pending[id(self)]
        issued_while[side, command].append(list(waiting))
        waiting.append(command)
        try:
            return await real(self, guest, command, args, timeout, oob=oob)
        finally:
            waiting.remove(command)

    monkeypatch.setattr(QemuBackend, "_exec_any", watched)
    spec, port = await running_and_listening(src, dst)
    out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert out.status is MigrationStatus.COMPLETED and out.total_time_ms > 0
    arrived = await within(dst.incoming_wait(spec.uuid))
    assert arrived.status is MigrationStatus.COMPLETED
    for side in ("src", "dst"):
        assert any("migrate-set-capabilities" in waiting
                   for waiting in issued_while[side, "migrate-set-parameters"]), side
        # The final query-migrate and the status query: the latter while the former waits.
        assert any("query-migrate" in waiting
                   for waiting in issued_while[side, "query-status"]), side
    assert src.state(spec.uuid) is GuestRunState.PAUSED  # (postmigrate)


@pytest.mark.qemu
async def test_a_refused_capability_still_fails_the_migration_with_qemus_words(
    src: QemuBackend, dst: QemuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sent together with the parameters, a refused ``migrate-set-capabilities`` fails the
    outgoing migration as it did alone: QEMU's words, no ``migrate``, the guest runs on."""
    real = QemuBackend._exec_any
    sent: list[str] = []

    async def refusing(self: QemuBackend, guest: Any, command: str,
                       args: dict[str, object] | None = None, timeout: float = 30, *,
                       oob: bool = False) -> object:
        if self is src:
            sent.append(command)
            if command == "migrate-set-capabilities":
                raise QmpCommandFailed(command, "capability refused here", "GenericError")
        return await real(self, guest, command, args, timeout, oob=oob)

    monkeypatch.setattr(QemuBackend, "_exec_any", refusing)
    spec, port = await running_and_listening(src, dst)
    with pytest.raises(BackendError, match="capability refused here"):
        await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert "migrate" not in sent
    assert src.state(spec.uuid) is GuestRunState.RUNNING


@pytest.mark.qemu
async def test_the_progress_poller_ends_without_a_command_cancelled_on_its_way(
    src: QemuBackend, dst: QemuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's progress poller, woken by the stream's end as the flow is, may have a
    ``query-migrate`` on its way then: it is answered and read, not cancelled (a cancelled
    command's answer arrives after its waiter is gone: "Unknown ID ..., message dropped" in the
    daemon's log).  Here every query the poller sends during the stream is held until the
    stream completed, so that the end always finds one on its way."""
    real = QemuBackend._exec_any
    held: list[str] = []
    cancelled: list[str] = []

    async def holding(self: QemuBackend, guest: Any, command: str,
                      args: dict[str, object] | None = None, timeout: float = 30, *,
                      oob: bool = False) -> object:
        during_stream = guest.mig_status in ("setup", "active")
        try:
            result = await real(self, guest, command, args, timeout, oob=oob)
            if self is src and command == "query-migrate" and during_stream:
                held.append(command)
                await wait_until(lambda: guest.mig_status == "completed", timeout=30,
                                 what="the stream's end")
            return result
        except asyncio.CancelledError:
            cancelled.append(command)
            raise

    monkeypatch.setattr(QemuBackend, "_exec_any", holding)
    spec, port = await running_and_listening(src, dst)
    out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert out.status is MigrationStatus.COMPLETED
    await within(dst.incoming_wait(spec.uuid))
    guest = src._guests[spec.uuid]

    def polling() -> list[Any]:
        return [t for t in guest.tasks
                if getattr(t.get_coro(), "__name__", "") == "_src_poll_progress"]

    await wait_until(lambda: not polling(), timeout=30, what=lambda: f"the poller {polling()}")
    assert held, "the poller sent no query during the stream"
    assert cancelled == []


@pytest.mark.qemu
async def test_the_destination_reads_the_streams_end_before_finish_asks(
    src: QemuBackend, dst: QemuBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The destination reads the final statistics and the run status when QEMU reports the
    stream completed (the source's Perform ends then): ``incoming_wait`` (Finish) asks QEMU
    nothing more, and its progress is what was read."""
    real = QemuBackend._exec_any
    answered: list[str] = []

    async def watched(self: QemuBackend, guest: Any, command: str,
                      args: dict[str, object] | None = None, timeout: float = 30, *,
                      oob: bool = False) -> object:
        result = await real(self, guest, command, args, timeout, oob=oob)
        if self is dst:
            answered.append(command)
        return result

    monkeypatch.setattr(QemuBackend, "_exec_any", watched)
    spec, port = await running_and_listening(src, dst)
    listening = len(answered)
    out = await within(src.outgoing(spec.uuid, to(port), MigrationTuning()))
    assert out.status is MigrationStatus.COMPLETED
    await wait_until(lambda: sorted(answered[listening:]) == ["query-migrate", "query-status"],
                     timeout=10, what=lambda: f"the end read: {answered[listening:]}")
    arrived = await within(dst.incoming_wait(spec.uuid))
    assert arrived.status is MigrationStatus.COMPLETED and arrived.total_time_ms > 0
    assert sorted(answered[listening:]) == ["query-migrate", "query-status"]
    assert dst.state(spec.uuid) is GuestRunState.PAUSED  # (Finish's cont is the daemon's)
