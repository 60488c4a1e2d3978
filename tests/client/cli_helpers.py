"""Shared by the CLI test modules that run real daemons: two ``virtmigd`` processes on loopback
(the ``daemons`` fixture), the ``virtmig`` CLI run against them, and virsh's fixed answers.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtmig.testing import WaitTimeout, free_port_range, wait_until_sync
from virtmig.testing.pki import session_pki


def domain_xml(name: str, memory_mib: int = 64, dirty_rate_mib: int = 0) -> str:
    """A test-backend guest; ``dirty_rate_mib``: how fast it dirties its memory."""
    metadata = (f"<metadata><virtmig:guest xmlns:virtmig='urn:virtmig:domain:1' "
                f"dirty-rate-mib='{dirty_rate_mib}'/></metadata>" if dirty_rate_mib else "")
    return textwrap.dedent(f"""\
        <domain type='test'>
          <name>{name}</name>
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64'>hvm</type></os>
          {metadata}
        </domain>
        """)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    uri: str
    log: Path


def start_daemon(tmp: Path, name: str, extra: str = "") -> Daemon:
    """``virtmigd`` ``name``; ``extra``: more lines of its TOML config."""
    ready, log = tmp / f"{name}.ready", tmp / f"{name}.log"
    config = session_pki().config(tmp / f"{name}.toml", name, extra=extra)
    cmd = [
        sys.executable, "-m", "virtmig.daemon.main", "--config", str(config),
        "--listen", "tls://127.0.0.1:0",
        "--state-dir", str(tmp / name),
        "--hostname", f"{name}.test",
        "--migration-address", "127.0.0.1",
        "--migration-host", "127.0.0.1",
        "--migration-ports", free_port_range(),
        "--ready-file", str(ready),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    with contextlib.suppress(WaitTimeout):  # (it fails below, showing the daemon's log)
        wait_until_sync(lambda: ready.exists() or proc.poll() is not None, timeout=30,
                        interval=0.02, what=f"virtmigd {name} to start")
    if not ready.exists():
        stop_process(proc)
        pytest.fail(f"virtmigd {name} did not start:\n{log.read_text()}")
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    return Daemon(proc, f"virtmig+tls://{info['addresses'][0]}", log)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    """Two ``virtmigd`` processes, ``src`` and ``dst``, on loopback."""
    started: list[Daemon] = []
    try:
        started.append(start_daemon(tmp_path, "src"))
        started.append(start_daemon(tmp_path, "dst"))
        yield started[0], started[1]
    finally:
        for d in started:
            stop_process(d.proc)


def virtmig(uri: str | None, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    # -q: without virsh's blank line after the output (test_cli_virsh checks it is there).
    cmd = [sys.executable, "-m", "virtmig.client.cli", "-q"]
    if uri is not None:
        cmd += ["-c", uri]
    raw = subprocess.run([*cmd, *args], capture_output=True, timeout=60, env=env)
    # Decoded by hand: text mode would turn the progress line's "\r" into "\n".
    res = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(),
                                      raw.stderr.decode())
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    return res


def background(uri: str, *args: str) -> subprocess.Popen[bytes]:
    """``virtmig -c URI ARGS...`` left running, its output on pipes."""
    return subprocess.Popen([sys.executable, "-m", "virtmig.client.cli", "-q", "-c", uri, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(proc: subprocess.Popen[bytes], marker: bytes, *, stderr: bool = False,
               timeout: float = 30) -> bytes:
    """What the process wrote (to stdout, or stderr) up to and including ``marker``."""
    pipe = proc.stderr if stderr else proc.stdout
    assert pipe is not None
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {marker!r} in {seen!r}"
        ready, _, _ = select.select([pipe], [], [], left)
        if ready:
            chunk = os.read(pipe.fileno(), 4096)
            assert chunk, f"the process ended before {marker!r}: {seen!r}"
            seen += chunk
    return seen


def start_guest(tmp_path: Path, uri: str, name: str, memory_mib: int = 64,
                dirty_rate_mib: int = 0) -> None:
    xml = tmp_path / f"{name}.xml"
    xml.write_text(domain_xml(name, memory_mib, dirty_rate_mib))
    ok(uri, "define", str(xml))
    ok(uri, "start", name)


ABORTED = "error: operation aborted: job 'migration out' canceled by client\n"


NO_JOB = "error: Requested operation is not valid: no job is active on the domain\n"


EMPTY_LIST = " Id   Name   State\n--------------------\n"


def ok(uri: str, *args: str) -> str:
    res = virtmig(uri, *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return res.stdout


def fails(uri: str | None, *args: str) -> str:
    res = virtmig(uri, *args)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.startswith("error: ")
    return res.stderr


def migration_id(uri: str, name: str) -> str:
    """The id of ``name``'s last migration on the daemon at ``uri`` (its completed job's
    ``virtmig.migration_id`` statistic)."""
    for line in ok(uri, "domjobinfo", "--completed", "--rawstats", name).splitlines():
        if line.startswith("virtmig.migration_id: "):
            return line.split(": ", 1)[1]
    raise AssertionError(f"no migration id in the completed job of {name}")
