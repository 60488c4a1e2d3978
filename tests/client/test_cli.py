"""The ``virtmig`` CLI: option → flags/params mapping, virsh's validation messages and layouts,
and the commands against two real ``virtmigd`` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from virtmig.client import cli
from virtmig.client.cli import (
    COMMANDS_BY_NAME,
    CliError,
    MigrateOptions,
    UsageError,
    build_migration,
    format_table,
    job_progress,
    parse_command,
    progress_line,
)
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, ParamType, TypedParam

F = MigrateFlags
P = MigrateParam

DEST = "virtmig+tcp://127.0.0.1:1"


def migration(*argv: str) -> MigrateOptions:
    return build_migration(parse_command(COMMANDS_BY_NAME["migrate"], argv))


# --- pure functions -------------------------------------------------------------------------------


def test_table_is_virsh_layout() -> None:
    assert format_table(["Id", "Name", "State"], [["-", "vm1", "shut off"]]) == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    vm1    shut off\n"
    )
    assert format_table(["Id", "Name", "State"],
                        [["1", "a-long-name", "running"], ["12", "b", "paused"]]) == (
        " Id   Name          State\n"
        "-----------------------------\n"
        " 1    a-long-name   running\n"
        " 12   b             paused\n"
    )
    assert format_table(["Id", "Name", "State"], []) == (
        " Id   Name   State\n"
        "--------------------\n"
    )


@pytest.mark.parametrize(
    ("remaining", "total", "expected"),
    [
        (0, 0, None),                # nothing known yet: no line
        (5, 0, None),
        (100, 100, 0.0),
        (50, 100, 50.0),
        (2, 3, 33.33),               # 33.333… truncated
        (1, 3, 66.66),               # 66.666… truncated, not rounded to 66.67
        (1, 10**9, 99.99),           # 99.9999999 would print as 100.00: capped
        (0, 100, 99.99),             # still running: never 100 before success
        (200, 100, 0.0),
    ],
)
def test_job_progress(remaining: int, total: int, expected: float | None) -> None:
    assert job_progress(remaining, total) == expected


def test_progress_line_format() -> None:
    assert progress_line("Migration", 8.59) == "\rMigration: [ 8.59 %]"
    assert progress_line("Migration", 42.17) == "\rMigration: [42.17 %]"
    assert progress_line("Migration", 100.0) == "\rMigration: [100.00 %]"


@pytest.mark.parametrize(
    ("option", "flag"),
    [
        ("--live", F.LIVE),
        ("--offline", F.OFFLINE),
        ("--p2p", F.PEER2PEER),
        ("--tunnelled", F.TUNNELLED),
        ("--tunneled", F.TUNNELLED),
        ("--persistent", F.PERSIST_DEST),
        ("--undefinesource", F.UNDEFINE_SOURCE),
        ("--suspend", F.PAUSED),
        ("--copy-storage-all", F.NON_SHARED_DISK),
        ("--copy-storage-inc", F.NON_SHARED_INC),
        ("--copy-storage-synchronous-writes", F.NON_SHARED_SYNCHRONOUS_WRITES),
        ("--change-protection", F.CHANGE_PROTECTION),
        ("--unsafe", F.UNSAFE),
        ("--compressed", F.COMPRESSED),
        ("--auto-converge", F.AUTO_CONVERGE),
        ("--rdma-pin-all", F.RDMA_PIN_ALL),
        ("--abort-on-error", F.ABORT_ON_ERROR),
        ("--postcopy", F.POSTCOPY),
        ("--postcopy-resume", F.POSTCOPY_RESUME),
        ("--zerocopy", F.ZEROCOPY),
        ("--tls", F.TLS),
        ("--parallel", F.PARALLEL),
    ],
)
def test_flag_options(option: str, flag: MigrateFlags) -> None:
    opts = migration(option, "vm1", DEST)
    assert opts.flags == flag
    assert len(opts.params) == 0


def test_options_without_a_flag() -> None:
    opts = migration("--verbose", "--direct", "vm1", DEST)
    assert opts.flags == F(0)
    assert opts.verbose and opts.unmanaged
    assert migration("--p2p", "vm1", DEST).unmanaged
    plain = migration("vm1", DEST)
    assert not plain.verbose and not plain.unmanaged


@pytest.mark.parametrize(
    ("argv", "name", "ptype", "values"),
    [
        (["--migrateuri", "tcp://10.0.0.2:49152"], P.URI, ParamType.STRING,
         ["tcp://10.0.0.2:49152"]),
        (["--graphicsuri", "spice://h"], P.GRAPHICS_URI, ParamType.STRING, ["spice://h"]),
        (["--listen-address", "10.0.0.2"], P.LISTEN_ADDRESS, ParamType.STRING, ["10.0.0.2"]),
        (["--dname", "vm2"], P.DEST_NAME, ParamType.STRING, ["vm2"]),
        (["--bandwidth", "100"], P.BANDWIDTH, ParamType.ULLONG, [100]),
        (["--bandwidth", str(2**64 - 1)], P.BANDWIDTH, ParamType.ULLONG, [2**64 - 1]),
        (["--postcopy-bandwidth", "7"], P.BANDWIDTH_POSTCOPY, ParamType.ULLONG, [7]),
        (["--migrate-disks", "vda,vdb"], P.MIGRATE_DISKS, ParamType.STRING, ["vda", "vdb"]),
        (["--disks-port", "10809"], P.DISKS_PORT, ParamType.INT, [10809]),
        (["--disks-uri", "unix:///x"], P.DISKS_URI, ParamType.STRING, ["unix:///x"]),
        (["--comp-methods", "xbzrle,mt"], P.COMPRESSION, ParamType.STRING, ["xbzrle", "mt"]),
        (["--comp-mt-level", "3"], P.COMPRESSION_MT_LEVEL, ParamType.INT, [3]),
        (["--comp-mt-threads", "4"], P.COMPRESSION_MT_THREADS, ParamType.INT, [4]),
        (["--comp-mt-dthreads", "2"], P.COMPRESSION_MT_DTHREADS, ParamType.INT, [2]),
        (["--comp-xbzrle-cache", "1048576"], P.COMPRESSION_XBZRLE_CACHE, ParamType.ULLONG,
         [1048576]),
        (["--comp-zlib-level", "9"], P.COMPRESSION_ZLIB_LEVEL, ParamType.INT, [9]),
        (["--comp-zstd-level", "20"], P.COMPRESSION_ZSTD_LEVEL, ParamType.INT, [20]),
        (["--auto-converge-initial", "20"], P.AUTO_CONVERGE_INITIAL, ParamType.INT, [20]),
        (["--auto-converge-increment", "10"], P.AUTO_CONVERGE_INCREMENT, ParamType.INT, [10]),
        (["--parallel-connections", "4"], P.PARALLEL_CONNECTIONS, ParamType.INT, [4]),
        (["--tls-destination", "h.example"], P.TLS_DESTINATION, ParamType.STRING,
         ["h.example"]),
    ],
)
def test_param_options(argv: list[str], name: MigrateParam, ptype: ParamType,
                       values: list[int | str]) -> None:
    params = migration(*argv, "vm1", DEST).params
    assert list(params) == [TypedParam(name.value, ptype, v) for v in values]


def test_xml_files_are_read_into_params(tmp_path: Path) -> None:
    dxml, pxml = tmp_path / "d.xml", tmp_path / "p.xml"
    dxml.write_text("<domain>live</domain>")
    pxml.write_text("<domain>config</domain>")
    opts = migration("--live", "--persistent", "--xml", str(dxml), "--persistent-xml", str(pxml),
                     "vm1", DEST)
    assert opts.params.get(P.DEST_XML) == "<domain>live</domain>"
    assert opts.params.get(P.PERSIST_XML) == "<domain>config</domain>"
    assert opts.flags == F.LIVE | F.PERSIST_DEST


def test_unreadable_xml_file(tmp_path: Path) -> None:
    missing = tmp_path / "none.xml"
    with pytest.raises(CliError) as info:
        migration("--xml", str(missing), "vm1", DEST)
    assert info.value.lines == (
        f"cannot read file '{missing}'",
        f"Failed to open file '{missing}': No such file or directory",
    )


def test_positional_data_options_fill_in_virsh_order() -> None:
    cmd = COMMANDS_BY_NAME["migrate"]
    args = parse_command(cmd, ["--live", "vm1", DEST, "tcp://m:1", "spice://g", "10.0.0.9",
                               "newname"])
    assert (args.domain, args.desturi, args.migrateuri, args.graphicsuri, args.listen_address,
            args.dname) == ("vm1", DEST, "tcp://m:1", "spice://g", "10.0.0.9", "newname")
    # Named data options are skipped by the positional ones; options may follow positionals.
    args = parse_command(cmd, ["--desturi", DEST, "vm1", "tcp://m:1", "--verbose"])
    assert (args.domain, args.desturi, args.migrateuri, args.verbose) == (
        "vm1", DEST, "tcp://m:1", True)
    opts = build_migration(parse_command(cmd, ["vm1", DEST, "tcp://m:1", "--dname", "x"]))
    assert opts.params.get(P.URI) == "tcp://m:1"
    assert opts.params.get(P.DEST_NAME) == "x"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--live", "--offline"], "Options --live and --offline are mutually exclusive"),
        (["--live", "--timeout", "5", "--timeout-suspend", "--timeout-postcopy", "--postcopy"],
         "Options --timeout-suspend and --timeout-postcopy are mutually exclusive"),
        (["--persistent-xml", "x.xml"],
         "Option --persistent is required by option --persistent-xml"),
        (["--live", "--postcopy-after-precopy"],
         "Option --postcopy is required by option --postcopy-after-precopy"),
        (["--live", "--timeout", "5", "--timeout-postcopy"],
         "Option --postcopy is required by option --timeout-postcopy"),
        (["--offline", "--timeout", "5"], "migrate: Unexpected timeout for offline migration"),
        (["--timeout", "5"], "migrate: Unexpected timeout for offline migration"),
        (["--live", "--timeout", "0"],
         "Numeric value '0' for <timeout> option is malformed or out of range"),
        (["--live", "--timeout", "-3"],
         "Numeric value '-3' for <timeout> option is malformed or out of range"),
        (["--live", "--timeout", "soon"],
         "Numeric value 'soon' for <timeout> option is malformed or out of range"),
        (["--live", "--timeout-suspend"],
         "migrate: Unexpected --timeout-* option without --timeout"),
        (["--live", "--postcopy", "--timeout-postcopy"],
         "migrate: Unexpected --timeout-* option without --timeout"),
        (["--bandwidth", "-1"],
         "Numeric value '-1' for <bandwidth> option is malformed or out of range"),
        (["--bandwidth", "1e3"],
         "Numeric value '1e3' for <bandwidth> option is malformed or out of range"),
        (["--disks-port", str(2**31)],
         f"Numeric value '{2**31}' for <disks-port> option is malformed or out of range"),
    ],
)
def test_validation_messages(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        migration(*argv, "vm1", DEST)
    assert info.value.lines == (message,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--live", "--timeout", "5"], "migrate: --timeout is not supported yet"),
        (["--live", "--timeout", "5", "--timeout-suspend"],
         "migrate: --timeout is not supported yet"),
        (["--live", "--postcopy", "--timeout", "5", "--timeout-postcopy"],
         "migrate: --timeout is not supported yet"),
        (["--live", "--postcopy", "--postcopy-after-precopy"],
         "migrate: --postcopy-after-precopy is not supported yet"),
    ],
)
def test_client_side_features_are_refused_not_ignored(argv: list[str], message: str) -> None:
    with pytest.raises(CliError) as info:
        migration(*argv, "vm1", DEST)
    assert info.value.lines == (message,)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["migrate", "--live"], "error: command 'migrate' requires <domain> option\n"),
        (["migrate", "vm1"], "error: command 'migrate' requires <desturi> option\n"),
        (["migrate", "vm1", DEST, "a", "b", "c", "d", "e"],
         "error: migrate: unexpected data 'e'\n"),
        (["migrate", "--nope", "vm1", DEST], "error: migrate: unrecognized arguments: --nope\n"),
        (["migrate", "--live", "--offline", "vm1", DEST],
         "error: Options --live and --offline are mutually exclusive\n"),
        (["frobnicate"], "error: unknown command: 'frobnicate'\n"),
        ([], "error: no command given; try 'virtmig help'\n"),
        (["dominfo"], "error: command 'dominfo' requires <domain> option\n"),
        (["-c"], "error: argument -c/--connect: expected one argument\n"),
    ],
)
def test_usage_errors_in_process(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", message)


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS_BY_NAME:
        assert f"\n    {name} " in out
    assert cli.main(["--help"]) == 0
    assert "migrate" in capsys.readouterr().out
    assert cli.main(["help", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "--postcopy-after-precopy" in out and "--tunnelled" in out


def test_keyboard_interrupt_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["list"]) == 1
    assert capsys.readouterr().err == "error: interrupted\n"


# --- against real daemons -------------------------------------------------------------------------


def domain_xml(name: str, memory_mib: int = 64) -> str:
    return textwrap.dedent(f"""\
        <domain type='test'>
          <name>{name}</name>
          <memory unit='MiB'>{memory_mib}</memory>
          <vcpu>1</vcpu>
          <os><type arch='x86_64'>hvm</type></os>
        </domain>
        """)


def free_port_range(count: int = 8) -> str:
    """``LO-HI`` of ``count`` ports that are free right now (a base from the kernel)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + count > 65535:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return f"{base}-{base + count - 1}"
    raise RuntimeError("no free port range")


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    uri: str
    log: Path


