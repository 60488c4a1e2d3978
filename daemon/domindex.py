"""The definition index: the name of every persistent definition the daemon accepted, keyed by
its file's identity, so that a start reads one file instead of parsing every definition (issue
17: 100,000 definitions).

The definition files (``domains/<uuid>.xml``) stay the truth; the index is a cache of what a
load needs from each of them (the name: the UUID is the file name, which the load rules pin)
and may be lost or wrong at any time:

* an entry counts only while its key matches the file's ``stat``: inode, size, ``mtime_ns``
  and ``ctime_ns`` (a file rewritten by the daemon is a new inode; an edit in place changes
  the times, and ``ctime`` cannot be set back by a user).  A file without a matching entry is
  parsed, as without an index, and gets a new entry;
* every record carries a CRC-32 of its text: a torn or damaged record is ignored (its file is
  parsed), and an index with another header (another format, another virtmig version, or
  none) is ignored whole; in both cases it is rewritten;
* what a record says is checked again when the definition is parsed, on first use
  (:meth:`Registry.resolve <virtmig.daemon.registry.Registry.resolve>`).

File ``STATE/domains.index``, one record a line after a header line::

    virtmig-domain-index 1 <virtmig version>
    <crc32 hex> + <file> <ino> <size> <mtime_ns> <ctime_ns> <name>
    <crc32 hex> - <file>

An append-only journal: define writes one ``+`` record (after the definition file is durable),
undefine one ``-`` record (after the file is gone); the last record of a file wins.  Appends
are not fsynced: losing one costs a parse at the next start, never a wrong answer (a crash
between a definition's write and its record is a file without a matching entry).  Define and
undefine thus cost one small append however many domains there are.  The journal is compacted
(rewritten atomically from the entries in memory: one line per definition) at start when it
was damaged or carries more than about as many dead records as live ones, and while running
once the records since the last compaction exceed twice the live entries plus
:data:`COMPACT_SLACK`: amortised, still O(1) a change.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from pathlib import Path

from virtmig.daemon.state import atomic_write
from virtmig.proto import logsafe

log = logsafe.logger(__name__)

FORMAT = 1
#: Dead records tolerated beyond the live entries before a compaction.
COMPACT_SLACK = 1000


def _record(body: str) -> str:
    return f"{zlib.crc32(body.encode()):08x} {body}\n"


class DomainIndex:
    """The index file of one state dir, and its live entries in memory (file -> record)."""

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.header = f"virtmig-domain-index {FORMAT} {version}\n"
        self._live: dict[str, str] = {}  # file name -> its "+" record's body
        self._records = 0  # records in the file since its header
        self.appends = 0  # records appended since this object was made (tests count them)
        self.compactions = 0

    def read(self) -> tuple[dict[str, str], bool]:
        """The entries the file holds (file name -> its ``+`` record's body, which
        :func:`prefix` checks against the file), and whether the file needs a rewrite
        (missing, damaged, another header, or mostly dead records)."""
        entries: dict[str, str] = {}
        damaged = False
        records = 0
        try:
            with open(self.path, "rb") as f:
                if f.readline().decode("utf-8", "replace") != self.header:
                    log.info("definition index %s is missing or of another version: rebuilt",
                             self.path)
                    return {}, True
                for line in f:  # one at a time: a start holds no copy of the whole file
                    records += 1
                    body = line[9:-1]
                    if line[-1:] != b"\n" or line[8:9] != b" " or \
                            line[:8] != b"%08x" % zlib.crc32(body):
                        damaged = True
                        continue
                    text = body.decode("utf-8", "replace")
                    if text.startswith("+ "):
                        entries[text[2:text.index(" ", 2)]] = text
                    elif text.startswith("- "):
                        entries.pop(text[2:], None)
                    else:
                        damaged = True
        except FileNotFoundError:
            return {}, True
        except (OSError, ValueError) as exc:  # ValueError: a "+" record without its fields
            log.warning("cannot read the definition index %s: %s; parsing every definition",
                        self.path, exc)
            return {}, True
        self._records = records
        if damaged:
            log.warning("definition index %s is damaged: its good records are used, it is "
                        "rewritten", self.path)
        return entries, damaged or records > 2 * len(entries) + COMPACT_SLACK

    # --- the entries in force (what a compaction writes) ----------------------------------------

    def keep(self, file: str, body: str) -> None:
        """Take an entry into memory (at load, for a definition accepted: its record's body,
        or :func:`body` for a definition parsed)."""
        self._live[file] = body

    def rewrite(self) -> None:
        """Replace the file with the entries in memory, atomically."""
        data = self.header + "".join(_record(b) for b in self._live.values())
        try:
            atomic_write(self.path, data.encode(), sync_dir=False)
        except OSError as exc:
            log.warning("cannot write the definition index %s: %s", self.path, exc)
            return
        self._records = len(self._live)
        self.compactions += 1

    # --- changes (define, undefine) ---------------------------------------------------------------

    def put(self, file: str, path: Path, name: str) -> None:
        """Record definition ``file`` (just written at ``path``) as named ``name``."""
        try:
            record = body(file, path.stat(), name)
        except OSError as exc:
            log.warning("cannot index %s: %s", path, exc)
            self.drop(file)
            return
        self._live[file] = record
        self._append(record)

    def drop(self, file: str) -> None:
        """Forget definition ``file`` (removed, or not to be trusted)."""
        self._live.pop(file, None)
        self._append(f"- {file}")

    def _append(self, body: str) -> None:
        if self._records > 2 * len(self._live) + COMPACT_SLACK:
            self.rewrite()
            return
        try:  # 0600 like every file of the state dir (atomic_write's temporary files)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "a", encoding="utf-8") as f:
                if f.tell() == 0:
                    f.write(self.header)
                f.write(_record(body))
        except OSError as exc:
            log.warning("cannot write the definition index %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                self.path.unlink()  # rebuilt at the next start
            return
        self._records += 1
        self.appends += 1


def prefix(file: str, st: os.stat_result) -> str:
    """What the record of ``file`` as ``st`` describes it starts with (its name follows)."""
    return f"+ {file} {st.st_ino} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns} "


def body(file: str, st: os.stat_result, name: str) -> str:
    """The record of definition ``file`` (as ``st`` describes it) named ``name``."""
    return prefix(file, st) + name
