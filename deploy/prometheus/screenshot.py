"""``make prom-screenshot``: a real Prometheus scrapes two real daemons through a test run, and
headless Chromium screenshots its graph page for the README (``docs/prometheus-*.png``).

Everything runs on loopback, in one temporary dir that is removed at the end:

* a throw-away PKI (a CA; host certificates ``host-a.test`` and ``host-b.test`` for 127.0.0.1;
  client certificates ``admin``, the operator, and ``prometheus``, which may only read);
* two ``virtmigd`` processes (test backend) on ``tls://127.0.0.1``, each with ``metrics_listen``
  on a loopback port (HTTPS with client certificates, as for any TLS daemon);
* ``prometheus`` (Debian's package) with the generated ``prometheus.yml``: job ``virtmig``
  scrapes both endpoints every second over TLS with the ``prometheus`` certificate, and the
  rules of ``deploy/prometheus/virtmig-rules.yml`` are evaluated every second;
* a workload driven with the client library (:class:`~virtmig.client.connection.AsyncConnection`)
  for ``--seconds`` (default 120): five guests that move between the hosts, several at once, by
  regular (client-driven) and peer-to-peer live migrations, with some that fail (a destination
  whose Prepare names a closed loopback port) and some aborted while they stream;
* ``chromium --headless`` (Debian's ``chromium``), confined to loopback (every other host name
  resolves to nothing and every request that is not to 127.0.0.1 goes to a closed loopback
  proxy), screenshots Prometheus' graph page for each query of :data:`PANELS`.

``--config-only DIR`` writes the PKI and ``prometheus.yml`` in ``DIR`` and stops (no daemon, no
Prometheus): ``tests/deploy/test_prometheus_screenshot.py`` checks that file with ``promtool
check config``.  The screenshot run is not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from virtmig.client import pki as gen
from virtmig.client.connection import AsyncConnection
from virtmig.client.migrate import RemoteSource
from virtmig.client.sequence import run_v3
from virtmig.proto.errors import VirtmigError
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, TypedParams
from virtmig.proto.pki import PkiPaths
from virtmig.testing import ClosedPortDest, domain_xml, free_port, wait_job_streaming
from virtmig.testing.wait import wait_until_sync

F = MigrateFlags
HERE = Path(__file__).resolve().parent
RULES = HERE / "virtmig-rules.yml"
BIN = Path(sys.executable).parent
HOSTS = ("host-a", "host-b")
OPERATOR = "admin"
SCRAPER = "prometheus"
GUESTS = 5
SEED = 16


@dataclass(frozen=True)
class Panel:
    """One screenshot: Prometheus' graph of ``expr``, in ``docs/NAME``."""

    name: str
    expr: str
    stacked: bool = False


PANELS = (
    # Migrations that ended in the last minute on the sources, one line per outcome.
    Panel("prometheus-outcomes.png",
          'sum by (outcome) (increase(virtmig_migration_duration_seconds_count'
          '{role="source"}[1m]))'),
    # The sources' migration jobs in flight, stacked by phase (a recording rule of
    # virtmig-rules.yml; no series while none is).
    Panel("prometheus-in-flight.png",
          'sum by (phase) (virtmig:migrations_in_flight:sum{role="source"})', stacked=True),
)


@dataclass(frozen=True)
class Daemon:
    """A ``virtmigd`` process: its control URI and its metrics endpoint (``HOST:PORT``)."""

    proc: subprocess.Popen[bytes]
    uri: str
    metrics: str


# --- set-up -------------------------------------------------------------------------------------


def make_pki(work: Path) -> Path:
    """The CA and PKI dirs ``work/pki/NAME`` (both hosts, the operator, the scraper); returns
    ``work/pki``."""
    pki = work / "pki"
    gen.init_ca(pki / "ca")
    for name in HOSTS:
        gen.issue(pki / "ca", pki / name, host=f"{name}.test", ips=["127.0.0.1"])
    for name in (OPERATOR, SCRAPER):
        gen.issue(pki / "ca", pki / name, client=name)
    return pki


def daemon_config(work: Path, name: str, metrics_port: int) -> Path:
    """``virtmigd --config`` of host ``name``: the operator and the other host (a peer-to-peer
    source) may do anything, the scraper may only read (scrape)."""
    config = work / f"{name}.toml"
    config.write_text(f'pki_dir = "{work / "pki" / name}"\n'
                      'tls_allowed_dn_list = ["O=virtmig,CN=admin", "O=virtmig,CN=host-*"]\n'
                      f'tls_readonly_dn_list = ["O=virtmig,CN={SCRAPER}"]\n'
                      f'metrics_listen = "127.0.0.1:{metrics_port}"\n')
    return config


