"""deploy/virtmigd.service: the unit uses the daemon's readiness notification (``Type=notify``,
from the main process), reloads with SIGHUP, and passes ``systemd-analyze verify`` where systemd
is installed.  That ``virtmigd`` sends ``READY=1``/``RELOADING=1``/``STOPPING=1`` is shown by a
real process in tests/daemon/test_health.py and test_reload.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "virtmigd.service"


def service_section(text: str) -> dict[str, list[str]]:
    """The ``[Service]`` section's keys and their values, in order (a key may repeat)."""
    section = ""
    out: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a KEY=VALUE line: {raw!r}"
        if section == "[Service]":
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_unit_waits_for_the_daemons_readiness_and_reloads_with_sighup() -> None:
    service = service_section(UNIT.read_text())
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]  # READY=1 comes from virtmigd itself
    [start] = service["ExecStart"]
    assert start.split()[0].endswith("/virtmigd") and "--config" in start.split()
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert service["KillSignal"] == ["SIGTERM"]  # a graceful stop (STOPPING=1)


def systemd_analyze() -> str:
    """systemd-analyze's path; the test skips without it, except in CI (.ci/run installs it)."""
    path = shutil.which("systemd-analyze")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is missing (Debian package systemd; .ci/run installs it)")
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    return path


def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path: Path) -> None:
    """With its ExecStart pointed at this install's ``virtmigd`` (the shipped path is where an
    install puts it); systemd-analyze prints a line for each thing it ignores or doubts (an
    unknown key, a bad ``Type=``), with exit status 0 all the same."""
    analyze = systemd_analyze()
    virtmigd = Path(sys.executable).parent / "virtmigd"
    assert virtmigd.exists(), virtmigd
    unit = tmp_path / "virtmigd.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/virtmigd", str(virtmigd)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")
