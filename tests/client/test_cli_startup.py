"""What ``virtmig`` loads to start (issue 17: it starts fast; ``bench/cli_startup.py`` measures it,
nothing here times anything): ``--help`` and parse errors load argparse and the CLI's light
modules only; ``list`` over TLS loads no ``cryptography``, no migration driver, no typed-params
table and no XML library; and a client PKI dir that cannot work is still reported by name, in
virtmig's words only, now that its full checks run when a connection fails rather than before
every one.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.client.cli_helpers import Daemon, start_daemon, stop_process, virtmig
from virtmig.client.cli import app
from virtmig.client.cli.base import Lazy
from virtmig.testing import wait_until
from virtmig.testing.pki import session_pki

# What ``--help`` and a parse error may load of virtmig: the command table and its options.
LIGHT = {"virtmig", "virtmig.client", "virtmig.client.cli", "virtmig.client.cli.app",
         "virtmig.client.cli.base", "virtmig.client.cli.parsers"}


def run_reporting(argv: tuple[str, ...], setup: str, report: str) -> tuple[int, Any]:
    """The exit status of the ``virtmig`` console script run with ARGV after ``setup`` (Python
    source), and what the expression ``report`` (JSON) says as the process ends.  main() ends
    the process itself (os._exit): ``report`` is written from an exit path it cannot skip, a
    wrapper around os._exit."""
    code = ("import json, os, sys\n"
            + setup
            + "_exit = os._exit\n"
            "def _report(status):\n"
            f"    os.write(2, ('\\n' + json.dumps({report}) + '\\n').encode())\n"
            "    _exit(status)\n"
            "os._exit = _report\n"
            "from virtmig.client.cli import main\n"
            "main()\n")
    res = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                         timeout=60)
    return res.returncode, json.loads(res.stderr.splitlines()[-1])


def imported_by(*argv: str) -> tuple[int, set[str]]:
    """The exit status of the ``virtmig`` console script run with ARGV, and every module it
    loaded (the whole dotted names)."""
    status, modules = run_reporting(argv, "", "sorted(sys.modules)")
    return status, set(modules)


@pytest.mark.parametrize("argv", [
    ["--help"], ["help"], ["help", "list"], ["--version"], ["list", "--no-such-option"],
    ["no-such-command"], ["dominfo"], ["event", "--no-such-option"], ["-q"],
])
def test_help_and_parse_errors_load_argparse_and_the_command_table_only(argv: list[str]
                                                                        ) -> None:
    status, modules = imported_by(*argv)
    assert status in (0, 1)
    assert {m for m in modules if m.startswith("virtmig")} <= LIGHT
    # Neither gRPC, protobuf nor asyncio; not even typing, dataclasses (inspect) or shutil
    # (argparse's way to the terminal's width, with zlib, bz2 and lzma).
    assert not {m.split(".")[0] for m in modules} & {
        "grpc", "google", "asyncio", "typing", "dataclasses", "inspect", "cryptography",
        "shutil"}


def test_every_command_names_a_handler_and_setup_that_exist() -> None:
    """The table names handlers by module and function: each one resolves to a coroutine
    function of the module named, and so does every setup given by name."""
    for cmd in app.COMMANDS:
        assert isinstance(cmd.handler, Lazy)
        assert cmd.handler.module.startswith("virtmig.client.cli.")
        assert inspect.iscoroutinefunction(cmd.handler.resolve()), cmd.name
        if isinstance(cmd.setup, Lazy):
            assert callable(cmd.setup.resolve()), cmd.name


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path, "src")
    try:
        yield d
    finally:
        stop_process(d.proc)


def test_list_over_tls_loads_no_x509_code_nor_migration_drivers(daemon: Daemon) -> None:
    uri = f"{daemon.uri}?pkipath={session_pki().client()}"
    status, modules = imported_by("-q", "-c", uri, "list")
    assert status == 0
    assert "grpc" in modules
    assert not {m.split(".")[0] for m in modules} & {"cryptography", "lxml", "xml", "psutil"}
    assert not modules & {"virtmig.proto.pki", "virtmig.client.migrate",
                          "virtmig.client.sequence", "virtmig.proto.compat",
                          "virtmig.proto.params", "virtmig.proto.wire"}
    assert not [m for m in modules if m.startswith("virtmig.daemon")]
    # Nor protobuf's pure-Python backend, which the upb backend does not use (its module is
    # there, lazy: see the next test).
    assert not modules & PROTOBUF_PURE_PYTHON


# What protobuf's pure-Python backend module (python_message) imports, unless it is left lazy.
PROTOBUF_PURE_PYTHON = {"google.protobuf.text_format", "google.protobuf.internal.containers",
                        "google.protobuf.internal.decoder", "google.protobuf.internal.encoder"}


def test_the_deferred_protobuf_backend_loads_in_full_when_used() -> None:
    """The program makes protobuf's pure-Python backend lazy (``defer_protobuf_pure_python``):
    messages work without it, and code that uses it gets the whole module."""
    code = ("import sys\n"
            "from virtmig.client.cli.base import defer_protobuf_pure_python\n"
            "defer_protobuf_pure_python()\n"
            "from virtmig.proto import virtmig_pb2 as pb\n"
            "m = pb.ListReply(domains=[pb.Domain(name='vm1', id=3)])\n"
            "assert pb.ListReply.FromString(m.SerializeToString()) == m\n"
            f"assert not {sorted(PROTOBUF_PURE_PYTHON)!r} & sys.modules.keys()\n"
            "from google.protobuf.internal import python_message\n"
            "assert callable(python_message._AttachFieldHelpers)\n"
            "from google.protobuf import text_format\n"
            "print(text_format.MessageToString(m, as_one_line=True))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == 'domains { name: "vm1" id: 3 }\n'


def test_list_works_with_protobufs_pure_python_backend(daemon: Daemon) -> None:
    env = {**os.environ, "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python"}
    res = virtmig(f"{daemon.uri}?pkipath={session_pki().client()}", "list", env=env)
    assert (res.returncode, res.stderr) == (0, "")
    assert res.stdout.splitlines()[0].split() == ["Id", "Name", "State"]


def bad_dir(tmp_path: Path, fault: str) -> Path:
    """A copy of the test client's PKI dir with ``fault``."""
    pki = session_pki()
    out = tmp_path / fault
    shutil.copytree(pki.client(), out)
    if fault == "foreign-cert":  # signed by another CA
        shutil.copyfile(pki.foreign_client() / "clientcert.pem", out / "clientcert.pem")
    elif fault == "other-key":  # a good key, of another certificate
        shutil.copyfile(pki.client("other") / "private/clientkey.pem",
                        out / "private/clientkey.pem")
    elif fault == "not-pem-ca":
        (out / "cacert.pem").write_text("not a certificate\n")
    elif fault == "leaf-as-ca":
        shutil.copyfile(out / "clientcert.pem", out / "cacert.pem")
    return out


