"""Whom a root daemon's QEMU runs as (``virtmig.daemon.backend.qemu.confine.run_as``): the
configured ``qemu_user`` and ``qemu_group`` (the user's primary group by default), none of
root's groups, and the ``setpriv`` command that drops to them with no way back.

Decided as a root daemon decides (``geteuid`` is 0 here whoever runs the test), for ``nobody``,
which every Debian system has; a real QEMU under that identity: ``test_qemu_confinement.py``.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil

import pytest

from virtmig.daemon.backend.qemu import QemuSettings
from virtmig.daemon.backend.qemu.confine import run_as


@pytest.fixture(autouse=True)
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)


def test_qemu_user_and_its_primary_group_by_default() -> None:
    nobody = pwd.getpwnam("nobody")
    who = run_as(QemuSettings(user="nobody"))
    assert who is not None
    assert (who.user, who.uid, who.gid) == ("nobody", nobody.pw_uid, nobody.pw_gid)
    assert 0 not in who.groups and who.gid not in who.groups


def test_qemu_group_replaces_the_primary_group() -> None:
    nobody, users = pwd.getpwnam("nobody"), grp.getgrnam("users")
    assert users.gr_gid != nobody.pw_gid
    who = run_as(QemuSettings(user="nobody", group="users"))
    assert who is not None
    assert (who.uid, who.gid) == (nobody.pw_uid, users.gr_gid)
    assert 0 not in who.groups and users.gr_gid not in who.groups


def test_the_command_drops_to_that_identity_for_good() -> None:
    who = run_as(QemuSettings(user="nobody", group="users"))
    assert who is not None
    setpriv = shutil.which("setpriv")
    assert setpriv is not None
    groups = (["--groups", ",".join(map(str, who.groups))] if who.groups
              else ["--clear-groups"])
    assert who.command(["/usr/bin/qemu-system-x86_64", "-S"]) == [
        os.path.abspath(setpriv), f"--reuid={who.uid}", f"--regid={who.gid}", *groups,
        "--no-new-privs", "--", "/usr/bin/qemu-system-x86_64", "-S"]
