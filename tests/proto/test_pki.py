"""The PKI for mutual TLS: the dir layout and its resolution, what ``init_ca``/``issue`` write
(files, modes, certificate contents), every refusal of the loaders, and one real gRPC
mutual-TLS exchange on loopback with what ``issue`` wrote.  DNs: ``test_pki_dn.py``."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from virtmig.client import pki as gen
from virtmig.proto.errors import ConfigUnsupported, InvalidArgument, OperationInvalid
from virtmig.proto.pki import (
    PKI_DIR_ENV,
    SYSTEM_PKI_DIR,
    PkiPaths,
    default_pki_dir,
    load_client_credentials,
    load_server_credentials,
    peer_subject_dn,
    resolve_pki_dir,
    subject_dn,
)

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    gen.init_ca(tmp_path / "ca")
    return tmp_path / "ca"


@pytest.fixture
def host_dir(ca_dir: Path, tmp_path: Path) -> Path:
    gen.issue(ca_dir, tmp_path / "host-a", host="host-a", ips=["127.0.0.1", "::1"])
    return tmp_path / "host-a"


@pytest.fixture
def client_dir(ca_dir: Path, tmp_path: Path) -> Path:
    gen.issue(ca_dir, tmp_path / "alice", client="alice")
    return tmp_path / "alice"


def cert_of(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def tree(root: Path) -> dict[str, int]:
    """Every file and dir below ``root``, with its permission bits."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


def eku(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


# --- where the files are --------------------------------------------------------------------------


def test_paths_have_libvirts_names(tmp_path: Path) -> None:
    p = PkiPaths.of(tmp_path)
    assert (p.dir, p.cacert, p.servercert, p.serverkey, p.clientcert, p.clientkey) == (
        tmp_path, tmp_path / "cacert.pem", tmp_path / "servercert.pem",
        tmp_path / "private/serverkey.pem", tmp_path / "clientcert.pem",
        tmp_path / "private/clientkey.pem",
    )


def test_default_dir_for_root_and_users(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert default_pki_dir() == SYSTEM_PKI_DIR == Path("/etc/pki/virtmig")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert default_pki_dir() == tmp_path / "xdg/virtmig/pki"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/ignored")  # the XDG spec: absolute only
    assert default_pki_dir() == tmp_path / "home/.config/virtmig/pki"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert default_pki_dir() == tmp_path / "home/.config/virtmig/pki"


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(PKI_DIR_ENV, raising=False)
    assert resolve_pki_dir() == default_pki_dir()
    assert resolve_pki_dir("") == default_pki_dir()
    monkeypatch.setenv(PKI_DIR_ENV, str(tmp_path / "env"))
    assert resolve_pki_dir() == tmp_path / "env"
    assert resolve_pki_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert PkiPaths.resolve(str(tmp_path / "explicit")) == PkiPaths.of(tmp_path / "explicit")
    assert PkiPaths.resolve() == PkiPaths.of(tmp_path / "env")


# --- what init_ca and issue write -----------------------------------------------------------------


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077])
def test_files_and_modes(tmp_path: Path, mask: int) -> None:
    with umask(mask):
        gen.init_ca(tmp_path / "ca")
        gen.issue(tmp_path / "ca", tmp_path / "deep/host", host="h", ips=["10.0.0.1"])
        gen.issue(tmp_path / "ca", tmp_path / "cli", client="c")
    cert_mode = 0o644  # set exactly: a stricter umask does not hide the certificates
    dir_mode = 0o755 & ~mask
    assert tree(tmp_path / "ca") == {"cacert.pem": cert_mode, "private": 0o700,
                                     "private/cakey.pem": 0o600}
    assert stat.S_IMODE((tmp_path / "deep").stat().st_mode) == dir_mode  # made, not 0777
    assert stat.S_IMODE((tmp_path / "deep/host").stat().st_mode) == dir_mode
    assert tree(tmp_path / "deep/host") == {
        "cacert.pem": cert_mode, "servercert.pem": cert_mode, "clientcert.pem": cert_mode,
        "private": 0o700, "private/serverkey.pem": 0o600, "private/clientkey.pem": 0o600,
    }
    assert tree(tmp_path / "cli") == {"cacert.pem": cert_mode, "clientcert.pem": cert_mode,
                                      "private": 0o700, "private/clientkey.pem": 0o600}
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_ca_certificate(ca_dir: Path) -> None:
    cert = cert_of(ca_dir / "cacert.pem")
    assert subject_dn(cert) == "O=virtmig,CN=virtmig CA"
    assert cert.issuer == cert.subject
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=3650)
    key = serialization.load_pem_private_key((ca_dir / "private/cakey.pem").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)


