"""A throw-away PKI for tests: one CA, a PKI dir per daemon, client dirs, made on first use.

Every test daemon listens on ``tls://127.0.0.1:0`` with its own host dir (``virtmig pki issue
--host NAME.test --ip 127.0.0.1``: a daemon named ``src`` is ``O=virtmig,CN=src.test``), and
every test client presents ``O=virtmig,CN=admin``.  The PKI lives in a temporary dir for the
whole process (a pytest session, or a benchmark run) and is removed at exit.
:func:`~virtmig.testing.hosts.start_host` uses it for every daemon it starts.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from virtmig.client import pki as gen

LOOPBACK = ("127.0.0.1",)
ADMIN = "admin"


class ThrowawayPki:
    """A CA in ``root``, and the PKI dirs it issued, each made once on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = root / "ca"
        gen.init_ca(self.ca)
        self._dirs: dict[tuple[str, ...], Path] = {}

    def _dir(self, key: tuple[str, ...], make: object) -> Path:
        path = self._dirs.get(key)
        if path is None:
            path = self.root / "-".join(key)
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
    """The process's PKI, made on first use."""
    global _session
    if _session is None:
        root = Path(tempfile.mkdtemp(prefix="virtmig-test-pki-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _session = ThrowawayPki(root)
    return _session
