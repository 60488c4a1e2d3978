"""Making the certificates for virtmig's mutual TLS (``virtmig pki``): a CA, and PKI dirs that
:mod:`virtmig.proto.pki` loads as they are.

Only the CLI makes certificates; daemons and clients only load them.  So this half lives in the
client package, and a daemon never imports it.

A CA dir::

    CA_DIR/cacert.pem            the CA certificate (CN from --cn, O from --org)
    CA_DIR/private/cakey.pem     its key

``issue --host NAME`` makes a certificate with CN=NAME, SAN DNS:NAME (an address given as NAME
becomes an IP SAN) plus an IP SAN for each ``--ip``, and purposes serverAuth and clientAuth.  It
is written twice, as ``servercert.pem``/``private/serverkey.pem`` and ``clientcert.pem``/
``private/clientkey.pem`` (the same certificate and key: a daemon serves, and is a client of its
peer in peer-to-peer migration), beside ``cacert.pem``.  ``issue --client NAME`` makes a
clientAuth-only certificate with CN=NAME and writes only the client files and ``cacert.pem``.
A certificate's subject is the CA's without its CN, then CN=NAME (``O=virtmig,CN=host-a`` with
the default CA), so that ``O=virtmig,CN=*`` admits every certificate of one CA.

Keys are ECDSA P-256: gRPC's TLS (BoringSSL) signs TLS 1.3 handshakes with it, as with P-384 and
RSA, while an Ed25519 key, otherwise a fine choice, fails gRPC's handshake.  A key file is 0600
from its creation (``os.open`` with the mode, never a chmod afterwards), in a ``private/`` dir
made 0700.  Every file is written under a temporary name and then linked into place: nobody
sees it half-written, and an existing file stays unless ``force`` (refused before anything is
written).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtmig.proto.errors import InvalidArgument, OperationFailed, OperationInvalid
from virtmig.proto.pki import (
    PRIVATE_DIR,
    PkiPaths,
    check_ca,
    key_matches,
    parse_certificates,
    parse_private_key,
    read_pem_file,
)

CA_CERT_FILE = "cacert.pem"
CA_KEY_FILE = f"{PRIVATE_DIR}/cakey.pem"
DEFAULT_CA_CN = "virtmig CA"
DEFAULT_ORG = "virtmig"
DEFAULT_CA_DAYS = 3650
DEFAULT_LEAF_DAYS = 365
# Upper bound for --days: x509 dates end in 9999, and a century is already far past any use.
MAX_DAYS = 36500
# A certificate is valid from a little before its making: a peer whose clock lags accepts it.
BACKDATE = timedelta(minutes=5)

CERT_MODE = 0o644
KEY_MODE = 0o600
DIR_MODE = 0o755
PRIVATE_DIR_MODE = 0o700

_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Identity:
    """A certificate and its key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class _File:
    path: Path
    data: bytes
    what: str
    private: bool = False  # a key: 0600, in a 0700 dir


@dataclass(frozen=True)
class WrittenFile:
    """One file ``init_ca`` or ``issue`` wrote, and what it holds."""

    path: Path
    what: str


# --- certificates in memory -----------------------------------------------------------------------


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(days: int, not_before: datetime | None) -> tuple[datetime, datetime]:
    if not 1 <= days <= MAX_DAYS:
        raise InvalidArgument(f"invalid validity of {days} days: expected 1 to {MAX_DAYS}")
    start = not_before if not_before is not None else datetime.now(UTC) - BACKDATE
    return start, start + timedelta(days=days)


def _name(attributes: Iterable[tuple[x509.ObjectIdentifier, str]]) -> x509.Name:
    try:
        return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])
    except ValueError as exc:  # empty, or longer than x509 allows (CN: 64 characters)
        raise InvalidArgument(f"invalid certificate name: {exc}") from None


