"""SIGHUP reloads what can change at run time: a real ``virtmigd`` process told by a signal, and
the changes' effects on a daemon in this process (DN lists, call limits, log level)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtmig.daemon import reload
from virtmig.proto.errors import PermissionDenied
from virtmig.testing import start_host, stop_host


def notified(sock: socket.socket) -> list[str]:
    return sock.recv(4096).decode().splitlines()


@contextlib.contextmanager
def notifying_virtmigd(cfg: Path, notify_path: Path) -> Iterator[tuple[subprocess.Popen[str],
                                                                        socket.socket]]:
    """``virtmigd --config cfg`` with ``NOTIFY_SOCKET`` bound at ``notify_path``: the process
    (stderr piped) and the socket its sd_notify datagrams come to; killed if still running."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)  # bounded: each datagram comes when the daemon gets there
        proc = subprocess.Popen([sys.executable, "-m", "virtmig.daemon.main", "--config",
                                 str(cfg)], env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            yield proc, notify
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)


def test_sighup_reloads_the_config_file_of_a_running_virtmigd(tmp_path: Path) -> None:
    cfg = tmp_path / "virtmigd.toml"
    base = (f'listen = ["unix://{tmp_path}/run/virtmigd.sock"]\nstate_dir = "{tmp_path}/s"\n'
            'migration_address = "127.0.0.1"\n')
    cfg.write_text(base)
    with notifying_virtmigd(cfg, tmp_path / "notify") as (proc, notify):
        assert "READY=1" in notified(notify)
        cfg.write_text(base.replace("127.0.0.1", "127.0.0.2") + 'log_level = "debug"\n'
                       'max_clients = 7\ntls_allowed_dn_list = ["O=virtmig,CN=ops-*"]\n')
        proc.send_signal(signal.SIGHUP)
        assert notified(notify) == ["RELOADING=1"]
        assert notified(notify) == ["READY=1"]
        cfg.write_text(base + 'max_clients = "many"\n')  # refused whole, nothing changes
        proc.send_signal(signal.SIGHUP)
        assert notified(notify) == ["RELOADING=1"]
        assert notified(notify) == ["READY=1"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # SIGHUP did not end it: SIGTERM did, gracefully
        assert proc.stderr is not None
        err = proc.stderr.read()
    lines = err.splitlines()

    def logged(level: str, text: str) -> bool:
        return any(f" {level} " in line and line.endswith(text) for line in lines)

    assert logged("INFO", "reload: log_level info -> debug"), err
    assert logged("INFO", "reload: max_clients 512 -> 7"), err
    assert logged("INFO", "reload: tls_allowed_dn_list [] -> [O=virtmig,CN=ops-*]"), err
    assert logged("WARNING", "reload: migration_address changed, it takes effect at the next "
                             "start"), err
    assert logged("ERROR", f"reload refused, the settings are unchanged: invalid argument: "
                           f"invalid max_clients 'many' in {cfg}: expected a whole number"), err
    assert "Traceback" not in err


async def test_a_reload_applies_dn_lists_and_limits_to_the_next_call(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    h = await start_host(tmp_path, "h")
    try:
        assert await h.conn.list_domains() == []
        old = h.daemon.config
        new = dataclasses.replace(old, tls_allowed_dn_list=("O=virtmig,CN=someone-else",),
                                  max_clients=3, max_calls_per_client=2, log_level="debug",
                                  stall_timeout_s=5.0, job_wait_timeout=99.0)
        with caplog.at_level(logging.INFO):
            changes = reload.apply(h.running, new)
            assert root.level == logging.DEBUG
        assert "reload: max_clients 512 -> 3" in caplog.messages
        assert changes == ["tls_allowed_dn_list [] -> [O=virtmig,CN=someone-else]",
                           "stall_timeout 0.0 -> 5.0", "max_clients 512 -> 3",
                           "max_calls_per_client 32 -> 2", "log_level info -> debug"]
        assert (h.daemon.calls.max_clients, h.daemon.calls.max_calls_per_client) == (3, 2)
        assert h.daemon.config.stall_timeout_s == 5.0
        assert h.daemon.config.job_wait_timeout == old.job_wait_timeout  # needs a restart
        with pytest.raises(PermissionDenied, match="'O=virtmig,CN=admin' is not on the list"):
            await h.conn.list_domains()
        reload.apply(h.running, dataclasses.replace(new, tls_allowed_dn_list=()))
        assert await h.conn.list_domains() == []
    finally:
        root.setLevel(saved[0])
        for handler in [x for x in root.handlers if x not in saved[1]]:
            root.removeHandler(handler)
        await stop_host(h)
