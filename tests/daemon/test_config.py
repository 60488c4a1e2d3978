"""The settings schema against its documentation, and the daemon's start-up errors: a value of the
wrong type and a port in use are one clear line and exit 1, from a real ``virtmigd`` process."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from virtmig.daemon.config import build_parser, load_config
from virtmig.daemon.settings import BY_KEY, EXPECTED, SCHEMA, default
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
