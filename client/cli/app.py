"""The CLI's entry point: the command table, the argparse parsers (virsh's "data" options by
name or by position), and ``main``, which turns every failure into ``error:`` lines and an exit
status.

Start-up is part of the interface (issue 17): ``--help``, ``help COMMAND`` and a parse error import
argparse and this package's light modules (:mod:`~virtmig.client.cli.base`,
:mod:`~virtmig.client.cli.parsers`) only, since the table names each handler by module
(:func:`~virtmig.client.cli.base.lazy`); a command imports its own module, and gRPC, when it runs.
``tests/client/test_cli_startup.py`` pins both import sets (and that every handler resolves);
``bench/cli_startup.py`` measures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Sequence

from virtmig import __version__
from virtmig.client.cli import parsers
from virtmig.client.cli.base import (
    DEFAULT_CONNECT_TIMEOUT,
    CliError,
    Command,
    Session,
    UsageError,
    add_json,
    connect_timeout,
    in_program,
    lazy,
    option,
    print_error,
    start_program,
)
from virtmig.client.cli.parsers import EVENT_NAMES, MIGRATE_DATA

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from typing import Any, NoReturn


class _Parser(argparse.ArgumentParser):
    """argparse without its ``exit(2)``: errors become :class:`UsageError`."""

    def __init__(self, *, label: str = "", **kwargs: Any) -> None:
        self._width: int | None = None
        super().__init__(**kwargs)
        self.label = label

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.label}: {message}" if self.label else message)

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse's own sizes the text with shutil.get_terminal_size, and importing shutil
        # (with zlib, bz2 and lzma) is the largest part of what a parse error costs beyond
        # argparse: the same width, found without it.
        # (typeshed's formatter class takes ``prog`` only; argparse's take ``width`` too)
        # argparse makes a formatter for every add_argument (to check its metavar): the width
        # is found once per parser (issue 17: migrate's parser has ~60 options, and without a
        # terminal each lookup raised and caught two exceptions).
        if self._width is None:
            self._width = _columns() - 2
        make: Callable[..., argparse.HelpFormatter] = self.formatter_class
        return make(prog=self.prog, width=self._width)


def _columns() -> int:
    """``shutil.get_terminal_size().columns``: ``$COLUMNS``, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    stdout = sys.__stdout__
    if columns <= 0 and stdout is not None:
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns
        except (ValueError, OSError):  # closed or detached, or not a terminal
            columns = 0
    return columns if columns > 0 else 80


def _cmd(name: str, help_text: str, module: str, data: tuple[str, ...] = (),
         required: tuple[str, ...] = (), setup: Any = None, **kwargs: Any) -> Command:
    """A command whose handler is ``cmd_NAME`` of ``virtmig.client.cli.MODULE``, imported when it
    runs."""
    handler = lazy(f"virtmig.client.cli.{module}", f"cmd_{name.replace('-', '_')}")
    return Command(name, help_text, handler, data, required, setup, **kwargs)


_DOMAIN = ("domain",)
_POSTCOPY = parsers.setup_postcopy
_MIGRATE_DATA = tuple(option_name.replace("-", "_") for option_name, _, _ in MIGRATE_DATA)

