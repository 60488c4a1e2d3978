"""``migrate``'s option table (``virtmig.client.cli.options``) against what it drives: the argparse
parser and ``migrate --help``, and ``build_migration``'s flags and params.  A row without its parser
option, a parser option without its row, or a row whose flag or param does not come out fails."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from virtmig.client.cli import (
    COMMANDS_BY_NAME,
    MIGRATE_OPTIONS,
    MigrateOption,
    Read,
    UsageError,
    build_migration,
    command_parser,
    parse_command,
)
from virtmig.client.cli.options import PARAM_ORDER
from virtmig.proto.flags import MigrateFlags
from virtmig.proto.params import MigrateParam, ParamType, TypedParam

F = MigrateFlags
P = MigrateParam

DEST = "virtmig+tls://127.0.0.1:1"
MIGRATE = COMMANDS_BY_NAME["migrate"]

FLAG_ROWS = [o for o in MIGRATE_OPTIONS if o.flag is not None]
PARAM_ROWS = [o for o in MIGRATE_OPTIONS if o.param is not None]
OWN_ROWS = [o for o in MIGRATE_OPTIONS if o.flag is None and o.param is None]

# What a row's option needs besides itself to pass build_migration's checks.
NEEDS = {
    "persistent-xml": ["--persistent"],
    "timeout": ["--live"],
    "timeout-suspend": ["--live", "--timeout", "5"],
    "timeout-postcopy": ["--live", "--postcopy", "--timeout", "5"],
    "postcopy-after-precopy": ["--postcopy"],
}

PARAM_TYPES = {Read.STRING: ParamType.STRING, Read.LIST: ParamType.STRING,
               Read.FILE: ParamType.STRING, Read.INT: ParamType.INT,
               Read.ULLONG: ParamType.ULLONG}


def ids(rows: list[MigrateOption]) -> list[str]:
    return [o.name for o in rows]


def migrate_actions() -> list[argparse.Action]:
    """The migrate parser's options, in --help order, but -h and the domain."""
    parser = command_parser(MIGRATE)
    return [a for a in parser._actions
            if a.option_strings and a.dest not in ("help", "domain")]


def test_rows_are_unique_and_of_one_kind() -> None:
    names = [n for o in MIGRATE_OPTIONS for n in (o.name, *o.aliases)]
    assert len(names) == len(set(names))
    for o in MIGRATE_OPTIONS:
        assert o.flag is None or o.param is None, o.name
    # The client's own options: no flag, no param; build_migration reads each by name.
    assert sorted(ids(OWN_ROWS)) == sorted([
        "desturi", "direct", "verbose", "postcopy-after-precopy", "timeout-suspend",
        "timeout-postcopy", "timeout"])


def test_inconsistent_rows_are_refused() -> None:
    with pytest.raises(ValueError):
        MigrateOption("x", "x", flag=F.LIVE, read=Read.STRING)
    with pytest.raises(ValueError):
        MigrateOption("x", "x", flag=F.LIVE, param=P.URI)
    with pytest.raises(ValueError):
        MigrateOption("x", "x", param=P.URI)


def test_parser_has_exactly_the_rows_in_table_order() -> None:
    actions = migrate_actions()
    assert [a.dest for a in actions] == [o.dest for o in MIGRATE_OPTIONS]
    for action, o in zip(actions, MIGRATE_OPTIONS, strict=True):
        assert action.option_strings == [f"--{n}" for n in (o.name, *o.aliases)]
        assert action.help == o.help
        if o.read is Read.SWITCH:
            assert isinstance(action, argparse._StoreTrueAction), o.name
        else:
            assert action.nargs is None and action.const is None, o.name
            assert action.metavar == o.metavar and action.choices == o.choices, o.name


def test_data_rows_are_the_commands_positionals() -> None:
    assert MIGRATE.data == ("domain", *(o.dest for o in MIGRATE_OPTIONS if o.data))
    assert MIGRATE.data[:2] == ("domain", "desturi")