def test_ca_options(tmp_path: Path) -> None:
    gen.init_ca(tmp_path / "ca", common_name="Test CA", org="Acme", days=10)
    cert = cert_of(tmp_path / "ca/cacert.pem")
    assert subject_dn(cert) == "O=Acme,CN=Test CA"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=10)
    gen.issue(tmp_path / "ca", tmp_path / "h", host="h")
    assert subject_dn(cert_of(tmp_path / "h/servercert.pem")) == "O=Acme,CN=h"


def test_host_certificate(ca_dir: Path, host_dir: Path) -> None:
    assert (host_dir / "servercert.pem").read_bytes() == (host_dir / "clientcert.pem").read_bytes()
    assert ((host_dir / "private/serverkey.pem").read_bytes()
            == (host_dir / "private/clientkey.pem").read_bytes())
    assert (host_dir / "cacert.pem").read_bytes() == (ca_dir / "cacert.pem").read_bytes()
    cert = cert_of(host_dir / "servercert.pem")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host-a"
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["host-a"]
    assert sans.get_values_for_type(x509.IPAddress) == [ip_address("127.0.0.1"),
                                                         ip_address("::1")]
    assert eku(cert) == [SERVER_AUTH, CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=365)
    assert cert.not_valid_before_utc < datetime.now(UTC)
    cert.verify_directly_issued_by(cert_of(ca_dir / "cacert.pem"))


def test_host_given_as_an_address(ca_dir: Path, tmp_path: Path) -> None:
    gen.issue(ca_dir, tmp_path / "h", host="10.0.0.1", ips=["10.0.0.2", "10.0.0.1"])
    sans = cert_of(tmp_path / "h/servercert.pem").extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == []
    assert sans.get_values_for_type(x509.IPAddress) == [ip_address("10.0.0.1"),
                                                        ip_address("10.0.0.2")]


def test_client_certificate(client_dir: Path) -> None:
    cert = cert_of(client_dir / "clientcert.pem")
    assert subject_dn(cert) == "O=virtmig,CN=alice"
    assert eku(cert) == [CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_refuses_to_overwrite(ca_dir: Path, host_dir: Path) -> None:
    before = (ca_dir / "private/cakey.pem").read_bytes()
    with pytest.raises(OperationInvalid, match="already holds a CA"):
        gen.init_ca(ca_dir)
    assert (ca_dir / "private/cakey.pem").read_bytes() == before
    old = tree(host_dir), (host_dir / "servercert.pem").read_bytes()
    with pytest.raises(OperationInvalid, match=r"refusing to overwrite .*servercert\.pem"):
        gen.issue(ca_dir, host_dir, host="host-a")
    assert (tree(host_dir), (host_dir / "servercert.pem").read_bytes()) == old
    # --force replaces the files, and a key that had been opened up gets 0600 back.
    os.chmod(host_dir / "private/serverkey.pem", 0o644)
    gen.issue(ca_dir, host_dir, host="host-a", force=True)
    assert (host_dir / "servercert.pem").read_bytes() != old[1]
    assert tree(host_dir) == old[0]
    load_server_credentials(PkiPaths.of(host_dir))


def test_a_partly_existing_dir_is_left_alone(ca_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "out/private").mkdir(parents=True)
    (tmp_path / "out/private/clientkey.pem").write_text("mine")
    os.chmod(tmp_path / "out/private", 0o755)
    os.chmod(tmp_path / "out/private/clientkey.pem", 0o644)
    with pytest.raises(OperationInvalid, match=r"clientkey\.pem"):
        gen.issue(ca_dir, tmp_path / "out", client="c")
    assert tree(tmp_path / "out") == {"private": 0o755, "private/clientkey.pem": 0o644}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, "exactly one of"),
        ({"host": "h", "client": "c"}, "exactly one of"),
        ({"client": "c", "ips": ["10.0.0.1"]}, "IP addresses are for a host"),
        ({"host": "h", "ips": ["10.0.0"]}, "invalid IP address '10.0.0'"),
        ({"host": "bad name"}, "invalid host name 'bad name'"),
        ({"host": "-h"}, "invalid host name"),
        ({"host": "h..example"}, "invalid host name"),
        ({"host": "hôte"}, "invalid host name"),
        ({"client": ""}, "invalid certificate name"),
        ({"client": "x" * 65}, "invalid certificate name"),
        ({"host": "h", "days": 0}, "invalid validity of 0 days"),
    ],
)
def test_issue_arguments(ca_dir: Path, tmp_path: Path, kwargs: dict[str, object],
                         error: str) -> None:
    with pytest.raises(InvalidArgument, match=error):
        gen.issue(ca_dir, tmp_path / "out", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_issue_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"holds no CA: .*cacert\.pem' does not exist"):
        gen.issue(tmp_path / "nowhere", tmp_path / "out", host="h")