COMMANDS: tuple[Command, ...] = (
    _cmd("list", "list domains", "domains", setup=parsers.setup_list),
    _cmd("define", "define (but don't start) a domain from an XML file", "domains",
         ("file",), ("file",)),
    _cmd("create", "create a domain from an XML file", "domains", ("file",), ("file",),
         parsers.setup_create),
    _cmd("undefine", "undefine a domain", "domains", _DOMAIN, _DOMAIN),
    _cmd("start", "start a (previously defined) inactive domain", "domains", _DOMAIN, _DOMAIN,
         parsers.setup_start),
    _cmd("destroy", "destroy (stop) a domain", "domains", _DOMAIN, _DOMAIN),
    _cmd("suspend", "suspend a domain", "domains", _DOMAIN, _DOMAIN),
    _cmd("resume", "resume a domain", "domains", _DOMAIN, _DOMAIN),
    _cmd("dominfo", "domain information", "domains", _DOMAIN, _DOMAIN, add_json),
    _cmd("domstate", "domain state", "domains", _DOMAIN, _DOMAIN, parsers.setup_domstate),
    _cmd("dumpxml", "domain information in XML", "domains", _DOMAIN, _DOMAIN,
         parsers.setup_dumpxml),
    _cmd("ttyconsole", "tty console", "domains", _DOMAIN, _DOMAIN),
    _cmd("migrate", "migrate domain to another host", "migration",
         ("domain", *_MIGRATE_DATA), ("domain", "desturi"),
         lazy("virtmig.client.cli.options", "setup_migrate"),
         metavars={o.replace("-", "_"): metavar for o, metavar, _ in MIGRATE_DATA},
         data_help={o.replace("-", "_"): text for o, _, text in MIGRATE_DATA}),
    _cmd("domjobinfo", "domain job information", "jobs", _DOMAIN, _DOMAIN,
         parsers.setup_domjobinfo),
    _cmd("domjobabort", "abort active domain job", "jobs", _DOMAIN, _DOMAIN,
         _POSTCOPY("abort a post-copy migration")),
    _cmd("migrate-setmaxdowntime", "set maximum tolerable downtime", "jobs",
         ("domain", "downtime"), ("domain", "downtime"), metavars={"downtime": "MS"}),
    _cmd("migrate-getmaxdowntime", "get maximum tolerable downtime", "jobs", _DOMAIN, _DOMAIN),
    _cmd("migrate-setspeed", "Set the maximum migration bandwidth", "jobs",
         ("domain", "bandwidth"), ("domain", "bandwidth"),
         _POSTCOPY("set post-copy migration bandwidth"), metavars={"bandwidth": "MiB/s"}),
    _cmd("migrate-getspeed", "Get the maximum migration bandwidth", "jobs", _DOMAIN, _DOMAIN,
         _POSTCOPY("get post-copy migration bandwidth")),
    _cmd("migrate-compcache", "get/set compression cache size", "jobs", _DOMAIN, _DOMAIN,
         parsers.setup_compcache),
    _cmd("migrate-postcopy", "Switch running migration from pre-copy to post-copy", "jobs",
         _DOMAIN, _DOMAIN),
    _cmd("migrate-resolve", "settle a guest whose migration's outcome is unknown", "domains",
         ("domain", "desturi"), _DOMAIN, metavars={"desturi": "DESTURI"}),
    _cmd("migrate-history", "past migrations of this host, newest first", "history", _DOMAIN,
         (), parsers.setup_migrate_history),
    _cmd("event", "Domain Events", "jobs", ("domain", "event", "timeout"), (),
         parsers.setup_event, metavars={"event": "TYPE", "timeout": "SECONDS"}),
    _cmd("hostname", "print the daemon's hostname", "host"),
    _cmd("version", "show version", "host"),
    _cmd("nodeinfo", "node information", "host", setup=add_json),
    _cmd("capabilities", "capabilities", "host", setup=add_json),
    _cmd("health", "virtmig: the daemon's gRPC health status (exit 0 only when SERVING)", "host",
         setup=parsers.setup_health),
    _cmd("pki", "make a CA, or issue a host's or client's TLS certificates (no daemon)", "pki",
         setup=lazy("virtmig.client.cli.pki", "setup_pki")),
)

COMMANDS_BY_NAME = {c.name: c for c in COMMANDS}

# The data options' help, unless the command has its own (``Command.data_help``).
_DATA_HELP = {
    "domain": "domain name, id or uuid",
    "file": "file containing an XML domain description",
    "downtime": "maximum tolerable downtime (in milliseconds) for migration",
    "bandwidth": "migration bandwidth limit in MiB/s",
    "event": f"which event type to wait for: {', '.join(EVENT_NAMES)}",
    "timeout": "timeout seconds",
    "desturi": "the destination daemon's URI, as this daemon reaches it (default: the one "
               "recorded)",
}


def command_parser(cmd: Command) -> _Parser:
    """The argparse parser of one command (its data options by name or by position)."""
    usage_parts = []
    for name in cmd.data:
        metavar = cmd.metavars.get(name, name.upper())
        part = f"[--{option(name)}] {metavar}"
        usage_parts.append(part if name in cmd.required else f"[{part}]")
    p = _Parser(prog=f"virtmig {cmd.name}", description=cmd.help, allow_abbrev=False,
                label=cmd.name,
                usage=f"%(prog)s [OPTIONS] {' '.join(usage_parts)}".rstrip())
    for name in cmd.data:
        p.add_argument(f"--{option(name)}", dest=name,
                       metavar=cmd.metavars.get(name, name.upper()),
                       help=cmd.data_help.get(name, _DATA_HELP.get(name)))
    if cmd.data:
        p.add_argument("positional", nargs="*", metavar="ARG", help=argparse.SUPPRESS)
    if cmd.setup is not None:
        cmd.setup(p)
    return p


