"""A generic checker that builds nested frozen dataclasses from plain (YAML) data.

Every problem is collected as ``(key path, what was expected)``, so one error names them all."""

from __future__ import annotations

import dataclasses
import difflib
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union

from mcn_compress.errors import ConfigError


class FieldProblems(ConfigError):
    """Raised by a section's checks: ``problems`` is a list of (key, what was expected)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "; ".join(f"{key}: {message}" if key else message for key, message in problems)
        )


def raise_if(problems: list[tuple[str, str]]) -> None:
    if problems:
        raise FieldProblems(problems)


class Mismatch(Exception):
    """A value does not have the expected type."""


INVALID: Any = object()


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


_YAML_WORDS: dict[bool, tuple[str, ...]] = {
    False: ("off", "no", "false", "n"),
    True: ("on", "yes", "true", "y"),
}


def type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def strip_optional(tp: Any) -> Any:
    if _is_union(tp):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def describe_type(tp: Any) -> str:
    """What a value of type ``tp`` must look like, in words."""
    if _is_union(tp):
        inner = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(inner) + " or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        item = describe_type(typing.get_args(tp)[0])
        return f"a list of {item.removeprefix('a ').removeprefix('an ')}s"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def show_value(value: Any) -> str:
    """A short repr of ``value`` and its type, for messages: `reprlib` looks at a few items
    of each container only, so a huge value is never turned into text whole."""
    text = _REPR.repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def join_key(path: str, key: str) -> str:
    return f"{path}.{key}" if path and key else path or key


def coerce(value: Any, tp: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """``value`` checked against ``tp`` (converted where YAML is lax); raises `Mismatch`."""
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return build_dataclass(tp, {} if value is None else value, path, problems)
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, path, problems)
            except Mismatch:
                continue
        raise Mismatch
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool):
            value = next((c for c in choices if c in _YAML_WORDS[value]), value)
        if any(type(value) is type(c) and value == c for c in choices):
            return value
        raise Mismatch
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise Mismatch
        item = typing.get_args(tp)[0]
        items = [coerce(v, item, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if tp is Any:
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            return float(value)
    if tp is str and isinstance(value, str):
        return value
    raise Mismatch


def build_dataclass(cls: type, data: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    """Instantiate dataclass ``cls`` from mapping ``data``, appending problems on failure."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if not isinstance(data, Mapping):
        problems.append((path, f"expected {describe_type(cls)}, got {show_value(data)}"))
        return INVALID
    hints = type_hints(cls)
    ok = True
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {join_key(path, close[0])}?)" if close else ""
            problems.append(
                (
                    join_key(path, str(key)),
                    f"unknown key{hint}; expected one of {', '.join(fields)}",
                )
            )
            ok = False
    kwargs: dict[str, Any] = {}
    for name, fld in fields.items():
        sub = join_key(path, name)
        if name not in data:
            required = fld.default is dataclasses.MISSING and (
                fld.default_factory is dataclasses.MISSING
            )
            if required:
                problems.append((sub, f"missing required value ({describe_type(hints[name])})"))
                ok = False
            continue
        before = len(problems)
        try:
            value = coerce(data[name], hints[name], sub, problems)
        except Mismatch:
            problems.append(
                (sub, f"expected {describe_type(hints[name])}, got {show_value(data[name])}")
            )
            ok = False
            continue
        if value is INVALID or len(problems) > before:
            ok = False
            continue
        kwargs[name] = value
    if not ok:
        return INVALID
    try:
        return cls(**kwargs)
    except FieldProblems as exc:
        problems.extend((join_key(path, key), message) for key, message in exc.problems)
    except ConfigError as exc:
        problems.append((path, str(exc)))
    return INVALID


def problems_error(source: str, problems: list[tuple[str, str]]) -> ConfigError:
    parts = [f"{key}: {message}" if key else message for key, message in problems]
    if len(parts) == 1:
        return ConfigError(f"{source}: {parts[0]}")
    return ConfigError(f"{source}: {len(parts)} problems: " + "; ".join(parts))
