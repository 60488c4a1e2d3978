"""Commands on the daemon's host: ``hostname``, ``version``, ``nodeinfo`` (with the features
and migration protocols the daemon advertises), ``capabilities`` (virsh's capabilities XML:
the host, its migration transports, the guests it runs) and virtmig's ``health`` (the daemon's
gRPC health service, :mod:`virtmig.client.health`: exit status 0 only when SERVING)."""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET

from virtmig import __version__
from virtmig.client.cli.base import CliError, Session
from virtmig.client.cli.jsonout import (
    URI_TRANSPORTS,
    capabilities_json,
    dumps,
    health_json,
    host_json,
)
from virtmig.client.values import HostInfo
from virtmig.proto.errors import VirtmigError
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
    if args.json:
        sys.stdout.write(dumps(host_json(host)))
        return
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



def capabilities_xml(host: HostInfo) -> str:
    """libvirt's capabilities XML, as much of it as a virtmig daemon has."""
    caps = ET.Element("capabilities")
    h = ET.SubElement(caps, "host")
    ET.SubElement(h, "uuid").text = host.host_uuid
    cpu = ET.SubElement(h, "cpu")
    ET.SubElement(cpu, "arch").text = host.arch
    ET.SubElement(cpu, "topology", sockets="1", cores=str(host.cpus), threads="1")
    migration = ET.SubElement(h, "migration_features")
    ET.SubElement(migration, "live")
    transports = ET.SubElement(migration, "uri_transports")
    for name in URI_TRANSPORTS:
        ET.SubElement(transports, "uri_transport").text = name
    guest = ET.SubElement(caps, "guest")
    ET.SubElement(guest, "os_type").text = "hvm"
    arch = ET.SubElement(guest, "arch", name=host.arch)
    ET.SubElement(arch, "domain", type=host.backend)
    ET.indent(caps, space="  ")
    return ET.tostring(caps, encoding="unicode") + "\n"


async def cmd_capabilities(s: Session, args: argparse.Namespace) -> None:
    host = await (await s.conn()).host()
    sys.stdout.write(dumps(capabilities_json(host)) if args.json else capabilities_xml(host))


async def cmd_health(s: Session, args: argparse.Namespace) -> None:
    """Print the daemon's health status; fail (exit 1, no error line) unless SERVING."""
    # Imported here, not at the top: parsing a command line (and --help) loads no gRPC.
    from virtmig.client.health import check_health, check_service_name

    service = check_service_name(args.service)
    try:
        health = await check_health(s.uri, service, timeout=s.timeout)
    except VirtmigError as exc:
        raise CliError("failed to connect to the hypervisor", str(exc)) from None
    if args.json:
        sys.stdout.write(dumps(health_json(health)))
    else:
        print(health.status)
    if not health.serving:
        raise CliError()