def start_daemon(work: Path, name: str, ports: str) -> Daemon:
    """``virtmigd`` for host ``name`` on ``tls://127.0.0.1`` (a free port), migration ports
    ``ports``; returns when its ready file is written."""
    ready = work / f"{name}.ready"
    cmd = [str(BIN / "virtmigd"), "--config", str(daemon_config(work, name, free_port())),
           "--listen", "tls://127.0.0.1:0", "--state-dir", str(work / "state" / name),
           "--hostname", f"{name}.test", "--migration-address", "127.0.0.1",
           "--migration-host", "127.0.0.1", "--migration-ports", ports,
           "--ready-file", str(ready), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)

    def started() -> dict[str, object] | None:
        if proc.poll() is not None:
            raise SystemExit(f"virtmigd {name} exited with status {proc.returncode}")
        return json.loads(ready.read_text()) if ready.exists() else None

    info = wait_until_sync(started, timeout=30, what=f"virtmigd {name} to start", interval=0.05)
    addresses = info["addresses"]
    assert isinstance(addresses, list)
    port = str(addresses[0]).rsplit(":", 1)[1]
    return Daemon(proc, f"virtmig+tls://127.0.0.1:{port}", str(info["metrics"]))


def prometheus_config(pki: Path, targets: list[str]) -> str:
    """``prometheus.yml`` (JSON, which is YAML): job ``virtmig`` scrapes ``targets`` every
    second over TLS with the scraper's certificate; the rules are evaluated every second."""
    paths = PkiPaths.of(pki / SCRAPER)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{
            "job_name": "virtmig",
            "scheme": "https",
            "tls_config": {"ca_file": str(paths.cacert), "cert_file": str(paths.clientcert),
                           "key_file": str(paths.clientkey)},
            "static_configs": [{"targets": targets}],
        }],
    }
    return json.dumps(config, indent=2) + "\n"