@pytest.mark.parametrize(("fault", "why"), [
    ("foreign-cert", "the client certificate '{d}/clientcert.pem' is not signed by the CA "
                     "certificate '{d}/cacert.pem'"),
    ("other-key", "client key '{d}/private/clientkey.pem' does not match the client "
                  "certificate '{d}/clientcert.pem'"),
    ("not-pem-ca", "CA certificate '{d}/cacert.pem' holds no PEM certificate"),
    ("leaf-as-ca", "the CA certificate '{d}/cacert.pem' is not a CA certificate: its basic "
                   "constraints do not say CA"),
])
@pytest.mark.parametrize("reachable", [True, False])
def test_a_client_pki_dir_that_cannot_work_is_named_in_virtmigs_words_only(
        daemon: Daemon, tmp_path: Path, fault: str, why: str, reachable: bool) -> None:
    d = bad_dir(tmp_path, fault)
    target = daemon.uri if reachable else "virtmig+tls://127.0.0.1:1"
    res = virtmig(f"{target}?pkipath={d}", "list")
    assert res.returncode == 1
    # Two lines: no log line of gRPC's own ("Invalid private key", "Handshake failed") before.
    assert res.stderr == ("error: failed to connect to the hypervisor\n"
                          f"error: unsupported configuration: {why.format(d=d)}\n")


@pytest.mark.parametrize("columns", [None, "57", "0", "wide"])
def test_help_is_as_wide_as_argparse_would_make_it(monkeypatch: pytest.MonkeyPatch,
                                                    columns: str | None) -> None:
    """The parsers find the terminal's width without shutil, as argparse (with shutil) would."""
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert app._columns() == shutil.get_terminal_size().columns
    for parser in (app.main_parser(), app.command_parser(app.COMMANDS_BY_NAME["migrate"])):
        ours = parser._get_formatter()
        argparses = argparse.ArgumentParser._get_formatter(parser)
        assert type(ours) is type(argparses)
        assert (ours._width, ours._max_help_position) == (argparses._width,
                                                          argparses._max_help_position)


def dialed_before(*argv: str) -> tuple[int, list[dict[str, bool]]]:
    """The exit status of the console script run with ARGV, and for each channel it opened,
    which of the client library's heavy modules were loaded at that moment."""
    setup = ("from virtmig.client import transport\n"
             "seen = []\n"
             "_open = transport.open_channel\n"
             "def open_channel(*args, **kwargs):\n"
             "    seen.append({m: m in sys.modules for m in (\n"
             "        'virtmig.proto.virtmig_pb2', 'google.protobuf.descriptor_pool',\n"
             "        'virtmig.client.rpc')})\n"
             "    return _open(*args, **kwargs)\n"
             "transport.open_channel = open_channel\n")
    status, seen = run_reporting(argv, setup, "seen")
    return status, list(seen)