def start_daemon(tmp: Path, name: str) -> Daemon:
    ready, log = tmp / f"{name}.ready", tmp / f"{name}.log"
    cmd = [
        sys.executable, "-m", "virtmig.daemon.main",
        "--listen", "tcp://127.0.0.1:0",
        "--state-dir", str(tmp / name),
        "--hostname", f"{name}.test",
        "--migration-address", "127.0.0.1",
        "--migration-host", "127.0.0.1",
        "--migration-ports", free_port_range(),
        "--ready-file", str(ready),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_process(proc)
            pytest.fail(f"virtmigd {name} did not start:\n{log.read_text()}")
        time.sleep(0.02)
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    return Daemon(proc, f"virtmig+tcp://{info['addresses'][0]}", log)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Daemon, Daemon]]:
    started: list[Daemon] = []
    try:
        started.append(start_daemon(tmp_path, "src"))
        started.append(start_daemon(tmp_path, "dst"))
        yield started[0], started[1]
    finally:
        for d in started:
            stop_process(d.proc)


def virtmig(uri: str | None, *args: str, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "virtmig.client.cli"]
    if uri is not None:
        cmd += ["-c", uri]
    raw = subprocess.run([*cmd, *args], capture_output=True, timeout=60, env=env)
    # Decoded by hand: text mode would turn the progress line's "\r" into "\n".
    res = subprocess.CompletedProcess(raw.args, raw.returncode, raw.stdout.decode(),
                                      raw.stderr.decode())
    assert "Traceback" not in res.stdout + res.stderr, res.stderr
    return res


