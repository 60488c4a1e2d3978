"""Commands on domains themselves: ``list``, ``define``, ``undefine``, ``start``, the lifecycle
verbs (``destroy``, ``suspend``, ``resume``: :func:`lifecycle`), ``dominfo``, ``domstate``,
``dumpxml`` and ``ttyconsole`` (their options: :mod:`virtmig.client.cli.parsers`).
"""

from __future__ import annotations

import argparse
import contextlib
import operator
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from virtmig.client.cli.base import (
    CliError,
    Handler,
    Session,
    act,
    exclusive,
    lookup,
    read_file,
)
from virtmig.client.cli.jsonout import domain_json, dominfo_json, dumps, state_json
from virtmig.client.cli.output import format_table
from virtmig.client.values import Domain
from virtmig.proto.errors import NoDomain, OperationFailed, VirtmigError
from virtmig.proto.flags import DomainState, reason_label

if TYPE_CHECKING:
    from virtmig.client.connection import AsyncConnection
    from virtmig.proto import virtmig_pb2 as pb

_STATE_FILTERS = (("state_running", (DomainState.RUNNING,)),
                  ("state_paused", (DomainState.PAUSED,)),
                  ("state_shutoff", (DomainState.SHUTOFF,)),
                  ("state_other", tuple(s for s in DomainState if s not in (
                      DomainState.RUNNING, DomainState.PAUSED, DomainState.SHUTOFF))))


_ID = operator.attrgetter("id")


def list_filter(args: argparse.Namespace) -> Callable[[Domain | pb.Domain], bool] | None:
    """virsh's ``list`` filters: within a group (states; persistent/transient) any may match,
    and every group given must match (libvirt's ``VIR_CONNECT_LIST_DOMAINS_*``); None when
    none is given."""
    states = {int(s) for name, group in _STATE_FILTERS if getattr(args, name) for s in group}
    persistence = {flag for flag, name in ((True, "persistent"), (False, "transient"))
                   if getattr(args, name)}
    if not states and not persistence:
        return None

    def keep(d: Domain | pb.Domain) -> bool:
        return (not states or d.state in states) and (
            not persistence or d.persistent in persistence)

    return keep


async def cmd_list(s: Session, args: argparse.Namespace) -> None:
    exclusive(args, "table", "name")
    exclusive(args, "table", "uuid")
    conn = await s.conn()
    # virsh: --inactive or --state-shutoff list the inactive domains instead; --all both.
    inactive = bool(args.all or args.inactive or args.state_shutoff)
    active = bool(args.all or not inactive)
    keep = list_filter(args)
    # The wire messages, read as they are (100,000 of them cost more as Domain values).
    listed = await conn.list_domain_msgs(active=active, inactive=inactive)
    if keep is not None:
        listed = [d for d in listed if keep(d)]
    # virsh's order: running domains by id, then inactive ones by name (case-insensitive).
    up = sorted((d for d in listed if d.id >= 0), key=_ID)
    down = [d for d in listed if d.id < 0]
    down.sort(key=lambda d: d.name.lower())
    doms = up + down
    if args.json:
        sys.stdout.write(dumps([domain_json(Domain.from_msg(d)) for d in doms]))
    elif args.name or args.uuid:
        for d in doms:
            print(" ".join(([d.uuid] if args.uuid else []) + ([d.name] if args.name else [])))
    else:
        label = {int(s): s.label for s in DomainState}
        rows = [(str(d.id) if d.id >= 0 else "-", d.name,
                 label.get(d.state) or DomainState(d.state).label) for d in doms]
        sys.stdout.write(format_table(["Id", "Name", "State"], rows))


async def cmd_define(s: Session, args: argparse.Namespace) -> None:
    xml = read_file(args.file)
    conn = await s.conn()
    dom = await act(f"Failed to define domain from {args.file}", conn.define(xml))
    print(f"Domain '{dom.name}' defined from {args.file}")


def _xml_name(xml: str) -> str | None:
    """The ``<name>`` of a domain XML, if it has one (the daemon checks the rest)."""
    import xml.etree.ElementTree as ET  # not at import time: only `create` needs it

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    name = root.findtext("name")
    return name.strip() if name else None


async def cmd_create(s: Session, args: argparse.Namespace) -> None:
    """virsh's ``create``: a transient domain, started from the file.  virtmig has no RPC for
    it: the domain is defined, started and undefined (a running domain that is undefined
    stays, transient); a failure undoes what was done, and a name in use is refused first."""
    xml = read_file(args.file)
    conn = await s.conn()
    what = f"Failed to create domain from {args.file}"
    name = _xml_name(xml)
    if name:
        with contextlib.suppress(NoDomain):
            other = await conn.lookup(name)
            raise CliError(what, str(OperationFailed(
                f"domain '{name}' already exists with uuid {other.uuid}")))
    dom = await act(what, conn.define(xml))
    try:
        await act(what, conn.start(dom, paused=args.paused))
    except BaseException:
        with contextlib.suppress(VirtmigError):
            await conn.undefine(dom)
        raise
    await act(what, conn.undefine(dom))
    print(f"Domain '{dom.name}' created from {args.file}")


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
    state, reason, _reason_name, _detail = await act(
        f"Failed to resolve the migration of domain '{dom.name}'",
        conn.resolve_migration(dom, args.desturi or ""))
    print(f"Domain '{dom.name}' resolved: {DomainState(state).label} "
          f"({reason_label(state, reason)})")


def lifecycle(verb: str, done: str, call: Callable[[AsyncConnection, Domain], Awaitable[None]]
              ) -> Handler:
    """The handler of a lifecycle verb: ``call`` on the domain, then "Domain 'NAME' DONE"."""

    async def handler(s: Session, args: argparse.Namespace) -> None:
        conn = await s.conn()
        dom = await lookup(conn, args.domain)
        await act(f"Failed to {verb} domain '{dom.name}'", call(conn, dom))
        print(f"Domain '{dom.name}' {done}")

    return handler


cmd_destroy = lifecycle("destroy", "destroyed", lambda c, d: c.destroy(d))
cmd_suspend = lifecycle("suspend", "suspended", lambda c, d: c.suspend(d))
cmd_resume = lifecycle("resume", "resumed", lambda c, d: c.resume(d))


async def cmd_dominfo(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    info = await conn.info(dom)
    if args.json:
        sys.stdout.write(dumps(dominfo_json(info)))
        return
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
    state, reason, _reason_name, detail = await conn.state_detail(dom)
    if args.json:
        sys.stdout.write(dumps({**state_json(state, reason), "detail": detail}))
        return
    label = DomainState(state).label
    if not args.reason:
        print(label)
        return
    # virtmig's words after virsh's reason: what a guest whose migration's outcome is
    # unknown waits for.
    print(f"{label} ({reason_label(state, reason)})" + (f": {detail}" if detail else ""))


async def cmd_dumpxml(s: Session, args: argparse.Namespace) -> None:
    conn = await s.conn()
    dom = await lookup(conn, args.domain)
    xml = await conn.xml_desc(dom, inactive=args.inactive, migratable=args.migratable,
                              secure=args.security_info)
    sys.stdout.write(xml if xml.endswith("\n") else xml + "\n")


def console_tty(xml: str) -> str:
    """The pty of a running domain's console, from its live XML: ``<console tty=>`` (what
    virsh reads), else the ``<source path=>`` of its first pty console or serial port
    (``""``: none)."""
    from lxml import etree  # not at import time: `virtmig --help` loads no lxml

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