def test_issue_refuses_an_open_ca_key(ca_dir: Path, tmp_path: Path) -> None:
    os.chmod(ca_dir / "private/cakey.pem", 0o640)
    with pytest.raises(ConfigUnsupported, match="permissions 0640 for CA key"):
        gen.issue(ca_dir, tmp_path / "out", host="h")


# --- loading --------------------------------------------------------------------------------------


def test_load_accepts_what_issue_writes(host_dir: Path, client_dir: Path) -> None:
    host = PkiPaths.of(host_dir)
    server = load_server_credentials(host)
    assert server.ca_pem == host.cacert.read_bytes()
    assert server.cert_chain_pem == host.servercert.read_bytes()
    assert server.key_pem == host.serverkey.read_bytes()
    assert server.subject == "O=virtmig,CN=host-a"
    assert "PRIVATE" not in repr(server)
    assert load_client_credentials(host).cert_chain_pem == host.clientcert.read_bytes()
    assert load_client_credentials(PkiPaths.of(client_dir)).subject == "O=virtmig,CN=alice"


def test_load_accepts_a_key_only_its_owner_can_read(host_dir: Path) -> None:
    os.chmod(host_dir / "private/serverkey.pem", 0o400)
    load_server_credentials(PkiPaths.of(host_dir))


@pytest.mark.parametrize("name", ["cacert.pem", "servercert.pem", "private/serverkey.pem"])
def test_refuses_a_missing_file(host_dir: Path, name: str) -> None:
    (host_dir / name).unlink()
    with pytest.raises(ConfigUnsupported, match=f"'{host_dir / name}' does not exist"):
        load_server_credentials(PkiPaths.of(host_dir))


def test_refuses_an_unreadable_file(host_dir: Path) -> None:
    (host_dir / "servercert.pem").unlink()
    (host_dir / "servercert.pem").mkdir()
    with pytest.raises(ConfigUnsupported, match=r"cannot read server certificate '.*"
                                                r"servercert\.pem': Is a directory"):
        load_server_credentials(PkiPaths.of(host_dir))
    (host_dir / "private/serverkey.pem").unlink()
    os.mkfifo(host_dir / "private/serverkey.pem", 0o600)  # and no writer: must not block
    (host_dir / "servercert.pem").rmdir()
    shutil.copy(host_dir / "clientcert.pem", host_dir / "servercert.pem")
    with pytest.raises(ConfigUnsupported, match=r"serverkey\.pem' is not a regular file"):
        load_server_credentials(PkiPaths.of(host_dir))
    if os.geteuid() != 0:  # root reads whatever the mode says
        os.chmod(host_dir / "cacert.pem", 0)
        with pytest.raises(ConfigUnsupported, match=r"cannot read CA certificate .*denied"):
            load_server_credentials(PkiPaths.of(host_dir))


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_refuses_a_key_others_can_read(host_dir: Path, mode: int) -> None:
    key = host_dir / "private/clientkey.pem"
    os.chmod(key, mode)
    with pytest.raises(ConfigUnsupported) as err:
        load_client_credentials(PkiPaths.of(host_dir))
    assert err.value.detail == (
        f"permissions {mode:04o} for client key '{key}' are too open: a private key must be "
        "accessible by its owner only (chmod 600)"
    )


