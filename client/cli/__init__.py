"""``virtmig``: the virsh-like command-line client, a thin shell over :class:`AsyncConnection`.

Commands, options, messages and layouts follow virsh's::

    virtmig [-c URI | --connect URI] COMMAND [OPTIONS] [ARGS]

Like virsh, a command's "data" options may be given by name or by position: ``migrate --live
vm1 virtmig+tcp://host-b`` is ``migrate --live --domain vm1 --desturi virtmig+tcp://host-b``.

Every failure is one ``error: <message>`` line (or virsh's two: what failed, then why) on stderr
and exit status 1; a user never sees a Python traceback.  As virsh, a blank line follows every
command that ran (``-q``/``--quiet``: none); virsh's interactive shell is not copied.  Parsing
the command line (``--help``, a mistake) imports no gRPC: the connection modules are imported
when a command first connects.  This package's names are imported on first use, like
``virtmig.client``'s: ``virtmig --help`` and parse errors cost no more than the interpreter and
argparse (issue 17; ``bench/cli_startup.py``).  ``tests/client/test_cli_virsh.py`` holds the
conformance table (virsh's words, read from its sources, against ours).

Ctrl-C during ``migrate`` aborts the migration job (virsh's ``virDomainAbortJob``) and waits for
the migration call to report it; a second Ctrl-C gives up at once.  virtmig's own additions are
marked as such in the help: ``domjobinfo --watch``, the ``job-failed`` event, and ``migrate
--stall-timeout/--completion-timeout/--completion-timeout-action``.

The package, by concern::

    app        the command table, the parsers, main (the ``virtmig`` console script)
    base       errors, virsh's option checks, Session, the Command record, Ctrl-C handling
    parsers    the commands' options (argparse setups), apart from the commands' code
    output     virsh's layouts: tables, capacities, progress line, domjobinfo, events
    jsonout    the read commands' --json shapes (documented in the README)
    options    migrate's options: one table drives its parser and build_migration
    migration  migrate, and the watching around the call (progress, Ctrl-C, --timeout)
    jobs       domjobinfo, domjobabort, downtime/speed, migrate-postcopy, event
    history    migrate-history
    domains    list (virsh's filters), define, undefine, start, destroy/suspend/resume, ...
    host       hostname, version, nodeinfo, capabilities
    pki        pki init/issue: the CA and certificates for mutual TLS (needs no daemon)
"""

from __future__ import annotations

from virtmig.client import _lazy_getattr

TYPE_CHECKING = False  # typing's, without importing typing
if TYPE_CHECKING:
    from virtmig.client.cli.app import (
        COMMANDS,
        COMMANDS_BY_NAME,
        command_parser,
        commands_help,
        main,
        main_parser,
        parse_command,
        run,
    )
    from virtmig.client.cli.base import (
        CliError,
        Command,
        Handler,
        Session,
        UsageError,
        lookup,
        on_sigint,
        read_file,
    )
    from virtmig.client.cli.migration import watch_migration
    from virtmig.client.cli.options import (
        MIGRATE_OPTIONS,
        MigrateOption,
        MigrateOptions,
        Read,
        build_migration,
    )
    from virtmig.client.cli.output import (
        JOB_OPERATION_LABELS,
        JOB_TYPE_LABELS,
        ProgressLine,
        event_timestamp,
        format_event,
        format_job_info,
        format_job_rawstats,
        format_table,
        job_params,
        job_progress,
        pretty_capacity,
        progress_line,
        typed_value,
    )
    from virtmig.client.cli.parsers import EVENT_NAMES

# Where each public name lives: imported on first use (PEP 562), so that the console script's
# ``from virtmig.client.cli import main`` loads the command table and nothing else.
_MODULES = {
    "app": ("COMMANDS", "COMMANDS_BY_NAME", "command_parser", "commands_help", "main",
            "main_parser", "parse_command", "run"),
    "base": ("CliError", "Command", "Handler", "Session", "UsageError", "lookup", "on_sigint",
             "read_file"),
    "migration": ("watch_migration",),
    "options": ("MIGRATE_OPTIONS", "MigrateOption", "MigrateOptions", "Read", "build_migration"),
    "output": ("JOB_OPERATION_LABELS", "JOB_TYPE_LABELS", "ProgressLine", "event_timestamp",
               "format_event", "format_job_info", "format_job_rawstats", "format_table",
               "job_params", "job_progress", "pretty_capacity", "progress_line", "typed_value"),
    "parsers": ("EVENT_NAMES",),
}
_LAZY = {name: f"virtmig.client.cli.{module}" for module, names in _MODULES.items()
         for name in names}


__getattr__ = _lazy_getattr(globals(), _LAZY)


__all__ = [
    "COMMANDS",
    "COMMANDS_BY_NAME",
    "EVENT_NAMES",
    "JOB_OPERATION_LABELS",
    "JOB_TYPE_LABELS",
    "MIGRATE_OPTIONS",
    "CliError",
    "Command",
    "Handler",
    "MigrateOption",
    "MigrateOptions",
    "ProgressLine",
    "Read",
    "Session",
    "UsageError",
    "build_migration",
    "command_parser",
    "commands_help",
    "event_timestamp",
    "format_event",
    "format_job_info",
    "format_job_rawstats",
    "format_table",
    "job_params",
    "job_progress",
    "lookup",
    "main",
    "main_parser",
    "on_sigint",
    "parse_command",
    "pretty_capacity",
    "progress_line",
    "read_file",
    "run",
    "typed_value",
    "watch_migration",
]