def make_ca(*, common_name: str = DEFAULT_CA_CN, org: str = DEFAULT_ORG,
            days: int = DEFAULT_CA_DAYS, not_before: datetime | None = None) -> Identity:
    """A self-signed CA certificate and its new key, for signing leaf certificates only."""
    key = new_key()
    start, end = _validity(days, not_before)
    name = _name([(NameOID.ORGANIZATION_NAME, org), (NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(digital_signature=False, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=True, crl_sign=True, encipher_only=False,
                          decipher_only=False)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Identity(cert, key)


def make_leaf(ca: Identity, common_name: str, *, dns_names: Sequence[str] = (),
              ips: Sequence[IpAddress] = (), server: bool,
              days: int = DEFAULT_LEAF_DAYS, not_before: datetime | None = None) -> Identity:
    """A certificate signed by ``ca`` and its new key: purposes serverAuth and clientAuth if
    ``server``, else clientAuth only."""
    key = new_key()
    start, end = _validity(days, not_before)
    subject = _name([*((a.oid, str(a.value)) for a in ca.cert.subject
                       if a.oid != NameOID.COMMON_NAME),
                     (NameOID.COMMON_NAME, common_name)])
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          key_cert_sign=False, crl_sign=False, encipher_only=False,
                          decipher_only=False)
    purposes = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + [
        ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
                       critical=False)
    )
    alt_names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    alt_names += [x509.IPAddress(ip) for ip in ips]
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return Identity(builder.sign(ca.key, hashes.SHA256()), key)


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --- files ----------------------------------------------------------------------------------------


def _make_dirs(path: Path, mode: int) -> None:
    """``mkdir -p`` with ``mode`` for each dir it makes (``Path.mkdir(parents=True)`` gives the
    parents the umask's default, 0777 under umask 000)."""
    missing = [p for p in (path, *path.parents) if not os.path.lexists(p)]
    for p in reversed(missing):
        try:
            os.mkdir(p, mode)
        except FileExistsError:
            pass
        except OSError as exc:
            raise OperationFailed(f"cannot create directory '{p}': {exc.strerror}") from None


def _write_file(path: Path, data: bytes, mode: int, *, replace: bool) -> None:
    # Made 0600 (the umask can only take bits away), then given its final mode before it is
    # linked into place: a key is never readable by others, not even for a moment.
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, KEY_MODE)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise OperationInvalid(f"'{path}' already exists") from None
    except OSError as exc:
        raise OperationFailed(f"cannot write '{path}': {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _write_all(directory: Path, files: Sequence[_File], *, force: bool) -> list[WrittenFile]:
    """Write ``files`` (in or below ``directory``).  Without ``force``, refuse before writing
    anything if one of them exists."""
    if not force:
        existing = [str(f.path) for f in files if os.path.lexists(f.path)]
        if existing:
            raise OperationInvalid(
                f"refusing to overwrite {', '.join(existing)} (--force overwrites)"
            )
    _make_dirs(directory, DIR_MODE)
    for f in files:
        if f.private:
            _make_dirs(f.path.parent, PRIVATE_DIR_MODE)
        _write_file(f.path, f.data, KEY_MODE if f.private else CERT_MODE, replace=force)
    return [WrittenFile(f.path, f.what) for f in files]


def init_ca(ca_dir: str | os.PathLike[str], *, common_name: str = DEFAULT_CA_CN,
            org: str = DEFAULT_ORG, days: int = DEFAULT_CA_DAYS) -> list[WrittenFile]:
    """Make a CA in ``ca_dir`` (``cacert.pem``, ``private/cakey.pem``); never over an existing
    one."""
    d = Path(ca_dir)
    cert, key = d / CA_CERT_FILE, d / CA_KEY_FILE
    if os.path.lexists(cert) or os.path.lexists(key):
        raise OperationInvalid(f"'{d}' already holds a CA: refusing to overwrite it")
    ca = make_ca(common_name=common_name, org=org, days=days)
    return _write_all(d, [_File(cert, cert_pem(ca.cert), "CA certificate"),
                          _File(key, key_pem(ca.key), "CA key", private=True)], force=False)


def load_ca(ca_dir: str | os.PathLike[str], *, now: datetime | None = None) -> Identity:
    """The CA that :func:`init_ca` made in ``ca_dir``, checked (in date, a CA, key 0600 and
    matching)."""
    d = Path(ca_dir)
    cert_path, key_path = d / CA_CERT_FILE, d / CA_KEY_FILE
    if not os.path.lexists(cert_path):
        raise InvalidArgument(f"'{d}' holds no CA: '{cert_path}' does not exist "
                              "('virtmig pki init' makes one)")
    cert = parse_certificates(read_pem_file(cert_path, "CA certificate"), cert_path,
                              "CA certificate")[0]
    check_ca(cert, cert_path, "CA certificate", now or datetime.now(UTC))
    key = parse_private_key(read_pem_file(key_path, "CA key", private=True), key_path, "CA key")
    if not key_matches(key, cert):
        raise InvalidArgument(f"CA key '{key_path}' does not match '{cert_path}'")
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument(f"CA key '{key_path}' is not an ECDSA key, as 'virtmig pki init' "
                              "makes them")
    return Identity(cert, key)


def write_pki_dir(out_dir: str | os.PathLike[str], ca_cert: x509.Certificate, leaf: Identity,
                  *, server: bool, force: bool = False) -> list[WrittenFile]:
    """Write a PKI dir: ``cacert.pem``, the client files, and (``server``) the server files,
    which hold the same certificate and key."""
    paths = PkiPaths.of(out_dir)
    cert, key = cert_pem(leaf.cert), key_pem(leaf.key)
    files = [_File(paths.cacert, cert_pem(ca_cert), "CA certificate")]
    if server:
        files += [_File(paths.servercert, cert, "server certificate"),
                  _File(paths.serverkey, key, "server key", private=True)]
    files += [_File(paths.clientcert, cert, "client certificate"),
              _File(paths.clientkey, key, "client key", private=True)]
    return _write_all(paths.dir, files, force=force)


def issue(ca_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], *,
          host: str | None = None, ips: Sequence[str] = (), client: str | None = None,
          days: int = DEFAULT_LEAF_DAYS, force: bool = False) -> list[WrittenFile]:
    """Sign a certificate with the CA in ``ca_dir`` and write a PKI dir in ``out_dir``: for
    ``host`` usable as server and client, for ``client`` as client only (module docstring)."""
    if (host is None) == (client is None):
        raise InvalidArgument("issue needs exactly one of a host name or a client name")
    if ips and host is None:
        raise InvalidArgument("IP addresses are for a host certificate")
    addresses = _unique(_ip(a) for a in ips)
    dns_names: list[str] = []
    if host is not None:
        try:
            addresses = _unique([ipaddress.ip_address(host), *addresses])
        except ValueError:
            dns_names = [_dns_name(host)]
    name = host if host is not None else client or ""
    _validity(days, None)  # a bad --days fails before the CA is read
    ca = load_ca(ca_dir)
    leaf = make_leaf(ca, name, dns_names=dns_names, ips=addresses, server=host is not None,
                     days=days)
    return write_pki_dir(out_dir, ca.cert, leaf, server=host is not None, force=force)


def _ip(text: str) -> IpAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"invalid IP address '{text}'") from None


def _unique(addresses: Iterable[IpAddress]) -> list[IpAddress]:
    return list(dict.fromkeys(addresses))


def _dns_name(host: str) -> str:
    """``host`` if it is a DNS name (ASCII labels; IDNs in their ``xn--`` form)."""
    labels = host.split(".")
    if len(host) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise InvalidArgument(f"invalid host name '{host}': expected a DNS name or an address")
    return host
