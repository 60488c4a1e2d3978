"""The fault matrix's session: at its end ``$VIRTMIG_FAULTS_REPORT`` (``make faults`` sets it
to ``docs/recovery.md``) is rewritten from the cases that ran (:mod:`tests.faults.report`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.faults import report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    target = os.environ.get(report.REPORT_ENV)
    if target:
        report.write(Path(target))
