"""virtmig.proto.record: a ``@record`` class behaves as the same class under
``@dataclass(frozen=True)`` (or ``@dataclass`` with ``frozen=False``) does -- construction and its
errors, defaults and factories, ``__post_init__``, repr, equality, hash, frozen errors,
``dataclasses``' functions and pattern matching -- and what it does not support is refused
when the class is decorated."""

from __future__ import annotations

import dataclasses
import inspect
import pickle
from collections.abc import Callable
from functools import partial
from typing import Any, ClassVar  # noqa: F401 (ClassVar: read by dataclasses, by name)

import pytest

from virtmig.proto.record import record


def twins(name: str, annotations: dict[str, str], body: dict[str, Any] | None = None,
          frozen: bool = True) -> tuple[Any, Any]:
    """The class ``name`` with these fields (and ``body``) made twice: by ``dataclass`` and by
    ``record``, with the same name, qualified name and module."""
    def make() -> type:
        ns = {"__annotations__": dict(annotations), "__module__": __name__,
              "__qualname__": name, **(body or {})}
        return type(name, (), ns)

    return dataclasses.dataclass(frozen=frozen)(make()), record(frozen=frozen)(make())


FIELDS = {"a": "int", "b": "str", "c": "tuple[int, ...]", "d": "float | None"}
DEFAULTS = {"c": (), "d": None}


def outcome(call: Callable[[], object]) -> tuple[str, object]:
    """What a call gave: ('ok', repr of the value) or the exception's type name and text."""
    try:
        return "ok", repr(call())
    except Exception as e:  # (compared between the twins)
        return type(e).__name__, str(e)


@pytest.mark.parametrize("frozen", [True, False])
def test_construction_binds_as_a_dataclass_does(frozen: bool) -> None:
    dc, rec = twins("Value", FIELDS, DEFAULTS, frozen=frozen)
    calls: list[tuple[tuple[object, ...], dict[str, object]]] = [
        ((1, "x"), {}), ((1, "x", (2,), 0.5), {}), ((), {"a": 1, "b": "x"}),
        ((1,), {"b": "x", "d": 1.0}), ((1, "x"), {"c": (3,)}), ((1, "x", (4,)), {}),
        # errors, with Python's own messages
        ((), {}), ((1,), {}), ((), {"b": "x"}), ((1, "x", (), None, 5), {}),
        ((1, "x", (), None, 5, 6), {}), ((1, "x"), {"e": 1}), ((1, "x"), {"a": 2}),
        ((1,), {"b": "x", "zz": 1, "a": 3}), ((1, "x", (), None), {"d": 2.0}),
        ((1, "x", (), None, 5), {"zz": 1}),
    ]
    for args, kwargs in calls:
        assert outcome(partial(rec, *args, **kwargs)) == outcome(partial(dc, *args, **kwargs)), (
            args, kwargs)
    only_required, _ = twins("Pair", {"x": "int", "y": "int"})
    assert outcome(lambda: twins("Pair", {"x": "int", "y": "int"})[1](1, 2, 3)) == outcome(
        lambda: only_required(1, 2, 3))
    assert outcome(lambda: twins("One", {"x": "int"})[1]()) == outcome(
        lambda: twins("One", {"x": "int"})[0]())


@pytest.mark.parametrize("frozen", [True, False])
def test_repr_eq_and_hash_are_a_dataclass_s(frozen: bool) -> None:
    hidden = dataclasses.field(default="s", repr=False)
    dc, rec = twins("Value", {**FIELDS, "e": "str"}, {**DEFAULTS, "e": hidden}, frozen=frozen)
    values = [(1, "x"), (1, "x", (2, 3), 0.5), (2, "it's", (), None)]
    for args in values:
        assert repr(rec(*args)) == repr(dc(*args))
        assert "e=" not in repr(rec(*args))
        assert rec(*args) == rec(*args)
        assert rec(*args) != dc(*args)  # (another class)
        assert (rec(*args) == object()) is False
        if frozen:
            assert hash(rec(*args)) == hash(dc(*args))
        else:
            with pytest.raises(TypeError, match="unhashable"):
                hash(rec(*args))
    assert rec(1, "x") != rec(1, "y")
    assert rec(1, "x", e="t") != rec(1, "x")  # (e is compared, only not shown)
    if frozen:
        assert len({rec(*args) for args in values + values}) == 3


def test_a_record_that_holds_itself_prints_as_a_dataclass_does() -> None:
    dc, rec = twins("Node", {"items": "list[object]"}, frozen=False)
    d, r = dc([]), rec([])
    d.items.append(d)
    r.items.append(r)
    assert repr(r) == repr(d) == "Node(items=[...])"


def test_a_frozen_record_refuses_changes_as_a_dataclass_does() -> None:
    dc, rec = twins("Value", FIELDS, DEFAULTS)
    d, r = dc(1, "x"), rec(1, "x")
    for change in (lambda v: setattr(v, "a", 2), lambda v: setattr(v, "new", 2),
                   lambda v: delattr(v, "b"), lambda v: delattr(v, "new")):
        assert outcome(partial(change, r)) == outcome(partial(change, d))
        assert outcome(partial(change, r))[0] == "FrozenInstanceError"
    assert r == rec(1, "x")


