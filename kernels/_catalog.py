"""The catalog: one table of every optimizer and loss this package ships, read by everything that lists them.

An optimizer or loss joins by decorating its class with :func:`register`; its hyperparameters and their
types are read off the constructor's signature, so they cannot drift from the code. The advisor's rule
validation and ``build_optimizer``/``build_loss``, the trial's candidate pairs, the test tables and the
benchmark cases all read :func:`optimizers`, :func:`losses` and :func:`entry`; none keeps a list of its own.

The order of registration (the import order in ``kernels/__init__.py``) is the advisor's tie-break order.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

Kind = Literal["optimizer", "loss"]

# the rule language's types (advisor._expr's NUMBER / NUMBERS, and "bool"; "choice:a|b", one of the words)
NUMBER, NUMBERS, BOOL, CHOICE = "number", "list[number]", "bool", "choice:"

# constructor arguments that select an implementation or torch's legacy spellings, not the math: a rule or a
# trial never sets them
_NOT_HYPERPARAMETERS = frozenset({"self", "params", "foreach", "capturable", "differentiable", "fused",
                                  "maximize", "size_average", "reduce", "reduction", "decoupled_weight_decay",
                                  "state_dtype", "kahan_sum"})


@dataclass(frozen=True)
class HyperParam:
    """One constructor argument a rule or a trial may set: its name, its type in the rule language, its
    default."""

    name: str
    type: str
    default: Any
    accepts: tuple[type, ...] = ()  # the Python types the constructor's annotation names

    def coerce(self, value: Any) -> Any:
        """A rule-language value (a float, a list of floats, a bool) as the constructor takes it: a list
        becomes a float32 tensor or a tuple of floats, a whole number an int where the argument is an int."""
        if isinstance(value, (list, tuple)):
            if torch.Tensor in self.accepts:
                return torch.tensor(list(value), dtype=torch.float32)
            return tuple(float(v) for v in value)
        if (self.type == NUMBER and int in self.accepts and float not in self.accepts
                and not isinstance(value, bool) and float(value).is_integer()):
            return int(value)
        return value


@dataclass(frozen=True)
class Config:
    """A named configuration, used by the benchmarks and tests: the constructor's keyword arguments and the
    bytes one fp32 step reads and writes per parameter element (the bandwidth bound's numerator)."""

    name: str
    kwargs: dict[str, Any]
    bytes_per_element: int | None = None


@dataclass(frozen=True)
class Entry:
    """One optimizer or loss.

    ``torch``: the dotted name of its torch counterpart (``torch.optim.Adam``), or None where torch has
    none. ``tasks``: the tasks a loss is a candidate for (empty: never a candidate, e.g. a fused head).
    ``default_candidate``: an optimizer always considered by the advisor's trial (False: only when a rule
    scored it). ``trial_note``: why a loss cannot be trialled automatically (None: it can).
    ``configs``: named configurations for benchmarks and tests (optimizers).
    """

    name: str
    kind: Kind
    cls: type
    torch: str | None
    functional: Callable[..., Any] | None = None
    tasks: tuple[str, ...] = ()
    default_candidate: bool = True
    trial_note: str | None = None
    configs: tuple[Config, ...] = ()
    params: dict[str, HyperParam] = field(default_factory=dict)

    def torch_class(self) -> type | None:
        """The torch counterpart itself (imported on demand), or None."""
        if self.torch is None:
            return None
        module, _, name = self.torch.rpartition(".")
        obj: Any = __import__(module, fromlist=[name])
        return getattr(obj, name)


_ENTRIES: dict[str, Entry] = {}


def _members(annotation: Any) -> set:
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    return {typing.get_origin(m) or m for m in (typing.get_args(annotation) if union else (annotation,))}


def _type_of(name: str, annotation: Any, owner: str) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # Literal[...] | None: the words
        words = [a for a in typing.get_args(annotation) if typing.get_origin(a) is Literal]
        if len(words) == 1 and all(a is type(None) or a in words for a in typing.get_args(annotation)):
            annotation = words[0]
    if typing.get_origin(annotation) is Literal and all(isinstance(a, str) for a in typing.get_args(annotation)):
        return CHOICE + "|".join(typing.get_args(annotation))  # one of these words (a state codec: "8bit")
    members = _members(annotation)
    if bool in members:
        return BOOL
    if members & {float, int}:
        return NUMBER
    if members & {tuple, list, torch.Tensor}:
        return NUMBERS
    raise TypeError(f"catalog: {owner}.__init__ argument {name!r} has annotation {annotation!r}, which maps to "
                    "no rule-language type (number, numbers, bool)")


def hyperparameters(cls: type) -> dict[str, HyperParam]:
    """The constructor arguments of ``cls`` that a rule may set, with their rule-language types."""
    hints = typing.get_type_hints(cls.__init__, globalns=vars(inspect.getmodule(cls)) | {"torch": torch})
    out = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name in _NOT_HYPERPARAMETERS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        default = None if p.default is inspect.Parameter.empty else p.default
        ann = hints.get(name, type(default))
        out[name] = HyperParam(name, _type_of(name, ann, cls.__name__), default,
                               tuple(m for m in _members(ann) if isinstance(m, type)))
    return out


def register(kind: Kind, *, torch: str | None, functional: Callable[..., Any] | None = None,
             tasks: tuple[str, ...] = (), default_candidate: bool = True, trial_note: str | None = None,
             configs: dict[str, tuple[dict[str, Any], int | None]] | None = None) -> Callable[[type], type]:
    """Class decorator: add the class to the catalog under its own name. ``configs``: name ->
    (constructor kwargs, fp32 bytes per element per step)."""
    if kind not in ("optimizer", "loss"):
        raise ValueError(f"catalog: kind must be 'optimizer' or 'loss' (got {kind!r})")

    def add(cls: type) -> type:
        name = cls.__name__
        if name in _ENTRIES and _ENTRIES[name].cls is not cls:
            raise ValueError(f"catalog: {name} is registered twice ({_ENTRIES[name].cls.__module__} and "
                             f"{cls.__module__})")
        _ENTRIES[name] = Entry(
            name=name, kind=kind, cls=cls, torch=torch, functional=functional, tasks=tuple(tasks),
            default_candidate=default_candidate, trial_note=trial_note,
            configs=tuple(Config(n, dict(kw), b) for n, (kw, b) in (configs or {}).items()),
            params=hyperparameters(cls))
        return cls

    return add


def entry(name: str) -> Entry:
    """The catalog entry called ``name``; a KeyError listing the known names otherwise."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise KeyError(f"{name!r} is not in optadvisor's catalog; known: {', '.join(_ENTRIES)}") from None


def optimizers() -> tuple[Entry, ...]:
    """Every optimizer, in registration order."""
    return tuple(e for e in _ENTRIES.values() if e.kind == "optimizer")


def losses(task: str | None = None) -> tuple[Entry, ...]:
    """Every loss, or those that are candidates for ``task``, in registration order."""
    return tuple(e for e in _ENTRIES.values() if e.kind == "loss" and (task is None or task in e.tasks))


def tasks() -> tuple[str, ...]:
    """The tasks some loss serves, in first-seen order."""
    seen: dict[str, None] = {}
    for e in losses():
        seen.update(dict.fromkeys(e.tasks))
    return tuple(seen)