def start_prometheus(work: Path, config: Path, port: int) -> subprocess.Popen[bytes]:
    """``prometheus`` on ``127.0.0.1:port``, its storage in ``work/tsdb``; returns when ready."""
    proc = subprocess.Popen([
        shutil.which("prometheus") or "prometheus", f"--config.file={config}",
        f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn"])

    def ready() -> bool:
        if proc.poll() is not None:
            raise SystemExit(f"prometheus exited with status {proc.returncode}")
        url = f"http://127.0.0.1:{port}/-/ready"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
        return False

    wait_until_sync(ready, timeout=60, what="prometheus to be ready", interval=0.2)
    return proc


def query(port: int, expr: str) -> list[float]:
    """The values of an instant query (Prometheus' HTTP API on loopback)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.load(r)
    return [float(s["value"][1]) for s in body["data"]["result"]]


# --- the workload -------------------------------------------------------------------------------


@dataclass
class Fleet:
    """Connections to both daemons, where each guest is, and what the run did."""

    conns: list[AsyncConnection]
    uris: list[str]
    where: dict[str, int]
    done: dict[str, int]


async def migrate_once(fleet: Fleet, name: str, kind: str, rng: random.Random) -> None:
    """Migrate guest ``name`` to the other host: ``kind`` ``live`` (client-driven), ``p2p``,
    ``unreachable`` (fails: Prepare names a closed port) or ``abort`` (aborted as it streams)."""
    a = fleet.where[name]
    b = 1 - a
    src, dst = fleet.conns[a], fleet.conns[b]
    params = TypedParams.of({MigrateParam.BANDWIDTH: rng.choice((32, 64, 128))})
    if kind == "live":
        await src.migrate3(name, dst, params, F.LIVE)
    elif kind == "p2p":
        await src.migrate_to_uri3(name, fleet.uris[b], params, F.LIVE | F.PEER2PEER)
    elif kind == "unreachable":
        with contextlib.suppress(VirtmigError):
            await run_v3(RemoteSource(src, True), ClosedPortDest(dst, True), name, params,
                         F.LIVE, protection=True)
            raise SystemExit(f"the migration of {name} to a closed port succeeded")
        return
    else:
        slow = TypedParams.of({MigrateParam.BANDWIDTH: 8})
        task = asyncio.ensure_future(src.migrate3(name, dst, slow, F.LIVE))
        await wait_job_streaming(src, name)
        await src.abort_job(name)
        with contextlib.suppress(VirtmigError):
            await task
            raise SystemExit(f"the aborted migration of {name} succeeded")
        return
    fleet.where[name] = b


async def guest_loop(fleet: Fleet, name: str, until: float, rng: random.Random) -> None:
    """Migrate ``name`` back and forth until ``until`` (the loop's clock), a pause between."""
    loop = asyncio.get_running_loop()
    kinds = ("live",) * 4 + ("p2p",) * 3 + ("unreachable", "abort")
    # Pacing, not synchronisation: the guests start and pause at different times.
    await asyncio.sleep(rng.uniform(0, 8))
    while loop.time() < until:
        kind = rng.choice(kinds)
        await migrate_once(fleet, name, kind, rng)
        fleet.done[kind] = fleet.done.get(kind, 0) + 1
        await asyncio.sleep(rng.uniform(0.5, 4))


async def drive(daemons: list[Daemon], operator: Path, seconds: float) -> dict[str, int]:
    """Guests ``vm1``.. spread over both hosts, migrated for ``seconds``; returns how many
    migrations of each kind ran."""
    conns = [await AsyncConnection.open(d.uri, pki_dir=operator) for d in daemons]
    try:
        fleet = Fleet(conns, [d.uri for d in daemons], {}, {})
        for i in range(GUESTS):
            name, host = f"vm{i + 1}", i % 2
            await conns[host].define(domain_xml(name, 64, dirty_rate_mib=i % 3 + 1))
            await conns[host].start(name)
            fleet.where[name] = host
        rng = random.Random(SEED)
        until = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(guest_loop(fleet, name, until, random.Random(rng.random()))
                               for name in fleet.where))
        for name, host in fleet.where.items():
            await conns[host].destroy(name)
        return fleet.done
    finally:
        for conn in conns:
            await conn.close()


# --- the screenshots ----------------------------------------------------------------------------


def graph_url(port: int, panel: Panel, seconds: int) -> str:
    """Prometheus' graph page of ``panel`` over the last ``seconds``."""
    return f"http://127.0.0.1:{port}/graph?" + urllib.parse.urlencode({
        "g0.expr": panel.expr, "g0.tab": "0", "g0.stacked": str(int(panel.stacked)),
        "g0.show_exemplars": "0", "g0.range_input": f"{seconds}s"})


def screenshot(chromium: str, work: Path, url: str, out: Path) -> None:
    """Headless Chromium's screenshot of ``url`` in ``out``, with no traffic off loopback: host
    names other than 127.0.0.1 resolve to nothing, requests other than to 127.0.0.1 go to a
    closed loopback port (as a proxy), background services are off."""
    closed = free_port()
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={work / 'chromium'}", "--no-first-run", "--no-default-browser-check",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--disable-extensions", "--disable-breakpad",
           "--disable-domain-reliability", "--dns-prefetch-disable",
           "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           f"--proxy-server=127.0.0.1:{closed}", "--proxy-bypass-list=127.0.0.1",
           "--window-size=1400,900", "--virtual-time-budget=10000",
           f"--screenshot={out}", url]
    env = {**os.environ, "HOME": str(work)}
    subprocess.run(cmd, check=True, env=env, timeout=120, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    if not out.exists():
        raise SystemExit(f"chromium wrote no screenshot for {url}")


# --- main ---------------------------------------------------------------------------------------


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(args: argparse.Namespace, work: Path) -> None:
    pki = make_pki(work)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        daemons = [start_daemon(work, "host-a", "49152-49183"),
                   start_daemon(work, "host-b", "49184-49215")]
        procs += [d.proc for d in daemons]
        config = work / "prometheus.yml"
        config.write_text(prometheus_config(pki, [d.metrics for d in daemons]))
        port = free_port()
        procs.append(start_prometheus(work, config, port))
        started = time.monotonic()
        wait_until_sync(lambda: query(port, "up") == [1.0, 1.0], timeout=60, interval=0.5,
                        what="prometheus to scrape both daemons")
        done = asyncio.run(drive(daemons, pki / OPERATOR, args.seconds))
        print(f"prom-screenshot: migrations run: {done}", flush=True)
        # Until a scrape and a rule evaluation after the run saw no migration in flight (a
        # daemon exports no in-flight series then: the query's result is empty).
        wait_until_sync(lambda: query(port, "sum(virtmig:migrations_in_flight:sum)") == [],
                        timeout=30, interval=0.5, what="prometheus to see the run's end")
        # The graph's range: the whole time Prometheus ran, to the next 10 s.
        seconds = math.ceil((time.monotonic() - started) / 10) * 10
        for panel in PANELS:
            out = args.out_dir / panel.name
            screenshot(args.chromium, work, graph_url(port, panel, seconds), out)
            print(f"prom-screenshot: {out} ({out.stat().st_size} bytes): {panel.expr}",
                  flush=True)
    finally:
        stop(procs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=120, help="length of the workload")
    parser.add_argument("--out-dir", type=Path, default=HERE.parents[1] / "docs",
                        help="where the PNGs go (default: docs/)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--config-only", type=Path, metavar="DIR",
                        help="write the PKI and prometheus.yml (targets on closed loopback "
                             "ports) in DIR, start nothing")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        parser.error(f"--seconds must be in (0, 3600], not {args.seconds:g}")
    if args.config_only is not None:
        pki = make_pki(args.config_only)
        targets = [f"127.0.0.1:{free_port()}" for _ in HOSTS]
        (args.config_only / "prometheus.yml").write_text(prometheus_config(pki, targets))
        return 0
    for tool in ("prometheus", args.chromium):
        if shutil.which(tool) is None:
            print(f"prom-screenshot: {tool} is not installed (Debian packages prometheus, "
                  "chromium)", file=sys.stderr)
            return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="virtmig-promshot-") as tmp:
        run(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