def test_refuses_a_certificate_from_another_ca(host_dir: Path, tmp_path: Path) -> None:
    gen.init_ca(tmp_path / "other")
    shutil.copy(tmp_path / "other/cacert.pem", host_dir / "cacert.pem")
    with pytest.raises(ConfigUnsupported) as err:
        load_server_credentials(PkiPaths.of(host_dir))
    assert err.value.detail == (
        f"the server certificate '{host_dir / 'servercert.pem'}' is not signed by the CA "
        f"certificate '{host_dir / 'cacert.pem'}'"
    )


def test_accepts_a_ca_bundle(host_dir: Path, tmp_path: Path) -> None:
    gen.init_ca(tmp_path / "other")
    bundle = (tmp_path / "other/cacert.pem").read_bytes() + (host_dir / "cacert.pem").read_bytes()
    (host_dir / "cacert.pem").write_bytes(bundle)
    load_server_credentials(PkiPaths.of(host_dir))


def test_refuses_expired_and_future_certificates(ca_dir: Path, tmp_path: Path) -> None:
    ca = gen.load_ca(ca_dir)
    now = datetime.now(UTC)
    old = gen.make_leaf(ca, "old", server=True, not_before=now - timedelta(days=30), days=2)
    gen.write_pki_dir(tmp_path / "old", ca.cert, old, server=True)
    with pytest.raises(ConfigUnsupported, match=r"servercert.pem' has expired \(valid until "):
        load_server_credentials(PkiPaths.of(tmp_path / "old"))
    new = gen.make_leaf(ca, "new", server=True, not_before=now + timedelta(days=1))
    gen.write_pki_dir(tmp_path / "new", ca.cert, new, server=True)
    with pytest.raises(ConfigUnsupported, match=r"clientcert.pem' is not yet active"):
        load_client_credentials(PkiPaths.of(tmp_path / "new"))


def test_refuses_an_expired_ca(host_dir: Path) -> None:
    later = datetime.now(UTC) + timedelta(days=3651)
    with pytest.raises(ConfigUnsupported, match=r"the CA certificate '.*' has expired"):
        load_server_credentials(PkiPaths.of(host_dir), now=later)
    soon = datetime.now(UTC) + timedelta(days=366)
    with pytest.raises(ConfigUnsupported, match=r"the server certificate '.*' has expired"):
        load_server_credentials(PkiPaths.of(host_dir), now=soon)


def test_refuses_a_key_of_another_certificate(host_dir: Path, client_dir: Path) -> None:
    shutil.copy(client_dir / "private/clientkey.pem", host_dir / "private/serverkey.pem")
    with pytest.raises(ConfigUnsupported) as err:
        load_server_credentials(PkiPaths.of(host_dir))
    assert err.value.detail == (
        f"server key '{host_dir / 'private/serverkey.pem'}' does not match the server "
        f"certificate '{host_dir / 'servercert.pem'}'"
    )


def test_refuses_a_client_certificate_as_server(host_dir: Path, client_dir: Path) -> None:
    shutil.copy(client_dir / "clientcert.pem", host_dir / "servercert.pem")
    shutil.copy(client_dir / "private/clientkey.pem", host_dir / "private/serverkey.pem")
    with pytest.raises(ConfigUnsupported, match="may not be used by a TLS server: its "
                                                "extended key usage lacks serverAuth"):
        load_server_credentials(PkiPaths.of(host_dir))


