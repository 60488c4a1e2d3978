"""``@record``: a dataclass whose methods are not compiled per class (issue 17: the CLI's
start-up).

``@dataclass(frozen=True)`` writes ``__init__``, ``__repr__``, ``__eq__``, ``__hash__``,
``__setattr__`` and ``__delattr__`` of every class as source text and compiles them with
``exec`` at import: about 3.5 million instructions a class, and a ``migrate`` command imports
fifteen.  A class decorated with :func:`record` is declared as a dataclass is (annotations,
defaults, ``field(...)``) and is one: ``dataclasses.fields``, ``replace``, ``asdict`` and
``is_dataclass`` work on it and its ``__dataclass_params__`` say what it is; ``dataclasses``
still collects its fields, but its methods are written here, once: the repr and the frozen
``__setattr__``/``__delattr__`` are shared functions, ``__init__``, ``__eq__`` and ``__hash__``
closures over the class's field list (made per class, never compiled).  They do what a
dataclass's do: ``__init__`` binds positional and keyword arguments over the fields (defaults,
default factories, Python's own ``TypeError`` messages), sets them as ``object.__setattr__``
would and calls ``__post_init__``; the repr, ``==`` (same class, field tuples) and ``hash``
(field tuple; none when not frozen) are a dataclass's, and a frozen record refuses assignment
and deletion with ``dataclasses.FrozenInstanceError``.

Only what the decorated classes use is supported: ``frozen`` (the default, as the type checker
is told) or not, defaults, ``field(default_factory=...)`` and ``field(repr=False)``,
``__post_init__``.  Anything else -- a base class, ``field(init=False)``, ``compare``, ``hash``
or ``kw_only``, ``ClassVar``/``InitVar`` fields, a method the decorator would write defined by
the class -- is refused at decoration (``TypeError``), so nothing changes meaning silently.
The ``__init__`` costs a little more to call than a compiled one (about 1,400 instructions
with positional arguments, 10,000 with keywords): this is for tables and values a command
builds, not for objects made per page in the daemons.
"""

from __future__ import annotations

import dataclasses
from _thread import get_ident
from dataclasses import MISSING, FrozenInstanceError
from operator import attrgetter
from typing import TYPE_CHECKING, Any, TypeVar, dataclass_transform, overload

if TYPE_CHECKING:
    from collections.abc import Callable

T = TypeVar("T")

# Markers of a field's value not given yet (_Spec.template).
_REQUIRED, _FACTORY = object(), object()

# What @record writes: a class defining one of these itself is refused.
_WRITTEN = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__")


class _Spec:
    """A record class's field list, as its shared methods read it."""

    __slots__ = ("cls", "defaults", "factories", "frozen", "index", "names",
                 "post_init", "qualname", "required", "shown", "template", "values")

    def __init__(self, cls: type, frozen: bool) -> None:
        fields = dataclasses.fields(cls)
        self.cls = cls
        self.frozen = frozen
        self.qualname = cls.__qualname__
        self.names = tuple(f.name for f in fields)
        self.shown = tuple(f.name for f in fields if f.repr)
        self.defaults = {f.name: f.default for f in fields if f.default is not MISSING}
        self.factories = {f.name: f.default_factory for f in fields
                          if f.default_factory is not MISSING}
        # (The fields without a default come first: @record refuses any other order.)
        self.required = sum(1 for f in fields
                            if f.default is MISSING and f.default_factory is MISSING)
        self.index = {name: i for i, name in enumerate(self.names)}
        # The values before a call's arguments fill them in: the defaults, else a marker.
        self.template = tuple(_FACTORY if f.default_factory is not MISSING
                              else _REQUIRED if f.default is MISSING else f.default
                              for f in fields)
        self.post_init = hasattr(cls, "__post_init__")
        # The fields' values as a tuple (attrgetter gives a bare value for one name).
        if len(self.names) == 1:
            one = attrgetter(self.names[0])
            self.values: Callable[[object], tuple[object, ...]] = lambda obj: (one(obj),)
        elif self.names:
            self.values = attrgetter(*self.names)
        else:
            self.values = lambda obj: ()


