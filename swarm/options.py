"""Options declared once, as the fields of a dataclass: their defaults, help and command-line flags all come from it.

    @dataclass(frozen=True)
    class Config:
        port: int = option(8080, "port to listen on")
        names: tuple[str, ...] = option((), "who to greet", metavar="NAME")

    add_arguments(parser, Config)                 # --port N, --names NAME [NAME ...], with their help and defaults
    config = from_args(Config, parser.parse_args())

The flag's type comes from the field's annotation: int, float, str, bool (--x / --no-x), `X | None` (default
None), and sequences (`tuple[X, ...]`, `list[X]`, `Sequence[X]`: nargs "+"). Keywords given to option() go to
parser.add_argument as they are (choices, metavar, type, nargs, ...) and win over what the annotation says. A
declared default is also the class attribute (`Config.port == 8080`), so code can name a default without an instance.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import types
import typing
from collections.abc import Collection
from typing import Any

HELP, ARGPARSE = "help", "argparse"  # keys of an option's field metadata
_SEQUENCES = (tuple, list, collections.abc.Sequence)


def option(default: Any, help: str, **argparse_extras: Any) -> Any:
    """A dataclass field that is also a command-line option; `help` is plain text (a % is shown as it is)."""
    metadata = {HELP: help, ARGPARSE: argparse_extras}
    if isinstance(default, (list, dict, set)):  # a mutable default: each instance gets its own copy
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def declared(cls) -> list[dataclasses.Field]:
    """The fields of dataclass `cls` that option() declared, in order."""
    return [f for f in dataclasses.fields(cls) if HELP in f.metadata]


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _flag_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    default = f.default_factory() if f.default is dataclasses.MISSING else f.default
    kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata[HELP].replace("%", "%%")}
    hint = _unwrap_optional(hint)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in _SEQUENCES and args:
        fixed = origin is tuple and Ellipsis not in args
        kwargs.update(nargs=len(args) if fixed else "+", type=args[0])
    elif hint in (int, float, str):
        kwargs["type"] = hint
    elif "type" not in f.metadata[ARGPARSE]:
        raise TypeError(f"option {f.name!r}: no flag for type {hint!r}; give option(..., type=a parser of its text)")
    kwargs.update(f.metadata[ARGPARSE])
    return kwargs


def add_arguments(parser, cls, *, only: Collection[str] | None = None, exclude: Collection[str] = ()) -> list[str]:
    """Add a --kebab-case flag to `parser` (or an argument group) for each declared field of `cls` (those in `only`,
    if given, and not in `exclude`); returns the field names. parser.set_defaults(name=...) changes one's default."""
    hints = typing.get_type_hints(cls)
    names = []
    for f in declared(cls):
        if (only is not None and f.name not in only) or f.name in exclude:
            continue
        parser.add_argument("--" + f.name.replace("_", "-"), **_flag_kwargs(f, hints[f.name]))
        names.append(f.name)
    return names


def from_args(cls, namespace: argparse.Namespace, **extra: Any):
    """An instance of `cls` from parsed arguments: each init field the namespace has (declared or not), then `extra`.
    Lists that argparse made for tuple fields become tuples, so frozen instances stay hashable."""
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(namespace, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(namespace, f.name)}
    values.update(extra)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(_unwrap_optional(hints[name])) in (tuple, collections.abc.Sequence):
            values[name] = tuple(value)
    return cls(**values)