def test_an_unfrozen_record_takes_changes() -> None:
    _, rec = twins("Trace", {"calls": "list[str]", "protocol": "str"},
                   {"calls": dataclasses.field(default_factory=list), "protocol": ""},
                   frozen=False)
    first, second = rec(), rec()
    first.calls.append("begin")
    first.protocol = "v3"
    assert second.calls == [] and first.calls is not second.calls  # (a list each)
    assert first == rec(["begin"], "v3")
    del first.protocol
    assert first.protocol == ""  # (the class's default again, as a dataclass's)


def test_defaults_factories_and_post_init() -> None:
    made: list[object] = []

    def post_init(self: Any) -> None:
        made.append(self)
        if self.n < 0:
            raise ValueError("negative")

    body = {"n": 0, "tags": dataclasses.field(default_factory=lambda: ["t"]),
            "__post_init__": post_init}
    dc, rec = twins("Counted", {"n": "int", "tags": "list[str]"}, body)
    r = rec()
    assert made == [r] and r.tags == ["t"] and r.n == 0
    assert rec().tags is not r.tags
    assert repr(rec(2)) == repr(dc(2))
    assert outcome(lambda: rec(-1)) == outcome(lambda: dc(-1)) == ("ValueError", "negative")
    assert rec.n == dc.n == 0  # (a default is a class attribute, a factory's is not)
    assert not hasattr(rec, "tags") and not hasattr(dc, "tags")


def test_dataclasses_functions_and_matching_work_on_a_record() -> None:
    dc, rec = twins("Value", FIELDS, DEFAULTS)
    r, d = rec(1, "x", (2,)), dc(1, "x", (2,))
    assert all(dataclasses.is_dataclass(x) for x in (r, rec))
    assert [(f.name, f.type, f.default) for f in dataclasses.fields(r)] == [
        (f.name, f.type, f.default) for f in dataclasses.fields(d)]
    assert dataclasses.asdict(r) == dataclasses.asdict(d)
    assert dataclasses.astuple(r) == dataclasses.astuple(d)
    assert dataclasses.replace(r, b="y") == rec(1, "y", (2,))
    assert outcome(lambda: dataclasses.replace(r, zz=1))[0] == "TypeError"
    assert rec.__match_args__ == dc.__match_args__ == ("a", "b", "c", "d")
    match r:
        case rec(1, b, c=(2,)):
            assert b == "x"
        case _:
            pytest.fail("no match")
    for name in ("init", "repr", "eq", "order", "unsafe_hash", "frozen"):
        assert (getattr(rec.__dataclass_params__, name)
                == getattr(dc.__dataclass_params__, name)), name
    assert not twins("V", {"a": "int"}, frozen=False)[1].__dataclass_params__.frozen
    assert rec.__doc__ == dc.__doc__ == "Value(a: 'int', b: 'str', c: 'tuple[int, ...]' = (), " \
        "d: 'float | None' = None)"
    assert pickle.loads(pickle.dumps(Picklable(1, "x"))) == Picklable(1, "x")


@record
class Picklable:
    """(A module-level record, for pickle.)"""

    a: int
    b: str = ""


def test_inspect_sees_a_dataclass_s_signature() -> None:
    """(What ``help`` shows of the client's values, for one.)"""
    dc, rec = twins("Value", {**FIELDS, "e": "list[int]"},
                    {**DEFAULTS, "e": dataclasses.field(default_factory=list)})
    assert str(inspect.signature(rec)) == str(inspect.signature(dc)) == (
        "(a: 'int', b: 'str', c: 'tuple[int, ...]' = (), d: 'float | None' = None, "
        "e: 'list[int]' = <factory>) -> None")
    with pytest.raises(TypeError):
        inspect.signature(rec(1, "x"))  # (an instance is not callable, as a dataclass's)


def test_a_docstring_is_kept() -> None:
    assert Picklable.__doc__ == "(A module-level record, for pickle.)"
    assert twins("D", {"x": "int", "y": "list[int]"},
                 {"y": dataclasses.field(default_factory=list)})[1].__doc__ == (
        "D(x: 'int', y: 'list[int]' = <factory>)")


def _refused(annotations: dict[str, Any], body: dict[str, Any] | None = None,
             bases: tuple[type, ...] = ()) -> str:
    ns = {"__annotations__": annotations, "__module__": __name__, **(body or {})}
    with pytest.raises(TypeError) as info:
        record(type("Odd", bases, ns))
    return str(info.value)


def test_what_a_record_does_not_support_is_refused() -> None:
    assert "base class" in _refused({"a": "int"}, bases=(Picklable,))
    options: list[dict[str, Any]] = [{"init": False}, {"compare": False}, {"hash": True},
                                      {"kw_only": True}]
    for option in options:
        assert "field 'a'" in _refused({"a": "int"},
                                       {"a": dataclasses.field(default=0, **option)})
    assert "ClassVar" in _refused({"a": "int", "b": "ClassVar[int]"}, {"b": 1})
    assert "ClassVar" in _refused({"a": "int", "b": "dataclasses.InitVar[int]"})
    assert "field 'b'" in _refused({"a": "int", "_": "dataclasses.KW_ONLY", "b": "int"})
    for method in ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__",
                   "__delattr__"):
        assert method in _refused({"a": "int"}, {method: lambda self, *a: None})
    # as a dataclass refuses it (its message)
    with pytest.raises(TypeError) as info:
        dataclasses.dataclass(type("Odd", (), {"__annotations__": {"a": "int", "b": "int"},
                                               "a": 0}))
    assert _refused({"a": "int", "b": "int"}, {"a": 0}) == str(info.value)

