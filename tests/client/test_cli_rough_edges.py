"""What a new user runs into first: connection failures in libvirt's words, the connect timeout
and what it waited for, URIs with parts the client would ignore, what ``--help`` and a command
import, and the README's own examples.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client import cli_helpers
from tests.client.cli_helpers import Daemon, ok, start_guest, stop_process, virtmig
from virtmig.testing import wait_until_sync

daemons = cli_helpers.daemons
README = Path(__file__).resolve().parents[2] / "README.md"


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield int(s.getsockname()[1])


def test_refused_connection_reads_like_libvirt() -> None:
    port = closed_port()
    res = virtmig(f"virtmig+tcp://127.0.0.1:{port}", "list")
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr == ("error: failed to connect to the hypervisor\n"
                          f"error: unable to connect to server at '127.0.0.1:{port}': "
                          "Connection refused\n")


def test_missing_socket_reads_like_libvirt(tmp_path: Path) -> None:
    sock = tmp_path / "none.sock"
    res = virtmig(f"virtmig+unix://{sock}", "list")
    assert res.stderr == ("error: failed to connect to the hypervisor\n"
                          f"error: Failed to connect socket to '{sock}': "
                          "No such file or directory\n")


def test_connect_timeout_says_what_it_waited_for(silent_port: int) -> None:
    uri = f"virtmig+tcp://127.0.0.1:{silent_port}"
    waited = (f"error: Timed out during operation: no answer from the daemon at "
              f"'127.0.0.1:{silent_port}' within {{}} s (the connect timeout: --connect-timeout "
              "or VIRTMIG_CONNECT_TIMEOUT)\n")
    res = virtmig(uri, "--connect-timeout", "0.5", "list")
    assert res.returncode == 1
    assert res.stderr == "error: failed to connect to the hypervisor\n" + waited.format("0.5")
    env = {**os.environ, "VIRTMIG_CONNECT_TIMEOUT": "0.7"}
    res = virtmig(uri, "list", env=env)
    assert res.stderr.endswith(waited.format("0.7"))
    # The option wins over the environment.
    res = virtmig(uri, "--connect-timeout", "0.4", "list", env=env)
    assert res.stderr.endswith(waited.format("0.4"))


@pytest.mark.parametrize(("args", "env", "error"), [
    (["--connect-timeout", "abc"], None,
     "Numeric value 'abc' for <connect-timeout> option is malformed or out of range"),
    (["--connect-timeout", "0"], None,
     "Numeric value '0' for <connect-timeout> option is malformed or out of range"),
    (["--connect-timeout", "nan"], None,
     "Numeric value 'nan' for <connect-timeout> option is malformed or out of range"),
    ([], "-1", "Numeric value '-1' for VIRTMIG_CONNECT_TIMEOUT environment variable is "
               "malformed or out of range"),
])
def test_bad_connect_timeouts_are_refused(args: list[str], env: str | None, error: str) -> None:
    environ = {**os.environ, "VIRTMIG_CONNECT_TIMEOUT": env} if env is not None else None
    res = virtmig(f"virtmig+tcp://127.0.0.1:{closed_port()}", *args, "list", env=environ)
    assert res.returncode == 1
    assert res.stderr.startswith(f"error: {error}")


@pytest.mark.parametrize(("uri", "error"), [
    ("virtmig+tcp://127.0.0.1:1/system", "unsupported path '/system'"),
    ("virtmig+tcp://127.0.0.1:1?socket=/x", "unsupported parameter 'socket'"),
    ("virtmig+tls://127.0.0.1:1?pkipath=/x&no_verify=1", "unsupported parameter 'no_verify'"),
    ("virtmig+unix:///run/x.sock?mode=legacy", "unsupported parameter 'mode'"),
])
def test_uri_parts_the_client_does_not_understand_are_refused(uri: str, error: str) -> None:
    res = virtmig(uri, "list")
    assert res.returncode == 1
    assert res.stderr.startswith("error: failed to connect to the hypervisor\n"
                                 f"error: invalid argument: {error} in connection URI '{uri}'")


def imported_by(*argv: str) -> set[str]:
    """The top-level packages (and virtmig's modules) loaded by ``virtmig ARGV``."""
    code = ("import json, sys\n"
            "from virtmig.client.cli.app import main\n"
            "main(sys.argv[1:])\n"
            "print(json.dumps(sorted({m if m.startswith('virtmig') else m.split('.')[0]"
            " for m in sys.modules})), file=sys.stderr)\n")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60)
    return set(json.loads(res.stderr.splitlines()[-1]))


@pytest.mark.parametrize("argv", [
    ["--help"], ["help", "migrate"], ["list", "--no-such-option"], ["no-such-command"],
    ["migrate", "--live", "--offline", "vm", "virtmig+tcp://h"], ["--version"],
    ["help", "health"], ["health", "--no-such-option"],
])
def test_help_and_parse_errors_do_not_import_grpc(argv: list[str]) -> None:
    modules = imported_by(*argv)
    assert "virtmig.client.cli.app" in modules
    assert not modules & {"grpc", "cryptography", "lxml", "qemu"}


def test_a_command_imports_grpc_and_little_else() -> None:
    modules = imported_by("-c", f"virtmig+tcp://127.0.0.1:{closed_port()}", "list")
    assert "grpc" in modules
    # No PKI code for a plain URI, no XML library, nothing of the daemon.
    assert not modules & {"cryptography", "lxml", "qemu", "psutil"}
    assert not [m for m in modules if m.startswith("virtmig.daemon")]


def readme_commands(verb: str) -> list[str]:
    """The README's example command lines (in ```sh blocks) running ``verb``."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(), re.S)
    return [line for block in blocks for line in block.splitlines()
            if line.startswith("virtmig ") and f" {verb} " in f"{line} "]


def test_readme_event_example_works_as_written(daemons: tuple[Daemon, Daemon],
                                               tmp_path: Path) -> None:
    src, _dst = daemons
    [example] = readme_commands("event")
    argv = example.split()[1:]
    assert argv[:2] == ["-c", "virtmig+tls://host-a"]
    start_guest(tmp_path, src.uri, "vm1")
    proc = cli_helpers.background(src.uri, *argv[2:])
    try:
        def answered() -> bool:
            ok(src.uri, "suspend", "vm1")
            ok(src.uri, "resume", "vm1")
            return proc.poll() is not None

        wait_until_sync(answered, timeout=30, interval=0.1, what="the README's event example")
        out, err = proc.communicate(timeout=10)
    finally:
        stop_process(proc)
    assert (proc.returncode, err) == (0, b"")
    assert re.fullmatch(r"event 'lifecycle' for domain 'vm1': (Suspended Paused|Resumed "
                        r"Unpaused)\nevents received: 1\n", out.decode())


def test_readme_points_nowhere_outside_the_repository() -> None:
    text = README.read_text()
    assert "/work/" not in text and "../shared" not in text
    # Relative paths climbing out: only from a folder of the repository (build/mutate's
    # ../../.venv) back into it.
    assert re.findall(r"(?<![\w.])(?:\.\./)+[\w.-]+", text) == ["../../.venv"]
    root = README.parent
    for target in re.findall(r"\]\(([^)#]+)\)", text):  # markdown links
        if "://" not in target:
            assert (root / target).exists(), target
