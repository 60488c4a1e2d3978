"""The daemon on its own: configuration, lifecycle with libvirt's errors, files and restarts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.job import AsyncJob, MigrationJob, Phase
from virtmig.daemon.statusxml import job_from_status
from virtmig.proto.errors import (
    InternalError,
    InvalidArgument,
    NoDomain,
    OperationFailed,
    OperationInvalid,
    XMLError,
)
from virtmig.proto.flags import DomainState, MigrateFlags
from virtmig.testing import Host, domain_xml, start_host, stop_host


@pytest.fixture
async def host(tmp_path: Path) -> Host:  # type: ignore[misc]
    h = await start_host(tmp_path, "solo")
    yield h
    await stop_host(h)


def args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# --- configuration -------------------------------------------------------------------------------


def test_config_file_and_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "virtmigd.toml"
    cfg.write_text('state_dir = "/s"\nhostname = "a"\nmigration_ports = "50000-50010"\n'
                   'listen = ["tls://127.0.0.1:0"]\nmax_clients = 7\nmax_downtime_ms = 50\n')
    c = load_config(args("--config", str(cfg), "--hostname", "b"))
    assert (c.state_dir, c.hostname) == ("/s", "b")  # flags win over the file
    assert (c.max_clients, c.max_calls_per_client, c.default_max_downtime_ms) == (7, 32, 50)
    assert (c.migration_port_min, c.migration_port_max) == (50000, 50010)
    assert c.listen == ("tls://127.0.0.1:0",)


@pytest.mark.parametrize(
    ("text", "message"),
    [('bogus = 1\n', "unknown setting"), ('migration_ports = "9-1"\n', "port range"),
     ('listen = ["http://x"]\n', "unsupported listen URI"), ('x = \n', "cannot read"),
     ('max_downtime_ms = 0\n', "invalid max_downtime_ms: Invalid downtime 0: must be between"),
     ('max_downtime_ms = 2000001\n', "invalid max_downtime_ms: Invalid downtime 2000001"),
     ('max_downtime_ms = "fast"\n', "invalid max_downtime_ms 'fast'"),
     ('max_clients = 0\n', "invalid max_clients 0: expected a whole number of at least 1"),
     ('max_calls_per_client = -1\n', "invalid max_calls_per_client -1"),
     ('max_calls_per_client = 1.5\n', "invalid max_calls_per_client 1.5"),
     # the one-place check's peer and settling settings (virtmig.daemon.locate)
     ('peer_timeout = 0\n', "invalid peer_timeout 0: expected a positive number of seconds"),
     ('settle_retry_min = -1\n', "invalid settle_retry_min -1: expected a positive number"),
     ('settle_retry_max = 1e9\n', "invalid settle_retry_max 1e\\+09: expected a positive"),
     ('settle_retry_min = 5\nsettle_retry_max = 2\n',
      "invalid settle_retry_max 2: less than settle_retry_min"),
     ('settle_attempts = 0\n', "invalid settle_attempts 0: expected a whole number of at least")],
)
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(InvalidArgument, match=message):
        load_config(args("--config", str(cfg)))


def test_virtmigd_reports_config_errors_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from virtmig.daemon.main import main

    assert main(["--config", str(tmp_path / "missing.toml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("virtmigd: error: invalid argument: cannot read config file")
    assert "Traceback" not in err


# --- lifecycle -----------------------------------------------------------------------------------


async def test_lifecycle_states_and_reasons(host: Host) -> None:
    c = host.conn
    dom = await c.define(domain_xml("vm1"))
    assert dom.persistent and dom.state is DomainState.SHUTOFF and dom.id == -1
    started = await c.start("vm1")
    assert started.id > 0 and await c.state("vm1") == (DomainState.RUNNING, 1, "booted")
    await c.suspend("vm1")
    assert await c.state("vm1") == (DomainState.PAUSED, 1, "user")
    await c.resume("vm1")
    assert await c.state("vm1") == (DomainState.RUNNING, 5, "unpaused")
    await c.destroy("vm1")
    assert await c.state("vm1") == (DomainState.SHUTOFF, 2, "destroyed")
    await c.start("vm1", paused=True)
    assert (await c.state("vm1"))[0] is DomainState.PAUSED
    assert [d.name for d in await c.list_domains()] == ["vm1"]
    await c.undefine("vm1")  # running: becomes transient
    assert not (await c.lookup("vm1")).persistent
    await c.destroy("vm1")
    with pytest.raises(NoDomain):
        await c.lookup("vm1")


async def test_lookup_by_uuid_and_id(host: Host) -> None:
    dom = await host.conn.define(domain_xml("vm1"))
    assert (await host.conn.lookup(dom.uuid)).name == "vm1"
    started = await host.conn.start("vm1")
    assert (await host.conn.lookup(str(started.id))).name == "vm1"
    info = await host.conn.info("vm1")
    assert (info.max_memory_kib, info.vcpus, info.os_type) == (64 * 1024, 1, "hvm")


@pytest.mark.parametrize(
    ("setup", "call", "error", "message"),
    [
        ([], "start", NoDomain, "no domain with matching name 'vm1'"),
        (["define"], "destroy", OperationInvalid, "domain is not running"),
        (["define"], "suspend", OperationInvalid, "domain is not running"),
        (["define", "start"], "start", OperationInvalid, "domain is already running"),
        (["define", "start"], "resume", OperationInvalid, "domain is not paused"),
    ],
)
async def test_lifecycle_errors(host: Host, setup: list[str], call: str,
                                error: type[Exception], message: str) -> None:
    for step in setup:
        if step == "define":
            await host.conn.define(domain_xml("vm1"))
        else:
            await getattr(host.conn, step)("vm1")
    with pytest.raises(error, match=message):
        await getattr(host.conn, call)("vm1")


async def test_undefine_transient_is_refused(host: Host) -> None:
    await host.conn.define(domain_xml("vm1"))
    await host.conn.start("vm1")
    await host.conn.undefine("vm1")
    with pytest.raises(OperationInvalid, match="cannot undefine transient domain"):
        await host.conn.undefine("vm1")


async def test_bad_xml_is_a_typed_error_naming_the_problem(host: Host) -> None:
    with pytest.raises(XMLError):
        await host.conn.define("<domain type='test'><name>x</name>")
    with pytest.raises(XMLError, match="DTD"):
        await host.conn.define('<!DOCTYPE d [<!ENTITY e SYSTEM "file:///etc/passwd">]>'
                               "<domain type='test'><name>&e;</name></domain>")


async def test_define_clashes(host: Host) -> None:
    a = await host.conn.define(domain_xml("vm1"))
    with pytest.raises(OperationFailed, match="already exists with uuid"):
        await host.conn.define(domain_xml("vm1"))
    with pytest.raises(OperationFailed, match="is already defined with uuid"):
        await host.conn.define(domain_xml("vm2", uuid=a.uuid))
    # same name and uuid: an update of the definition
    await host.conn.define(domain_xml("vm1", 128, uuid=a.uuid))
    assert (await host.conn.info("vm1")).max_memory_kib == 128 * 1024


# --- files and restarts --------------------------------------------------------------------------


async def test_restart_keeps_host_uuid_and_persistent_domains(tmp_path: Path) -> None:
    h = await start_host(tmp_path, "h")
    host_uuid = (await h.conn.host()).host_uuid
    await h.conn.define(domain_xml("keep"))
    await h.conn.define(domain_xml("running"))
    await h.conn.start("running")
    await h.conn.define(domain_xml("transient"))
    await h.conn.start("transient")
    await h.conn.undefine("transient")
    await stop_host(h)

    h = await start_host(tmp_path, "h")
    try:
        assert (await h.conn.host(refresh=True)).host_uuid == host_uuid
        doms = {d.name: d for d in await h.conn.list_domains(active=True, inactive=True)}
        assert set(doms) == {"keep", "running"}
        # The test backend's guests live in the daemon: they did not survive the restart.
        assert await h.conn.state("running") == (DomainState.SHUTOFF, 8, "daemon")
        await h.conn.start("running")
    finally:
        await stop_host(h)


async def test_status_file_records_the_job(host: Host) -> None:
    await host.conn.define(domain_xml("vm1"))
    await host.conn.start("vm1")
    dom = host.daemon.registry.by_name("vm1")
    dom.job = MigrationJob(kind=AsyncJob.MIGRATION_OUT,
                           phase=Phase.BEGIN3, flags=MigrateFlags.LIVE,
                           pre_state=DomainState.RUNNING)
    host.daemon.registry.save_status(dom)
    from lxml import etree

    root = etree.fromstring((host.state_dir / "status" / f"{dom.uuid}.xml").read_bytes())
    job = job_from_status(root)
    assert job is not None and job.phase is Phase.BEGIN3 and job.flags == MigrateFlags.LIVE
    assert root.find("domain") is not None
    await host.daemon.registry.end_job(dom, None)


async def test_file_durability(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every file is fsynced and renamed into place; definitions also fsync their folder.

    Status files do not: they describe live guests, which a power loss ends anyway, and a
    migration writes them up to ten times on its critical path.
    """
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await host.conn.define(domain_xml("vm1"))
    domains = host.state_dir / "domains"
    assert any(p.startswith(f"{domains}/.") for p in synced)  # the temporary file
    assert str(domains) in synced  # the folder, for the rename
    synced.clear()
    await host.conn.start("vm1")
    status = host.state_dir / "status"
    assert any(p.startswith(f"{status}/.") for p in synced)
    assert str(status) not in synced
    dom = host.daemon.registry.by_name("vm1")
    assert (status / f"{dom.uuid}.xml").exists()


def test_phase_never_goes_backwards() -> None:
    from virtmig.daemon.job import AsyncJob

    job = MigrationJob(kind=AsyncJob.MIGRATION_OUT, phase=Phase.BEGIN3, flags=MigrateFlags(0))
    job.set_phase(Phase.PERFORM3)
    job.set_phase(Phase.PERFORM3_DONE)
    with pytest.raises(InternalError, match="migration protocol going backwards "
                                            "perform3_done => begin3"):
        job.set_phase(Phase.BEGIN3)
    assert job.phase is Phase.PERFORM3_DONE


def test_shipped_example_config_loads() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "virtmigd.toml"
    c = load_config(args("--config", str(example)))
    assert c.listen == ("unix:///run/virtmig/virtmigd.sock", "tls://0.0.0.0:16614")
    assert (c.pki_dir, c.listen_insecure_tcp) == ("/etc/pki/virtmig", False)
    assert (c.migration_port_min, c.migration_port_max) == (49152, 49215)