def _custom_leaf(ca: gen.Identity, out: Path, *, purposes: list[x509.ObjectIdentifier] | None,
                 ca_flag: bool = False) -> None:
    """A host dir whose certificate has exactly ``purposes`` (None: no such extension)."""
    key = gen.new_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "custom")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca_flag, path_length=None), critical=True)
    )
    if purposes is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(purposes), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())
    gen.write_pki_dir(out, ca.cert, gen.Identity(cert, key), server=True)


def test_purposes(ca_dir: Path, tmp_path: Path) -> None:
    ca = gen.load_ca(ca_dir)
    _custom_leaf(ca, tmp_path / "server-only", purposes=[SERVER_AUTH])
    load_server_credentials(PkiPaths.of(tmp_path / "server-only"))
    with pytest.raises(ConfigUnsupported, match="may not be used by a TLS client: its "
                                                "extended key usage lacks clientAuth"):
        load_client_credentials(PkiPaths.of(tmp_path / "server-only"))
    # No extended key usage at all: any purpose (libvirt and BoringSSL agree).
    _custom_leaf(ca, tmp_path / "any", purposes=None)
    load_server_credentials(PkiPaths.of(tmp_path / "any"))
    load_client_credentials(PkiPaths.of(tmp_path / "any"))


def test_refuses_ca_confusion(ca_dir: Path, host_dir: Path, tmp_path: Path) -> None:
    _custom_leaf(gen.load_ca(ca_dir), tmp_path / "ca-leaf", purposes=None, ca_flag=True)
    with pytest.raises(ConfigUnsupported, match=r"servercert\.pem' is a CA certificate"):
        load_server_credentials(PkiPaths.of(tmp_path / "ca-leaf"))
    shutil.copy(host_dir / "servercert.pem", host_dir / "cacert.pem")
    with pytest.raises(ConfigUnsupported, match=r"cacert\.pem' is not a CA certificate"):
        load_server_credentials(PkiPaths.of(host_dir))


def test_accepts_an_intermediate_ca(ca_dir: Path, tmp_path: Path) -> None:
    root = gen.load_ca(ca_dir)
    mid_key = gen.new_key()
    mid_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "virtmig"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "mid")])
    mid_cert = (
        x509.CertificateBuilder().subject_name(mid_name).issuer_name(root.cert.subject)
        .public_key(mid_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root.key, hashes.SHA256())
    )
    mid = gen.Identity(mid_cert, mid_key)
    gen.write_pki_dir(tmp_path / "h", root.cert, gen.make_leaf(mid, "h", server=True),
                      server=True)
    paths = PkiPaths.of(tmp_path / "h")
    with pytest.raises(ConfigUnsupported, match="is not signed by the CA certificate"):
        load_server_credentials(paths)  # the leaf alone does not reach the root
    chain = paths.servercert.read_bytes() + gen.cert_pem(mid_cert)
    paths.servercert.write_bytes(chain)
    assert load_server_credentials(paths).cert_chain_pem == chain
    other = gen.make_ca()
    paths.servercert.write_bytes(paths.clientcert.read_bytes() + gen.cert_pem(other.cert))
    with pytest.raises(ConfigUnsupported, match="broken chain: certificate 1 is not signed by "
                                                "certificate 2"):
        load_server_credentials(paths)


def test_refuses_what_is_not_pem(host_dir: Path) -> None:
    paths = PkiPaths.of(host_dir)
    key = serialization.load_pem_private_key(paths.serverkey.read_bytes(), None)
    paths.serverkey.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigUnsupported, match=r"serverkey\.pem' is encrypted"):
        load_server_credentials(paths)
    paths.serverkey.write_text("not a key\n")
    with pytest.raises(ConfigUnsupported, match=r"serverkey\.pem' holds no PEM private key"):
        load_server_credentials(paths)
    paths.servercert.write_text("")
    with pytest.raises(ConfigUnsupported, match=r"servercert\.pem' holds no PEM certificate"):
        load_server_credentials(paths)


