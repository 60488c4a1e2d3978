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

#: What identifies one version of a definition file.
Key = tuple[int, int, int, int]


def key_of(st: os.stat_result) -> Key:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


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

    def read(self) -> tuple[dict[str, tuple[Key, str]], bool]:
        """The entries the file holds (file name -> key, name), and whether it needs a
        rewrite (missing, damaged, another header, or mostly dead records)."""
        try:
            text = self.path.read_bytes().decode("utf-8", "replace")
        except FileNotFoundError:
            return {}, True
        except OSError as exc:
            log.warning("cannot read the definition index %s: %s; parsing every definition",
                        self.path, exc)
            return {}, True
        head, _, rest = text.partition("\n")
        if head + "\n" != self.header:
            log.info("definition index %s is of another version: rebuilt", self.path)
            return {}, True
        entries: dict[str, tuple[Key, str]] = {}
        damaged = bool(rest) and not rest.endswith("\n")
        lines = rest.split("\n")
        lines.pop()  # after the last newline: "" or a torn record
        for line in lines:
            crc, _, body = line.partition(" ")
            if crc != f"{zlib.crc32(body.encode()):08x}":
                damaged = True
                continue
            fields = body.split(" ", 6)
            if fields[0] == "-" and len(fields) == 2:
                entries.pop(fields[1], None)
            elif fields[0] == "+" and len(fields) == 7:
                try:
                    key = (int(fields[2]), int(fields[3]), int(fields[4]), int(fields[5]))
                except ValueError:
                    damaged = True
                    continue
                entries[fields[1]] = (key, fields[6])
            else:
                damaged = True
        self._records = len(lines)
        if damaged:
            log.warning("definition index %s is damaged: its good records are used, it is "
                        "rewritten", self.path)
        return entries, damaged or len(lines) > 2 * len(entries) + COMPACT_SLACK

    # --- the entries in force (what a compaction writes) ----------------------------------------

    def keep(self, file: str, key: Key, name: str) -> None:
        """Take an entry into memory (at load, for a definition accepted)."""
        self._live[file] = _body(file, key, name)

    def rewrite(self) -> None:
        """Replace the file with the entries in memory, atomically."""
        data = self.header + "".join(_record(body) for body in self._live.values())
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
            key = key_of(path.stat())
        except OSError as exc:
            log.warning("cannot index %s: %s", path, exc)
            self.drop(file)
            return
        body = _body(file, key, name)
        self._live[file] = body
        self._append(body)

    def drop(self, file: str) -> None:
        """Forget definition ``file`` (removed, or not to be trusted)."""
        self._live.pop(file, None)
        self._append(f"- {file}")

    def _append(self, body: str) -> None:
        if self._records > 2 * len(self._live) + COMPACT_SLACK:
            self.rewrite()
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
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


def _body(file: str, key: Key, name: str) -> str:
    return f"+ {file} {key[0]} {key[1]} {key[2]} {key[3]} {name}"
