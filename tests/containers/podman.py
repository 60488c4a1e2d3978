"""Podman for the container tests: one runner that records what it makes and removes it all.

Concern: run ``podman`` with the harness's own engine settings and leave the machine as it was.

* **Settings.** :class:`Podman` writes its own ``containers.conf`` and points ``CONTAINERS_CONF``
  at it (never the machine's): ``runc`` (the default ``crun`` fails on these machines' hybrid
  cgroup layout), ``cgroupfs`` (no systemd), rlimits a root shell may set (podman's defaults
  exceed them), events to a file.
* **Clean-up.** Every container, network, volume and image made through :meth:`Podman.create`,
  :meth:`network`, :meth:`volume` and :meth:`track_image` is removed by :meth:`Podman.cleanup`
  (containers first, with their anonymous volumes), whatever happened before; ``podman build``
  runs with ``--layers=false``, so no intermediate layer outlives the build.
  :meth:`Podman.inventory` before and after tells what is left.
* **Sysctls.** netavark turns on ``net.ipv4.ip_forward`` when it sets up a network:
  :func:`kept_sysctls` saves it (and any others named) and writes the old values back.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

CONTAINERS_CONF = """\
# Written by the virtmig container tests (tests/containers/podman.py); used via CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
"""
COMMAND_TIMEOUT = 900.0  # a build that installs QEMU from .debs; every other call is quicker
FORWARD_SYSCTL = "net.ipv4.ip_forward"


class PodmanError(Exception):
    """A podman command failed; ``str()`` has the command and its output."""


def sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


@contextlib.contextmanager
def kept_sysctls(*names: str) -> Iterator[dict[str, str]]:
    """Save the sysctls ``names`` (and ``net.ipv4.ip_forward``); write them back at the end."""
    saved = {n: sysctl_path(n).read_text().strip() for n in (FORWARD_SYSCTL, *names)}
    try:
        yield dict(saved)
    finally:
        for name, value in saved.items():
            if sysctl_path(name).read_text().strip() != value:
                sysctl_path(name).write_text(value + "\n")


class Podman:
    """``podman`` with the harness's ``containers.conf`` (written in ``workdir``)."""

    def __init__(self, workdir: Path, prefix: str) -> None:
        self.prefix = prefix  # every name this runner makes starts with it
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}
        self.containers: list[str] = []
        self.networks: list[str] = []
        self.volumes: list[str] = []
        self.images: list[str] = []

    def __call__(self, *args: str, check: bool = True, input: bytes | None = None,
                 timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[bytes]:
        """Run ``podman ARGS``; raise :class:`PodmanError` if it fails and ``check``."""
        cmd = ["podman", *args]
        try:
            done = subprocess.run(cmd, env=self.env, input=input, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise PodmanError(f"{' '.join(cmd)}: no answer in {timeout:.0f} s") from exc
        if check and done.returncode:
            raise PodmanError(f"{' '.join(cmd)} exited {done.returncode}:\n"
                              f"{done.stdout.decode(errors='replace')[-4000:]}"
                              f"{done.stderr.decode(errors='replace')[-4000:]}")
        return done

    def text(self, *args: str, check: bool = True, timeout: float = COMMAND_TIMEOUT) -> str:
        return self(*args, check=check, timeout=timeout).stdout.decode(errors="replace")

    def exists(self, kind: str, name: str) -> bool:
        """Whether ``podman KIND exists NAME`` (kind: image, container, network, volume)."""
        return self(kind, "exists", name, check=False).returncode == 0

    def network(self, name: str, *options: str) -> str:
        self.networks.append(name)
        self("network", "create", *options, name)
        return name

    def volume(self, name: str) -> str:
        self.volumes.append(name)
        self("volume", "create", name)
        return name

    def track_image(self, name: str) -> str:
        """Remove image ``name`` at :meth:`cleanup`."""
        self.images.append(name)
        return name

    def create(self, name: str, options: Sequence[str], image: str,
               command: Sequence[str] = ()) -> str:
        """``podman run -d`` container ``name``."""
        self.containers.append(name)
        self("run", "-d", "--name", name, *options, image, *command)
        return name

    def cleanup(self) -> list[str]:
        """Remove everything this runner made; the errors met (an empty list: all gone)."""
        errors: list[str] = []

        def attempt(*args: str) -> None:
            try:
                self(*args, timeout=120)
            except PodmanError as exc:
                errors.append(str(exc))

        for name in reversed(self.containers):
            if self.exists("container", name):
                attempt("rm", "-f", "-v", "-t", "0", name)
        for name in reversed(self.networks):
            if self.exists("network", name):
                attempt("network", "rm", "-f", name)
        for name in reversed(self.volumes):
            if self.exists("volume", name):
                attempt("volume", "rm", "-f", name)
        for name in reversed(self.images):
            if self.exists("image", name):
                attempt("rmi", "-f", name)
        self.containers, self.networks, self.volumes, self.images = [], [], [], []
        return errors

    def inventory(self) -> set[str]:
        """Every container, network, volume and image on the machine, as ``KIND NAME``."""
        out: set[str] = set()
        for kind, args in (("container", ("ps", "-a", "--format", "{{.ID}}")),
                           ("network", ("network", "ls", "--format", "{{.Name}}")),
                           ("volume", ("volume", "ls", "--format", "{{.Name}}")),
                           ("image", ("images", "-a", "--format", "{{.ID}}"))):
            out |= {f"{kind} {name}" for name in self.text(*args).split()}
        return out