def ok(uri: str, *args: str) -> str:
    res = virtmig(uri, *args)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    return res.stdout


def fails(uri: str | None, *args: str) -> str:
    res = virtmig(uri, *args)
    assert res.returncode == 1
    assert res.stdout == ""
    assert res.stderr.startswith("error: ")
    return res.stderr


def test_lifecycle_and_live_migration(hosts: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = hosts
    xml = tmp_path / "web.xml"
    xml.write_text(domain_xml("web"))

    assert ok(src.uri, "define", str(xml)) == f"Domain 'web' defined from {xml}\n"
    assert ok(src.uri, "list") == " Id   Name   State\n--------------------\n"
    assert ok(src.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    web    shut off\n"
    )
    assert ok(src.uri, "list", "--inactive") == ok(src.uri, "list", "--all")
    assert ok(src.uri, "start", "web") == "Domain 'web' started\n"
    assert ok(src.uri, "list") == (
        " Id   Name   State\n"
        "----------------------\n"
        " 1    web    running\n"
    )
    assert ok(src.uri, "domstate", "web") == "running\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "running (booted)\n"

    info = ok(src.uri, "dominfo", "web").splitlines()
    uuid = info[2].split()[1]
    assert info == [
        "Id:             1",
        "Name:           web",
        f"UUID:           {uuid}",
        "OS Type:        hvm",
        "State:          running",
        "CPU(s):         1",
        *([line for line in info if line.startswith("CPU time:")]),
        "Max memory:     65536 KiB",
        "Used memory:    65536 KiB",
        "Persistent:     yes",
        "Autostart:      disable",
        "Managed save:   no",
        "Security model: none",
        "Security DOI:   0",
    ]
    # By id and by UUID, like virsh.
    assert ok(src.uri, "domstate", "1") == "running\n"
    assert ok(src.uri, "domstate", "--domain", uuid) == "running\n"

    assert ok(src.uri, "suspend", "web") == "Domain 'web' suspended\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "paused (user)\n"
    assert ok(src.uri, "resume", "web") == "Domain 'web' resumed\n"
    assert ok(src.uri, "domstate", "--reason", "web") == "running (unpaused)\n"

    dumped = ok(src.uri, "dumpxml", "web")
    assert "<name>web</name>" in dumped and uuid in dumped
    assert "<name>web</name>" in ok(src.uri, "dumpxml", "--inactive", "web")
    assert "<name>web</name>" in ok(src.uri, "dumpxml", "--migratable", "web")

    res = virtmig(src.uri, "migrate", "--live", "--verbose", "web", dst.uri)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""
    assert res.stderr.endswith("\rMigration: [100.00 %]\n")
    assert "error" not in res.stderr

    # The source keeps its persistent definition, shut off (migrated); the guest runs on dst.
    assert ok(src.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    web    shut off\n"
    )
    assert ok(src.uri, "domstate", "--reason", "web") == "shut off (migrated)\n"
    assert ok(dst.uri, "list", "--all") == (
        " Id   Name   State\n"
        "----------------------\n"
        " 1    web    running\n"
    )
    assert ok(dst.uri, "domstate", "--reason", "web") == "running (migrated)\n"
    assert "Persistent:     no" in ok(dst.uri, "dominfo", "web")

    assert ok(dst.uri, "destroy", "web") == "Domain 'web' destroyed\n"
    assert ok(src.uri, "undefine", "web") == "Domain 'web' has been undefined\n"
    assert ok(src.uri, "list", "--all") == " Id   Name   State\n--------------------\n"


def test_offline_persistent_and_rename_migrations(hosts: tuple[Daemon, Daemon],
                                                  tmp_path: Path) -> None:
    src, dst = hosts
    for name in ("cold", "warm"):
        (tmp_path / f"{name}.xml").write_text(domain_xml(name))
        ok(src.uri, "define", str(tmp_path / f"{name}.xml"))

    assert ok(src.uri, "migrate", "--offline", "--persistent", "cold", dst.uri) == ""
    assert ok(dst.uri, "list", "--all") == (
        " Id   Name   State\n"
        "-----------------------\n"
        " -    cold   shut off\n"
    )
    assert "Persistent:     yes" in ok(dst.uri, "dominfo", "cold")
    assert "cold" in ok(src.uri, "list", "--inactive")

    # Params from options: a rename, with the source definition removed.
    ok(src.uri, "start", "warm")
    assert ok(src.uri, "migrate", "--live", "--persistent", "--undefinesource",
              "--dname", "warm2", "--bandwidth", "1000", "warm", dst.uri) == ""
    assert "warm" not in ok(src.uri, "list", "--all")
    assert ok(dst.uri, "domstate", "--reason", "warm2") == "running (migrated)\n"
    assert "Persistent:     yes" in ok(dst.uri, "dominfo", "warm2")


def test_errors_are_one_clear_line(hosts: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = hosts
    (tmp_path / "vm.xml").write_text(domain_xml("vm"))
    ok(src.uri, "define", str(tmp_path / "vm.xml"))
    ok(src.uri, "start", "vm")

    assert fails(src.uri, "dominfo", "nosuch") == "error: failed to get domain 'nosuch'\n"
    assert fails(src.uri, "migrate", "--live", "nosuch", dst.uri) == (
        "error: failed to get domain 'nosuch'\n")
    assert fails(src.uri, "start", "vm") == "error: Domain is already active\n"
    assert fails(src.uri, "suspend", "--domain", "nosuch") == (
        "error: failed to get domain 'nosuch'\n")

    err = fails(src.uri, "define", str(tmp_path / "none.xml"))
    assert err == (f"error: Failed to open file '{tmp_path / 'none.xml'}': "
                   "No such file or directory\n")
    (tmp_path / "bad.xml").write_text("<domain type='test'><name>x</name>")
    err = fails(src.uri, "define", str(tmp_path / "bad.xml"))
    assert err.startswith(f"error: Failed to define domain from {tmp_path / 'bad.xml'}\nerror: ")

    assert fails(src.uri, "migrate", "--live", "--offline", "vm", dst.uri) == (
        "error: Options --live and --offline are mutually exclusive\n")
    assert fails(src.uri, "migrate", "--live", "--timeout", "5", "vm", dst.uri) == (
        "error: migrate: --timeout is not supported yet\n")

    # Options this version cannot do: parsed, passed on, refused with the daemon's reason.
    err = fails(src.uri, "migrate", "--live", "--copy-storage-all", "vm", dst.uri)
    assert err == ("error: migration flag VIR_MIGRATE_NON_SHARED_DISK is not supported by this "
                   "host\n")
    err = fails(src.uri, "migrate", "--live", "--comp-mt-level", "3", "vm", dst.uri)
    assert err == ("error: migration parameter 'compression.mt.level' is not supported by "
                   "this host\n")
    err = fails(src.uri, "migrate", "--live", "--p2p", "vm", dst.uri)
    assert err == "error: p2p migration is not supported by the source host\n"
    err = fails(src.uri, "migrate", "--live", "--direct", "vm", dst.uri)
    assert err == "error: direct migration is not supported by the source host\n"
    # Nothing happened to the guest.
    assert ok(src.uri, "domstate", "--reason", "vm") == "running (booted)\n"
    assert ok(dst.uri, "list", "--all") == " Id   Name   State\n--------------------\n"

    err = fails(src.uri, "migrate", "--live", "vm", "virtmig+tcp://127.0.0.1:1")
    assert err.startswith("error: failed to connect to the destination "
                          "'virtmig+tcp://127.0.0.1:1'\nerror: unable to connect")
    err = fails("virtmig+tcp://127.0.0.1:1", "list")
    assert err.startswith("error: failed to connect to the hypervisor\nerror: unable to connect")
    err = fails("bogus://x", "list")
    assert err.startswith("error: failed to connect to the hypervisor\n"
                          "error: unsupported connection URI 'bogus://x'")


def test_host_commands_and_default_uri(hosts: tuple[Daemon, Daemon]) -> None:
    src, _dst = hosts
    env = {**os.environ, "VIRTMIG_DEFAULT_URI": src.uri}
    res = virtmig(None, "hostname", env=env)
    assert (res.returncode, res.stdout) == (0, "src.test\n")

    lines = ok(src.uri, "version").splitlines()
    assert lines[0].startswith("Compiled against library: virtmig ")
    assert lines[1].startswith("Using library: virtmig ")
    assert lines[2].startswith("Using API: virtmig ")
    assert lines[3].startswith("Running hypervisor: test ")

    node = dict(line.split(":", 1) for line in ok(src.uri, "nodeinfo").splitlines())
    assert set(node) == {"CPU model", "CPU(s)", "Memory size", "Host UUID", "Backend",
                         "Features"}
    assert node["Memory size"].endswith(" KiB")
    assert node["Backend"].strip() == "test"
    assert "V3" in node["Features"].split()


def test_interrupt_during_migration(hosts: tuple[Daemon, Daemon], tmp_path: Path) -> None:
    src, dst = hosts
    (tmp_path / "big.xml").write_text(domain_xml("big", memory_mib=256))
    ok(src.uri, "define", str(tmp_path / "big.xml"))
    ok(src.uri, "start", "big")
    # 256 MiB at 50 MiB/s: interrupted once the first progress line shows.
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtmig.client.cli", "-c", src.uri, "migrate", "--live",
         "--verbose", "--bandwidth", "50", "big", dst.uri],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        seen = b""
        while b"Migration: [" not in seen:
            chunk = os.read(proc.stderr.fileno(), 256)
            assert chunk, "migrate ended before showing progress"
            seen += chunk
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        stop_process(proc)
    text = (seen + err).decode()
    assert proc.returncode == 1
    assert out == b""
    assert text.endswith("\nerror: interrupted\n")
    assert "Traceback" not in text
    # The source daemon gives the guest back once the client's session is gone.
    deadline = time.monotonic() + 20
    while ok(src.uri, "domstate", "big") != "running\n" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ok(src.uri, "domstate", "big") == "running\n"
