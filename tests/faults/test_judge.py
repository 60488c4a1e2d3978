"""Unit tests of the fault matrix's invariant check (:func:`tests.faults.harness.judge`) and of
its "recovery is over" test (:func:`tests.faults.harness.settled`), fed made-up host views: no
root, no namespaces, no QEMU (not marked ``faults``: they run with the ordinary tests)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tests.faults.harness import HostView, judge, settled

# The good outcomes: the guest migrated (B runs it, A keeps its shut-off definition), or it
# stayed on A (B has nothing), or A holds it paused with words on an unknown outcome.
MIGRATED = (HostView("hosta", "shut off", "migrated", persistent=True),
            HostView("hostb", "running", "migrated", persistent=True, qemus=(42,)))
STAYED = (HostView("hosta", "running", "migration-canceled", persistent=True, qemus=(41,)),
          HostView("hostb", "absent"))
UNKNOWN = (HostView("hosta", "paused", "migration",
                    "outcome unknown: waiting for hostb.test", persistent=True, qemus=(41,)),
           HostView("hostb", "absent"))


@pytest.mark.parametrize("a, b", [MIGRATED, STAYED, UNKNOWN], ids=["migrated", "stayed",
                                                                    "unknown"])
def test_a_correct_outcome_breaks_nothing(a: HostView, b: HostView) -> None:
    assert judge(a, b) == []


def _broken(a: HostView, b: HostView) -> str:
    return "\n".join(judge(a, b))


def test_two_live_copies() -> None:
    a, b = STAYED[0], MIGRATED[1]
    assert "2 hosts have the guest running or paused" in _broken(a, b)


def test_no_live_copy() -> None:
    a, b = MIGRATED[0], HostView("hostb", "absent")
    assert "0 hosts have the guest running or paused" in _broken(a, b)


@pytest.mark.parametrize("side", [0, 1])
def test_a_leftover_job(side: int) -> None:
    views = list(MIGRATED)
    views[side] = replace(views[side], job="migration_in prepare")
    assert f"{views[side].host}: a job is left (migration_in prepare)" in _broken(*views)


def test_a_qemu_process_on_the_host_without_the_guest() -> None:
    a, b = replace(MIGRATED[0], qemus=(77,)), MIGRATED[1]
    assert "hosta: QEMU processes [77] for a guest that is shut off" in _broken(a, b)


@pytest.mark.parametrize("qemus", [(), (42, 43)], ids=["none", "two"])
def test_a_running_guest_needs_exactly_one_qemu(qemus: tuple[int, ...]) -> None:
    a, b = MIGRATED[0], replace(MIGRATED[1], qemus=qemus)
    assert f"hostb: {len(qemus)} QEMU processes for a running guest" in _broken(a, b)


@pytest.mark.parametrize("reason", ["", "unknown"])
def test_a_pause_with_no_reason(reason: str) -> None:
    a, b = replace(UNKNOWN[0], reason=reason, detail=""), UNKNOWN[1]
    assert "hosta: paused without a reason" in _broken(a, b)


def test_a_pause_with_a_reason_or_words_holds() -> None:
    for a in (replace(UNKNOWN[0], detail=""), replace(UNKNOWN[0], reason="")):
        assert judge(a, UNKNOWN[1]) == []


@pytest.mark.parametrize("a", [replace(MIGRATED[0], persistent=False),
                               HostView("hosta", "absent")], ids=["transient", "absent"])
def test_the_source_lost_its_persistent_definition(a: HostView) -> None:
    assert "hosta: the source's persistent definition is gone" in _broken(a, MIGRATED[1])


def test_the_destination_runs_it_without_its_persistent_definition() -> None:
    a, b = MIGRATED[0], replace(MIGRATED[1], persistent=False)
    assert "hostb: the guest runs there without its persistent definition" in _broken(a, b)


def test_a_daemon_down() -> None:
    a, b = STAYED[0], HostView("hostb", "daemon down")
    assert "hostb: its daemon is not running" in _broken(a, b)


@pytest.mark.parametrize("a, b", [MIGRATED, STAYED], ids=["migrated", "stayed"])
def test_settled_when_one_host_runs_it_and_the_other_has_nothing_live(a: HostView,
                                                                      b: HostView) -> None:
    assert settled(a, b)


@pytest.mark.parametrize("a, b", [
    UNKNOWN,  # still paused: settling may yet resume it
    (replace(MIGRATED[0], job="migration_out confirm3"), MIGRATED[1]),
    (MIGRATED[0], replace(MIGRATED[1], job="migration_in finish3")),
    (HostView("hosta", "daemon down"), MIGRATED[1]),
    (STAYED[0], MIGRATED[1]),  # two running
    (replace(MIGRATED[0], qemus=(77,)), MIGRATED[1]),  # QEMU left on the other host
    (replace(STAYED[0], state="paused"), replace(MIGRATED[1], state="paused")),
    (replace(UNKNOWN[0], qemus=()), MIGRATED[1]),  # the other host still says paused
], ids=["paused", "source-job", "destination-job", "daemon-down", "two-running",
        "qemu-left", "none-running", "other-paused"])
def test_not_settled(a: HostView, b: HostView) -> None:
    assert not settled(a, b)
