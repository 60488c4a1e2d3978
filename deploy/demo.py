"""``make demo``: two daemons on loopback, one 256 MiB guest, live-migrated with the CLI, all
over mutual TLS.

Makes a throw-away PKI with ``virtmig pki`` (a CA, a certificate for each host, one for the
operator), starts ``virtmigd`` twice on ``tls://127.0.0.1`` (free ports, separate state dirs,
different host UUIDs and hostnames, each with its own certificate), defines and starts a guest on
the first, runs ``virtmig migrate --live --tls --verbose`` to the second (the daemons refuse a
migration whose data stream is not TLS: ``migrate_tls_force``), shows ``virtmig list --all``
on both, stops the daemons.  Everything lives in a temporary dir.  Exits non-zero if any step
fails.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
GUEST = """\
<domain type='test'>
  <name>demo-vm</name>
  <memory unit='MiB'>256</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <metadata>
    <!-- the test backend's guest dirties 32 MiB of its memory per second -->
    <virtmig:guest xmlns:virtmig="urn:virtmig:domain:1" dirty-rate-mib="32"/>
  </metadata>
  <devices>
    <serial type='pty'><target port='0'/></serial>
  </devices>
</domain>
"""


def show(*cmd: str) -> None:
    print(f"$ {' '.join(shlex.quote(c) for c in cmd)}", flush=True)


def make_pki(work: Path) -> Path:
    """A CA, a PKI dir per host (``work/pki/NAME``), and the operator's (returned)."""
    pki = work / "pki"
    ca = pki / "ca"
    for args in (["pki", "init", str(ca)],
                 *(["pki", "issue", str(ca), "--host", f"{name}.demo", "--ip", "127.0.0.1",
                    "--out", str(pki / name)] for name in ("host-a", "host-b")),
                 ["pki", "issue", str(ca), "--client", "operator", "--out", str(pki / "me")]):
        show("virtmig", *args)
        subprocess.run([str(BIN / "virtmig"), *args], check=True, stdout=subprocess.DEVNULL)
    return pki / "me"


def start_daemon(work: Path, name: str, ports: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = work / f"{name}.ready"
    config = work / f"{name}.toml"
    # Full access for the operator and for the other host (a peer-to-peer source); migration
    # streams must be TLS too (the data channel, not only the control channel).
    config.write_text(f'pki_dir = "{work / "pki" / name}"\n'
                      'tls_allowed_dn_list = ["O=virtmig,CN=operator", "O=virtmig,CN=host-*"]\n'
                      'migrate_tls_force = true\n')
    cmd = [
        str(BIN / "virtmigd"),
        "--config", str(config),
        "--listen", "tls://127.0.0.1:0",
        "--listen", f"unix://{work / 'run' / name}/virtmigd.sock",
        "--state-dir", str(work / "state" / name),
        "--hostname", f"{name}.demo",
        "--migration-address", "127.0.0.1",
        "--migration-host", "127.0.0.1",
        "--migration-ports", ports,
        "--ready-file", str(ready),
        "--log-level", "warning",
    ]
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"virtmigd {name} did not start")
        time.sleep(0.05)
    addresses = json.loads(ready.read_text())["addresses"]
    port = next(a for a in addresses if not a.startswith("unix:")).rsplit(":", 1)[1]
    return proc, f"virtmig+tls://127.0.0.1:{port}"


def virtmig(uri: str, *args: str) -> None:
    show("virtmig", "-c", uri, *args)
    subprocess.run([str(BIN / "virtmig"), "-c", uri, *args], check=True)


def main() -> int:
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="virtmig-demo-") as tmp:
        work = Path(tmp)
        try:
            operator = make_pki(work)
            # The CLI's certificates (a URI's ?pkipath=DIR would do the same for one command).
            os.environ["VIRTMIG_PKI_DIR"] = str(operator)
            show("export", f"VIRTMIG_PKI_DIR={operator}")
            src_proc, src = start_daemon(work, "host-a", "49152-49183")
            procs.append(src_proc)
            dst_proc, dst = start_daemon(work, "host-b", "49184-49215")
            procs.append(dst_proc)
            xml = work / "demo-vm.xml"
            xml.write_text(GUEST)
            virtmig(src, "nodeinfo")
            virtmig(src, "define", str(xml))
            virtmig(src, "start", "demo-vm")
            virtmig(src, "list", "--all")
            # 200 MiB/s keeps the transfer visible for a moment in the progress line
            virtmig(src, "migrate", "--live", "--tls", "--verbose", "--bandwidth", "200", "demo-vm",
                    dst)
            print("--- host-a", flush=True)
            virtmig(src, "list", "--all")
            virtmig(src, "domstate", "--reason", "demo-vm")
            print("--- host-b", flush=True)
            virtmig(dst, "list", "--all")
            virtmig(dst, "domstate", "--reason", "demo-vm")
        except subprocess.CalledProcessError as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    print("demo: guest live-migrated from host-a to host-b, control and data over mutual TLS",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
