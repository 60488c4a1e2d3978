"""The fleet under test: host-a and host-b running virtmigd, and a client, each a container.

Concern: start the three containers of ``deploy/compose.yaml``'s shape on an ``--internal``
network (nothing leaves it; peers are found by container name), with mutual TLS everywhere, and
give the tests what they look at: the ``virtmig`` CLI in the client, each host's guests and
QEMU processes, a guest's serial console.

* PKI (made on the host with :mod:`virtmig.client.pki`, mounted read-only): a CA, host dirs for
  ``host-a`` and ``host-b`` (``O=virtmig,CN=host-a``: DNS SAN the container name), the client's
  ``O=virtmig,CN=admin``, and ``O=virtmig,CN=intruder``, which the CA signed but the daemons'
  ``tls_allowed_dn_list`` leaves out.
* The daemons read ``deploy/container/virtmigd.toml`` (mounted read-only) plus shorter settle
  and idle-job timeouts (:data:`TEST_SETTINGS`); their state dirs are volumes; the test guest
  (kernel and initrd, built on the host) is shared storage at ``/var/lib/virtmig/images`` on
  both, read-only.
* Addresses: podman 4.3's aardvark-dns stopped answering for a name whose container was
  removed and made again (gRPC's resolver then hung until its deadline), and the peers' ARP
  caches kept the old container's MAC address for minutes (both seen here).  So the network
  has no DNS (``--disable-dns``, ``--dns none``, gRPC's native resolver), every container gets
  a fixed IP and MAC address on it (``--ip``, ``--mac-address``: the same when re-created or
  reconnected) and the others' names in its ``/etc/hosts`` (``--add-host``): names are still
  all anyone looks up.
* A host is ready when its image's health check passes (``podman healthcheck run``: ``virtmig
  health``, the daemon's gRPC health service, SERVING).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.containers.images import CONFIG
from tests.containers.podman import Podman, PodmanError
from virtmig.client import pki as gen
from virtmig.testing import GuestImage, qemu_domain_xml, wait_until_sync

HOSTS = ("host-a", "host-b")
CLIENT = "client"
IMAGES = "/var/lib/virtmig/images"  # shared storage in both hosts (storage_dirs)
STATE = "/var/lib/virtmig"
SOCKET = "/run/virtmig/virtmigd.sock"  # the daemons' unix socket (deploy/container/virtmigd.toml)
XML_DIR = "/xml"  # the client's view of the tests' domain XML
INTRUDER_PKI = "/etc/pki/intruder"
TEST_SETTINGS = """
# tests/containers: settle an unknown outcome soon after the peer is back
settle_retry_max = 5
incoming_job_timeout = 30
"""
HEARTBEAT = re.compile(rb"HEARTBEAT n=(\d+) sum=([0-9a-f]+) ok=([01])")
READY_TIMEOUT = 120.0
CLI_TIMEOUT = 600.0


@dataclass(frozen=True)
class Guest:
    """A test guest: its name and uuid."""

    name: str
    uuid: str


class Fleet:
    """The containers of one run (``start`` makes them, ``Podman.cleanup`` removes them)."""

    def __init__(self, podman: Podman, image: str, workdir: Path, guest: GuestImage) -> None:
        self.podman = podman
        self.image = image
        self.work = workdir
        self.guest_image = GuestImage(Path(IMAGES) / "vmlinuz", Path(IMAGES) / "initrd.cpio",
                                      guest.modules)
        self._host_guest = guest
        self.network = f"{podman.prefix}-net"
        self.volumes = {h: f"{podman.prefix}-{h}-state" for h in HOSTS}
        self.names = {h: f"{podman.prefix}-{h}" for h in (*HOSTS, CLIENT)}
        self.ips: dict[str, str] = {}
        self.macs: dict[str, str] = {}

    # --- setting up --------------------------------------------------------------------------

    def start(self) -> None:
        self._write_files()
        self.podman.network(self.network, "--internal", "--disable-dns")
        subnet = ipaddress.ip_network(self.podman.text(
            "network", "inspect", "--format", "{{range .Subnets}}{{.Subnet}}{{end}}",
            self.network).strip())
        self.ips = {name: str(subnet[10 + i]) for i, name in enumerate((*HOSTS, CLIENT))}
        self.macs = {name: f"02:76:6d:00:00:{10 + i:02x}" for i, name in enumerate(self.ips)}
        for host in HOSTS:
            self.podman.volume(self.volumes[host])
            self.start_host(host)
        self.podman.create(self.names[CLIENT], [
            "--hostname", CLIENT, "--network", self.network, *self._addressing(CLIENT),
            "-v", f"{self.work / 'pki' / 'admin'}:/etc/pki/virtmig:ro",
            "-v", f"{self.work / 'pki' / 'intruder'}:{INTRUDER_PKI}:ro",
            "-v", f"{self.work / 'xml'}:{XML_DIR}:ro",
        ], self.image, ["sleep", "infinity"])
        for host in HOSTS:
            self.wait_ready(host)

    def _addressing(self, name: str) -> list[str]:
        """``name``'s fixed address, and the others' names (module docstring)."""
        hosts = [f"--add-host={n}:{ip}" for n, ip in self.ips.items() if n != name]
        return ["--dns", "none", "-e", "GRPC_DNS_RESOLVER=native", "--ip", self.ips[name],
                "--mac-address", self.macs[name], *hosts]

    def disconnect(self, host: str) -> None:
        self.podman("network", "disconnect", self.network, self.names[host])

    def reconnect(self, host: str) -> None:
        """Connect ``host`` again, at its address (nothing if it is connected)."""
        if self.network in self.podman.text("inspect", "--format",
                                            "{{json .NetworkSettings.Networks}}",
                                            self.names[host]):
            return
        self.podman("network", "connect", "--ip", self.ips[host],
                    "--mac-address", self.macs[host], self.network, self.names[host])

    def _write_files(self) -> None:
        pki = self.work / "pki"
        gen.init_ca(pki / "ca")
        for host in HOSTS:
            gen.issue(pki / "ca", pki / host, host=host)
        gen.issue(pki / "ca", pki / "admin", client="admin")
        gen.issue(pki / "ca", pki / "intruder", client="intruder")
        images = self.work / "images"
        images.mkdir()
        for src, dst in ((self._host_guest.kernel, self.guest_image.kernel),
                         (self._host_guest.initrd, self.guest_image.initrd)):
            shutil.copyfile(src, images / dst.name)
            (images / dst.name).chmod(0o644)
        (self.work / "xml").mkdir()
        (self.work / "virtmigd.toml").write_text(CONFIG.read_text() + TEST_SETTINGS)

    def start_host(self, host: str) -> None:
        """Start ``host``'s container (again, after :meth:`stop_host`: same state volume)."""
        self.podman.create(self.names[host], [
            "--hostname", host, "--network", self.network, *self._addressing(host),
            "-v", f"{self.volumes[host]}:{STATE}",
            "-v", f"{self.work / 'images'}:{IMAGES}:ro",
            "-v", f"{self.work / 'pki' / host}:/etc/pki/virtmig:ro",
            "-v", f"{self.work / 'virtmigd.toml'}:/etc/virtmig/virtmigd.toml:ro",
        ], self.image)

    def stop_host(self, host: str) -> None:
        """Stop ``host``'s daemon (SIGTERM through tini) and remove its container."""
        name = self.names[host]
        self.podman("stop", "-t", "30", name)
        self.podman("rm", name)
        self.podman.containers.remove(name)

    def wait_ready(self, host: str) -> None:
        name = self.names[host]

        def healthy() -> bool:
            return self.podman("healthcheck", "run", name, check=False).returncode == 0

        wait_until_sync(healthy, timeout=READY_TIMEOUT, interval=0.5,
                        what=lambda: f"{host} healthy; log: {self.logs(host)[-2000:]}")

    def logs(self, host: str) -> str:
        return self.podman.text("logs", self.names[host], check=False)

    # --- the client ----------------------------------------------------------------------------

    def virtmig(self, host: str, *args: str, pki: str = "",
                check: bool = True) -> subprocess.CompletedProcess[bytes]:
        """``virtmig -c virtmig+tls://HOST ARGS`` in the client container."""
        uri = f"virtmig+tls://{host}" + (f"?pkipath={pki}" if pki else "")
        done = self.podman("exec", self.names[CLIENT], "virtmig", "-c", uri, *args, check=False,
                           timeout=CLI_TIMEOUT)
        if check and done.returncode:
            raise PodmanError(f"virtmig {' '.join(args)} on {host} exited {done.returncode}: "
                              f"{done.stderr.decode(errors='replace')}")
        return done

    def virtmig_async(self, host: str, *args: str) -> subprocess.Popen[bytes]:
        """The same, started in the background."""
        return subprocess.Popen(
            ["podman", "exec", self.names[CLIENT], "virtmig", "-c", f"virtmig+tls://{host}",
             *args], env=self.podman.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def domains(self, host: str) -> dict[str, str]:
        """``list --all`` on ``host``: name -> state."""
        out = self.virtmig(host, "list", "--all").stdout.decode()
        rows = [line.split(None, 2) for line in out.splitlines()[2:] if line.strip()]
        return {row[1]: row[2].strip() for row in rows if len(row) == 3}

    # --- guests --------------------------------------------------------------------------------

    def define(self, host: str, name: str, *, memory_mib: int = 256, dirty_mb: int = 64,
               dirty_rate: int = 4) -> Guest:
        """Define the heartbeat guest ``name`` on ``host`` (TCG: the test kernel hangs under
        this machine's nested KVM)."""
        guest = Guest(name, str(uuidlib.uuid4()))
        xml = qemu_domain_xml(self.guest_image, name, memory_mib, uuid=guest.uuid,
                              dirty_mb=dirty_mb, dirty_rate=dirty_rate, domain_type="qemu")
        (self.work / "xml" / f"{name}.xml").write_text(xml)
        self.virtmig(host, "define", f"{XML_DIR}/{name}.xml")
        return guest

    def boot(self, host: str, name: str, **kw: int) -> Guest:
        """Define and start ``name`` on ``host``; return once it has sent a heartbeat."""
        guest = self.define(host, name, **kw)
        self.virtmig(host, "start", name)
        self.wait_heartbeat(host, guest, 0)
        return guest

    def serial(self, host: str, guest: Guest) -> bytes:
        """``guest``'s serial console on ``host`` so far (b"" if it never ran there)."""
        path = self._volume_path(host) / "backend" / "qemu" / guest.uuid / "serial0.log"
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""

    def _volume_path(self, host: str) -> Path:
        return Path(self.podman.text("volume", "inspect", "--format", "{{.Mountpoint}}",
                                     self.volumes[host]).strip())

    def heartbeats(self, host: str, guest: Guest) -> list[tuple[int, bool]]:
        return [(int(m.group(1)), m.group(3) == b"1")
                for m in HEARTBEAT.finditer(self.serial(host, guest))]

    def wait_heartbeat(self, host: str, guest: Guest, above: int, timeout: float = 120) -> int:
        """The first heartbeat counter above ``above`` on ``host``'s console."""
        def later() -> int | None:
            beats = [n for n, _ in self.heartbeats(host, guest) if n > above]
            return beats[0] if beats else None

        return wait_until_sync(
            later, timeout=timeout, interval=0.5,
            what=lambda: f"{guest.name} heartbeat above {above} on {host}; serial tail "
                         f"{self.serial(host, guest)[-600:]!r}")

    def last_heartbeat(self, host: str, guest: Guest) -> int:
        beats = self.heartbeats(host, guest)
        return beats[-1][0] if beats else 0

    def qemus(self, host: str) -> list[str]:
        """The QEMU processes in ``host``'s container (their command lines)."""
        out = self.podman.text("top", self.names[host], "args", check=False)
        return [line for line in out.splitlines() if "qemu-system" in line]

    def remove_guest(self, guest: Guest) -> None:
        """Destroy and undefine ``guest`` wherever it is."""
        for host in HOSTS:
            state = self.domains(host).get(guest.name)
            if state is None:
                continue
            if state != "shut off":
                self.virtmig(host, "destroy", guest.name, check=False)
            self.virtmig(host, "undefine", guest.name, check=False)


def migrate_args(name: str, dest: str, extra: Sequence[str] = ()) -> list[str]:
    """``migrate --live --tls --persistent --undefinesource NAME virtmig+tls://DEST``: the guest
    moves whole (its definition too), encrypted."""
    return ["migrate", "--live", "--tls", "--persistent", "--undefinesource", *extra, name,
            f"virtmig+tls://{dest}"]
