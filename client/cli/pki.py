"""``virtmig pki``: make a CA, and issue the PKI dirs that mutual TLS loads (virtmig's own
command; virsh has none).  It needs no daemon and opens no connection::

    virtmig pki init CA_DIR [--cn NAME] [--org ORG] [--days N]
    virtmig pki issue CA_DIR (--host NAME [--ip ADDR]... | --client NAME) --out DIR
                      [--days N] [--force]

The certificate code (:mod:`virtmig.client.pki`, and with it ``cryptography``) is imported only
when this command runs: every other command starts without it.
"""

from __future__ import annotations

import argparse

from virtmig.client.cli.base import Session, UsageError, exclusive, number, option, require

USAGE = """\
%(prog)s init CA_DIR [--cn NAME] [--org ORG] [--days N]
       %(prog)s issue CA_DIR (--host NAME [--ip ADDR]... | --client NAME) --out DIR
                   [--days N] [--force]"""

# The options each action takes (--days: both).
_INIT_ONLY = ("cn", "org")
_ISSUE_ONLY = ("host", "ip", "client", "out", "force")


def setup_pki(p: argparse.ArgumentParser) -> None:
    from virtmig.client import pki

    p.usage = USAGE
    p.add_argument("action", choices=("init", "issue"), metavar="ACTION",
                   help="init: make a CA in CA_DIR; issue: sign a certificate with it and "
                        "write a PKI dir")
    p.add_argument("ca_dir", metavar="CA_DIR", help="the CA's directory")
    p.add_argument("--days", metavar="N",
                   help=f"validity in days (default: {pki.DEFAULT_CA_DAYS} for a CA, "
                        f"{pki.DEFAULT_LEAF_DAYS} for a certificate)")
    init = p.add_argument_group("init")
    init.add_argument("--cn", metavar="NAME",
                      help=f"the CA's common name (default: {pki.DEFAULT_CA_CN})")
    init.add_argument("--org", metavar="ORG",
                      help=f"the organization in every certificate (default: {pki.DEFAULT_ORG})")
    issue = p.add_argument_group("issue")
    issue.add_argument("--host", metavar="NAME",
                       help="a daemon's host name: a certificate usable as server and as client")
    issue.add_argument("--ip", metavar="ADDR", action="append", default=[],
                       help="an IP address of the host, as a subject alternative name "
                            "(repeatable)")
    issue.add_argument("--client", metavar="NAME", help="a client-only certificate for NAME")
    issue.add_argument("--out", metavar="DIR", help="the PKI dir to write")
    issue.add_argument("--force", action="store_true", help="overwrite existing files")


async def cmd_pki(s: Session, args: argparse.Namespace) -> None:
    from virtmig.client import pki

    for name in _ISSUE_ONLY if args.action == "init" else _INIT_ONLY:
        if getattr(args, name):
            raise UsageError(f"Option --{option(name)} is not valid with 'pki {args.action}'")
    if args.action == "init":
        days = _days(args, pki.DEFAULT_CA_DAYS, pki.MAX_DAYS)
        written = pki.init_ca(args.ca_dir, common_name=args.cn or pki.DEFAULT_CA_CN,
                              org=args.org or pki.DEFAULT_ORG, days=days)
    else:
        exclusive(args, "host", "client")
        require(args, "ip", "host")
        if not args.host and not args.client:
            raise UsageError("command 'pki issue' requires <host> or <client> option")
        if not args.out:
            raise UsageError("command 'pki issue' requires <out> option")
        days = _days(args, pki.DEFAULT_LEAF_DAYS, pki.MAX_DAYS)
        written = pki.issue(args.ca_dir, args.out, host=args.host, ips=args.ip,
                            client=args.client, days=days, force=args.force)
    for f in written:
        print(f"wrote {f.path} ({f.what})")


def _days(args: argparse.Namespace, default: int, most: int) -> int:
    return default if args.days is None else number("days", args.days, 1, most)
