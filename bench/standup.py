"""Two hosts on one machine for ``bench/libvirt_vs_virtmig.py``: real libvirtd beside virtmigd.

:class:`Stand` makes two network namespaces joined by one veth pair (a /24 in 10.0.0.0/8 that
exists only inside them), and in each namespace starts

* a libvirtd (Debian's libvirt 9.0) as ``/work/shared/reference/libvirt-on-this-machine.md``
  describes: its own UTS namespace (hostname) and mount namespace, where private copies of
  ``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``, ``/var/cache/libvirt``,
  ``/var/log/libvirt``, ``/etc/hosts``, ``/etc/passwd`` and ``/etc/group`` (the last two with the
  ``libvirt-qemu`` user that libvirtd resolves before it reads ``qemu.conf``) are bind-mounted;
  listening on plain TCP with ``auth_tcp = "none"`` on its namespace's address only; QEMU as root,
  no security driver, no cgroups; run under a subreaper wrapper that reaps the QEMUs libvirtd
  double-forks at once (without it PID 1 here reaps them every ~1.7 s and each teardown waits);
* a virtmigd (backend ``qemu``) listening on mutual TLS on the same address, with a throw-away
  PKI whose host certificates name that address; QEMU as root (as libvirt's), under QEMU's seccomp
  sandbox (as libvirt's default), migration ports beside libvirt's (49216-49279).

Everything started is removed by :meth:`Stand.close` (also after a failure or Ctrl-C): every
process left in the two namespaces is killed (libvirtd, virtmigd, their QEMUs), the namespaces
deleted (the veth pair with them; the private mounts lived in mount namespaces that die with
their processes), the mount-target folders this run created and its working folder removed.
Needs root, ``ip``, ``unshare``, ``libvirtd``, ``virsh`` and ``qemu-system-x86_64``.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from virtmig.client import pki as gen
from virtmig.testing import wait_until_sync

LIBVIRTD = "/usr/sbin/libvirtd"
QEMU = "/usr/bin/qemu-system-x86_64"
#: (host path, private copy's folder name): bind-mounted over in libvirtd's mount namespace
PRIVATE_DIRS = (("/etc/libvirt", "etc"), ("/run/libvirt", "run"), ("/var/lib/libvirt", "lib"),
                ("/var/cache/libvirt", "cache"), ("/var/log/libvirt", "log"))
PRIVATE_FILES = ("/etc/hosts", "/etc/passwd", "/etc/group")
START_TIMEOUT_S = 180.0  # libvirtd's first start probes QEMU's capabilities (~16 s idle)
VIRTMIG_PORTS = "49216-49279"  # libvirt's are 49152-49215

SUBREAPER = '''\
"""libvirtd's parent: a child subreaper that reaps at once whatever dies under it."""
import ctypes, os, signal, sys
ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
child = os.fork()
if child == 0:
    os.execv(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(child, signal.SIGTERM))
signal.signal(signal.SIGINT, lambda *_: os.kill(child, signal.SIGTERM))
while True:
    try:
        pid, _ = os.wait()
    except ChildProcessError:
        break
    if pid == child:
        break
