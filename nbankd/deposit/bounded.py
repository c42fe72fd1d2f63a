"""Reading a document an inbox's writer controls (a sidecar) in bounded time and memory.

A sidecar is at most 1 MiB, but a small YAML text can still describe an enormous
value (nested aliases, "billion laughs") or nest deeper than Python's recursion
limit. These functions refuse, with :class:`TooBig` naming the limit, before any
such value is built:

1. YAML is first read as a stream of parser events (the parser keeps its own
   stack, it never recurses): more than :data:`MAX_DEPTH` levels of nesting, more
   than :data:`MAX_NODES` nodes or more than :data:`MAX_ALIASES` aliases stop it.
2. The composed node graph is checked for duplicate keys in a mapping (an
   error, never "the last one wins"), keys that are not plain scalars, and
   numbers YAML 1.1 reads otherwise than written (``0417`` is octal 271:
   :class:`OddNumber`; :mod:`nbankd.yamlnumbers`).
3. The constructed value is walked once, aliases expanded, with a budget of
   :data:`MAX_NODES` nodes and :data:`MAX_DEPTH` levels, so a value that aliases
   make exponential is refused before anything serialises it.

JSON gets the duplicate-key check while decoding, a RecursionError becomes
:class:`TooBig`, and step 3. Parse errors of either format are raised as they come
(``ValueError`` or ``yaml.YAMLError``).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from nbankd.yamlnumbers import number_reading, odd_number

MAX_DEPTH = 32
MAX_NODES = 100_000
MAX_ALIASES = 100

_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class TooBig(ValueError):
    """The document is over one of the limits; the message says which."""


class DuplicateKey(ValueError):
    """A mapping names the same key twice."""


class OddNumber(ValueError):
    """A number written otherwise than in plain decimal (YAML 1.1 reads 0417 as 271)."""


def load_yaml(text: str) -> Any:
    """The value of a YAML document, within the limits (see the module docstring)."""
    _check_events(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(node, loader)
        value = loader.construct_document(node)
    finally:
        loader.dispose()
    check_size(value)
    return value


def load_json(text: str) -> Any:
    """The value of a JSON document, within the limits; duplicate keys are refused."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_pairs)
    except RecursionError:
        raise TooBig(f"nested deeper than {MAX_DEPTH} levels") from None
    check_size(value)
    return value


def check_size(value: Any) -> None:
    """Walks ``value`` (aliases expanded) and raises TooBig past the depth or node limit."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    nodes = 0
    while stack:
        item, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise TooBig(f"more than {MAX_NODES:,} values (aliases expanded)")
        if depth > MAX_DEPTH and isinstance(item, (dict, list, tuple, set)):
            raise TooBig(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
            stack.extend((k, depth + 1) for k in item)
        elif isinstance(item, (list, tuple, set)):
            stack.extend((v, depth + 1) for v in item)


def _check_events(text: str) -> None:
    depth = nodes = aliases = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            nodes += 1
            if depth > MAX_DEPTH:
                raise TooBig(f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1
        elif isinstance(event, yaml.ScalarEvent):
            nodes += 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_ALIASES:
                raise TooBig(f"more than {MAX_ALIASES} aliases (*name)")
        if nodes > MAX_NODES:
            raise TooBig(f"more than {MAX_NODES:,} values")


def _check_keys(root: yaml.Node, loader: Any) -> None:
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                line = key.start_mark.line + 1
                if not isinstance(key, yaml.ScalarNode):
                    raise ValueError(f"a mapping key at line {line} is not text")
                # compared as JSON will see them: 1 and 0x1, yes and on, 1 and "1" clash
                merge = key.tag == "tag:yaml.org,2002:merge"
                built = "<<" if merge else str(loader.construct_object(key))
                if built in keys:
                    raise DuplicateKey(
                        f"key {key.value!r} appears twice in one mapping (line {line})"
                    )
                keys.add(built)
                stack.extend((key, value))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        else:
            _check_number(node)


def _check_number(node: yaml.Node) -> None:
    """Refuses a number YAML would read otherwise than it is written (``0417``)."""
    text = odd_number(node)
    if text is not None:
        raise OddNumber(
            f"{text} at line {node.start_mark.line + 1} is not a plain decimal number: "
            f"YAML reads it as {number_reading(text)}; quote it ('{text}') to keep it as "
            "written"
        )


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKey(f"key {key!r} appears twice in one object")
        out[key] = value
    return out
