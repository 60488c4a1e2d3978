"""The settings schema against its documentation and against the other places a default could be
written (each is written once, in the schema), and the daemon's start-up errors: a value of the
wrong type and a port in use are one clear line and exit 1, from a real ``virtmigd`` process."""

from __future__ import annotations

import ast
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virtmig.daemon import reload
from virtmig.daemon.backend.qemu.confine import QemuSettings
from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.core import DaemonConfig
from virtmig.daemon.history import History
from virtmig.daemon.limits import CallLimits
from virtmig.daemon.settings import BY_KEY, EXPECTED, SCHEMA, default, held
from virtmig.proto.errors import InvalidArgument

ROOT = Path(__file__).resolve().parents[2]


def readme_table_keys() -> set[str]:
    """The TOML keys README's table of daemon settings names (first column, in backticks)."""
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("| flag / TOML key | meaning | default |")
    keys: set[str] = set()
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first = line.split("|")[1]
        keys |= {k for k in re.findall(r"`([^`]+)`", first) if re.fullmatch(r"[a-z_]+", k)}
    return keys


def test_readme_documents_every_setting_and_no_other() -> None:
    keys = readme_table_keys()
    assert keys == set(BY_KEY), (set(BY_KEY) - keys, keys - set(BY_KEY))


def test_the_example_config_names_every_setting_and_loads() -> None:
    text = (ROOT / "deploy" / "virtmigd.toml").read_text()
    named = set(re.findall(r"^#? ?([a-z_]+) =", text, re.MULTILINE))
    assert named == set(BY_KEY), (set(BY_KEY) - named, named - set(BY_KEY))
    load_config(build_parser().parse_args(["--config", str(ROOT / "deploy/virtmigd.toml")]))


def test_every_default_passes_its_own_check(tmp_path: Path) -> None:
    # Writing each non-computed default explicitly changes nothing.
    implicit = load_config(build_parser().parse_args(["--state-dir", str(tmp_path)]))
    lines = []
    for s in SCHEMA:
        value = default(s.key)
        if value is None or s.key == "state_dir":
            continue
        rendered = repr(value).replace("True", "true").replace("False", "false")
        lines.append(f"{s.key} = {rendered}".replace("'", '"'))
    cfg = tmp_path / "all.toml"
    cfg.write_text("\n".join(lines) + "\n")
    explicit = load_config(build_parser().parse_args(["--config", str(cfg), "--state-dir",
                                                      str(tmp_path)]))
    assert explicit == implicit


@pytest.mark.parametrize("setting", SCHEMA, ids=lambda s: s.key)
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(tmp_path: Path,
                                                                setting: object) -> None:
    assert hasattr(setting, "key") and hasattr(setting, "kind")
    key, kind = setting.key, setting.kind
    wrong = "true" if kind in ("string", "strings", "paths") else '"abc"'
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"{key} = {wrong}\n")
    with pytest.raises(InvalidArgument) as err:
        load_config(build_parser().parse_args(["--config", str(cfg)]))
    assert err.value.detail == (
        f"invalid {key} {'True' if wrong == 'true' else repr('abc')} in {cfg}: "
        f"expected {EXPECTED[kind]}")


def virtmigd(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "virtmig.daemon.main", *argv],
                          capture_output=True, text=True, timeout=60, check=False)


def test_virtmigd_with_a_wrong_type_in_its_config_says_so_in_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('job_wait_timeout = "abc"\n')
    done = virtmigd("--config", str(cfg), "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 1
    assert done.stderr == (f"virtmigd: error: invalid argument: invalid job_wait_timeout 'abc' "
                           f"in {cfg}: expected a number\n")
    assert not (tmp_path / "s").exists()  # refused before the state dir was touched


def test_virtmigd_with_its_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = virtmigd("--state-dir", str(tmp_path / "s"), "--allow-insecure",
                        "--listen", f"unix://{tmp_path}/run/virtmigd.sock",
                        "--listen", f"tcp://127.0.0.1:{port}")
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert errors == [f"virtmigd: error: operation failed: cannot listen on "
                      f"tcp://127.0.0.1:{port}: Address already in use"], done.stderr
    assert "Traceback" not in done.stderr


# The defaults written outside the schema's table must be read from it: DaemonConfig's fields
# (named as reload.fields names them), the qemu backend's settings, the limits' and the
# history's constants.
_QEMU = (("qemu_user", "user"), ("qemu_group", "group"), ("qemu_sandbox", "sandbox"),
         ("vnc_port_min", "vnc_port_min"), ("vnc_port_max", "vnc_port_max"),
         ("vnc_remote_listen", "vnc_remote_listen"), ("block_devices", "block_devices"))
_CONSTANTS = (("max_clients", "daemon/limits.py", "DEFAULT_MAX_CLIENTS"),
              ("max_calls_per_client", "daemon/limits.py", "DEFAULT_MAX_CALLS_PER_CLIENT"),
              ("history_max_bytes", "daemon/history.py", "DEFAULT_MAX_BYTES"))
# Left by the schema (default None) to the start, or required.
_AT_START = {"state_dir", "listen", "emulators"}


def _defaults_in(path: Path, cls: str | None) -> dict[str, ast.expr]:
    """The default expressions of ``cls``'s annotated fields (module constants: None)."""
    tree = ast.parse(path.read_text())
    body = tree.body
    if cls is not None:
        [node] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls]
        body = node.body
    return {n.target.id: n.value for n in body if isinstance(n, ast.AnnAssign)
            and isinstance(n.target, ast.Name) and n.value is not None}


def _is_literal(expr: ast.expr) -> bool:
    try:
        ast.literal_eval(expr)
    except ValueError:
        return False
    return True


def test_each_default_is_written_in_the_schema_only() -> None:
    config = DaemonConfig(state_dir="/x")
    in_config = _defaults_in(ROOT / "daemon/core.py", "DaemonConfig")
    in_qemu = _defaults_in(ROOT / "daemon/backend/qemu/confine.py", "QemuSettings")
    places: list[tuple[str, str, ast.expr]] = []
    for s in SCHEMA:
        if s.key in _AT_START:
            continue
        names = reload.fields(s.key)
        value = tuple(getattr(config, n) for n in names)
        expected = (tuple(int(p) for p in s.default.split("-")) if s.key == "migration_ports"
                    else (held(s.key),))
        assert value == expected, s.key
        places += [(s.key, f"DaemonConfig.{n}", in_config[n]) for n in names]
    qemu = QemuSettings()
    for key, attr in _QEMU:
        assert getattr(qemu, attr) == held(key), key
        places.append((key, f"QemuSettings.{attr}", in_qemu[attr]))
    for key, module, name in _CONSTANTS:
        places.append((key, f"{module}:{name}", _defaults_in(ROOT / module, None)[name]))
    assert (CallLimits().max_clients, CallLimits().max_calls_per_client) == (
        held("max_clients"), held("max_calls_per_client"))
    assert History(Path("/nonexistent")).max_bytes == held("history_max_bytes")
    written_twice = [(key, where) for key, where, expr in places if _is_literal(expr)]
    assert written_twice == []
