"""Log lines that callers cannot forge: every string a log call interpolates is escaped and
truncated.

A domain name, an XML snippet, a URI, a DN or an error message that quotes a caller's input can
hold newlines, control or bidi characters, or megabytes: written as they are, they would forge
log lines, hide the text after them on a terminal, or flood the log.  :func:`safe` makes any
value one bounded printable line: a backslash, a character that is not printable (controls,
line and paragraph separators, format characters such as U+202E) and a lone surrogate (bytes
that were not UTF-8) become a Python-style escape (``\\n``, ``\\x1b``, ``\\u202e``,
``\\udcff``); past :data:`LIMIT` characters of output the rest is cut and a marker says how
much (``...[+N chars]``).

Modules get their logger from :func:`logger`: it carries :class:`SafeArgs`, which passes every
string, exception or path argument of a record through :func:`safe` (numbers stay as they
are), so no log call of those modules can interpolate raw caller text.  The message format
itself is the code's own.
"""

from __future__ import annotations

import logging
import os
from typing import Any

LIMIT = 200
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _escape(ch: str) -> str:
    named = _NAMED.get(ch)
    if named is not None:
        return named
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(value: object, limit: int = LIMIT) -> str:
    """``value`` as one printable line of at most ``limit`` characters (plus the cut marker)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text
    out: list[str] = []
    size = 0
    for i, ch in enumerate(text):
        piece = _escape(ch)
        if size + len(piece) > limit:
            out.append(f"...[+{len(text) - i} chars]")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def _safe_arg(arg: Any) -> Any:
    if isinstance(arg, str | BaseException | os.PathLike):
        return safe(arg)
    return arg


class SafeArgs(logging.Filter):
    """Escapes and truncates the string arguments of every record of the logger it is on."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(_safe_arg(a) for a in args)
        elif isinstance(args, dict):
            record.args = {k: _safe_arg(v) for k, v in args.items()}
        return True


_FILTER = SafeArgs()


def logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with :class:`SafeArgs` on it (added once)."""
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    return log
