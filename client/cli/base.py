"""What every command module of the CLI shares: its errors, virsh's checks of option values, the
command's connections (:class:`Session`), the command record, and Ctrl-C while a command waits.

The errors live here rather than with ``main`` so that command modules can raise them without
importing the command table that imports them.

``virtmig --help`` and every parse error import this module and not much else (issue 17: they
must cost no more than the interpreter plus argparse), so it imports only what argparse already
loaded: asyncio, signal, typing, dataclasses and virtmig's error classes are imported where they
are used.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import sys
from collections.abc import Awaitable, Callable, Iterator

# typing's TYPE_CHECKING without importing typing (mypy treats any TYPE_CHECKING as true).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    from virtmig.client.connection import AsyncConnection, Domain
    from virtmig.client.transport import Dialing

    T = TypeVar("T")


# --- errors ---------------------------------------------------------------------------------------


class CliError(Exception):
    """A failure the CLI reports itself: each line becomes one ``error: <line>``."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0] if lines else "")
        self.lines = lines


class UsageError(CliError):
    """Bad command line (argparse's errors included)."""


def print_error(line: str) -> None:
    """One ``error: <line>`` on stderr, after whatever stdout holds."""
    sys.stdout.flush()
    print(f"error: {line}", file=sys.stderr, flush=True)


# --- option values, as virsh reads them -----------------------------------------------------------

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
LLONG_MIN, LLONG_MAX = -(2**63), 2**63 - 1
ULLONG_MAX = 2**64 - 1
_DECIMAL = re.compile(r"[+-]?[0-9]+")


def option(dest: str) -> str:
    """An argparse ``dest`` as the option is spelt: ``listen_address`` → ``listen-address``."""
    return dest.replace("_", "-")


def number(dest: str, text: str, lo: int, hi: int) -> int:
    """virsh's ``vshCommandOpt{Int,UInt,ULongLong}``: decimal, in range, or the virsh error."""
    if not _DECIMAL.fullmatch(text) or not lo <= int(text, 10) <= hi:
        raise UsageError(
            f"Numeric value '{text}' for <{option(dest)}> option is malformed or out of range"
        )
    return int(text, 10)


def read_file(path: str, *context: str) -> str:
    """virsh's ``virFileReadAll``: the content, or ``Failed to open file``, after ``context``."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise CliError(*context, f"Failed to open file '{path}': {reason}") from None


def exclusive(args: argparse.Namespace, a: str, b: str) -> None:
    """virsh's ``VSH_EXCLUSIVE_OPTIONS(a, b)``."""
    if getattr(args, a) and getattr(args, b):
        raise UsageError(f"Options --{option(a)} and --{option(b)} are mutually exclusive")


def require(args: argparse.Namespace, opt: str, required: str) -> None:
    """virsh's ``VSH_REQUIRE_OPTION(option, required)``."""
    if getattr(args, opt) and not getattr(args, required):
        raise UsageError(f"Option --{option(required)} is required by option --{option(opt)}")


def add_json(p: argparse.ArgumentParser) -> None:
    """A read command's ``--json``: its documented shape (:mod:`virtmig.client.cli.jsonout`)."""
    p.add_argument("--json", action="store_true",
                   help="virtmig: print JSON (shape documented in the README)")


# --- connections ----------------------------------------------------------------------------------


CONNECT_TIMEOUT_ENV = "VIRTMIG_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0
# A day: more is a typo, and a deadline that far is no deadline.
MAX_CONNECT_TIMEOUT = 86400.0


def connect_timeout(option_value: str | None) -> float:
    """How long a connection waits for the daemon's first answer: ``--connect-timeout``, else
    ``$VIRTMIG_CONNECT_TIMEOUT``, else 10 s; seconds, more than 0 and at most a day."""
    source, text = "<connect-timeout> option", option_value
    if text is None:
        source, text = f"{CONNECT_TIMEOUT_ENV} environment variable", os.environ.get(
            CONNECT_TIMEOUT_ENV)
    if text is None or (text == "" and option_value is None):
        return DEFAULT_CONNECT_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= MAX_CONNECT_TIMEOUT:  # (NaN fails too)
        raise UsageError(f"Numeric value '{text}' for {source} is malformed or out of range "
                         f"(seconds, more than 0 and at most {MAX_CONNECT_TIMEOUT:g})")
    return value


