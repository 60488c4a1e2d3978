"""The unix sockets: the run dir the daemon makes and checks (the default one included), the
sockets' modes whatever the umask, and the read-only socket that allows read calls only."""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import domain_xml
from virtmig.client.connection import AsyncConnection
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.core import DaemonConfig
from virtmig.daemon.listeners import plan, prepare_run_dir, prepare_run_dirs
from virtmig.daemon.main import RunningDaemon, start_daemon
from virtmig.proto.errors import ConfigUnsupported, PermissionDenied
from virtmig.proto.flags import DomainState
from virtmig.proto.uri import RUN_DIR_ENV


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def start(tmp_path: Path, run: Path, **settings: object) -> RunningDaemon:
    return await start_daemon(DaemonConfig(
        state_dir=str(tmp_path / "state"), listen=(f"unix://{run}/virtmigd.sock",),
        **settings))  # type: ignore[arg-type]


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
async def test_socket_and_run_dir_modes_whatever_the_umask(tmp_path: Path, mask: int) -> None:
    run = tmp_path / "deep" / "run"
    with umask(mask):
        running = await start(tmp_path, run, readonly_socket=True)
        assert os.umask(mask) == mask  # the daemon put the umask back
    try:
        assert (mode(tmp_path / "deep"), mode(run)) == (0o755, 0o755)
        assert stat.S_ISSOCK(os.lstat(run / "virtmigd.sock").st_mode)
        assert mode(run / "virtmigd.sock") == 0o600
        assert mode(run / "virtmigd-ro.sock") == 0o666
        assert running.addresses == [f"unix:{run}/virtmigd.sock", f"unix:{run}/virtmigd-ro.sock"]
    finally:
        await running.stop(grace=0)


async def test_the_read_only_socket_allows_read_calls_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    running = await start(tmp_path, run, readonly_socket=True)
    try:
        async with await AsyncConnection.open(f"virtmig+unix://{run}/virtmigd.sock") as rw:
            await rw.define(domain_xml("vm1"))
            await rw.start("vm1")
        async with await AsyncConnection.open(f"virtmig+unix://{run}/virtmigd-ro.sock") as ro:
            assert [d.name for d in await ro.list_domains()] == ["vm1"]
            assert (await ro.state("vm1"))[0] is DomainState.RUNNING
            assert (await ro.info("vm1")).domain.name == "vm1"
            with pytest.raises(PermissionDenied) as err:
                await ro.destroy("vm1")
            assert str(err.value) == "access denied: read-only socket: Destroy is not a read call"
            with pytest.raises(PermissionDenied):
                await ro.define(domain_xml("vm2"))
            assert [d.name for d in await ro.list_domains(inactive=True)] == ["vm1"]
            assert (await ro.state("vm1"))[0] is DomainState.RUNNING
    finally:
        await running.stop(grace=0)


def test_a_run_dir_that_exists_is_checked(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    prepare_run_dir(run)
    assert mode(run) == 0o700  # a stricter dir of its own is left as it is
    for bad in (0o777, 0o775, 0o757, 0o1777):
        os.chmod(run, bad)
        with pytest.raises(ConfigUnsupported, match=(
                rf"run dir '{run}' may be written by others \(mode {bad:04o}\): it must be "
                "writable by its owner only")):
            prepare_run_dir(run)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a dir away needs root")
def test_a_run_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    os.chown(run, 65534, -1)
    with pytest.raises(ConfigUnsupported, match=(
            rf"run dir '{run}' belongs to uid 65534, not to the daemon's user \(uid 0\)")):
        prepare_run_dir(run)


def test_a_run_dir_that_is_not_a_dir_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigUnsupported, match="is not a directory"):
        prepare_run_dir(tmp_path / "link")


async def test_the_daemon_does_not_start_on_a_bad_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(run, 0o777)
    with pytest.raises(ConfigUnsupported, match="may be written by others"):
        await start(tmp_path, run)
    assert not (run / "virtmigd.sock").exists()
    assert not (tmp_path / "state").exists()  # refused before the daemon touched its state


def test_the_default_run_dir_is_checked_too(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With no ``--listen``, a non-root daemon's socket is in ``$XDG_RUNTIME_DIR/virtmig``, else
    ``/tmp/virtmig-UID`` (root's: ``/run/virtmig``), and that dir is checked as any other: one
    made beforehand by someone else (here: by this process, while the daemon is uid 4242) is
    refused."""
    monkeypatch.delenv(RUN_DIR_ENV, raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert load_config(build_parser().parse_args([])).listen == (
        "unix:///run/virtmig/virtmigd.sock",)
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    assert load_config(build_parser().parse_args([])).listen == (
        "unix:///tmp/virtmig-4242/virtmigd.sock",)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    config = load_config(build_parser().parse_args([]))
    assert config.listen == (f"unix://{tmp_path}/xdg/virtmig/virtmigd.sock",)
    (tmp_path / "xdg/virtmig").mkdir(parents=True, mode=0o755)
    with pytest.raises(ConfigUnsupported, match=(
            rf"run dir '{tmp_path}/xdg/virtmig' belongs to uid {os.getuid()}, not to the "
            r"daemon's user \(uid 4242\)")):
        prepare_run_dirs(plan(config))
