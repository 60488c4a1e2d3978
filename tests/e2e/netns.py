"""Test hosts in network namespaces: two namespaces joined by a veth pair, daemons inside.

Addresses (10.213.x.0/24) exist only inside the namespaces, which have no default route: no
packet of these tests can leave the machine.  Everything is removed by name/pid afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from virtmig.testing import wait_until_sync
from virtmig.testing.pki import session_pki


def netns_available() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is missing"
    probe = f"vmprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


@dataclass
class Netns:
    name: str
    address: str
    iface: str


@dataclass
class NetPair:
    """Two namespaces ``a`` and ``b`` on one link; ``link_down`` partitions them."""

    a: Netns
    b: Netns
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @classmethod
    def create(cls, tag: str, subnet: int) -> NetPair:
        a = Netns(f"vm{tag}a", f"10.213.{subnet}.1", f"vm{tag}a0")
        b = Netns(f"vm{tag}b", f"10.213.{subnet}.2", f"vm{tag}b0")
        net = cls(a, b)
        try:
            for ns in (a, b):
                sh("ip", "netns", "add", ns.name)
                sh("ip", "-n", ns.name, "link", "set", "lo", "up")
            sh("ip", "link", "add", a.iface, "netns", a.name, "type", "veth", "peer", "name",
               b.iface, "netns", b.name)
            for ns in (a, b):
                sh("ip", "-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", ns.iface)
                sh("ip", "-n", ns.name, "link", "set", ns.iface, "up")
        except BaseException:
            net.destroy()
            raise
        return net

    def start_daemon(self, ns: Netns, work: Path) -> str:
        """Start virtmigd inside ``ns`` (TLS on its address, with a host certificate for it);
        return its unix-socket URI (reachable from here)."""
        ready = work / f"{ns.name}.ready"
        sock = work / f"{ns.name}.sock"
        config = session_pki().config(work / f"{ns.name}.toml", ns.name, ips=[ns.address])
        proc = subprocess.Popen([
            "ip", "netns", "exec", ns.name, sys.executable, "-m", "virtmig.daemon.main",
            "--config", str(config),
            "--listen", f"tls://{ns.address}:16614", "--listen", f"unix://{sock}",
            "--state-dir", str(work / ns.name), "--hostname", f"{ns.name}.test",
            "--migration-address", ns.address, "--migration-host", ns.address,
            "--ready-file", str(ready), "--log-level", "warning",
        ], env=dict(os.environ, PYTHONPATH=os.getcwd()))
        self.procs.append(proc)

        def started() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"virtmigd exited with {proc.returncode} in {ns.name}")
            return ready.exists()

        wait_until_sync(started, timeout=30, interval=0.05, what=f"virtmigd to start in {ns.name}")
        json.loads(ready.read_text())
        return f"virtmig+unix://{sock}"

    def tls_uri(self, ns: Netns) -> str:
        """The daemon in ``ns`` as the other daemon reaches it (peer-to-peer)."""
        return f"virtmig+tls://{ns.address}:16614"

    def link_down(self) -> None:
        sh("ip", "-n", self.a.name, "link", "set", self.a.iface, "down")

    def destroy(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in (self.a, self.b):
            subprocess.run(["ip", "netns", "delete", ns.name], capture_output=True)
