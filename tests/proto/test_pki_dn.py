"""The subject DN as libvirt's ``tls_allowed_dn_list`` sees it (gnutls's form), and libvirt's
wildcard match over it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from virtmig.client import pki as gen
from virtmig.proto.pki import dn_matches, peer_subject_dn, subject_dn


def _named(*attributes: tuple[x509.ObjectIdentifier, str]) -> x509.Certificate:
    ca = gen.make_ca()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(oid, v) for oid, v in attributes]))
        .issuer_name(ca.cert.subject).public_key(gen.new_key().public_key())
        .serial_number(1).not_valid_before(datetime(2020, 1, 1, tzinfo=UTC))
        .not_valid_after(datetime(2030, 1, 1, tzinfo=UTC))
        .sign(ca.key, hashes.SHA256())
    )
    return cert


def test_subject_dn_is_gnutls_order_and_names() -> None:
    cert = _named((NameOID.COUNTRY_NAME, "GB"), (NameOID.STATE_OR_PROVINCE_NAME, "London"),
                  (NameOID.LOCALITY_NAME, "London"), (NameOID.ORGANIZATION_NAME, "Red Hat"),
                  (NameOID.COMMON_NAME, "host-a"))
    # libvirt's documented example pattern is "C=GB,ST=London,L=London,O=Red Hat,CN=*".
    assert subject_dn(cert) == "C=GB,ST=London,L=London,O=Red Hat,CN=host-a"
    pem = gen.cert_pem(cert)
    assert subject_dn(pem) == subject_dn(pem.decode()) == subject_dn(cert)
    assert dn_matches(subject_dn(cert), ["C=GB,ST=London,L=London,O=Red Hat,CN=*"])


def test_subject_dn_escapes_and_gnutls_attribute_names() -> None:
    cert = _named((NameOID.ORGANIZATION_NAME, "Acme, Inc."), (NameOID.COMMON_NAME, "a+b=c"),
                  (NameOID.EMAIL_ADDRESS, "ops@example.com"),
                  (NameOID.SERIAL_NUMBER, "42"), (NameOID.STREET_ADDRESS, "Main St"))
    assert subject_dn(cert) == (
        r"O=Acme\, Inc.,CN=a\+b=c,EMAIL=ops@example.com,serialNumber=42,street=Main St"
    )


def test_peer_subject_dn() -> None:
    pem = gen.cert_pem(gen.make_leaf(gen.make_ca(), "alice", server=False).cert)
    assert peer_subject_dn({"x509_pem_cert": [pem]}) == "O=virtmig,CN=alice"
    assert peer_subject_dn({"transport_security_type": [b"ssl"]}) is None


@pytest.mark.parametrize(
    ("dn", "patterns", "expected"),
    [
        ("C=GB,O=virtmig,CN=host-a", ["C=GB,O=virtmig,CN=host-a"], True),
        ("C=GB,O=virtmig,CN=host-a", ["C=GB,O=virtmig,CN=*"], True),
        ("C=GB,O=virtmig,CN=host-a", ["*"], True),
        ("", ["*"], True),
        ("", [""], True),
        ("C=GB,O=virtmig,CN=host-a", [], False),
        ("C=GB,O=virtmig,CN=host-a", [""], False),
        # The whole string: no match of a part at either end.
        ("C=GB,O=virtmig,CN=host-a", ["CN=host-a"], False),
        ("C=GB,O=virtmig,CN=host-a", ["C=GB,O=virtmig"], False),
        ("C=GB,O=virtmig,CN=host-a", ["*CN=host-a"], True),
        # '*' crosses commas, and matches nothing too.
        ("C=GB,O=virtmig,OU=lab,CN=host-a", ["C=GB,*,CN=host-a"], True),
        ("C=GB,O=virtmig,CN=host-a", ["C=GB,O=virtmig,CN=host-a*"], True),
        # '?' is exactly one character.
        ("C=GB,O=virtmig,CN=host-a", ["C=GB,O=virtmig,CN=host-?"], True),
        ("C=GB,O=virtmig,CN=host-ab", ["C=GB,O=virtmig,CN=host-?"], False),
        ("C=GB,O=virtmig,CN=host-", ["C=GB,O=virtmig,CN=host-?"], False),
        ("CN=hôst", ["CN=h?st"], True),
        # Everything else is itself: no classes, no escapes, no regex, case matters.
        ("CN=a", ["CN=[ab]"], False),
        ("CN=[ab]", ["CN=[ab]"], True),
        ("O=axb", ["O=a.b"], False),
        (r"O=Acme\, Inc.", [r"O=Acme\, Inc."], True),
        (r"CN=a\*", [r"CN=a\*"], True),
        ("CN=host-a", ["cn=host-a"], False),
        ("CN=host-a\nCN=x", ["CN=*"], True),
        # Any of the list.
        ("C=GB,O=virtmig,CN=host-b", ["C=GB,O=virtmig,CN=host-a", "*CN=host-b"], True),
    ],
)
def test_dn_matches(dn: str, patterns: list[str], expected: bool) -> None:
    assert dn_matches(dn, patterns) is expected