def test_refuses_a_key_type_grpc_cannot_use(ca_dir: Path, tmp_path: Path) -> None:
    ca = gen.load_ca(ca_dir)
    key = ed25519.Ed25519PrivateKey.generate()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ed")]))
        .issuer_name(ca.cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.now(UTC) - timedelta(hours=1))
        .not_valid_after(datetime.now(UTC) + timedelta(days=1))
        .sign(ca.key, hashes.SHA256())
    )
    paths = PkiPaths.of(tmp_path / "ed")
    gen.write_pki_dir(paths.dir, ca.cert, gen.make_leaf(ca, "ed", server=True), server=True)
    paths.servercert.write_bytes(gen.cert_pem(cert))
    paths.serverkey.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    with pytest.raises(ConfigUnsupported, match=r"a key gRPC's TLS cannot use \(Ed25519\)"):
        load_server_credentials(paths)


# --- one real mutual-TLS exchange over gRPC -------------------------------------------------------


async def _peer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """Echo what the server sees of its peer."""
    auth = context.auth_context()
    seen = {k: [v.decode() for v in vs] for k, vs in auth.items()}
    return json.dumps({"auth": seen, "dn": peer_subject_dn(auth)}).encode()


async def _call(port: int, creds: grpc.ChannelCredentials, name: str | None = None,
                address: str = "127.0.0.1") -> dict[str, object]:
    options = [("grpc.ssl_target_name_override", name)] if name else []
    async with grpc.aio.secure_channel(f"{address}:{port}", creds, options=options) as channel:
        who = channel.unary_unary("/virtmig.test.Peer/Who", None, None)  # bytes as they are
        reply = await who(b"", timeout=20)
    result: dict[str, object] = json.loads(reply)
    return result


async def test_grpc_mutual_tls(host_dir: Path, client_dir: Path, tmp_path: Path) -> None:
    host = load_server_credentials(PkiPaths.of(host_dir))
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "virtmig.test.Peer", {"Who": grpc.unary_unary_rpc_method_handler(_peer)})])
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(host.key_pem, host.cert_chain_pem)], root_certificates=host.ca_pem,
        require_client_auth=True))
    await server.start()
    try:
        alice = load_client_credentials(PkiPaths.of(client_dir))
        creds = grpc.ssl_channel_credentials(alice.ca_pem, alice.key_pem, alice.cert_chain_pem)
        # (a) works, by the host's DNS name and by its IP SAN, over TLS 1.3; and the server
        # computes the DN the allowed-DN lists will match from the client's certificate.
        seen = await _call(port, creds, "host-a")
        assert seen["dn"] == subject_dn(alice.cert_chain_pem) == "O=virtmig,CN=alice"
        auth = seen["auth"]
        assert isinstance(auth, dict)
        assert auth["ssl_tls_version"] == ["TLSv1.3"]
        assert auth["transport_security_type"] == ["ssl"]
        # gRPC's own subject string has RFC 4514's order, the reverse of libvirt's: the reason
        # authorization goes through peer_subject_dn.
        assert auth["x509_subject"] == ["CN=alice,O=virtmig"]
        assert (await _call(port, creds))["dn"] == "O=virtmig,CN=alice"
        # A host dir's client files work too (peer-to-peer: the source daemon as a client).
        peer = load_client_credentials(PkiPaths.of(host_dir))
        peer_creds = grpc.ssl_channel_credentials(peer.ca_pem, peer.key_pem, peer.cert_chain_pem)
        assert (await _call(port, peer_creds, "host-a"))["dn"] == "O=virtmig,CN=host-a"

        # The client checks the server's name.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(port, creds, "host-b")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # (b) A client certificate from another CA is refused.
        gen.init_ca(tmp_path / "other-ca")
        gen.issue(tmp_path / "other-ca", tmp_path / "mallory", client="alice")
        mallory = load_client_credentials(PkiPaths.of(tmp_path / "mallory"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(port, grpc.ssl_channel_credentials(
                alice.ca_pem, mallory.key_pem, mallory.cert_chain_pem), "host-a")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # (c) No client certificate at all is refused.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _call(port, grpc.ssl_channel_credentials(alice.ca_pem), "host-a")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)
