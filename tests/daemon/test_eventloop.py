"""The event loop ``virtmigd`` runs on (``event_loop``): the standard library's by default,
uvloop when asked, and only where gRPC's fork handlers are off; the tests' own loop is the
default's (tests/conftest.py)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import uvloop

import virtmig.daemon
from tests.conftest import TEST_LOOP_ENV
from tests.daemon.test_logs import run_virtmigd
from virtmig.daemon import eventloop
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.core import DaemonConfig
from virtmig.proto.errors import InvalidArgument


def test_the_setting_is_asyncio_by_default_and_checked(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text("")
    assert load_config(build_parser().parse_args(["--config", str(cfg)])).event_loop == "asyncio"
    assert DaemonConfig(state_dir=str(tmp_path)).event_loop == "asyncio"
    cfg.write_text('event_loop = "uvloop"\n')
    assert load_config(build_parser().parse_args(["--config", str(cfg)])).event_loop == "uvloop"
    cfg.write_text('event_loop = "trio"\n')
    with pytest.raises(InvalidArgument, match="invalid event_loop 'trio': expected asyncio or "
                                              "uvloop"):
        load_config(build_parser().parse_args(["--config", str(cfg)]))
    cfg.write_text("event_loop = 1\n")
    with pytest.raises(InvalidArgument, match="event_loop"):
        load_config(build_parser().parse_args(["--config", str(cfg)]))
    # A process whose gRPC has its fork handlers on cannot take uvloop.
    monkeypatch.setattr(virtmig.daemon, "GRPC_FORK_HANDLERS_OFF", False)
    cfg.write_text('event_loop = "uvloop"\n')
    with pytest.raises(InvalidArgument, match="gRPC's fork handlers are on in this process"):
        load_config(build_parser().parse_args(["--config", str(cfg)]))
    cfg.write_text('event_loop = "asyncio"\n')
    assert load_config(build_parser().parse_args(["--config", str(cfg)])).event_loop == "asyncio"


def test_the_factories() -> None:
    assert eventloop.factory("asyncio") is None
    loop = eventloop.factory("uvloop")()  # type: ignore[misc]
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    with pytest.raises(ValueError, match="unknown event loop 'trio'"):
        eventloop.factory("trio")


async def test_the_tests_run_on_the_daemons_default_loop() -> None:
    on_uvloop = isinstance(asyncio.get_running_loop(), uvloop.Loop)
    assert on_uvloop is (os.environ.get(TEST_LOOP_ENV, "asyncio") == "uvloop")


def test_the_daemons_package_turns_grpc_fork_handlers_off() -> None:
    """This process imported virtmig.daemon before gRPC (tests/conftest.py): the handlers are
    off, as in virtmigd."""
    assert virtmig.daemon.GRPC_FORK_HANDLERS_OFF
    assert os.environ["GRPC_ENABLE_FORK_SUPPORT"] == "false"


def _without_fork_setting(**extra: str) -> dict[str, str]:
    """This environment without ``GRPC_ENABLE_FORK_SUPPORT`` (this process set it: a child
    must set it itself), with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_ENABLE_FORK_SUPPORT"}
    return {**env, **extra}


def _stress(*argv: str, **env: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "tests.daemon.eventloop_stress", *argv],
                         capture_output=True, text=True, timeout=300, check=True,
                         env=_without_fork_setting(**env))
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


def test_uvloop_forks_do_not_break_the_daemons_tls_connections() -> None:
    """uvloop starts processes with fork: with gRPC's handlers on, migrations over TLS beside
    processes starting failed within a few dozen ("Decryption error: TSI_DATA_CORRUPTED"); off
    (virtmig.daemon does it), they go on."""
    result = _stress("30")
    assert result["handlers_off"] is True
    assert result["errors"] == [] and result["migrated"] == 30, result
    assert isinstance(result["spawned"], int) and result["spawned"] > 30, result


@pytest.mark.parametrize("how", ["grpc-first", "env"])
def test_uvloop_is_refused_where_grpc_fork_handlers_are_on(how: str) -> None:
    if how == "env":
        result = _stress("1", GRPC_ENABLE_FORK_SUPPORT="true")
    else:
        result = _stress("1", "grpc-first")
    assert result["handlers_off"] is False
    assert "gRPC's fork handlers are on in this process" in str(result["refused"])


def _loop_of_virtmigd(tmp_path: Path, config: str) -> bool:
    """Start ``virtmigd`` with ``config``, wait until it serves; whether uvloop's extension is
    mapped into the process (it is imported only to make the daemon's loop)."""
    tmp_path.mkdir()
    cfg = tmp_path / "virtmigd.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\nlisten = ["unix://{tmp_path}/run/v.sock"]\n'
                   + config)
    maps: list[str] = []
    run_virtmigd(tmp_path, "--config", str(cfg), env=_without_fork_setting(),
                 ready=lambda pid: maps.append(Path(f"/proc/{pid}/maps").read_text()))
    return "/uvloop/loop." in maps[0]


def test_virtmigd_runs_on_uvloop_when_told(tmp_path: Path) -> None:
    assert not _loop_of_virtmigd(tmp_path / "a", "")
    assert _loop_of_virtmigd(tmp_path / "b", 'event_loop = "uvloop"\n')


def test_listening_sockets_listen_or_raise_on_every_loop() -> None:
    """The daemon's servers listen on sockets made here, and read their port from them (not
    from ``Server.sockets``, which lists ``None`` for a server uvloop closed): an address in use
    is OSError at once, worded as the standard library's start_server words it."""
    held = eventloop.listening_socket("127.0.0.1", 0)
    try:
        port = held.getsockname()[1]
        with pytest.raises(OSError) as caught:
            eventloop.listening_socket("127.0.0.1", port)
        assert caught.value.errno == errno.EADDRINUSE
        assert str(caught.value) == (  # as the standard library's start_server words it
            f"[Errno {errno.EADDRINUSE}] error while attempting to bind on address "
            f"('127.0.0.1', {port}): address already in use")
    finally:
        held.close()
    for host, family, address in (("127.0.0.1", socket.AF_INET, "127.0.0.1"),
                                  ("::1", socket.AF_INET6, "::1"),
                                  ("localhost", socket.AF_INET, "127.0.0.1"),
                                  ("", socket.AF_INET, "0.0.0.0")):
        with eventloop.listening_socket(host, 0) as sock:
            assert sock.family == family and sock.getsockname()[0] == address, host
            with socket.create_connection((address if address != "0.0.0.0" else "127.0.0.1",
                                           sock.getsockname()[1]), timeout=10):
                pass  # it listens
