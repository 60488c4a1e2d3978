"""The commands' argparse options (their ``setup`` functions), apart from the command modules.

``virtmig --help``, ``help COMMAND`` and a parse error build a command's parser without running
it, and must cost no more than the interpreter plus argparse (issue 17): so the options live here,
in a module that imports argparse and :mod:`~virtmig.client.cli.base` only, while the command
modules (:mod:`~virtmig.client.cli.domains`, :mod:`~virtmig.client.cli.jobs`, ...) with their
values, protobuf messages and gRPC are imported when a command runs.  ``migrate``'s options are
:mod:`~virtmig.client.cli.options`' table (its parser imports that module); its data options, which
the command table needs, are :data:`MIGRATE_DATA` here.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from virtmig.client.cli.base import add_json

# ``event --event`` names: libvirt's, plus virtmig's ``job-failed``.
EVENT_NAMES = ("lifecycle", "migration-iteration", "job-completed", "job-failed")

# ``migrate``'s virsh "data" options after ``domain`` (by name or by position, in this order):
# name as virsh spells it, metavar, help.  :data:`virtmig.client.cli.options.MIGRATE_OPTIONS`
# begins with these rows.
MIGRATE_DATA: tuple[tuple[str, str, str], ...] = (
    ("desturi", "DESTURI", "connection URI of the destination host as seen from the client "
                           "(normal migration) or source (p2p migration)"),
    ("migrateuri", "URI", "migration URI, usually can be omitted"),
    ("graphicsuri", "URI", "graphics URI to be used for seamless graphics migration"),
    ("listen-address", "ADDR",
     "listen address that destination should bind to for incoming migration"),
    ("dname", "NAME", "rename to new name during migration (if supported)"),
)


def setup_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inactive", action="store_true", help="list inactive domains")
    p.add_argument("--all", action="store_true", help="list inactive & active domains")
    p.add_argument("--transient", action="store_true", help="list transient domains")
    p.add_argument("--persistent", action="store_true", help="list persistent domains")
    p.add_argument("--state-running", action="store_true",
                   help="list domains in running state")
    p.add_argument("--state-paused", action="store_true", help="list domains in paused state")
    p.add_argument("--state-shutoff", action="store_true",
                   help="list domains in shutoff state")
    p.add_argument("--state-other", action="store_true", help="list domains in other states")
    p.add_argument("--uuid", action="store_true", help="list uuid's only")
    p.add_argument("--name", action="store_true", help="list domain names only")
    p.add_argument("--table", action="store_true", help="list table (default)")
    add_json(p)


def setup_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paused", action="store_true", help="leave the guest paused after creation")


def setup_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paused", action="store_true", help="leave the guest paused after creation")
    p.add_argument("--force", action="store_true",
                   help="virtmig: start even if the guest was migrated to a host that runs it "
                        "or cannot be asked (logged by the daemon)")


def setup_domstate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", action="store_true", help="also print reason for the state")
    add_json(p)


def setup_dumpxml(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inactive", action="store_true", help="show inactive defined XML")
    p.add_argument("--migratable", action="store_true",
                   help="provide XML suitable for migrations")
    p.add_argument("--security-info", action="store_true",
                   help="include security sensitive information in XML dump")


def setup_domjobinfo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--completed", action="store_true",
                   help="return statistics of a recently completed job")
    p.add_argument("--keep-completed", action="store_true",
                   help="don't destroy statistics of a recently completed job when reading")
    p.add_argument("--anystats", action="store_true",
                   help="print statistics for any kind of job (even failed ones)")
    p.add_argument("--rawstats", action="store_true",
                   help="print the raw data returned by libvirt")
    p.add_argument("--watch", action="store_true",
                   help="virtmig: print the job's information each time it changes, until "
                        "the job ends")
    add_json(p)


def setup_compcache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", metavar="BYTES",
                   help="requested size of the cache (in bytes) used for compression")


def setup_postcopy(help_text: str) -> Callable[[argparse.ArgumentParser], None]:
    def setup(p: argparse.ArgumentParser) -> None:
        p.add_argument("--postcopy", action="store_true", help=help_text)

    return setup


def setup_event(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true",
                   help="wait for all events instead of just one type")
    p.add_argument("--loop", action="store_true",
                   help="loop until timeout or interrupt, rather than one-shot")
    p.add_argument("--list", action="store_true", help="list valid event types")
    p.add_argument("--timestamp", action="store_true",
                   help="show timestamp for each printed event")
    p.add_argument("--json", action="store_true",
                   help="virtmig: print each event as one line of JSON (shape in the README)")


def setup_health(p: argparse.ArgumentParser) -> None:
    p.add_argument("--service", metavar="NAME", default="",
                   help="the service to ask about, e.g. virtmig.v1.Migration (default: the "
                        "daemon as a whole)")
    add_json(p)


def setup_migrate_history(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", metavar="N", help="show the N newest migrations only")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array of the history's entries")
