"""deploy/prometheus: the recording and alerting rules pass ``promtool check rules`` and their
unit tests (``promtool test rules``), and name only metrics a daemon exports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from virtmig.daemon.metrics import Metrics
from virtmig.daemon.registry import Registry
from virtmig.daemon.state import StateDir

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool() -> str:
    """promtool's path; the test skips without it, except in CI (.ci/run installs it)."""
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (Debian package prometheus; .ci/run installs it)")
        pytest.skip("promtool is not installed (Debian package prometheus)")
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], cwd=RULES, capture_output=True, text=True,
                          timeout=120, check=False)


def test_promtool_check_rules() -> None:
    done = run("check", "rules", "virtmig-rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def test_promtool_test_rules() -> None:
    done = run("test", "rules", "virtmig-rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_the_rules_name_only_exported_metrics(tmp_path: Path) -> None:
    metrics = Metrics(Registry(StateDir(tmp_path)))
    exported = {line.split()[2] for line in metrics.scrape().decode().splitlines()
                if line.startswith("# TYPE ")}
    text = (RULES / "virtmig-rules.yml").read_text()
    used = set(re.findall(r"\b(virtmig_[a-z_]+)", text))
    assert used
    for name in used:
        base = re.sub(r"_(total|bucket|count|sum)$", "", name)
        assert base in exported or name in exported, name
