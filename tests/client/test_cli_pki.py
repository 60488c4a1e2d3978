"""``virtmig pki init`` / ``pki issue``: what they print and write, their errors, and that they
open no daemon connection (nor, for the other commands, load the certificate code)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from virtmig.client.cli import COMMANDS_BY_NAME, commands_help
from virtmig.client.cli import app as cli
from virtmig.client.connection import AsyncConnection
from virtmig.proto.pki import PkiPaths, load_client_credentials, load_server_credentials


@pytest.fixture(autouse=True)
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``pki`` must never open a connection: any attempt fails the test."""

    async def refuse(*args: object, **kwargs: object) -> AsyncConnection:
        raise AssertionError("virtmig pki opened a daemon connection")

    monkeypatch.setattr(AsyncConnection, "open", refuse)
    yield


@pytest.fixture
def ca(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert cli.main(["-q", "pki", "init", str(tmp_path / "ca")]) == 0
    capsys.readouterr()
    return tmp_path / "ca"


def test_init_prints_each_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca"
    # -c names an address nobody answers on: pki does not care.
    assert cli.main(["-q", "-c", "virtmig+tls://192.0.2.1:1", "pki", "init", str(ca), "--cn",
                     "Lab CA", "--org", "Lab", "--days", "30"]) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"wrote {ca}/cacert.pem (CA certificate)\n"
                          f"wrote {ca}/private/cakey.pem (CA key)\n", "")
    cert = x509.load_pem_x509_certificate((ca / "cacert.pem").read_bytes())
    assert cert.subject.rfc4514_string() == "CN=Lab CA,O=Lab"
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 30


def test_issue_host(ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "host-a"
    assert cli.main(["-q", "pki", "issue", str(ca), "--host", "host-a", "--ip", "192.0.2.7",
                     "--ip", "2001:db8::7", "--out", str(out_dir)]) == 0
    assert capsys.readouterr().out == (
        f"wrote {out_dir}/cacert.pem (CA certificate)\n"
        f"wrote {out_dir}/servercert.pem (server certificate)\n"
        f"wrote {out_dir}/private/serverkey.pem (server key)\n"
        f"wrote {out_dir}/clientcert.pem (client certificate)\n"
        f"wrote {out_dir}/private/clientkey.pem (client key)\n"
    )
    server = load_server_credentials(PkiPaths.of(out_dir))
    assert server.subject == "O=virtmig,CN=host-a"
    cert = x509.load_pem_x509_certificate(server.cert_chain_pem)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.7",
                                                                           "2001:db8::7"]
    load_client_credentials(PkiPaths.of(out_dir))


def test_issue_client(ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "alice"
    with_umask = os.umask(0)
    try:
        assert cli.main(["-q", "pki", "issue", str(ca), "--client", "alice", "--out", str(out_dir),
                         "--days", "7"]) == 0
    finally:
        os.umask(with_umask)
    assert capsys.readouterr().out == (
        f"wrote {out_dir}/cacert.pem (CA certificate)\n"
        f"wrote {out_dir}/clientcert.pem (client certificate)\n"
        f"wrote {out_dir}/private/clientkey.pem (client key)\n"
    )
    assert stat.S_IMODE((out_dir / "private").stat().st_mode) == 0o700
    assert stat.S_IMODE((out_dir / "private/clientkey.pem").stat().st_mode) == 0o600
    client = load_client_credentials(PkiPaths.of(out_dir))
    cert = x509.load_pem_x509_certificate(client.cert_chain_pem)
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc).days == 7
    assert not (out_dir / "servercert.pem").exists()


