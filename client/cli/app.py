"""The CLI's entry point: the command table, the argparse parsers (virsh's "data" options by
name or by position), and ``main``, which turns every failure into ``error:`` lines and an exit
status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from virtmig import __version__
from virtmig.client.cli import domains, history, host, jobs, options, pki
from virtmig.client.cli.base import (
    DEFAULT_CONNECT_TIMEOUT,
    CliError,
    Command,
    Session,
    UsageError,
    add_json,
    connect_timeout,
    option,
    print_error,
)
from virtmig.client.cli.migration import cmd_migrate
from virtmig.client.cli.output import EVENT_NAMES
from virtmig.proto.errors import VirtmigError

if TYPE_CHECKING:
    from virtmig.client.connection import AsyncConnection, Domain


class _Parser(argparse.ArgumentParser):
    """argparse without its ``exit(2)``: errors become :class:`UsageError`."""

    def __init__(self, *, label: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.label}: {message}" if self.label else message)


def _lifecycle(verb: str, done: str, call: Callable[[AsyncConnection, Domain], Awaitable[None]],
               help_text: str) -> Command:
    return Command(verb, help_text, domains.lifecycle(verb, done, call), ("domain",), ("domain",))


COMMANDS: tuple[Command, ...] = (
    Command("list", "list domains", domains.cmd_list, setup=domains.setup_list),
    Command("define", "define (but don't start) a domain from an XML file", domains.cmd_define,
            ("file",), ("file",)),
    Command("create", "create a domain from an XML file", domains.cmd_create, ("file",),
            ("file",), domains.setup_create),
    Command("undefine", "undefine a domain", domains.cmd_undefine, ("domain",), ("domain",)),
    Command("start", "start a (previously defined) inactive domain", domains.cmd_start,
            ("domain",), ("domain",), domains.setup_start),
    _lifecycle("destroy", "destroyed", lambda c, d: c.destroy(d),
               "destroy (stop) a domain"),
    _lifecycle("suspend", "suspended", lambda c, d: c.suspend(d), "suspend a domain"),
    _lifecycle("resume", "resumed", lambda c, d: c.resume(d), "resume a domain"),
    Command("dominfo", "domain information", domains.cmd_dominfo, ("domain",), ("domain",),
            domains.setup_dominfo),
    Command("domstate", "domain state", domains.cmd_domstate, ("domain",), ("domain",),
            domains.setup_domstate),
    Command("dumpxml", "domain information in XML", domains.cmd_dumpxml, ("domain",),
            ("domain",), domains.setup_dumpxml),
    Command("ttyconsole", "tty console", domains.cmd_ttyconsole, ("domain",), ("domain",)),
    Command("migrate", "migrate domain to another host", cmd_migrate,
            ("domain", *options.DATA_OPTIONS), ("domain", "desturi"), options.setup_migrate,
            options.DATA_METAVARS, options.DATA_HELP),
    Command("domjobinfo", "domain job information", jobs.cmd_domjobinfo, ("domain",),
            ("domain",), jobs.setup_domjobinfo),
    Command("domjobabort", "abort active domain job", jobs.cmd_domjobabort, ("domain",),
            ("domain",), jobs.setup_postcopy("abort a post-copy migration")),
    Command("migrate-setmaxdowntime", "set maximum tolerable downtime",
            jobs.cmd_migrate_setmaxdowntime, ("domain", "downtime"), ("domain", "downtime"),
            metavars={"downtime": "MS"}),
    Command("migrate-getmaxdowntime", "get maximum tolerable downtime",
            jobs.cmd_migrate_getmaxdowntime, ("domain",), ("domain",)),
    Command("migrate-setspeed", "Set the maximum migration bandwidth",
            jobs.cmd_migrate_setspeed, ("domain", "bandwidth"), ("domain", "bandwidth"),
            jobs.setup_postcopy("set post-copy migration bandwidth"), {"bandwidth": "MiB/s"}),
    Command("migrate-getspeed", "Get the maximum migration bandwidth",
            jobs.cmd_migrate_getspeed, ("domain",), ("domain",),
            jobs.setup_postcopy("get post-copy migration bandwidth")),
    Command("migrate-compcache", "get/set compression cache size", jobs.cmd_migrate_compcache,
            ("domain",), ("domain",), jobs.setup_compcache),
    Command("migrate-postcopy", "Switch running migration from pre-copy to post-copy",
            jobs.cmd_migrate_postcopy, ("domain",), ("domain",)),
    Command("migrate-resolve", "settle a guest whose migration's outcome is unknown",
            domains.cmd_migrate_resolve, ("domain", "desturi"), ("domain",),
            metavars={"desturi": "DESTURI"}),
    Command("migrate-history", "past migrations of this host, newest first",
            history.cmd_migrate_history, ("domain",), (), history.setup_migrate_history),
    Command("event", "Domain Events", jobs.cmd_event, ("domain", "event", "timeout"), (),
            jobs.setup_event, {"event": "TYPE", "timeout": "SECONDS"}),
    Command("hostname", "print the daemon's hostname", host.cmd_hostname),
    Command("version", "show version", host.cmd_version),
    Command("nodeinfo", "node information", host.cmd_nodeinfo, setup=add_json),
    Command("capabilities", "capabilities", host.cmd_capabilities, setup=add_json),
    Command("health", "virtmig: the daemon's gRPC health status (exit 0 only when SERVING)",
            host.cmd_health, setup=host.setup_health),
    Command("pki", "make a CA, or issue a host's or client's TLS certificates (no daemon)",
            pki.cmd_pki, setup=pki.setup_pki),
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
        asyncio.run(run(cmd, ns.connect, args, timeout))
    except CliError as exc:
        for line in exc.lines:
            print_error(line)
        status = 1
    except VirtmigError as exc:
        print_error(str(exc))
        status = 1
    if ran and not quiet:
        # virsh's vshPrintExtra(ctl, "\n") after every command it ran, failed ones too.
        print(flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    """The ``virtmig`` console script: returns the exit status (0 success, 1 failure)."""
    try:
        return _run_main(argv)
    finally:
        if argv is None:
            # The command is over and has reported: a late Ctrl-C (a second one during a
            # migration's abort) must not turn the exit status into a death by SIGINT while
            # the interpreter and gRPC's threads shut down.
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_main(argv: list[str] | None) -> int:
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

