"""Sidecar documents read in bounded time and memory: limits, duplicate keys, a table."""

from __future__ import annotations

import pytest
import yaml

from nbankd.deposit import bounded
from reliability.hostile_catalogue import billion_laughs


def _nested(levels: int) -> list[object]:
    value: list[object] = []
    for _ in range(levels - 1):
        value = [value]
    return value


OK = [
    (
        "id: rec1\nmetadata: {a: [1, 2, {b: c}]}\n",
        {"id": "rec1", "metadata": {"a": [1, 2, {"b": "c"}]}},
    ),
    ("", None),
    ("base: &b {x: 1}\nother: *b\n", {"base": {"x": 1}, "other": {"x": 1}}),
    ("b: &b {a: 1}\nc:\n  <<: *b\n  d: 2\n", {"b": {"a": 1}, "c": {"a": 1, "d": 2}}),
    ("m: " + "[" * 31 + "]" * 31 + "\n", {"m": _nested(31)}),
]

REFUSED = [
    ("billion laughs", billion_laughs(), bounded.TooBig, "aliases expanded"),
    ("deep flow", "m: " + "[" * 50_000 + "]" * 50_000, (ValueError, yaml.YAMLError), "depth"),
    ("just too deep", "m: " + "[" * 33 + "]" * 33, bounded.TooBig, "deeper than 32"),
    ("too many values", "m: [" + ",".join(["1"] * 100_001) + "]", bounded.TooBig, "100,000"),
    ("too many aliases", "a: &a 1\nb: [" + ",".join(["*a"] * 101) + "]", bounded.TooBig, "aliases"),
    ("duplicate key", "id: a\nid: b\n", bounded.DuplicateKey, "'id' appears twice"),
    ("nested duplicate", "m: {x: 1, x: 2}\n", bounded.DuplicateKey, "'x' appears twice"),
    ("booleans clash", "{yes: 1, on: 2}", bounded.DuplicateKey, "'on' appears twice"),
    ("numbers clash", "{1: x, 0x1: y}", bounded.DuplicateKey, "'0x1' appears twice"),
    ("number and text clash", '{1: x, "1": y}', bounded.DuplicateKey, "'1' appears twice"),
    ("mapping key", "? {a: 1}\n: v\n", ValueError, "not text"),
]


@pytest.mark.parametrize(("text", "value"), OK)
def test_yaml_within_limits_loads(text: str, value: object) -> None:
    """Ordinary sidecars, shared anchors and 31 levels of nesting load as safe_load would."""
    assert bounded.load_yaml(text) == value


@pytest.mark.parametrize(("case", "text", "error", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_yaml_over_a_limit_is_refused(case: str, text: str, error: object, words: str) -> None:
    """Each hostile YAML document raises its error (a ValueError) naming what is wrong."""
    with pytest.raises(error, match=words):
        bounded.load_yaml(text)


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ('{"m": ' + "[" * 50_000 + "]" * 50_000 + "}", bounded.TooBig, "deeper"),
        ('{"m": ' + "[" * 40 + "]" * 40 + "}", bounded.TooBig, "deeper than 32"),
        ('{"id": "a", "id": "b"}', bounded.DuplicateKey, "'id' appears twice"),
    ],
)
def test_json_over_a_limit_is_refused(text: str, error: type, words: str) -> None:
    """Deep or duplicate-keyed JSON raises its error naming what is wrong."""
    with pytest.raises(error, match=words):
        bounded.load_json(text)


def test_json_within_limits_loads() -> None:
    """An ordinary JSON sidecar loads unchanged."""
    assert bounded.load_json('{"id": "x", "metadata": {"a": [1]}}') == {
        "id": "x",
        "metadata": {"a": [1]},
    }
