"""The PKI directory for mutual TLS: where its files are, loading them with every check done up
front, and the subject DN that an allowed-DN list (``tls_allowed_dn_list``) matches.

A PKI dir has libvirt's file names::

    DIR/cacert.pem              the CA certificate(s) a peer's certificate must be signed by
    DIR/servercert.pem          this host's certificate as a TLS server (the daemon's listener)
    DIR/private/serverkey.pem   its key, 0600
    DIR/clientcert.pem          the certificate used as a TLS client (the CLI, a p2p source)
    DIR/private/clientkey.pem   its key, 0600

``virtmig pki issue`` writes such a dir, ready to use (:mod:`virtmig.client.pki`).  Which dir: an
explicit one (the ``?pkipath=`` URI parameter, or the config's ``pki_dir``), else
``$VIRTMIG_PKI_DIR``, else :func:`default_pki_dir`.  libvirt spreads its system files over
``/etc/pki/CA/cacert.pem`` and ``/etc/pki/libvirt/``, and puts keys beside the certificates (no
``private/``) in a ``pkipath`` or per-user dir; virtmig keeps one layout wherever the dir is, so
the dir ``issue`` writes works as the system dir, a user's dir or a ``pkipath`` alike.

Loading checks what libvirt's TLS context checks before it listens or connects (file present and
readable, certificates in date, signed by the CA, CA-ness, key usage and purpose), plus that the
key matches the certificate and is readable by its owner only (as ssh refuses a key others can
read), and that gRPC's TLS can use the key type.  So a bad dir fails at startup with a message
naming the file and what is wrong, not at the first handshake with "Socket closed".  Every
failure is :class:`~virtmig.proto.errors.ConfigUnsupported`.

The files' names and reading them (everything here that needs no ``cryptography``) are
:mod:`virtmig.proto.pkifiles`, re-exported here: a client connects with those alone and runs the
checks above when a connection fails, to say why (:mod:`virtmig.client.transport`).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ObjectIdentifier

from virtmig.proto.errors import ConfigUnsupported
from virtmig.proto.pkifiles import (
    CACERT_FILE,
    CLIENTCERT_FILE,
    CLIENTKEY_FILE,
    MAX_PEM_BYTES,
    PKI_DIR_ENV,
    PRIVATE_DIR,
    SERVERCERT_FILE,
    SERVERKEY_FILE,
    SYSTEM_PKI_DIR,
    PkiPaths,
    TlsMaterial,
    default_pki_dir,
    read_pem_file,
    resolve_pki_dir,
)

__all__ = [
    "CACERT_FILE",
    "CLIENTCERT_FILE",
    "CLIENTKEY_FILE",
    "MAX_PEM_BYTES",
    "PKI_DIR_ENV",
    "PRIVATE_DIR",
    "SERVERCERT_FILE",
    "SERVERKEY_FILE",
    "SYSTEM_PKI_DIR",
    "PkiPaths",
    "TlsMaterial",
    "check_ca",
    "default_pki_dir",
    "dn_matches",
    "key_matches",
    "load_client_credentials",
    "load_server_credentials",
    "parse_certificates",
    "parse_private_key",
    "peer_subject_dn",
    "read_pem_file",
    "resolve_pki_dir",
    "subject_dn",
]


_E = TypeVar("_E", bound=x509.ExtensionType)


# --- loading --------------------------------------------------------------------------------------


def load_server_credentials(paths: PkiPaths, *, now: datetime | None = None) -> TlsMaterial:
    """``cacert.pem``, ``servercert.pem`` and ``private/serverkey.pem``, checked (see the module
    docstring); ``ConfigUnsupported`` naming the file otherwise."""
    return _load(paths.cacert, paths.servercert, paths.serverkey, "server", now)


def load_client_credentials(paths: PkiPaths, *, now: datetime | None = None) -> TlsMaterial:
    """``cacert.pem``, ``clientcert.pem`` and ``private/clientkey.pem``, checked the same way."""
    return _load(paths.cacert, paths.clientcert, paths.clientkey, "client", now)


def parse_certificates(data: bytes, path: Path, what: str) -> list[x509.Certificate]:
    """The PEM certificates in ``data`` (read from ``path``), in order; at least one."""
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigUnsupported(f"{what} '{path}' holds no PEM certificate") from None


def parse_private_key(data: bytes, path: Path, what: str) -> PrivateKeyTypes:
    """The unencrypted PEM private key in ``data`` (read from ``path``)."""
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise ConfigUnsupported(
            f"{what} '{path}' is encrypted: virtmig needs an unencrypted key (its file mode "
            "protects it)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise ConfigUnsupported(f"{what} '{path}' holds no PEM private key") from None


def _load(ca_path: Path, cert_path: Path, key_path: Path, role: str,
          now: datetime | None) -> TlsMaterial:
    now = now or datetime.now(UTC)
    ca_pem = read_pem_file(ca_path, "CA certificate")
    cas = parse_certificates(ca_pem, ca_path, "CA certificate")
    for ca in cas:
        check_ca(ca, ca_path, "CA certificate", now)
    what = f"{role} certificate"
    cert_pem = read_pem_file(cert_path, what)
    chain = parse_certificates(cert_pem, cert_path, what)
    leaf = chain[0]
    _check_leaf(leaf, cert_path, role, now)
    for extra in chain[1:]:
        check_ca(extra, cert_path, f"intermediate CA certificate in the {what}", now)
    _check_chain(chain, cas, cert_path, ca_path, what)
    key_what = f"{role} key"
    key_pem = read_pem_file(key_path, key_what, private=True)
    key = parse_private_key(key_pem, key_path, key_what)
    if not key_matches(key, leaf):
        raise ConfigUnsupported(
            f"{key_what} '{key_path}' does not match the {what} '{cert_path}'"
        )
    _check_key_type(key, key_path, key_what)
    return TlsMaterial(ca_pem, cert_pem, key_pem, subject_dn(leaf))


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_times(cert: x509.Certificate, path: Path, what: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        start = _stamp(cert.not_valid_before_utc)
        raise ConfigUnsupported(f"the {what} '{path}' is not yet active (valid from {start})")
    if now > cert.not_valid_after_utc:
        raise ConfigUnsupported(
            f"the {what} '{path}' has expired (valid until {_stamp(cert.not_valid_after_utc)})"
        )


def _stamp(when: datetime) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S UTC")


def check_ca(cert: x509.Certificate, path: Path, what: str, now: datetime) -> None:
    """A CA certificate: in date, and its basic constraints say CA (libvirt's check)."""
    _check_times(cert, path, what, now)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is None or not constraints.ca:
        raise ConfigUnsupported(
            f"the {what} '{path}' is not a CA certificate: its basic constraints do not say CA"
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        raise ConfigUnsupported(
            f"the {what} '{path}' may not sign certificates: its key usage lacks keyCertSign"
        )


_PURPOSE = {"server": (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            "client": (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth")}


def _check_leaf(cert: x509.Certificate, path: Path, role: str, now: datetime) -> None:
    """In date, not a CA, usable for TLS signatures, and for this role.

    libvirt only warns about a missing purpose unless the extension is critical; virtmig refuses,
    because gRPC's TLS (BoringSSL) refuses such a peer anyway.  No extended key usage at all means
    any purpose, for libvirt and BoringSSL alike.
    """
    what = f"{role} certificate"
    _check_times(cert, path, what, now)
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise ConfigUnsupported(
            f"the {what} '{path}' is a CA certificate: its basic constraints say CA"
        )
    usage = _extension(cert, x509.KeyUsage)
    if usage is not None and not usage.digital_signature:
        raise ConfigUnsupported(
            f"the {what} '{path}' may not sign for TLS: its key usage lacks digitalSignature"
        )
    purposes = _extension(cert, x509.ExtendedKeyUsage)
    oid, name = _PURPOSE[role]
    if purposes is not None and oid not in purposes:
        raise ConfigUnsupported(
            f"the {what} '{path}' may not be used by a TLS {role}: its extended key usage "
            f"lacks {name}"
        )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_chain(chain: Sequence[x509.Certificate], cas: Sequence[x509.Certificate],
                 cert_path: Path, ca_path: Path, what: str) -> None:
    """Each certificate of the chain signed by the next, the last by a certificate of the CA
    file (a path of one, CA → leaf, in the usual case)."""
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        if not _issued_by(cert, issuer):
            raise ConfigUnsupported(
                f"the {what} '{cert_path}' holds a broken chain: certificate {i + 1} is not "
                f"signed by certificate {i + 2}"
            )
    if not any(_issued_by(chain[-1], ca) for ca in cas):
        raise ConfigUnsupported(
            f"the {what} '{cert_path}' is not signed by the CA certificate '{ca_path}'"
        )


def _spki(key: PrivateKeyTypes | x509.Certificate) -> bytes:
    public = key.public_key()
    return public.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def key_matches(key: PrivateKeyTypes, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private half of ``cert``'s public key."""
    return _spki(key) == _spki(cert)


# Key types gRPC's TLS 1.3 (BoringSSL) signs with: an Ed25519, Ed448 or P-521 key loads, but
# then the listener fails to bind or the handshake fails.
_TLS_CURVES = (ec.SECP256R1, ec.SECP384R1)


def _check_key_type(key: PrivateKeyTypes, path: Path, what: str) -> None:
    if isinstance(key, rsa.RSAPrivateKey):
        return
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, _TLS_CURVES):
        return
    kind = (f"ECDSA {key.curve.name}" if isinstance(key, ec.EllipticCurvePrivateKey)
            else type(key).__name__.replace("PrivateKey", ""))
    raise ConfigUnsupported(
        f"{what} '{path}' is a key gRPC's TLS cannot use ({kind}): use ECDSA P-256 or P-384, "
        "or RSA"
    )


# --- distinguished names --------------------------------------------------------------------------

# gnutls's names for attribute types (its ``_oid2str`` table) where they differ from
# cryptography's, or cryptography has none.  A type neither knows shows as its dotted OID; its
# value differs (gnutls writes ``#`` and the hex of its DER), a case virtmig's certificates and
# libvirt's documented ones never meet.
_GNUTLS_ATTR_NAMES: dict[ObjectIdentifier, str] = {
    ObjectIdentifier(dotted): name
    for dotted, name in {
        "2.5.4.9": "street", "2.5.4.12": "title", "2.5.4.13": "description",
        "2.5.4.5": "serialNumber", "2.5.4.20": "telephoneNumber", "2.5.4.4": "surName",
        "2.5.4.43": "initials", "2.5.4.44": "generationQualifier", "2.5.4.42": "givenName",
        "2.5.4.65": "pseudonym", "2.5.4.46": "dnQualifier", "2.5.4.17": "postalCode",
        "2.5.4.41": "name", "2.5.4.15": "businessCategory",
        "1.2.840.113556.1.4.656": "userPrincipalName",
        "1.3.6.1.4.1.311.60.2.1.1": "jurisdictionOfIncorporationLocalityName",
        "1.3.6.1.4.1.311.60.2.1.2": "jurisdictionOfIncorporationStateOrProvinceName",
        "1.3.6.1.4.1.311.60.2.1.3": "jurisdictionOfIncorporationCountryName",
        "1.2.840.113549.1.9.1": "EMAIL",
    }.items()
}


def subject_dn(cert: bytes | str | x509.Certificate) -> str:
    """A certificate's subject DN as libvirt matches ``tls_allowed_dn_list`` against it.

    libvirt takes gnutls's ``gnutls_x509_crt_get_dn()``: the attributes in the order the
    certificate stores them, most significant first, ``C=GB,O=virtmig,CN=host-a`` (libvirt's
    example pattern is ``C=GB,ST=London,L=London,O=Red Hat,CN=*``), values escaped as RFC 4514
    says.  That is the reverse of RFC 4514's own order, which OpenSSL, BoringSSL and so gRPC's
    ``x509_subject`` auth property use (``CN=host-a,O=virtmig,C=GB``): compare a peer with
    :func:`peer_subject_dn`, never with that property.  ``cert`` is PEM (the first certificate
    counts) or a parsed certificate.
    """
    if not isinstance(cert, x509.Certificate):
        cert = x509.load_pem_x509_certificate(cert.encode() if isinstance(cert, str) else cert)
    return ",".join(rdn.rfc4514_string(_GNUTLS_ATTR_NAMES) for rdn in cert.subject.rdns)


def peer_subject_dn(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The :func:`subject_dn` of a TLS peer's certificate, from a gRPC ``auth_context()``
    (its ``x509_pem_cert`` property); ``None`` if the peer showed no certificate."""
    for pem in auth_context.get("x509_pem_cert", ()):
        return subject_dn(pem)
    return None


def dn_matches(dn: str, patterns: Iterable[str]) -> bool:
    """Whether ``dn`` matches one of ``patterns``, as libvirt matches ``tls_allowed_dn_list``
    with ``g_pattern_match_simple``: over the whole string, ``*`` matches any run of characters
    (none included), ``?`` any one character, everything else itself (no ``[...]``, no escape).
    An empty list matches nothing."""
    return any(_pattern(p).fullmatch(dn) for p in patterns)


def _pattern(pattern: str) -> re.Pattern[str]:
    parts = ("." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern)
    return re.compile("".join(parts), re.DOTALL)
