"""The fault-injection harness: two ``virtmigd`` processes with the qemu backend in two network
namespaces, a migration client process, the faults, and the invariant.

* :class:`Lab`: the namespaces (:class:`tests.e2e.netns.NetPair`: a veth link, addresses that
  exist only inside them) and one :class:`DaemonProc` in each, over mutual TLS with the session's
  throw-away PKI; QEMU confined as the tests' unprivileged user.  A daemon is killed with SIGKILL
  and restarted with the same state dir, config and command line; the link is cut and restored
  with ``ip link set ... down/up`` on host A's end.  ``VIRTMIG_TEST_STALL`` (test-only, see
  :mod:`virtmig.daemon.stall`) can be given to a daemon's start.
* :class:`ClientProc`: the migration client (:mod:`tests.faults.client`) as a process whose
  progress lines the harness reads, and that it can pause after a phase and kill there.
* :func:`observe` / :func:`judge`: what each host says about the guest (state, reason, its
  words about an unknown outcome, persistence, job) and what ``/proc`` shows (the QEMU
  processes whose command line carries the guest's uuid, by the host whose state dir is their
  working directory; zombies are not running); then the invariant: exactly one host has the
  guest running (or paused, with a reason that says why) with one QEMU process, the other has no
  running copy and no QEMU process, the source's persistent definition is intact (and the
  destination's where it runs: the migrations use ``--persistent``), no job on either side.
  That the heartbeat goes on counting where the guest runs is checked by the test
  (:func:`heartbeat_goes_on`).

Everything started is stopped by pid (daemons by SIGTERM after their guests are destroyed, so
that each reaps its own QEMU children; SIGKILL when that fails), and this process becomes a
child subreaper, so that the QEMU of a daemon killed mid-case is reparented here and reaped
here once it exits, instead of waiting for PID 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

from tests.e2e.netns import Netns, NetPair, sh
from virtmig.client.connection import AsyncConnection
from virtmig.proto.errors import NoDomain, VirtmigError
from virtmig.proto.flags import DomainState, JobType
from virtmig.testing import WaitTimeout, kill_leftover_qemus, wait_until, wait_until_sync
from virtmig.testing.guest import cache_dir
from virtmig.testing.pki import session_pki
from virtmig.testing.qemu_user import qemu_user, serial_log

REPO = Path(__file__).resolve().parents[2]
DAEMON_PORT = 16614
_PR_SET_CHILD_SUBREAPER = 36

# Daemon settings of every case: QEMU confined as the tests' user, migrations without --tls
# accepted (the link is the test's own), and settling that retries fast.
CONFIG = """\
backend = "qemu"
storage_dirs = ["{cache}"]
qemu_user = "{user}"
migrate_tls_force = false
peer_timeout = 3
settle_retry_min = 0.5
settle_retry_max = 2
incoming_job_timeout = 20
"""


def become_subreaper() -> None:
    """Orphaned descendants (the QEMU of a killed daemon) are reparented to this process."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_orphans() -> None:
    """Reap every child that has exited: QEMU processes of killed daemons, reparented here
    (call only when no child this process waits for otherwise is running)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] != 0:
            pass


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def qemu_processes(uuid: str, state_dir: Path) -> list[int]:
    """Live (not zombie) QEMU processes of ``uuid`` whose working directory lies under
    ``state_dir`` (each host's QEMU runs in its guest folder there); zombies are reaped."""
    needle = f"\0-uuid\0{uuid}\0".encode()
    root = str(state_dir.resolve())
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if needle not in b"\0" + cmdline:
                continue
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                _reap(pid)
                continue
            if not os.readlink(f"/proc/{pid}/cwd").startswith(root + "/"):
                continue
        except OSError:
            continue
        found.append(pid)
    return found


@dataclass
class DaemonProc:
    """A ``virtmigd`` in namespace ``ns``, restartable with the same state and settings."""

    ns: Netns
    work: Path
    name: str
    proc: subprocess.Popen[bytes] | None = None
    stall: str = ""

    @property
    def state_dir(self) -> Path:
        return self.work / self.name

    @property
    def sock(self) -> Path:
        return self.work / f"{self.name}.sock"

    @property
    def uri(self) -> str:
        return f"virtmig+unix://{self.sock}"

    @property
    def tls_uri(self) -> str:
        return f"virtmig+tls://{self.ns.address}:{DAEMON_PORT}"

    @property
    def log_path(self) -> Path:
        return self.work / f"{self.name}.log"

    @property
    def config(self) -> Path:
        return self.work / f"{self.name}.toml"

    def serial_log(self, uuid: str) -> Path:
        return serial_log(self.state_dir, uuid)

    def start(self, stall: str = "") -> None:
        """Start (or restart) the daemon and wait until it serves; ``stall``: the test-only
        stall point it is started with (``VIRTMIG_TEST_STALL``), "" for none."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.stall = stall
        if not self.config.exists():
            extra = CONFIG.format(cache=cache_dir(), user=qemu_user())
            session_pki().config(self.config, self.name, ips=[self.ns.address], extra=extra)
        ready = self.work / f"{self.name}.ready"
        ready.unlink(missing_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("VIRTMIG_TEST_STALL", None)
        if stall:
            env["VIRTMIG_TEST_STALL"] = f"{stall}:{self.stall_file(stall)}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([
                "ip", "netns", "exec", self.ns.name, sys.executable, "-m",
                "virtmig.daemon.main", "--config", str(self.config),
                "--listen", f"tls://{self.ns.address}:{DAEMON_PORT}",
                "--listen", f"unix://{self.sock}",
                "--state-dir", str(self.state_dir), "--hostname", f"{self.name}.test",
                "--migration-address", self.ns.address, "--migration-host", self.ns.address,
                "--ready-file", str(ready), "--log-level", "info",
            ], env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=REPO)
        proc = self.proc

        def started() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"virtmigd {self.name} exited with {proc.returncode}: "
                                   f"{self.log_tail()}")
            return ready.exists()

        wait_until_sync(started, timeout=60, interval=0.05, what=f"virtmigd {self.name} to start")

    def stall_file(self, point: str) -> Path:
        """The file a daemon stalled at ``point`` creates, and waits for us to remove."""
        return self.work / f"{self.name}.stall-{point}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the daemon (its QEMU processes live on) and reap it."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    async def stop(self) -> None:
        """Destroy its guests through it (it reaps their QEMU), then SIGTERM it."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(Exception):
            async with await AsyncConnection.open(self.uri, connect_timeout=5) as conn:
                for dom in await conn.list_domains(active=True):
                    with contextlib.suppress(VirtmigError):
                        await conn.destroy(dom.uuid)
        proc.send_signal(signal.SIGTERM)
        try:
            await wait_until(lambda: proc.poll() is not None, timeout=20,
                             what=f"virtmigd {self.name} to stop")
        except WaitTimeout:
            proc.kill()
            proc.wait()


@dataclass
class ClientProc:
    """The migration client process (:mod:`tests.faults.client`) and the lines it printed."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, lab: Lab, mode: str, pause_after: str = "", bandwidth: int = 0) -> ClientProc:
        proc = subprocess.Popen([
            sys.executable, "-m", "tests.faults.client", "--src", lab.a.uri, "--dst", lab.b.uri,
            "--dest-uri", lab.b.tls_uri, "--mode", mode, "--bandwidth", str(bandwidth),
            "--pause-after", pause_after,
        ], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO)
        client = cls(proc)
        client._reader = threading.Thread(target=client._read, daemon=True)
        client._reader.start()
        return client

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def said(self, line: str) -> bool:
        return line in self.lines

    async def wait_said(self, line: str, timeout: float = 120) -> None:
        def there() -> bool:
            if line in self.lines:
                return True
            if self.proc.poll() is not None and self._reader is not None:
                self._reader.join(5)
                if line not in self.lines:
                    raise AssertionError(f"the client exited without {line!r}: {self.lines}")
            return False

        await wait_until(there, timeout=timeout, interval=0.05,
                         what=lambda: f"the client to say {line!r}: {self.lines}")

    def go(self) -> None:
        """Let a paused client go on."""
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    async def wait_exit(self, timeout: float = 180) -> str:
        """Wait until it exits; its RESULT line ("" when it was killed before one)."""
        await wait_until(lambda: self.proc.poll() is not None, timeout=timeout,
                         what=lambda: f"the client to finish: {self.lines}")
        if self._reader is not None:
            self._reader.join(10)
        return next((ln for ln in self.lines if ln.startswith("RESULT ")), "")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


@dataclass
class Lab:
    """Two namespaces, a daemon in each (``a``: the source, ``b``: the destination)."""

    net: NetPair
    a: DaemonProc
    b: DaemonProc
    clients: list[ClientProc] = field(default_factory=list)

    @classmethod
    def create(cls, work: Path, tag: str, subnet: int) -> Lab:
        net = NetPair.create(tag, subnet)
        return cls(net, DaemonProc(net.a, work, "hosta"), DaemonProc(net.b, work, "hostb"))

    @property
    def work(self) -> Path:
        return self.a.work

    def link_down(self) -> None:
        sh("ip", "-n", self.net.a.name, "link", "set", self.net.a.iface, "down")

    def link_up(self) -> None:
        sh("ip", "-n", self.net.a.name, "link", "set", self.net.a.iface, "up")

    def client(self, mode: str, pause_after: str = "", bandwidth: int = 0) -> ClientProc:
        client = ClientProc.start(self, mode, pause_after, bandwidth)
        self.clients.append(client)
        return client

    async def destroy(self) -> None:
        """Stop every client and daemon (each daemon's guests first), the QEMU processes any
        left (by pid file), and the namespaces."""
        try:
            for client in self.clients:
                client.close()
            for daemon in (self.a, self.b):
                await daemon.stop()
        finally:
            for daemon in (self.a, self.b):
                if daemon.alive():
                    daemon.kill()
            with contextlib.suppress(WaitTimeout):
                kill_leftover_qemus(self.work)
            self.net.destroy()
            reap_orphans()


@dataclass(frozen=True)
class HostView:
    """What one host says about the guest, and the QEMU processes it has for it."""

    host: str
    state: str  # running, paused, shut off, absent, ...
    reason: str = ""
    detail: str = ""
    persistent: bool = False
    job: str = ""  # the job type and phase when one is there, else ""
    qemus: tuple[int, ...] = ()

    @property
    def live(self) -> bool:
        return self.state in ("running", "paused")

    def describe(self) -> str:
        words = self.state
        if self.reason and self.state != "absent":
            words += f" ({self.reason})"
        if self.detail:
            words += f": {self.detail}"
        if self.state not in ("absent",) and self.persistent:
            words += ", persistent"
        if self.job:
            words += f", job {self.job}"
        words += f"; QEMU processes: {len(self.qemus)}"
        return words


_STATE_WORDS = {DomainState.RUNNING: "running", DomainState.PAUSED: "paused",
                DomainState.SHUTOFF: "shut off", DomainState.CRASHED: "crashed",
                DomainState.BLOCKED: "blocked", DomainState.SHUTDOWN: "shutting down",
                DomainState.PMSUSPENDED: "pmsuspended", DomainState.NOSTATE: "no state"}


async def observe(daemon: DaemonProc, uuid: str) -> HostView:
    qemus = tuple(qemu_processes(uuid, daemon.state_dir))
    if not daemon.alive():
        return HostView(daemon.name, "daemon down", qemus=qemus)
    async with await AsyncConnection.open(daemon.uri, connect_timeout=10) as conn:
        try:
            dom = await conn.lookup(uuid)
            state, _code, reason, detail = await conn.state_detail(uuid)
            job = await conn.job_info(uuid)
        except NoDomain:
            return HostView(daemon.name, "absent", qemus=qemus)
    job_words = "" if job.type is JobType.NONE else f"{job.type.name.lower()} {job.phase}"
    return HostView(daemon.name, _STATE_WORDS.get(state, str(state)), reason, detail,
                    dom.persistent, job_words.strip(), qemus)


def judge(a: HostView, b: HostView) -> list[str]:
    """The invariant's violations ([] when it holds); ``a`` is the migration's source."""
    broken = []
    live = [v for v in (a, b) if v.live]
    if len(live) != 1:
        broken.append(f"{len(live)} hosts have the guest running or paused")
    for view in (a, b):
        if view.state == "daemon down":
            broken.append(f"{view.host}: its daemon is not running")
        if view.job:
            broken.append(f"{view.host}: a job is left ({view.job})")
        if view.live and len(view.qemus) != 1:
            broken.append(f"{view.host}: {len(view.qemus)} QEMU processes for a {view.state} "
                          "guest")
        if not view.live and view.qemus:
            broken.append(f"{view.host}: QEMU processes {list(view.qemus)} for a guest that is "
                          f"{view.state}")
        if view.state == "paused" and not view.detail and view.reason in ("", "unknown"):
            broken.append(f"{view.host}: paused without a reason")
    if not a.persistent or a.state == "absent":
        broken.append(f"{a.host}: the source's persistent definition is gone")
    if b.live and not b.persistent:
        broken.append(f"{b.host}: the guest runs there without its persistent definition")
    return broken


def settled(a: HostView, b: HostView) -> bool:
    """Recovery is over: no job on either side, one host runs the guest, the other has no
    QEMU for it (a guest still paused is waited for: settling may yet resume it)."""
    views = (a, b)
    if any(v.job or v.state == "daemon down" for v in views):
        return False
    running = [v for v in views if v.state == "running"]
    others = [v for v in views if v.state != "running"]
    return len(running) == 1 and not others[0].qemus and not others[0].live