def _join(names: list[str]) -> str:
    """Python's list of argument names in its messages: 'a', 'a' and 'b', 'a', 'b', and 'c'."""
    quoted = [repr(n) for n in names]
    if len(quoted) == 1:
        return quoted[0]
    if len(quoted) == 2:
        return f"{quoted[0]} and {quoted[1]}"
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}"


def _bind_error(spec: _Spec, args: tuple[object, ...], kwargs: dict[str, object]) -> TypeError:
    """The TypeError Python raises for a compiled ``__init__`` given these arguments."""
    where = f"{spec.qualname}.__init__()"
    names = spec.names
    for key in kwargs:
        if key not in spec.index:
            return TypeError(f"{where} got an unexpected keyword argument {key!r}")
        if spec.index[key] < len(args):
            return TypeError(f"{where} got multiple values for argument {key!r}")
    if len(args) > len(names):
        most = len(names) + 1
        takes = (f"{most} positional argument{'s' if most != 1 else ''}"
                 if spec.required == len(names)
                 else f"from {spec.required + 1} to {most} positional arguments")
        given = len(args) + 1
        return TypeError(f"{where} takes {takes} but {given} "
                         f"{'were' if given != 1 else 'was'} given")
    missing = [n for n in names[len(args):]
               if n not in kwargs and n not in spec.defaults and n not in spec.factories]
    return TypeError(f"{where} missing {len(missing)} required positional "
                     f"argument{'s' if len(missing) != 1 else ''}: {_join(missing)}")


def _bind(spec: _Spec, args: tuple[object, ...], kwargs: dict[str, object]
          ) -> tuple[object, ...]:
    """Every field's value, in order, from a call's arguments (as a compiled ``__init__``
    binds them)."""
    given = len(args)
    if given > len(spec.names):
        raise _bind_error(spec, args, kwargs)
    values = [*args, *spec.template[given:]]
    index = spec.index
    for key, value in kwargs.items():
        i = index.get(key, -1)
        if i < given:  # (unknown, or given by position too)
            raise _bind_error(spec, args, kwargs)
        values[i] = value
    for i in range(given, spec.required):
        if values[i] is _REQUIRED:
            raise _bind_error(spec, args, kwargs)
    if spec.factories:
        for name, factory in spec.factories.items():
            if values[index[name]] is _FACTORY:
                values[index[name]] = factory()
    return tuple(values)


def _methods(spec: _Spec) -> tuple[Callable[..., None], Callable[[Any, object], object],
                                   Callable[[Any], int]]:
    """The record's ``__init__``, ``__eq__`` and ``__hash__``: the same code for every class
    (nothing compiled), with the class's field list bound in (closures, as fast to call as a
    dataclass's own methods)."""
    names, count, post_init, values = spec.names, len(spec.names), spec.post_init, spec.values

    def __init__(self: Any, *args: object, **kwargs: object) -> None:
        if kwargs or len(args) != count:
            args = _bind(type(self)._record, args, kwargs)
        # What object.__setattr__ does for each field (no field is a descriptor: the class
        # holds its defaults), in one step.
        self.__dict__.update(zip(names, args))  # noqa: B905 (as many values as names)
        if post_init:
            self.__post_init__()

    def __eq__(self: Any, other: object) -> object:  # (bool, or NotImplemented)
        if other.__class__ is self.__class__:
            return values(self) == values(other)
        return NotImplemented

    def __hash__(self: Any) -> int:
        return hash(values(self))

    for method in (__init__, __eq__, __hash__):
        method.__qualname__ = f"{spec.qualname}.{method.__name__}"
    return __init__, __eq__, __hash__


# A repr that meets itself again (a record holding itself) says "...", as a dataclass's does.
_repr_running: set[tuple[int, int]] = set()


def _repr(self: Any) -> str:
    key = (id(self), get_ident())
    if key in _repr_running:
        return "..."
    _repr_running.add(key)
    try:
        spec: _Spec = type(self)._record
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in spec.shown)
        return f"{type(self).__qualname__}({shown})"
    finally:
        _repr_running.discard(key)


def _frozen_setattr(self: Any, name: str, value: object) -> None:
    spec: _Spec = type(self)._record
    if type(self) is spec.cls or name in spec.index:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _frozen_delattr(self: Any, name: str) -> None:
    spec: _Spec = type(self)._record
    if type(self) is spec.cls or name in spec.index:
        raise FrozenInstanceError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


