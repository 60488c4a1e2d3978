"""The ``virtmig`` CLI's options: option → flags/params mapping, virsh's validation and usage
messages, help, and a keyboard interrupt.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from virtmig.client.cli import (
    COMMANDS_BY_NAME,
    CliError,
    MigrateOptions,
    UsageError,
    build_migration,
    parse_command,
)
from virtmig.client.cli import app as cli
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, ParamType, TypedParam

F = MigrateFlags


P = MigrateParam


DEST = "virtmig+tls://127.0.0.1:1"


def migration(*argv: str) -> MigrateOptions:
    return build_migration(parse_command(COMMANDS_BY_NAME["migrate"], argv))


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
        (["--stall-timeout", "30"], P.STALL_TIMEOUT, ParamType.ULLONG, [30]),
        (["--completion-timeout", "120"], P.COMPLETION_TIMEOUT, ParamType.ULLONG, [120]),
        (["--completion-timeout-action", "postcopy"], P.COMPLETION_TIMEOUT_ACTION,
         ParamType.STRING, ["postcopy"]),
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


def test_client_side_options() -> None:
    """``--timeout*`` and ``--postcopy-after-precopy`` are the client's: no flag, no param."""
    opts = migration("--live", "--timeout", "5", "vm1", DEST)
    assert (opts.timeout, opts.timeout_action, opts.postcopy_after_precopy) == (5, "suspend", False)
    assert opts.flags == F.LIVE and len(opts.params) == 0
    opts = migration("--live", "--timeout", "7", "--timeout-suspend", "vm1", DEST)
    assert (opts.timeout, opts.timeout_action) == (7, "suspend")
    opts = migration("--live", "--postcopy", "--timeout", "2", "--timeout-postcopy", "vm1", DEST)
    assert (opts.timeout, opts.timeout_action) == (2, "postcopy")
    assert opts.flags == F.LIVE | F.POSTCOPY
    opts = migration("--live", "--postcopy", "--postcopy-after-precopy", "vm1", DEST)
    assert opts.postcopy_after_precopy and opts.timeout == 0
    assert opts.flags == F.LIVE | F.POSTCOPY and len(opts.params) == 0
    assert migration("--live", "vm1", DEST).timeout == 0
    # virsh 9.0 takes --timeout 0 (no timeout), offline too.
    assert migration("--live", "--timeout", "0", "vm1", DEST).timeout == 0
    assert migration("--offline", "--persistent", "--timeout", "0", "vm1", DEST).timeout == 0


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
        (["migrate-setmaxdowntime", "vm1"],
         "error: command 'migrate-setmaxdowntime' requires <downtime> option\n"),
        (["migrate-setspeed", "--bandwidth", "5"],
         "error: command 'migrate-setspeed' requires <domain> option\n"),
        (["domjobinfo", "--keep-completed", "vm1"],
         "error: Option --completed is required by option --keep-completed\n"),
        (["domjobinfo", "--completed", "--watch", "vm1"],
         "error: Options --completed and --watch are mutually exclusive\n"),
        (["event"], "error: one of --list, --all, or --event <type> is required\n"),
        (["event", "--event", "reboot"], "error: unknown event type reboot\n"),
        (["event", "--all", "--event", "lifecycle"],
         "error: Options --all and --event are mutually exclusive\n"),
        (["event", "--list", "--all"], "error: Options --list and --all are mutually exclusive\n"),
        (["event", "--all", "--timeout", "0"],
         "error: Numeric value '0' for <timeout> option is malformed or out of range\n"),
    ],
)
def test_usage_errors_in_process(argv: list[str], message: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-q", *argv]) == 1
    out, err = capsys.readouterr()
    assert (out, err) == ("", message)


def test_completion_timeout_action_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-q", "migrate", "--completion-timeout-action", "nap", "vm1", DEST]) == 1
    assert capsys.readouterr().err.startswith(
        "error: migrate: argument --completion-timeout-action: invalid choice: 'nap'")


def test_event_list(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-q", "event", "--list"]) == 0
    assert capsys.readouterr().out == (
        "lifecycle\nmigration-iteration\njob-completed\njob-failed\n")


def test_help_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["-q", "help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS_BY_NAME:
        assert f"\n    {name} " in out
    assert cli.main(["-q", "--help"]) == 0
    assert "migrate" in capsys.readouterr().out
    assert cli.main(["-q", "help", "migrate"]) == 0
    out = capsys.readouterr().out
    assert "--postcopy-after-precopy" in out and "--tunnelled" in out


def test_keyboard_interrupt_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    def interrupted(argv: list[str]) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_main", interrupted)
    assert cli.main(["-q", "list"]) == 1
    assert capsys.readouterr().err == "error: interrupted\n"