def test_a_command_dials_its_daemon_before_loading_the_client_library(daemon: Daemon) -> None:
    """(issue 17) gRPC connects and does the TLS handshake on its own threads while the command
    imports protobuf, the messages and the RPC layer: the one channel of ``list`` exists before
    any of them is loaded."""
    uri = f"{daemon.uri}?pkipath={session_pki().client()}"
    status, channels = dialed_before("-q", "-c", uri, "list")
    assert status == 0
    assert channels == [{"virtmig.proto.virtmig_pb2": False,
                         "google.protobuf.descriptor_pool": False,
                         "virtmig.client.rpc": False}]


async def test_a_dialed_channel_is_connecting_and_its_timeout_counts_from_the_dial(
        daemon: Daemon) -> None:
    import grpc

    from virtmig.client.transport import dial

    dialing = dial(daemon.uri, pki_dir=session_pki().client())
    try:
        # Connecting with no call made: a channel left to its first call would stay IDLE.
        await wait_until(lambda: dialing.channel.get_state() is grpc.ChannelConnectivity.READY,
                         timeout=10, what="the dialed channel to connect by itself")
        assert dialing.remaining(86400) <= 86400
        dialing.started -= 20
        assert dialing.remaining(10) == 0
    finally:
        await dialing.channel.close(None)


def test_the_dataclasses_every_command_imports_have_docstrings() -> None:
    """``dataclass`` gives a class without a docstring one made with ``inspect.signature``, at
    import: the values every connecting command loads say what they are instead."""
    import dataclasses

    from virtmig.client import values
    from virtmig.proto import pkifiles, uri

    classes = [obj for module in (values, uri, pkifiles) for obj in vars(module).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj)
               and obj.__module__ == module.__name__]
    assert {c.__name__ for c in classes} >= {"Domain", "HostInfo", "ConnectURI", "PkiPaths"}
    for cls in classes:
        assert cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}("), cls.__name__


def _closes_loop(monkeypatch: pytest.MonkeyPatch, program: bool) -> tuple[bool, list[str]]:
    """Run a command whose handler only records that it ran, as the program or not: whether
    its event loop was torn down (``asyncio.Runner.close``)."""
    import asyncio

    from virtmig.client.cli import base

    closed: list[bool] = []
    ran: list[str] = []
    real_close = asyncio.Runner.close

    def close(self: asyncio.Runner) -> None:
        closed.append(True)
        real_close(self)

    async def handler(session: base.Session, args: argparse.Namespace) -> None:
        ran.append("ran")

    monkeypatch.setattr(asyncio.Runner, "close", close)
    monkeypatch.setattr(base, "_program", program)
    status = app._run_command(base.Command("probe", "a probe", handler), None,
                              argparse.Namespace(), 1.0)
    assert status == 0
    return bool(closed), ran


def test_the_program_skips_the_event_loops_teardown(monkeypatch: pytest.MonkeyPatch) -> None:
    """The program ends with os._exit once its command reported: it does not pay for the loop's
    teardown (cancel what is left, join the default executor's threads, close the loop, ~1 ms
    of every command); a caller of main() in Python gets its loop closed as always."""
    assert _closes_loop(monkeypatch, program=True) == (False, ["ran"])
    assert _closes_loop(monkeypatch, program=False) == (True, ["ran"])


async def test_a_commands_connections_close_at_once() -> None:
    """Session.close closes its connections together (each waits for its own daemon), every one
    of them even when one fails."""
    import asyncio

    from virtmig.client.cli.base import Session

    events: list[tuple[str, str]] = []
    both_closing = asyncio.Event()

    class Conn:
        def __init__(self, name: str, fails: bool = False) -> None:
            self.name, self.fails = name, fails

        async def close(self) -> None:
            events.append(("start", self.name))
            if len(events) == 2:
                both_closing.set()
            # Each close ends only once both began (closed one after the other, the first
            # would wait here in vain: its end then never comes).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await both_closing.wait()
            if not both_closing.is_set():
                return
            events.append(("end", self.name))
            if self.fails:
                raise OSError("gone")

    session = Session(None)
    session._opened.extend([Conn("source", fails=True), Conn("destination")])  # type: ignore[list-item]
    await session.close()
    assert sorted(events[:2]) == [("start", "destination"), ("start", "source")]
    assert sorted(events[2:]) == [("end", "destination"), ("end", "source")]
    assert session._opened == []
