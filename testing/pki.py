"""A throw-away PKI for tests: one CA, a PKI dir per daemon, client dirs, made on first use.

Every test daemon listens on ``tls://127.0.0.1:0`` with its own host dir (``virtmig pki issue
--host NAME.test --ip 127.0.0.1``: a daemon named ``src`` is ``O=virtmig,CN=src.test``), and
every test client presents ``O=virtmig,CN=admin``.  The PKI lives in a temporary dir for the
whole process (a pytest session, or a benchmark run) and is removed at exit (or by
:func:`release_session_pki`, which the test session calls as it ends).
:func:`~virtmig.testing.hosts.start_host` uses it for every daemon it starts.

The PKI belongs to the process that made it, and nothing is written before first use: a module
may hold ``session_pki()`` from its import on.  A process forked from one that had a PKI (mutmut's
fork server collects the tests, then forks a pytest run per mutant, which ends by ``os._exit``)
makes its own on first use, so that it neither issues into nor leaves files in a dir that its
parent and its siblings share: that shared dir made every run after the first fail ("refusing to
overwrite"), which mutmut counted as killed mutants (MUTATION.md).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from virtmig.client import pki as gen

LOOPBACK = ("127.0.0.1",)
ADMIN = "admin"


class ThrowawayPki:
    """A CA in ``root``, and the PKI dirs it issued, each made once on demand.

    ``root`` is a temporary dir made on first use, and made again in a process forked from the
    one that made it (see the module's docstring)."""

    def __init__(self) -> None:
        self._pid: int | None = None
        self._root: Path | None = None
        self._dirs: dict[tuple[str, ...], Path] = {}

    @property
    def root(self) -> Path:
        """This process's PKI dir (its CA made on first use)."""
        if self._root is None or self._pid != os.getpid():
            root = Path(tempfile.mkdtemp(prefix="virtmig-test-pki-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            gen.init_ca(root / "ca")
            self._root, self._pid, self._dirs = root, os.getpid(), {}
        return self._root

    @property
    def ca(self) -> Path:
        """The CA dir (``cacert.pem``, ``private/cakey.pem``)."""
        return self.root / "ca"

    def release(self) -> None:
        """Remove this process's PKI dir, if it made one (the next use makes a new one)."""
        if self._root is not None and self._pid == os.getpid():
            shutil.rmtree(self._root, ignore_errors=True)
        self._root, self._pid, self._dirs = None, None, {}

    def _dir(self, key: tuple[str, ...], make: object) -> Path:
        root = self.root  # first: a new process's root clears the dirs made elsewhere
        path = self._dirs.get(key)
        if path is None:
            path = root / "-".join(key)
            make(path)  # type: ignore[operator]
            self._dirs[key] = path
        return path

    def host(self, name: str, ips: Sequence[str] = LOOPBACK) -> Path:
        """The PKI dir of daemon ``name``: CN and DNS SAN ``NAME.test``, IP SANs ``ips``."""
        return self._dir(("host", name, *ips), lambda out: gen.issue(
            self.ca, out, host=f"{name}.test", ips=list(ips)))

    def client(self, name: str = ADMIN) -> Path:
        """A client dir with CN ``name`` (``O=virtmig,CN=NAME``)."""
        return self._dir(("client", name), lambda out: gen.issue(self.ca, out, client=name))

    def foreign_client(self, name: str = ADMIN) -> Path:
        """A client dir for CN ``name`` whose certificate another CA signed (it trusts this
        PKI's CA, so that only the daemon's check refuses it)."""
        def make(out: Path) -> None:
            other = self.root / "other-ca"
            if not other.exists():
                gen.init_ca(other)
            gen.issue(other, out, client=name)
            shutil.copyfile(self.ca / "cacert.pem", out / "cacert.pem")

        return self._dir(("foreign", name), make)

    def dn(self, cn: str) -> str:
        """The subject DN of a certificate this CA issued for ``cn``."""
        return f"O=virtmig,CN={cn}"

    def config(self, path: Path, name: str, *, ips: Sequence[str] = LOOPBACK,
               extra: str = "") -> Path:
        """A ``virtmigd --config`` file at ``path`` naming daemon ``name``'s PKI dir."""
        path.write_text(f'pki_dir = "{self.host(name, ips)}"\n{extra}')
        return path


_session: ThrowawayPki | None = None


def session_pki() -> ThrowawayPki:
    """The process's PKI (its dir made on first use, per process)."""
    global _session
    if _session is None:
        _session = ThrowawayPki()
    return _session


def release_session_pki() -> None:
    """Remove the session PKI's dir now, if this process made one: a process that ends by
    ``os._exit`` (a forked pytest run) runs no ``atexit`` handler."""
    if _session is not None:
        _session.release()
