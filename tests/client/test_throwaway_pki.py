"""The tests' throw-away PKI (:mod:`virtmig.testing.pki`) belongs to the process that made it:
a forked process (mutmut forks a pytest run per mutant from a process that collected the tests)
makes its own on first use, and releasing it removes only its own dir."""

from __future__ import annotations

import json
import os
from pathlib import Path

from virtmig.testing import ThrowawayPki


def _in_forked_child(pki: ThrowawayPki) -> dict[str, object]:
    """Issue the admin client dir in a forked child that ends by ``os._exit``, as mutmut's do;
    report what it saw."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        try:
            client = pki.client()
            seen = {"root": str(pki.root), "cert": (client / "clientcert.pem").is_file()}
            pki.release()
            seen["left"] = Path(str(seen["root"])).exists()
        except Exception as error:
            seen = {"error": f"{type(error).__name__}: {error}"}
        os.write(write, json.dumps(seen).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as reply:
        data = reply.read()
    os.waitpid(pid, 0)
    seen = json.loads(data)
    assert isinstance(seen, dict)
    return seen


def test_forked_runs_each_make_their_own_pki() -> None:
    """Held from import on (as a test module holds ``session_pki()``) and first used in forked
    children one after the other, each child issues into a dir of its own and removes it."""
    pki = ThrowawayPki()
    first = _in_forked_child(pki)
    second = _in_forked_child(pki)
    assert "error" not in first and "error" not in second, (first, second)
    assert first["cert"] and second["cert"]
    assert first["root"] != second["root"]
    assert not first["left"] and not second["left"]


def test_a_forked_child_does_not_touch_its_parents_pki() -> None:
    """The parent's PKI, in use before the fork, stays whole after the child issued and
    released its own."""
    pki = ThrowawayPki()
    client = pki.client()
    try:
        child = _in_forked_child(pki)
        assert "error" not in child, child
        assert child["root"] != str(pki.root)
        assert (client / "clientcert.pem").is_file()
        assert pki.client() == client
    finally:
        root = pki.root
        pki.release()
    assert not root.exists()
