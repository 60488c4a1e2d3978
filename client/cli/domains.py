"""Commands on domains themselves: ``list``, ``define``, ``undefine``, ``start``, the lifecycle
verbs (``destroy``, ``suspend``, ``resume``: :func:`lifecycle`), ``dominfo``, ``domstate``,
``dumpxml`` and ``ttyconsole``, with their options.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

from lxml import etree

from virtmig.client.cli.base import CliError, Handler, Session, act, lookup, read_file
from virtmig.client.cli.output import format_table
from virtmig.client.connection import AsyncConnection, Domain
from virtmig.proto.flags import DomainState


async def cmd_list(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    inactive = bool(args.all or args.inactive)
    active = bool(args.all or not args.inactive)
    doms = await conn.list_domains(active=active, inactive=inactive)
    # virsh's order: running domains by id, then inactive ones by name (case-insensitive).
    doms.sort(key=lambda d: (0, d.id, "") if d.id >= 0 else (1, 0, d.name.lower()))
    rows = [[str(d.id) if d.id >= 0 else "-", d.name, d.state.label] for d in doms]
    sys.stdout.write(format_table(["Id", "Name", "State"], rows))


async def cmd_define(s: Session, args: argparse.Namespace) -> None:
    xml = read_file(args.file)
    conn = await s.conn()
    dom = await act(f"Failed to define domain from {args.file}", conn.define(xml))
    print(f"Domain '{dom.name}' defined from {args.file}")


async def cmd_undefine(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    await act(f"Failed to undefine domain '{dom.name}'", conn.undefine(dom))
    print(f"Domain '{dom.name}' has been undefined")


async def cmd_start(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    if dom.id >= 0:
        raise CliError("Domain is already active")
    await act(f"Failed to start domain '{dom.name}'",
              conn.start(dom, paused=args.paused, force=args.force))
    print(f"Domain '{dom.name}' started")


async def cmd_migrate_resolve(s: Session, args: argparse.Namespace) -> None:
    """Settle a guest whose migration's outcome is unknown: the daemon asks the destination
    (recorded, or DESTURI) now, then resumes the guest or leaves it shut off as migrated."""
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    state, _reason, reason_name, _detail = await act(
        f"Failed to resolve the migration of domain '{dom.name}'",
        conn.resolve_migration(dom, args.desturi or ""))
    print(f"Domain '{dom.name}' resolved: {DomainState(state).label} ({reason_name})")


def lifecycle(verb: str, done: str, call: Callable[[AsyncConnection, Domain], Awaitable[None]]
              ) -> Handler:
    """The handler of a lifecycle verb: ``call`` on the domain, then "Domain 'NAME' DONE"."""

    async def handler(s: Session, args: argparse.Namespace) -> None:
        conn = await s.conn()
        dom = await lookup(conn, args.domain)
        await act(f"Failed to {verb} domain '{dom.name}'", call(conn, dom))
        print(f"Domain '{dom.name}' {done}")

    return handler


async def cmd_dominfo(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    info = await conn.info(dom)
    d = info.domain
    lines = [
        ("Id:", str(d.id) if d.id >= 0 else "-"),
        ("Name:", d.name),
        ("UUID:", d.uuid),
        ("OS Type:", info.os_type),
        ("State:", d.state.label),
        ("CPU(s):", str(info.vcpus)),
    ]
    if info.cpu_time_ns:
        lines.append(("CPU time:", f"{info.cpu_time_ns / 1e9:.1f}s"))
    lines += [
        ("Max memory:", f"{info.max_memory_kib} KiB"),
        ("Used memory:", f"{info.memory_kib} KiB"),
        ("Persistent:", "yes" if d.persistent else "no"),
        ("Autostart:", "disable"),
        ("Managed save:", "no"),
        ("Security model:", "none"),
        ("Security DOI:", "0"),
    ]
    for label, value in lines:
        print(f"{label:<15} {value}")


async def cmd_domstate(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    state, _reason, reason_name, detail = await conn.state_detail(dom)
    label = DomainState(state).label
    if not args.reason:
        print(label)
        return
    # virtmig's words after libvirt's reason: what a guest whose migration's outcome is
    # unknown waits for.
    print(f"{label} ({reason_name})" + (f": {detail}" if detail else ""))


async def cmd_dumpxml(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    xml = await conn.xml_desc(dom, inactive=args.inactive, migratable=args.migratable)
    sys.stdout.write(xml if xml.endswith("\n") else xml + "\n")


def console_tty(xml: str) -> str:
    """The pty of a running domain's console, from its live XML: ``<console tty=>`` (what
    virsh reads), else the ``<source path=>`` of its first pty console or serial port
    (``""``: none)."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    root = etree.fromstring(xml.encode("utf-8"), parser)
    for console in root.iterfind("devices/console"):
        if console.get("tty"):
            return str(console.get("tty"))
    for el in (*root.iterfind("devices/console"), *root.iterfind("devices/serial")):
        source = el.find("source")
        if el.get("type", "pty") == "pty" and source is not None and source.get("path"):
            return str(source.get("path"))
    return ""


async def cmd_ttyconsole(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    tty = console_tty(await conn.xml_desc(dom))
    if not tty:  # virsh fails without a word; say why
        raise CliError(f"domain '{dom.name}' has no pty console (is it running?)")
    print(tty)


def setup_list(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="list inactive & active domains")
    p.add_argument("--inactive", action="store_true", help="list inactive domains")


def setup_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--paused", action="store_true", help="leave the guest paused after creation")
    p.add_argument("--force", action="store_true",
                   help="virtmig: start even if the guest was migrated to a host that runs it "
                        "or cannot be asked (logged by the daemon)")


def setup_domstate(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", action="store_true", help="also print reason for the state")


def setup_dumpxml(p: argparse.ArgumentParser) -> None:
    p.add_argument("--inactive", action="store_true", help="show inactive defined XML")
    p.add_argument("--migratable", action="store_true",
                   help="provide XML suitable for migrations")