def start_program() -> None:
    """The ``virtmig`` program's start-up (not a caller of ``main()`` in Python): the collector
    paused (:func:`pause_gc_for_startup`), and protobuf's pure-Python backend made lazy when a
    first connection imports protobuf (:func:`defer_protobuf_pure_python`)."""
    global _program
    _program = True
    pause_gc_for_startup()


def pause_gc_for_startup() -> None:
    """The program (not a caller in Python): no cyclic garbage collection while the command
    imports gRPC, protobuf and virtmig's modules, whose objects all live to the end (the
    collector's passes over them are about 4 % of a migrate command's instructions, issue 17);
    :meth:`Session.open` turns it back on once a daemon answered, for commands that run long,
    with those objects frozen (``gc.freeze``): otherwise the first collections after that walk
    every one of them once per generation (about 2 % of a ``migrate``), and free none."""
    import gc

    global _gc_paused
    _gc_paused = gc.isenabled()
    gc.disable()


def _startup_over() -> None:
    global _gc_paused
    if _gc_paused:
        import gc

        _gc_paused = False
        gc.freeze()
        gc.enable()


_gc_paused = False
_program = False


def in_program() -> bool:
    """Whether this is the ``virtmig`` program (:func:`start_program`), which ends with
    ``os._exit`` once its command has reported."""
    return _program


# The module of protobuf's pure-Python backend.  Every generated ``*_pb2`` module loads it (through
# ``descriptor_pool``), with text_format, pickle and the Python encoder and decoder behind it, about
# a tenth of what ``import grpc`` costs; the upb backend, protobuf's default, never uses it.
PROTOBUF_PURE_PYTHON = "google.protobuf.internal.python_message"


def defer_protobuf_pure_python() -> None:
    """The program, once it runs a command: with protobuf's upb backend, make the pure-Python
    backend's module lazy (:class:`importlib.util.LazyLoader`, the standard library's lazy
    import): it is loaded in full on its first attribute access, which the upb backend does not
    make, so a command does not pay for it; any code that does use it gets it as always.  With
    another backend (``PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION``), or once the module is loaded,
    nothing changes."""
    import importlib.util

    name = PROTOBUF_PURE_PYTHON
    if name in sys.modules:
        return
    try:
        from google.protobuf.internal import api_implementation

        spec = importlib.util.find_spec(name) if api_implementation.Type() == "upb" else None
    except (ImportError, ValueError):  # (no protobuf: nothing to defer)
        return
    if spec is None or spec.loader is None:
        return
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    # The attribute on its package too: ``from google.protobuf.internal import python_message``
    # (descriptor_pool's) then finds it there, without the import system reading its __spec__,
    # which would load it.
    package, _, attr = name.rpartition(".")
    setattr(sys.modules[package], attr, module)


class Session:
    """The command's connections: the ``-c`` one, opened on first use, plus any others, each
    waiting ``timeout`` seconds for its daemon's first answer."""

    def __init__(self, uri: str | None, timeout: float = DEFAULT_CONNECT_TIMEOUT) -> None:
        self.uri = uri
        self.timeout = timeout
        self._conn: AsyncConnection | None = None
        self._opened: list[AsyncConnection] = []
        self._dialed: dict[str | None, Dialing] = {}

    async def conn(self) -> AsyncConnection:
        if self._conn is None:
            self._conn = await self.open(self.uri, "failed to connect to the hypervisor")
        return self._conn

    def dial(self, uri: str | None) -> None:
        """Start connecting to ``uri`` now (:func:`~virtmig.client.transport.dial`), for a
        later :meth:`open` of it: a command that opens two connections dials both before the
        imports of the first open.  Whatever is wrong (a bad URI, a PKI dir that cannot work) is
        left for :meth:`open` to report, in the order of the command's steps."""
        if uri in self._dialed:
            return
        from virtmig.client.transport import dial

        with contextlib.suppress(Exception):
            self._dialed[uri] = dial(uri)

    async def open(self, uri: str | None, what: str) -> AsyncConnection:
        """A connection to ``uri``, or ``CliError(what, why)``.

        The channel is dialed first (unless :meth:`dial` did: gRPC, the URI and the PKI dir's
        files only), then the client library is imported (protobuf, the messages, the stubs)
        while gRPC connects and, for TLS, does the handshake on its own threads (issue 17).
        """
        # Imported here, not at the top: parsing a command line (and --help) loads no gRPC.
        from virtmig.client.transport import dial
        from virtmig.proto.errors import VirtmigError

        dialing = self._dialed.pop(uri, None)
        try:
            if dialing is None:
                dialing = dial(uri)
        except VirtmigError as exc:
            raise CliError(what, str(exc)) from None
        try:
            if _program:
                defer_protobuf_pure_python()
            from virtmig.client.connection import AsyncConnection
        except BaseException:
            await dialing.channel.close(None)
            raise
        try:
            conn = await AsyncConnection.open_dialed(dialing, connect_timeout=self.timeout)
        except VirtmigError as exc:
            raise CliError(what, str(exc)) from None
        self._opened.append(conn)
        _startup_over()
        return conn

    async def close(self) -> None:
        dialed = list(self._dialed.values())
        self._dialed.clear()
        for dialing in dialed:  # (never opened: the command failed before)
            with contextlib.suppress(Exception):
                await dialing.channel.close(None)
        opened = list(reversed(self._opened))
        self._opened.clear()
        if opened:  # at once: each waits for its own daemon (its session's end, the channel's)
            import asyncio

            await asyncio.gather(*(conn.close() for conn in opened), return_exceptions=True)