def test_force(ca: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["pki", "issue", str(ca), "--client", "alice", "--out", str(tmp_path / "a")]
    assert cli.main(["-q", *argv]) == 0
    first = (tmp_path / "a/clientcert.pem").read_bytes()
    capsys.readouterr()
    assert cli.main(["-q", *argv]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: Requested operation is not valid: refusing to overwrite {tmp_path}/a/cacert.pem, ")
    assert cli.main(["-q", *argv, "--force"]) == 0
    assert (tmp_path / "a/clientcert.pem").read_bytes() != first


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["pki"], "pki: the following arguments are required: ACTION, CA_DIR"),
        (["pki", "renew", "x"], "pki: argument ACTION: invalid choice: 'renew' "
                                "(choose from 'init', 'issue')"),
        (["pki", "init", "CA", "--host", "h"], "Option --host is not valid with 'pki init'"),
        (["pki", "init", "CA", "--force"], "Option --force is not valid with 'pki init'"),
        (["pki", "issue", "CA", "--client", "c", "--cn", "x", "--out", "o"],
         "Option --cn is not valid with 'pki issue'"),
        (["pki", "issue", "CA", "--out", "o"],
         "command 'pki issue' requires <host> or <client> option"),
        (["pki", "issue", "CA", "--host", "h", "--client", "c", "--out", "o"],
         "Options --host and --client are mutually exclusive"),
        (["pki", "issue", "CA", "--client", "c", "--ip", "10.0.0.1", "--out", "o"],
         "Option --host is required by option --ip"),
        (["pki", "issue", "CA", "--host", "h"], "command 'pki issue' requires <out> option"),
        (["pki", "init", "CA", "--days", "0"],
         "Numeric value '0' for <days> option is malformed or out of range"),
        (["pki", "init", "CA", "--days", "36501"],
         "Numeric value '36501' for <days> option is malformed or out of range"),
        (["pki", "issue", "CA", "--host", "h", "--out", "o", "--days", "x"],
         "Numeric value 'x' for <days> option is malformed or out of range"),
    ],
)
def test_usage_errors(argv: list[str], error: str, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["-q", *argv]) == 1
    assert capsys.readouterr() == ("", f"error: {error}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--host", "bad name"], "invalid argument: invalid host name 'bad name': expected a "
                                 "DNS name or an address"),
        (["--host", "h", "--ip", "300.1.1.1"], "invalid argument: invalid IP address '300.1.1.1'"),
    ],
)
def test_issue_errors(ca: Path, tmp_path: Path, args: list[str], error: str,
                      capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-q", "pki", "issue", str(ca), *args, "--out", str(tmp_path / "o")]) == 1
    assert capsys.readouterr() == ("", f"error: {error}\n")


def test_errors_from_the_files(ca: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-q", "pki", "init", str(ca)]) == 1
    assert capsys.readouterr().err == (
        f"error: Requested operation is not valid: '{ca}' already holds a CA: refusing to "
        "overwrite it\n")
    nowhere = tmp_path / "nowhere"
    assert cli.main(["-q", "pki", "issue", str(nowhere), "--host", "h", "--out",
                     str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (
        f"error: invalid argument: '{nowhere}' holds no CA: '{nowhere}/cacert.pem' does not exist "
        "('virtmig pki init' makes one)\n"
    )
    os.chmod(ca / "private/cakey.pem", 0o644)
    assert cli.main(["-q", "pki", "issue", str(ca), "--host", "h", "--out",
                     str(tmp_path / "o")]) == 1
    assert capsys.readouterr().err == (
        f"error: unsupported configuration: permissions 0644 for CA key '{ca}/private/cakey.pem' "
        "are too open: a private key must be accessible by its owner only (chmod 600)\n"
    )


def test_listed_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert "    pki              make a CA, or issue" in commands_help()
    assert cli.main(["-q", "help", "pki"]) == 0
    assert capsys.readouterr().out.startswith(
        "usage: virtmig pki init CA_DIR [--cn NAME] [--org ORG] [--days N]\n"
        "       virtmig pki issue CA_DIR (--host NAME [--ip ADDR]... | --client NAME) --out DIR\n"
    )
    assert COMMANDS_BY_NAME["pki"].data == ()


def test_other_commands_do_not_load_cryptography() -> None:
    # The certificate code is imported when `pki` runs: no other command pays for it.
    code = "import sys, virtmig.client.cli; print(sorted(m for m in sys.modules if 'crypto' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out == "[]\n"
