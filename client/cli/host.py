"""Commands on the daemon's host: ``hostname``, ``version`` and ``nodeinfo`` (with the features
and migration protocols the daemon advertises)."""

from __future__ import annotations

import argparse

from virtmig import __version__
from virtmig.client.cli.base import Session
from virtmig.proto.flags import protocols_of


async def cmd_hostname(s: Session, args: argparse.Namespace) -> None:
    print((await (await s.conn()).host()).hostname)


async def cmd_version(s: Session, args: argparse.Namespace) -> None:
    host = await (await s.conn()).host()
    print(f"Compiled against library: virtmig {__version__}")
    print(f"Using library: virtmig {__version__}")
    print(f"Using API: virtmig {host.version}")
    print(f"Running hypervisor: {host.backend} {host.version}")


async def cmd_nodeinfo(s: Session, args: argparse.Namespace) -> None:
    host = await (await s.conn()).host()
    lines = [
        ("CPU model:", host.arch),
        ("CPU(s):", str(host.cpus)),
        ("Memory size:", f"{host.memory_kib} KiB"),
        ("Host UUID:", host.host_uuid),
        ("Backend:", host.backend),
        ("Features:", " ".join(sorted(host.features))),
        ("Migration protocols:", " ".join(protocols_of(host.features)) or "none"),
    ]
    for label, value in lines:
        print(f"{label:<20} {value}")