def parse_command(cmd: Command, argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command's arguments; positional values fill the data options not given by name,
    in order, as virsh does."""
    args = command_parser(cmd).parse_intermixed_args(list(argv))
    for value in getattr(args, "positional", None) or []:
        for name in cmd.data:
            if getattr(args, name) is None:
                setattr(args, name, value)
                break
        else:
            raise UsageError(f"{cmd.name}: unexpected data '{value}'")
    for name in cmd.required:
        if getattr(args, name) is None:
            raise UsageError(f"command '{cmd.name}' requires <{option(name)}> option")
    return args


def commands_help() -> str:
    lines = ["Commands:"]
    lines += [f"    {c.name:<16} {c.help}" for c in COMMANDS]
    lines.append("    help [COMMAND]   this list, or one command's options")
    return "\n".join(lines) + "\n"


def main_parser() -> _Parser:
    p = _Parser(prog="virtmig", usage="%(prog)s [-c URI] COMMAND [OPTIONS] [ARGS]",
                description="virtmig: virsh-like client of virtmigd",
                epilog=commands_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--connect", metavar="URI",
                   help="daemon connection URI: virtmig+tls://HOST[:PORT][?pkipath=DIR], "
                        "virtmig+unix:///PATH (default: $VIRTMIG_DEFAULT_URI or the local "
                        "daemon's socket)")
    p.add_argument("--connect-timeout", metavar="SECONDS",
                   help="virtmig: how long to wait for a daemon's first answer (default: "
                        "$VIRTMIG_CONNECT_TIMEOUT or 10)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="quiet mode: no blank line after a command's output (as virsh)")
    p.add_argument("-v", "--version", action="version", version=__version__)
    p.add_argument("command", nargs="?", metavar="COMMAND", help=argparse.SUPPRESS)
    p.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


# --- main -----------------------------------------------------------------------------------------


async def run(cmd: Command, uri: str | None, args: argparse.Namespace,
              timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
    """Run ``cmd``'s handler with a :class:`Session` on ``uri``, closing its connections."""
    session = Session(uri, timeout)
    try:
        await cmd.handler(session, args)
    finally:
        await session.close()


def _main(argv: list[str]) -> int:
    top = main_parser()
    ran, quiet, status = False, False, 0
    try:
        ns = top.parse_args(argv)
        quiet = ns.quiet
        if ns.command is None:
            raise UsageError("no command given; try 'virtmig help'")
        if ns.command == "help":
            if not ns.args:
                top.print_help()
                return 0
            name = ns.args[0]
            if name not in COMMANDS_BY_NAME:
                raise UsageError(f"command or command group '{name}' doesn't exist")
            command_parser(COMMANDS_BY_NAME[name]).print_help()
            return 0
        cmd = COMMANDS_BY_NAME.get(ns.command)
        if cmd is None:
            raise UsageError(f"unknown command: '{ns.command}'")
        args = parse_command(cmd, ns.args)
        timeout = connect_timeout(ns.connect_timeout)
        ran = True
        status = _run_command(cmd, ns.connect, args, timeout)
    except CliError as exc:
        for line in exc.lines:
            print_error(line)
        status = 1
    if ran and not quiet:
        # virsh's vshPrintExtra(ctl, "\n") after every command it ran, failed ones too.
        print(flush=True)
    return status


def _run_command(cmd: Command, uri: str | None, args: argparse.Namespace, timeout: float) -> int:
    """Run a parsed command in its event loop: 0, or 1 after its ``error:`` lines."""
    import asyncio  # here, not at the top: parsing (and --help) loads no asyncio

    from virtmig.proto.errors import VirtmigError

    try:
        if in_program():
            # The program ends with os._exit once the command has reported (_exit): the event
            # loop's teardown (cancel what is left, join the default executor's threads, close
            # the loop) would cost ~1 ms for nothing.  The command's connections are closed.
            asyncio.Runner().run(run(cmd, uri, args, timeout))
        else:
            asyncio.run(run(cmd, uri, args, timeout))
    except CliError as exc:
        for line in exc.lines:
            print_error(line)
        return 1
    except VirtmigError as exc:
        print_error(str(exc))
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``virtmig`` console script: returns the exit status (0 success, 1 failure); as the
    program (``argv`` None) it ends the process with that status itself (:func:`_exit`)."""
    try:
        status = _run_main(argv)
    finally:
        if argv is None:
            # The command is over and has reported: a late Ctrl-C (a second one during a
            # migration's abort) must not turn the exit status into a death by SIGINT while
            # the process ends.
            import signal

            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGINT, signal.SIG_IGN)
    if argv is None:
        _exit(status)
    return status


def _exit(status: int) -> NoReturn:
    """End the program now, without the interpreter's teardown: collecting gRPC's, protobuf's and
    virtmig's modules and objects costs a command that connected about a fifth of its CPU time
    (issue 17), for nothing: its connections are closed, and its output is flushed here.  Nothing
    the CLI runs registers an exit handler."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # the reader went away (or closed it): a failure
            status = status or 1
    os._exit(status)


def _run_main(argv: list[str] | None) -> int:
    if argv is None:
        # The program, not a caller in Python: gRPC's C core logs to stderr (a key that does not
        # match its certificate gets three lines of it before virtmig's error says so), and a
        # user reads virtmig's error lines only, unless they ask gRPC for its own.
        os.environ.setdefault("GRPC_VERBOSITY", "NONE")
        start_program()
    try:
        return _main(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:
        print_error("interrupted")
        return 1
    except BrokenPipeError:
        # stdout went away (``virtmig list | head``): say nothing more, and don't let the
        # interpreter's final flush fail either.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # a bug: still no traceback for the user
        print_error(f"internal error: {type(exc).__name__}: {exc}")
        return 1