@pytest.mark.parametrize("o", MIGRATE_OPTIONS, ids=ids(list(MIGRATE_OPTIONS)))
def test_every_row_is_in_the_help(o: MigrateOption, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: each option's help on its line
    text = " ".join(command_parser(MIGRATE).format_help().split())
    names = ", ".join(f"--{n}" for n in (o.name, *o.aliases))
    if o.choices:
        names += " {" + ",".join(o.choices) + "}"
    elif o.metavar is not None:
        names += f" {o.metavar}"
    assert f" {names} {o.help} " in f"{text} "


@pytest.mark.parametrize("o", FLAG_ROWS, ids=ids(FLAG_ROWS))
def test_each_flag_row_sets_exactly_its_flag(o: MigrateOption) -> None:
    for name in (o.name, *o.aliases):
        opts = build_migration(parse_command(MIGRATE, [f"--{name}", "vm1", DEST]))
        assert opts.flags == o.flag
        assert len(opts.params) == 0


def value_for(o: MigrateOption, tmp_path: Path) -> tuple[str, list[int | str]]:
    """A command-line value for a param row, and the param values it must give."""
    if o.choices:
        return o.choices[-1], [o.choices[-1]]
    if o.read is Read.LIST:
        return "a,b", ["a", "b"]
    if o.read is Read.FILE:
        path = tmp_path / f"{o.dest}.xml"
        path.write_text(f"<domain>{o.name}</domain>")
        return str(path), [f"<domain>{o.name}</domain>"]
    if o.read is Read.INT:
        return str(-(2**31)), [-(2**31)]
    if o.read is Read.ULLONG:
        return str(2**64 - 1), [2**64 - 1]
    return f"value-of-{o.name}", [f"value-of-{o.name}"]


@pytest.mark.parametrize("o", PARAM_ROWS, ids=ids(PARAM_ROWS))
def test_each_param_row_yields_its_param(o: MigrateOption, tmp_path: Path) -> None:
    assert o.param is not None
    raw, values = value_for(o, tmp_path)
    opts = build_migration(parse_command(MIGRATE, [*NEEDS.get(o.name, []), f"--{o.name}", raw,
                                                   "vm1", DEST]))
    ptype = PARAM_TYPES[o.read]
    assert list(opts.params) == [TypedParam(o.param.value, ptype, v) for v in values]
    assert opts.flags == (F.PERSIST_DEST if o.name == "persistent-xml" else F(0))


@pytest.mark.parametrize("o", [o for o in PARAM_ROWS if o.read in (Read.INT, Read.ULLONG)],
                         ids=ids([o for o in PARAM_ROWS if o.read in (Read.INT, Read.ULLONG)]))
def test_numeric_rows_are_range_checked(o: MigrateOption) -> None:
    too_big = str(2**31 if o.read is Read.INT else 2**64)
    for raw in ("x", too_big):
        with pytest.raises(UsageError) as info:
            build_migration(parse_command(MIGRATE, [f"--{o.name}", raw, "vm1", DEST]))
        assert info.value.lines == (
            f"Numeric value '{raw}' for <{o.name}> option is malformed or out of range",)


@pytest.mark.parametrize("o", OWN_ROWS, ids=ids(OWN_ROWS))
def test_own_rows_give_no_flag_and_no_param(o: MigrateOption) -> None:
    needs = NEEDS.get(o.name, [])
    if o.name == "desturi":
        argv = [*needs, "--desturi", DEST, "vm1"]
    elif o.read is Read.SWITCH:
        argv = [*needs, f"--{o.name}", "vm1", DEST]
    else:
        argv = [*needs, f"--{o.name}", "3", "vm1", DEST]
    opts = build_migration(parse_command(MIGRATE, argv))
    by_name = {row.name: row for row in FLAG_ROWS}
    expected = F(0)
    for arg in needs:
        if (row := by_name.get(arg.removeprefix("--"))) is not None and row.flag is not None:
            expected |= row.flag
    assert opts.flags == expected
    assert len(opts.params) == 0


def test_params_come_in_virsh_order(tmp_path: Path) -> None:
    """All params at once: added in PARAM_ORDER (virsh's doMigrate), whatever the argv order."""
    assert sorted(PARAM_ORDER) == sorted(o.param for o in PARAM_ROWS if o.param is not None)
    argv = ["--persistent"]
    for o in reversed(PARAM_ROWS):
        argv += [f"--{o.name}", value_for(o, tmp_path)[0]]
    opts = build_migration(parse_command(MIGRATE, [*argv, "vm1", DEST]))
    names = list(dict.fromkeys(p.name for p in opts.params))
    assert names == [p.value for p in PARAM_ORDER]
