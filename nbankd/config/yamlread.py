"""The configuration's YAML, read in bounded time and memory, with the line of every key.

Whatever the file holds, :func:`load_yaml` returns problems naming the file and the
line, never raises:

1. the text is first read as a stream of parser events (the parser keeps its own
   stack): nesting deeper than :data:`MAX_DEPTH` levels is refused before the
   (recursive) composer sees it;
2. the composed node graph is walked once per node, without recursion: the line
   of every key, keys given twice in one mapping (keys brought in by a merge
   ``<<: *anchor`` do not count: the mapping's own keys override them, as YAML
   says), numbers written other than in plain decimal (octal ``0417``, base 60
   ``1:30``, ``12_34``), an alias inside the value it names (a loop), and a value
   that aliases make larger than :data:`MAX_NODES` values or deeper than
   :data:`MAX_DEPTH` levels once expanded ("billion laughs");
3. a value PyYAML cannot build (``2024-02-30``, ``!!int three``, a number of
   thousands of digits) is found again scalar by scalar, to name its line and key.

The limits are the ones sidecars are read with (:mod:`nbankd.deposit.bounded`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nbankd.config.model import Problem
from nbankd.config.values import KeyPath, render_key
from nbankd.deposit.bounded import MAX_DEPTH, MAX_NODES
from nbankd.yamlnumbers import odd_number

__all__ = [
    "MAX_DEPTH",
    "MAX_NODES",
    "Lines",
    "duplicate_key_problems",
    "load_yaml",
]

_MERGE = "tag:yaml.org,2002:merge"
_INT = "tag:yaml.org,2002:int"
_FLOAT = "tag:yaml.org,2002:float"
_KINDS = {
    _INT: "a whole number",
    _FLOAT: "a number",
    "tag:yaml.org,2002:timestamp": "a date",
    "tag:yaml.org,2002:bool": "true or false",
}


@dataclass
class Lines:
    """What the walk of the file found, by key path."""

    #: line numbers (1-based) of key paths
    of: dict[KeyPath, int] = field(default_factory=dict)
    #: keys given twice in one mapping: (path, first line, second line)
    duplicates: list[tuple[KeyPath, int, int]] = field(default_factory=list)
    #: plain scalars YAML reads as a number although not written in plain decimal:
    #: key path -> (the text, the number YAML makes of it)
    numbers: dict[KeyPath, tuple[str, object]] = field(default_factory=dict)


def load_yaml(text: str, source: Path) -> tuple[Any, Lines, list[Problem]]:
    """The file's value, what its walk found, and the problems that stop reading it."""
    lines = Lines()
    loader = yaml.SafeLoader(text)
    try:
        deep = _too_deep(text, source)
        if deep is not None:
            return None, lines, [deep]
        node = loader.get_single_node()
        if node is None:
            msg = "the file is empty; it needs a mapping of settings (at least 'registry:')"
            return None, lines, [Problem(source, "", msg)]
        paths = _walk(node, lines)
        too_big = _expanded_size(node, source, paths)
        if too_big is not None:
            return None, lines, [too_big]
        try:
            data = loader.construct_document(node)
        except yaml.YAMLError:
            raise
        except Exception as err:  # ValueError, OverflowError... from one scalar
            return None, lines, [_unbuildable(node, err, source, paths)]
    except yaml.MarkedYAMLError as err:
        return None, lines, [_syntax_problem(err, source)]
    except yaml.YAMLError as err:  # pragma: no cover - PyYAML marks nearly everything
        return None, lines, [Problem(source, "", f"YAML error: {err}")]
    finally:
        loader.dispose()
    return data, lines, []


def duplicate_key_problems(source: Path, lines: Lines) -> list[Problem]:
    return [
        Problem(
            source,
            render_key(path),
            f"is given twice (lines {first} and {second}); remove one",
            line=second,
        )
        for path, first, second in lines.duplicates
    ]


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _syntax_problem(err: yaml.MarkedYAMLError, source: Path) -> Problem:
    mark = err.problem_mark or err.context_mark
    line = mark.line + 1 if mark is not None else None
    where = f" at line {line}, column {mark.column + 1}" if mark is not None else ""
    message = f"YAML syntax error{where}: {err.problem or err.context or 'invalid YAML'}"
    if err.context and err.problem and err.context_mark is not None:
        message += f" ({err.context} at line {err.context_mark.line + 1})"
    return Problem(source, "", message, line=line)


