"""The daemon's log settings (``log_level``, ``log_format``, ``log_outputs``) from the config file
and from the command line (``--log-level``, ``--log-format``, ``--log-output``: flags win), what
a real ``virtmigd`` process writes with them, and a SIGHUP switching the format."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from tests.daemon.test_reload import notifying_virtmigd
from virtmig.daemon.config import build_parser, load_config


def test_log_settings_come_from_the_file_and_the_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('log_level = "warning"\nlog_format = "json"\n'
                   f'log_outputs = ["file:{tmp_path}/a.log", "stderr"]\n')
    c = load_config(build_parser().parse_args(["--config", str(cfg)]))
    assert (c.log_level, c.log_format, c.log_outputs) == (
        "warning", "json", (f"file:{tmp_path}/a.log", "stderr"))
    c = load_config(build_parser().parse_args([
        "--config", str(cfg), "--log-level", "debug", "--log-format", "plain",
        "--log-output", f"file:{tmp_path}/b.log"]))
    assert (c.log_level, c.log_format, c.log_outputs) == ("debug", "plain",
                                                          (f"file:{tmp_path}/b.log",))


def run_virtmigd(tmp_path: Path, *argv: str, env: Mapping[str, str] | None = None,
                 ready: Callable[[int], None] | None = None) -> str:
    """Start ``virtmigd ARGV`` (in ``env``, default this one), wait until it is ready
    (systemd's notification), call ``ready(pid)``, stop it with SIGTERM; its stderr."""
    notify_path = tmp_path / "notify"
    notify_path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)  # bounded: the datagram comes once the daemon serves
        proc = subprocess.Popen([sys.executable, "-m", "virtmig.daemon.main", *argv],
                                env={**(os.environ if env is None else env),
                                     "NOTIFY_SOCKET": str(notify_path)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            assert "READY=1" in notify.recv(4096).decode().splitlines()
            if ready is not None:
                ready(proc.pid)
            proc.send_signal(signal.SIGTERM)
            _out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
    return err


def test_virtmigd_writes_its_log_as_the_config_and_the_flags_say(tmp_path: Path) -> None:
    json_log, plain_log = tmp_path / "json.log", tmp_path / "plain.log"
    cfg = tmp_path / "virtmigd.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/s"\nlisten = ["unix://{tmp_path}/run/v.sock"]\n'
                   f'log_format = "json"\nlog_outputs = ["file:{json_log}"]\n')
    # The config's: JSON lines in its file, nothing on stderr.
    assert run_virtmigd(tmp_path, "--config", str(cfg)) == ""
    lines = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(lines[0])
    assert any(d["level"] == "INFO" and d["message"].startswith("virtmigd serving on unix:")
               for d in lines), lines
    assert any(d["message"] == "shutting down" for d in lines), lines
    written = json_log.read_text()
    # The flags win: plain lines at WARNING and above in another file (the config's untouched).
    err = run_virtmigd(tmp_path, "--config", str(cfg), "--log-format", "plain", "--log-level",
                       "warning", "--log-output", f"file:{plain_log}", "--allow-insecure",
                       "--listen", f"unix://{tmp_path}/run/v.sock", "--listen",
                       "tcp://127.0.0.1:0")
    assert err == "" and json_log.read_text() == written
    plain = plain_log.read_text().splitlines()
    assert plain and all(" WARNING " in line or " ERROR " in line for line in plain), plain
    assert any(line.endswith("without TLS: whoever reaches it has full access "
                             "(listen_insecure_tcp)") and " virtmigd WARNING listening on tcp://"
               in line for line in plain), plain
    assert not any(line.lstrip().startswith("{") for line in plain)


def test_a_sighup_switches_the_log_format(tmp_path: Path) -> None:
    out = tmp_path / "virtmigd.log"
    cfg = tmp_path / "virtmigd.toml"
    base = (f'state_dir = "{tmp_path}/s"\nlisten = ["unix://{tmp_path}/run/v.sock"]\n'
            f'log_outputs = ["file:{out}"]\n')
    cfg.write_text(base)
    with notifying_virtmigd(cfg, tmp_path / "notify") as (proc, notify):
        assert "READY=1" in notify.recv(4096).decode().splitlines()
        cfg.write_text(base + 'log_format = "json"\n')
        proc.send_signal(signal.SIGHUP)
        assert notify.recv(4096).decode().splitlines() == ["RELOADING=1"]
        assert notify.recv(4096).decode().splitlines() == ["READY=1"]
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert (proc.returncode, err) == (0, "")
    lines = out.read_text().splitlines()
    plain = [line for line in lines if not line.startswith("{")]
    as_json = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(" virtmigd INFO virtmigd serving on unix:" in line for line in plain), lines
    assert lines[:len(plain)] == plain  # plain lines first, then JSON ones only
    assert {"message": "reload: log_format plain -> json", "level": "INFO"}.items() <= (
        as_json[0].items()), as_json
    assert as_json[-1]["message"] == "shutting down"
