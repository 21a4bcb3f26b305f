"""YAML read within bounds: recipes, ``--set`` values, a run's ``recipe.yaml`` (docs/design.md
4.5).

`load_yaml` refuses, before any value is built: a text over `MAX_YAML_BYTES`, nesting deeper
than `MAX_YAML_DEPTH`, and documents that expand (aliases counted each time they are used)
to more than `MAX_YAML_VALUES` values, which stops "billion laughs" files, a few lines of
aliases that stand for 10^9 values. An alias to a value that contains it (a recursive value)
is refused too. The checks walk PyYAML's event stream, which is parsed without recursion.
"""

from __future__ import annotations

from typing import Any

import yaml

from mcn_compress.errors import ConfigError

MAX_YAML_BYTES = 1024 * 1024
"""Longest YAML text (a recipe is about 1 KiB)."""
MAX_YAML_DEPTH = 32
"""Deepest nesting of mappings and sequences (a recipe has 3 levels)."""
MAX_YAML_VALUES = 100_000
"""Most values (scalars, mappings, sequences) after alias expansion (a recipe has ~60)."""

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _check_events(text: str, source: str) -> None:
    """Walk the events of ``text``: depth, expanded size and recursive aliases. libyaml 0.2.5+
    refuses deep flow nesting itself while it scans ahead (PyYAML 6.0.4's wheels): that is
    the same depth error."""
    try:
        _walk_events(text, source)
    except yaml.YAMLError as exc:
        if "nesting depth" in str(exc):
            raise ConfigError(
                f"{source}: the YAML nests deeper than {MAX_YAML_DEPTH} levels"
            ) from exc
        raise


def _walk_events(text: str, source: str) -> None:
    total = depth = 0
    sizes: dict[str, int] = {}
    open_nodes: list[tuple[str | None, int]] = []  # (anchor, total when the node started)
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.AliasEvent):
            if event.anchor not in sizes:
                raise ConfigError(
                    f"{source}: the YAML alias *{event.anchor} refers to a value that contains "
                    "it (or to no value); recursive values are not allowed"
                )
            total += sizes[event.anchor]
        elif isinstance(event, yaml.ScalarEvent):
            total += 1
            if event.anchor is not None:
                sizes[event.anchor] = 1
        elif isinstance(event, yaml.CollectionStartEvent):
            total += 1
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{source}: the YAML nests deeper than {MAX_YAML_DEPTH} levels")
            open_nodes.append((event.anchor, total - 1))
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
            anchor, start = open_nodes.pop()
            if anchor is not None:
                sizes[anchor] = total - start
        if total > MAX_YAML_VALUES:
            raise ConfigError(
                f"{source}: the YAML stands for more than {MAX_YAML_VALUES:,} values (aliases "
                "counted each time they are used); a recipe needs about a hundred"
            )


def load_yaml(text: str, source: str) -> Any:
    """The value of the YAML ``text`` (safe tags only) from ``source`` (named in errors),
    within the limits of the module docstring; every problem is one `ConfigError`. Syntax
    errors are `yaml.YAMLError`, for the caller to place."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{source}: {size:,} bytes of YAML; mcn-compress reads up to {MAX_YAML_BYTES:,}"
        )
    _check_events(text, source)
    try:
        return yaml.load(text, Loader=_Loader)
    except (ValueError, OverflowError) as exc:  # int('9' * 5000), 2001-02-30, ...
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{source}: a value cannot be read: {message[:200]}") from exc
