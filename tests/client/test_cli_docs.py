"""The generated man pages and bash completion (``make man``): they build, name every command
and option the parsers have, and the completion scripts complete in a real bash.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from virtmig.client.cli import COMMANDS, command_parser, main_parser
from virtmig.client.cli.docs import FILES, write_all
from virtmig.daemon.config import build_parser

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    res = subprocess.run([sys.executable, "-m", "virtmig.client.cli.docs", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    return out


def options_of(parser: object) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings  # type: ignore[attr-defined]
            if a.help != "==SUPPRESS=="}


def test_man_pages_name_every_command_and_option(docs: Path) -> None:
    page = (docs / "virtmig.1").read_text()
    assert page.startswith('.TH VIRTMIG 1 "" "virtmig ')
    sections = re.findall(r"^\.SS (.+)$", page, re.M)
    assert sections == [c.name.replace("-", "\\-") for c in COMMANDS]
    for parser in [main_parser(), *(command_parser(c) for c in COMMANDS)]:
        for opt in options_of(parser):
            assert f"\\fB{opt.replace('-', chr(92) + '-')}\\fR" in page, opt
    daemon = (docs / "virtmigd.8").read_text()
    assert daemon.startswith('.TH VIRTMIGD 8 ""')
    for opt in options_of(build_parser()):
        assert f"\\fB{opt.replace('-', chr(92) + '-')}\\fR" in daemon, opt
    # No line starts with a roff control character by accident (a help text starting with '.').
    for line in (page + daemon).splitlines():
        assert not line.startswith("'"), line
        assert not line.startswith(".") or re.match(r"\.(TH|SH|SS|TP|PP) ?", line), line


def complete(script: Path, *words: str) -> list[str]:
    """What bash's completion function of ``script`` offers for ``words`` (the last is the
    word being completed)."""
    func = "_virtmigd" if words[0] == "virtmigd" else "_virtmig"
    array = " ".join(f"'{w}'" for w in words)
    code = (f"source '{script}'; COMP_WORDS=({array}); COMP_CWORD={len(words) - 1}; {func}; "
            "printf '%s\\n' \"${COMPREPLY[@]}\"")
    res = subprocess.run(["bash", "--norc", "--noprofile", "-c", code], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return [w for w in res.stdout.splitlines() if w]


def test_bash_completion_completes(docs: Path, tmp_path: Path) -> None:
    script = docs / "virtmig.bash"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    assert complete(script, "virtmig", "migrate-g") == ["migrate-getmaxdowntime",
                                                        "migrate-getspeed"]
    assert complete(script, "virtmig", "-c", "virtmig+tls://h", "list", "--state-")[:3] == [
        "--state-running", "--state-paused", "--state-shutoff"]
    assert "--postcopy-after-precopy" in complete(script, "virtmig", "migrate", "--postcopy-")
    (tmp_path / "guest.xml").write_text("<domain/>")
    assert complete(script, "virtmig", "define", f"{tmp_path}/gu") == [f"{tmp_path}/guest.xml"]
    daemon = docs / "virtmigd.bash"
    assert "--config" in complete(daemon, "virtmigd", "--con")


def test_make_man_target_exists() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^man: .*\n\t\$\(PY\) -m virtmig\.client\.cli\.docs build/docs$", makefile,
                     re.M)


def test_write_all(tmp_path: Path) -> None:
    written = write_all(tmp_path / "out")
    assert [p.name for p in written] == list(FILES)
    assert all(p.read_text() for p in written)