def _too_deep(text: str, source: Path) -> Problem | None:
    """Nesting past MAX_DEPTH, seen in the event stream (no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                return Problem(
                    source,
                    "",
                    f"values are nested deeper than {MAX_DEPTH} levels (at line {line})",
                    line=line,
                    hint="a configuration needs a few levels; flatten this value",
                )
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1
    return None


def _walk(root: yaml.Node, lines: Lines) -> dict[int, KeyPath]:
    """Lines, duplicates and odd numbers of every node, each node walked once (a node
    an alias repeats keeps the key path where it is first written); returns node id ->
    that key path."""
    paths: dict[int, KeyPath] = {}
    stack: list[tuple[yaml.Node, KeyPath]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if id(node) in paths:
            continue
        paths[id(node)] = path
        lines.of.setdefault(path, _line(node))
        if isinstance(node, yaml.ScalarNode):
            _note_number(node, path, lines)
        elif isinstance(node, yaml.SequenceNode):
            items = [(item, (*path, index)) for index, item in enumerate(node.value)]
            stack.extend(reversed(items))  # popped in file order: anchors before aliases
        elif isinstance(node, yaml.MappingNode):
            stack.extend(reversed(_mapping_children(node, path, lines, paths)))
    return paths


def _mapping_children(
    node: yaml.MappingNode, path: KeyPath, lines: Lines, paths: dict[int, KeyPath]
) -> list[tuple[yaml.Node, KeyPath]]:
    children: list[tuple[yaml.Node, KeyPath]] = []
    merged: list[yaml.Node] = []
    seen: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            merged.append(value_node)
            children.append((value_node, (*path, "<<")))
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            children.append((value_node, path))
            continue
        key = str(key_node.value)
        line = _line(key_node)
        if key in seen:
            lines.duplicates.append(((*path, key), seen[key], line))
        seen[key] = line
        lines.of[(*path, key)] = line
        paths.setdefault(id(key_node), (*path, key))
        children.append((value_node, (*path, key)))
    # keys a merge brings in: their line (where the anchored mapping gives them)
    # unless the mapping gives them itself, which overrides them
    for source in merged:
        sources = source.value if isinstance(source, yaml.SequenceNode) else [source]
        for mapping in sources:
            if not isinstance(mapping, yaml.MappingNode):
                continue  # PyYAML refuses it while building, naming the line
            for key_node, _ in mapping.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                    lines.of.setdefault((*path, str(key_node.value)), _line(key_node))
    return children


def _note_number(node: yaml.ScalarNode, path: KeyPath, lines: Lines) -> None:
    text = odd_number(node)
    if text is None:
        return
    try:
        value: object = yaml.SafeLoader("").construct_object(node)
    except Exception:  # reported when the document is built
        return
    lines.numbers[path] = (text, value)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _expanded_size(root: yaml.Node, source: Path, paths: dict[int, KeyPath]) -> Problem | None:
    """A loop of aliases, or a value larger or deeper than the limits once aliases
    are expanded; each node is visited once (sizes are added up, not re-walked)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_stack: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_stack.discard(key)
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            if isinstance(node, yaml.ScalarNode):
                depth[key] = 0  # as the event stream counts: collections only
            else:
                depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_NODES or depth[key] > MAX_DEPTH:
                what = (
                    f"more than {MAX_NODES:,} values"
                    if size[key] > MAX_NODES
                    else f"nested deeper than {MAX_DEPTH} levels"
                )
                return _node_problem(
                    source,
                    node,
                    paths,
                    f"expands to {what} once its aliases (*name) are replaced by what they name",
                    "write the values out, or use fewer aliases",
                )
            continue
        if key in size:
            continue
        if key in on_stack:  # reached again while inside itself
            return _node_problem(
                source,
                node,
                paths,
                "holds an alias to itself (a loop), which no setting can take",
                "remove the alias (*name) from inside the value it names",
            )
        on_stack.add(key)
        stack.append((node, True))
        stack.extend((child, False) for child in _children(node) if id(child) not in size)
    return None


def _node_problem(
    source: Path, node: yaml.Node, paths: dict[int, KeyPath], message: str, hint: str
) -> Problem:
    path = paths.get(id(node), ())
    return Problem(source, render_key(path), message, line=_line(node), hint=hint)


def _unbuildable(
    root: yaml.Node, err: Exception, source: Path, paths: dict[int, KeyPath]
) -> Problem:
    """The scalar PyYAML could not build, found again one by one (each once)."""
    for node in sorted(_scalars(root), key=lambda n: (n.start_mark.line, n.start_mark.column)):
        if node.tag == _MERGE:
            continue
        try:
            yaml.SafeLoader("").construct_object(node)
        except Exception as one:  # the one to report
            text = str(node.value)
            shown = repr(text) if len(text) <= 40 else f"{text[:20]!r}... ({len(text)} characters)"
            kind = _KINDS.get(str(node.tag), f"a value tagged {node.tag}")
            reason = str(one).split(";")[0]
            return _node_problem(
                source,
                node,
                paths,
                f"{shown} cannot be read as {kind}: {reason}",
                "quote it to keep it as text, or correct it",
            )
    reason = f"{type(err).__name__}: {str(err).split(';')[0]}"
    return Problem(source, "", f"cannot read the YAML: {reason}")


def _scalars(root: yaml.Node) -> list[yaml.ScalarNode]:
    found: list[yaml.ScalarNode] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode):
            found.append(node)
        stack.extend(_children(node))
    return found