async def lookup(conn: AsyncConnection, key: str) -> Domain:
    """virsh's ``virshCommandOptDomain``: by id, UUID or name, or "failed to get domain"."""
    from virtmig.proto.errors import NoDomain

    try:
        return await conn.lookup(key)
    except NoDomain:
        raise CliError(f"failed to get domain '{key}'") from None


async def act(what: str, call: Awaitable[T]) -> T:
    """virsh's two-line failure: what the command could not do, then the library's reason."""
    from virtmig.proto.errors import VirtmigError

    try:
        return await call
    except VirtmigError as exc:
        raise CliError(what, str(exc)) from None


# --- commands -------------------------------------------------------------------------------------

Handler = Callable[[Session, argparse.Namespace], Awaitable[None]]


class Command:
    """One CLI command: its handler, and what its parser needs.  Immutable.

    Not a dataclass: ``dataclasses`` imports ``inspect``, which alone costs ``--help`` more than
    argparse does.  ``handler`` and ``setup`` are usually :func:`lazy` references, so that the
    command table imports no command's module.
    """

    __slots__ = ("data", "data_help", "handler", "help", "metavars", "name", "required", "setup")

    name: str
    help: str
    handler: Handler
    # virsh "data" options, in positional order; each can also be given as --NAME.
    data: tuple[str, ...]
    required: tuple[str, ...]
    setup: Callable[[argparse.ArgumentParser], None] | None
    metavars: dict[str, str]
    # This command's help for its data options (the shared ones are the parser's).
    data_help: dict[str, str]

    def __init__(self, name: str, help: str, handler: Handler, data: tuple[str, ...] = (),
                 required: tuple[str, ...] = (),
                 setup: Callable[[argparse.ArgumentParser], None] | None = None,
                 metavars: dict[str, str] | None = None,
                 data_help: dict[str, str] | None = None) -> None:
        values = (("name", name), ("help", help), ("handler", handler), ("data", data),
                  ("required", required), ("setup", setup), ("metavars", metavars or {}),
                  ("data_help", data_help or {}))
        for attr, value in values:
            object.__setattr__(self, attr, value)

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError(f"Command is immutable: cannot set '{attr}'")

    def __repr__(self) -> str:
        return f"Command({self.name!r})"


class Lazy:
    """A stand-in for function ``name`` of ``module`` that imports the module on its first call
    (the command table's handlers and setups)."""

    __slots__ = ("module", "name")

    def __init__(self, module: str, name: str) -> None:
        self.module = module
        self.name = name

    def resolve(self) -> Any:
        """The function itself (its module imported)."""
        import importlib

        return getattr(importlib.import_module(self.module), self.name)

    def __call__(self, *args: Any) -> Any:
        return self.resolve()(*args)

    def __repr__(self) -> str:
        return f"lazy({self.module}.{self.name})"


def lazy(module: str, name: str) -> Any:
    """:class:`Lazy`, typed as whatever the caller needs it to be (a handler, a setup)."""
    return Lazy(module, name)


@contextlib.contextmanager
def on_sigint(callback: Callable[[], None]) -> Iterator[None]:
    """Run ``callback`` on the event loop for each SIGINT while the block runs (instead of
    asyncio.run's cancel-and-raise); the previous handler is back afterwards."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGINT)
    try:
        loop.add_signal_handler(signal.SIGINT, callback)
    except (NotImplementedError, RuntimeError, ValueError):  # no signals here (not main thread)
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        if previous is not None:  # None: not set from Python, nothing to put back
            signal.signal(signal.SIGINT, previous)
