"""The client library's public names, pinned, and its one-way layers.

Adding or removing a public name of ``virtmig.client`` is a deliberate change: it fails here until
the expected set below says so.
"""

from __future__ import annotations

import ast
import types
from pathlib import Path

import virtmig.client
from virtmig.client import connection

PUBLIC = {
    "AsyncConnection",
    "Connection",
    "Domain",
    "DomainInfo",
    "DomainKey",
    "DomainState",
    "Event",
    "HostInfo",
    "JobInfo",
    "JobOperation",
    "JobType",
    "MigrateFlags",
    "MigrateParam",
    "TypedParam",
    "TypedParams",
    "VirtmigError",
    "open",
}

# What ``virtmig.client.connection`` has always exported (the CLI and the tests import it there).
CONNECTION_PUBLIC = {"AsyncConnection", "Domain", "DomainInfo", "DomainKey", "Event", "HostInfo",
                     "JobInfo"}

# The client's layers, in order: each module may import only the modules listed before it.
LAYERS = ["values", "records", "transport", "rpc", "sequence", "migrate", "connection", "sync"]
# The imports that may be deferred (still one way): a connection loads the migration drivers on
# its first migration, and the RPCs that return job, event, location or history values load
# them on first use, so that a command that does not need them starts without them (issue 17).
DEFERRED = {("connection", "migrate"), ("connection", "sequence"), ("connection", "records"),
            ("rpc", "records")}
# The package's own helper (PEP 562 re-exports), not a layer.
HELPERS = {"_lazy_getattr"}
# values re-exports records' names on first use (for the type checker: an import under
# TYPE_CHECKING); records builds on values.
REEXPORTS = {("values", "records")}


def test_all_is_the_pinned_set() -> None:
    assert len(virtmig.client.__all__) == len(set(virtmig.client.__all__))
    assert set(virtmig.client.__all__) == PUBLIC


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from virtmig.client import *", namespace)
    assert set(namespace) - {"__builtins__"} == PUBLIC
    assert all(namespace[name] is not None for name in PUBLIC)


def test_no_public_name_is_left_out_of_all() -> None:
    """Every public attribute of the package (but its submodules) is in ``__all__``."""
    names = {name for name, value in vars(virtmig.client).items()
             if not name.startswith("_") and not isinstance(value, types.ModuleType)
             and name != "annotations"}  # (the __future__ feature)
    assert names == PUBLIC


def test_connection_module_keeps_its_names() -> None:
    assert set(connection.__all__) == CONNECTION_PUBLIC
    for name in CONNECTION_PUBLIC:
        assert getattr(connection, name) is getattr(virtmig.client, name)


def _client_imports(tree: ast.Module) -> list[tuple[str, bool]]:
    """``(module, at_top_level)`` for each ``virtmig.client.X`` the module imports."""
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module is not None:
            if node.module == "virtmig.client":
                names = [alias.name for alias in node.names]
            elif node.module.startswith("virtmig.client."):
                names = [node.module.split(".")[2]]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[2] for a in node.names
                     if a.name.startswith("virtmig.client.")]
        found += [(name, id(node) in top) for name in names]
    return found


def test_layers_import_one_way_and_at_the_top() -> None:
    folder = Path(virtmig.client.__file__).parent
    for i, layer in enumerate(LAYERS):
        tree = ast.parse((folder / f"{layer}.py").read_text())
        for name, at_top in _client_imports(tree):
            if name in HELPERS:
                continue
            if (layer, name) in REEXPORTS:
                assert not at_top, f"{layer}.py imports virtmig.client.{name} at the top"
                continue
            assert name in LAYERS[:i], f"{layer}.py imports virtmig.client.{name}"
            assert at_top or (layer, name) in DEFERRED, \
                f"{layer}.py defers its import of virtmig.client.{name}"