class _Signature:
    """A record class's ``__signature__``, made when asked (``inspect.signature``, ``help``):
    what ``inspect.signature`` says of the same dataclass, from its compiled ``__init__``."""

    def __get__(self, obj: object, cls: type) -> Any:
        if obj is not None:
            raise AttributeError("__signature__")
        import inspect

        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        factory = dataclasses._HAS_DEFAULT_FACTORY  # type: ignore[attr-defined]
        return inspect.Signature([
            inspect.Parameter(f.name, kind, annotation=f.type,
                              default=(factory if f.default_factory is not MISSING
                                       else inspect.Parameter.empty if f.default is MISSING
                                       else f.default))
            for f in dataclasses.fields(cls)], return_annotation=None)


_SIGNATURE = _Signature()


def _refuse(cls: type, why: str) -> TypeError:
    return TypeError(f"@record {cls.__qualname__}: {why}")


def _make(cls: type, frozen: bool) -> type:
    if cls.__bases__ != (object,):
        raise _refuse(cls, "a base class is not supported")
    for name in _WRITTEN:
        if name in cls.__dict__:
            raise _refuse(cls, f"defines {name}, which @record writes")
    doc = cls.__dict__.get("__doc__")
    if doc is None:
        # (dataclasses would ask inspect.signature for one, at a cost: written below instead)
        cls.__doc__ = "(a record)"
    # dataclasses collects the fields (and checks them) but writes no method here.
    dataclasses.dataclass(cls, init=False, repr=False, eq=False, match_args=False)
    declared = [f for f in cls.__dict__.get("__dataclass_fields__", {}).values()]
    if len(declared) != len(dataclasses.fields(cls)):
        raise _refuse(cls, "ClassVar and InitVar fields are not supported")
    seen_default = False
    for f in declared:
        if not f.init or not f.compare or f.hash is not None or f.kw_only is True:
            raise _refuse(cls, f"field {f.name!r}: only default, default_factory and repr "
                          "are supported")
        if f.default is not MISSING or f.default_factory is not MISSING:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {f.name!r} follows default argument")
    params = cls.__dataclass_params__  # type: ignore[attr-defined]
    params.init = params.repr = params.eq = True
    params.frozen = frozen
    spec = _Spec(cls, frozen)
    cls._record = spec  # type: ignore[attr-defined]
    init, eq, hash_ = _methods(spec)
    cls.__init__ = init  # type: ignore[misc]
    cls.__repr__ = _repr  # type: ignore[assignment,method-assign]
    cls.__eq__ = eq  # type: ignore[assignment,method-assign]
    cls.__match_args__ = spec.names  # type: ignore[attr-defined,misc]
    cls.__signature__ = _SIGNATURE  # type: ignore[attr-defined]
    if frozen:
        cls.__hash__ = hash_  # type: ignore[assignment,method-assign]
        cls.__setattr__ = _frozen_setattr  # type: ignore[assignment,method-assign]
        cls.__delattr__ = _frozen_delattr  # type: ignore[assignment,method-assign]
    else:
        cls.__hash__ = None  # type: ignore[assignment]
    if doc is None:
        cls.__doc__ = _signature_doc(cls)
    return cls


def _signature_doc(cls: type) -> str:
    """What dataclasses makes the docstring of a class without one: its name and
    ``inspect.signature``'s text of its ``__init__`` (annotations as written, here strings)."""
    parts = []
    for f in dataclasses.fields(cls):
        text = f"{f.name}: {f.type!r}" if isinstance(f.type, str) else None
        if text is None:
            raise _refuse(cls, "annotations must be strings (from __future__ import annotations)")
        if f.default is not MISSING:
            text += f" = {f.default!r}"
        elif f.default_factory is not MISSING:
            text += " = <factory>"
        parts.append(text)
    return f"{cls.__name__}({', '.join(parts)})"


@overload
def record(cls: type[T], /) -> type[T]: ...


@overload
def record(*, frozen: bool = True) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(dataclasses.field,))
def record(cls: Any = None, /, *, frozen: bool = True) -> Any:
    """A dataclass (frozen unless ``frozen=False``) with shared methods: see the module."""
    if cls is None:
        return lambda c: _make(c, frozen)
    return _make(cls, frozen)


__all__ = ["record"]
