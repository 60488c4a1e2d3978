"""The PKI dir's files, without parsing them: where they are, and their bytes read with the checks
that need no X.509 code (present, readable, a regular file, not too big, a private key readable by
its owner only, PEM blocks of the right kind).

:mod:`virtmig.proto.pki` holds the rest (parsing, dates, chains, key types, subject DNs), with
``cryptography``; its module docstring describes the dir.  A client's TLS channel needs the bytes
only (:func:`read_client_files`): gRPC's TLS checks the chain itself, and a client imports
``cryptography`` (~40 ms, more than the rest of a ``virtmig list``'s own imports) only to explain
why a connection failed (:func:`virtmig.client.transport.connect_error`).  The daemon checks its
files fully at start, as before.
"""

from __future__ import annotations

import os
import stat
from dataclasses import field
from pathlib import Path

from virtmig.proto.errors import ConfigUnsupported
from virtmig.proto.record import record

PKI_DIR_ENV = "VIRTMIG_PKI_DIR"
SYSTEM_PKI_DIR = Path("/etc/pki/virtmig")

CACERT_FILE = "cacert.pem"
SERVERCERT_FILE = "servercert.pem"
SERVERKEY_FILE = "private/serverkey.pem"
CLIENTCERT_FILE = "clientcert.pem"
CLIENTKEY_FILE = "private/clientkey.pem"
PRIVATE_DIR = "private"

# A PEM file bigger than this is not a certificate or key (a wrong path to a disk image, say).
MAX_PEM_BYTES = 1 << 20


# --- where the files are --------------------------------------------------------------------------


def default_pki_dir() -> Path:
    """``/etc/pki/virtmig`` for root; otherwise ``$XDG_CONFIG_HOME/virtmig/pki`` (by default
    ``~/.config/virtmig/pki``).

    libvirt's per-user dir is ``~/.pki/libvirt``.  ``~/.pki`` is NSS's database dir that libvirt
    borrowed; virtmig's other per-user paths follow the XDG base-directory spec
    (``$XDG_RUNTIME_DIR/virtmig`` for the socket), and credentials are configuration, so they go
    under the XDG config dir.
    """
    if os.geteuid() == 0:
        return SYSTEM_PKI_DIR
    xdg = os.environ.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return base / "virtmig" / "pki"


def resolve_pki_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The PKI dir to use: ``explicit`` (``?pkipath=`` or the config's ``pki_dir``) if given,
    else ``$VIRTMIG_PKI_DIR`` if set, else :func:`default_pki_dir`."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(PKI_DIR_ENV)
    if env:
        return Path(env)
    return default_pki_dir()


@record
class PkiPaths:
    """The files of one PKI dir."""

    dir: Path
    cacert: Path
    servercert: Path
    serverkey: Path
    clientcert: Path
    clientkey: Path

    @classmethod
    def of(cls, directory: str | os.PathLike[str]) -> PkiPaths:
        """The files in ``directory``, with libvirt's names."""
        d = Path(directory)
        return cls(d, d / CACERT_FILE, d / SERVERCERT_FILE, d / SERVERKEY_FILE,
                   d / CLIENTCERT_FILE, d / CLIENTKEY_FILE)

    @classmethod
    def resolve(cls, explicit: str | os.PathLike[str] | None = None) -> PkiPaths:
        """The files of the dir :func:`resolve_pki_dir` picks."""
        return cls.of(resolve_pki_dir(explicit))


# --- reading --------------------------------------------------------------------------------------


@record
class TlsMaterial:
    """Checked PEM bytes, as ``grpc.ssl_server_credentials`` / ``ssl_channel_credentials`` take
    them: the CA certificate(s), the certificate chain (leaf first), and its key."""

    ca_pem: bytes = field(repr=False)
    cert_chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    # The certificate's subject, as :func:`subject_dn` writes it (for logs and messages).
    subject: str = ""


def read_pem_file(path: Path, what: str, *, private: bool = False) -> bytes:
    """A PEM file's bytes; ``ConfigUnsupported`` naming ``what`` and ``path`` if it is missing,
    unreadable, not a regular file or too big, or (``private``) if group or others may access it.
    """
    try:
        # O_NONBLOCK: opening a FIFO put there by mistake must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigUnsupported(f"{what} '{path}' is not a regular file")
            if private and st.st_mode & 0o077:
                raise ConfigUnsupported(
                    f"permissions {stat.S_IMODE(st.st_mode):04o} for {what} '{path}' are too "
                    "open: a private key must be accessible by its owner only (chmod 600)"
                )
            data = f.read(MAX_PEM_BYTES + 1)
    except FileNotFoundError:
        raise ConfigUnsupported(f"{what} '{path}' does not exist") from None
    except OSError as exc:
        raise ConfigUnsupported(f"cannot read {what} '{path}': {exc.strerror or exc}") from None
    if len(data) > MAX_PEM_BYTES:
        raise ConfigUnsupported(f"{what} '{path}' is too big for a PEM file")
    return data


# What gRPC's TLS loads: a file without these markers makes it log its own errors, so such a file
# is explained (by the full checks) before any connection.
_CERT_MARKER = b"-----BEGIN CERTIFICATE-----"
_KEY_MARKERS = (b"-----BEGIN PRIVATE KEY-----", b"-----BEGIN EC PRIVATE KEY-----",
                b"-----BEGIN RSA PRIVATE KEY-----")


def pem_blocks_look_right(material: TlsMaterial) -> bool:
    """Whether the CA and certificate files hold PEM certificates and the key file an
    unencrypted PEM key: what gRPC needs to build its TLS context (it checks the rest)."""
    return (_CERT_MARKER in material.ca_pem and _CERT_MARKER in material.cert_chain_pem
            and any(m in material.key_pem for m in _KEY_MARKERS))


def read_client_files(paths: PkiPaths) -> TlsMaterial:
    """``cacert.pem``, ``clientcert.pem`` and ``private/clientkey.pem`` as bytes, with the checks
    of :func:`read_pem_file` (the key's mode included); no ``subject``.  ``ConfigUnsupported``
    naming the file otherwise."""
    return TlsMaterial(read_pem_file(paths.cacert, "CA certificate"),
                       read_pem_file(paths.clientcert, "client certificate"),
                       read_pem_file(paths.clientkey, "client key", private=True))