for task in os.listdir("/proc/self/task"):  # what libvirtd left (its QEMUs): kill, reap
    with open(f"/proc/self/task/{task}/children") as f:
        for pid in f.read().split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except OSError:
                pass
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
'''


class Unavailable(Exception):
    """Something this benchmark needs is missing here (the message says what)."""


def check_prerequisites() -> None:
    """Raise :class:`Unavailable` naming what is missing."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (network namespaces, bind mounts)")
    for tool in ("ip", "unshare", "mount", "virsh", LIBVIRTD, QEMU):
        if shutil.which(tool) is None:
            raise Unavailable(f"{tool} is not installed (apt-get install -y libvirt-daemon "
                              "libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86)")
    if not Path("/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/"
                "libvirt_driver_qemu.so").exists():
        raise Unavailable("libvirt's QEMU driver is not installed "
                          "(apt-get install -y libvirt-daemon-driver-qemu)")


@dataclass(frozen=True)
class Side:
    """One host: its network namespace, address, hostname and folder."""

    name: str
    netns: str
    address: str
    folder: Path

    @property
    def hostname(self) -> str:
        return f"bench-{self.name}"

    @property
    def libvirt_uri(self) -> str:
        return f"qemu+tcp://{self.address}/system"

    @property
    def virtmig_uri(self) -> str:
        return f"virtmig+tls://{self.address}"

    def inside(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv]


def _run(argv: list[str], timeout: float = 30.0) -> None:
    subprocess.run(argv, check=True, timeout=timeout, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


class Stand:
    """The two namespaces and the four daemons; :meth:`close` removes all of it."""

    def __init__(self, work: Path, subnet: int = 201) -> None:
        self.work = work
        tag = f"vmb{os.getpid() % 100000}"
        self.sides = tuple(Side(n, f"{tag}-{n}", f"10.{subnet}.0.{i}", work / n)
                           for i, n in ((1, "a"), (2, "b")))
        self.tag = tag
        self.procs: list[subprocess.Popen[bytes]] = []
        self.made_dirs: list[Path] = []
        self.client_pki = work / "pki" / "client"

    # -- network ---------------------------------------------------------------------------

    def make_network(self) -> None:
        a, b = self.sides
        for side in self.sides:
            _run(["ip", "netns", "add", side.netns])
        va, vb = f"{self.tag}a", f"{self.tag}b"
        _run(["ip", "link", "add", va, "netns", a.netns, "type", "veth",
              "peer", "name", vb, "netns", b.netns])
        for side, dev in ((a, va), (b, vb)):
            _run(side.inside(["ip", "addr", "add", f"{side.address}/24", "dev", dev]))
            _run(side.inside(["ip", "link", "set", dev, "up"]))
            _run(side.inside(["ip", "link", "set", "lo", "up"]))

    # -- libvirtd ----------------------------------------------------------------------------

    def _libvirt_files(self, side: Side) -> Path:
        root = side.folder / "libvirt"
        for _host, name in PRIVATE_DIRS:
            (root / name).mkdir(parents=True, exist_ok=True)
        shutil.copytree("/etc/libvirt", root / "etc", dirs_exist_ok=True)
        (root / "etc" / "libvirtd.conf").write_text(
            f'listen_tls = 0\nlisten_tcp = 1\nlisten_addr = "{side.address}"\n'
            'auth_tcp = "none"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'host_uuid = "{uuid.uuid4()}"\n'
            'log_outputs = "3:file:/var/log/libvirt/libvirtd.log"\n')
        (root / "etc" / "qemu.conf").write_text(
            'user = "root"\ngroup = "root"\ndynamic_ownership = 0\nremember_owner = 0\n'
            'security_driver = "none"\ncgroup_controllers = [ ]\nnamespaces = [ ]\n'
            f'stdio_handler = "file"\nmigration_host = "{side.address}"\n'
            f'migration_address = "{side.address}"\n')
        hosts = Path("/etc/hosts").read_text() + "".join(
            f"{s.address} {s.hostname}\n" for s in self.sides)
        (root / "hosts").write_text(hosts)
        passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
        if "\nlibvirt-qemu:" not in "\n" + passwd:
            passwd += "libvirt-qemu:x:64055:64055:Libvirt Qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        for grp, gid in (("libvirt-qemu", 64055), ("libvirt", 64056)):
            if f"\n{grp}:" not in "\n" + group:
                group += f"{grp}:x:{gid}:\n"
        (root / "passwd").write_text(passwd)
        (root / "group").write_text(group)
        return root

    def start_libvirtd(self, side: Side) -> None:
        root = self._libvirt_files(side)
        wrapper = self.work / "subreaper.py"
        wrapper.write_text(SUBREAPER)
        for host, _name in PRIVATE_DIRS:
            if not Path(host).exists():
                Path(host).mkdir(parents=True)
                self.made_dirs.append(Path(host))
        mounts = [f"mount --bind {shlex.quote(str(root / name))} {host}"
                  for host, name in PRIVATE_DIRS]
        mounts += [f"mount --bind {shlex.quote(str(root / Path(f).name))} {f}"
                   for f in PRIVATE_FILES]
        script = " && ".join([f"hostname {side.hostname}", *mounts,
                              f"exec {shlex.quote(sys.executable)} {shlex.quote(str(wrapper))} "
                              f"{LIBVIRTD} --listen --pid-file /run/libvirt/libvirtd.pid "
                              "-f /etc/libvirt/libvirtd.conf"])
        argv = side.inside(["unshare", "--uts", "--mount", "--propagation", "private",
                            "sh", "-c", script])
        with open(side.folder / "libvirtd.stderr", "wb") as err:
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                               stdout=err, stderr=err))

    def wait_libvirtd(self, side: Side) -> None:
        def up() -> bool:
            self._check_alive()
            done = subprocess.run(side.inside(["virsh", "-c", side.libvirt_uri, "version"]),
                                  stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
            return done.returncode == 0
        wait_until_sync(up, timeout=START_TIMEOUT_S, interval=0.5,
                        what=f"libvirtd in {side.netns} to answer")

    # -- virtmigd ----------------------------------------------------------------------------

    def make_pki(self) -> None:
        ca = self.work / "pki" / "ca"
        gen.init_ca(ca)
        for side in self.sides:
            gen.issue(ca, self.work / "pki" / side.name, host=side.hostname,
                      ips=[side.address])
        gen.issue(ca, self.client_pki, client="admin")

    def start_virtmigd(self, side: Side) -> Path:
        folder = side.folder / "virtmig"
        (folder / "images").mkdir(parents=True, exist_ok=True)
        config = folder / "virtmigd.toml"
        config.write_text(
            f'listen = ["tls://{side.address}:16614"]\n'
            f'pki_dir = "{self.work / "pki" / side.name}"\n'
            f'state_dir = "{folder / "state"}"\nhostname = "{side.hostname}"\n'
            'backend = "qemu"\nqemu_user = "root"\n'
            # libvirt is given no --tls either: both migration streams are plain TCP
            'migrate_tls_force = false\n'
            f'migration_ports = "{VIRTMIG_PORTS}"\n'
            f'migration_address = "{side.address}"\nmigration_host = "{side.address}"\n'
            f'storage_dirs = ["{folder / "images"}"]\n'
            f'log_outputs = ["file:{folder / "virtmigd.log"}"]\n')
        ready = folder / "ready.json"
        daemon = str(Path(sys.executable).with_name("virtmigd"))
        env = {**os.environ, "VIRTMIG_RUN_DIR": str(folder / "run")}
        with open(side.folder / "virtmigd.stderr", "wb") as err:
            self.procs.append(subprocess.Popen(
                side.inside([daemon, "--config", str(config), "--ready-file", str(ready)]),
                stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env))
        return ready

    def wait_virtmigd(self, ready: Path) -> None:
        def up() -> bool:
            self._check_alive()
            return ready.exists()
        wait_until_sync(up, timeout=START_TIMEOUT_S, interval=0.1, what="virtmigd to serve")

    def _check_alive(self) -> None:
        """Raise with the daemons' output if one of them exited."""
        if all(p.poll() is None for p in self.procs):
            return
        logs = sorted(self.work.glob("*/*.stderr")) + sorted(self.work.glob("*/*/virtmigd.log"))
        logs += sorted(self.work.glob("*/libvirt/log/libvirtd.log"))
        tails = "".join(f"\n--- {p}:\n" + "\n".join(p.read_text(errors="replace")
                                                     .splitlines()[-15:]) for p in logs)
        raise RuntimeError(f"a daemon exited at start{tails}")

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "VIRTMIG_PKI_DIR": str(self.client_pki)}

    # -- everything ---------------------------------------------------------------------------

    def start(self) -> None:
        self.make_network()
        self.make_pki()
        for side in self.sides:
            self.start_libvirtd(side)
        readies = [self.start_virtmigd(side) for side in self.sides]
        for side, ready in zip(self.sides, readies, strict=True):
            self.wait_virtmigd(ready)
            self.wait_libvirtd(side)

    def close(self) -> None:
        """Kill every process in the namespaces, delete them, remove the folders made."""
        for proc in self.procs:  # libvirtd's wrapper kills its QEMUs; virtmigd stops
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for side in self.sides:
            self._kill_netns(side.netns)
        for path in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                path.rmdir()

    @staticmethod
    def _kill_netns(netns: str) -> None:
        """SIGKILL whatever still runs in ``netns`` (QEMUs outlive virtmigd), then delete it."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
            pids = [int(p) for p in done.stdout.split()]
            if done.returncode != 0 or not pids:
                break
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)  # a SIGKILLed process leaves /proc once its parent reaps it
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
