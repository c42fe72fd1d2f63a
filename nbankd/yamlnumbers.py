"""Numbers YAML 1.1 reads otherwise than they look, for every YAML nbankd reads.

PyYAML follows YAML 1.1: a plain ``0417`` is octal (271), ``1:30`` is base 60 (90),
``12_34`` is 1234, ``0x1F`` hexadecimal. Written as an animal's band number or a
session's time, such a value would be registered as another number without a word.
:func:`odd_number` finds such a scalar in a composed document (the configuration's
metadata and every sidecar refuse it, with the hint to quote it) and
:func:`number_reading` says in words what YAML made of it.
"""

from __future__ import annotations

import re

import yaml

__all__ = ["number_reading", "odd_number"]

_NUMBER_TAGS = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
_PLAIN_DECIMAL = re.compile(
    r"^[-+]?(?:(?:0|[1-9][0-9]*)(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?$"
)


def odd_number(node: yaml.Node) -> str | None:
    """The text of ``node`` when it is a plain (unquoted) scalar YAML reads as a number
    although it is not written in plain decimal; None otherwise."""
    if not isinstance(node, yaml.ScalarNode) or node.style not in (None, ""):
        return None  # quoted (libyaml's loader gives a plain scalar the style "")
    if node.tag not in _NUMBER_TAGS:
        return None
    text = str(node.value)
    if _PLAIN_DECIMAL.match(text) or text.lower().lstrip("+-") in (".inf", ".nan"):
        return None
    return text


def number_reading(text: str) -> str:
    """How YAML 1.1 reads a number not written in plain decimal, in words."""
    digits = text.lstrip("+-").lower()
    if ":" in digits:
        return "a base-60 number"
    if digits.startswith("0x"):
        return "a hexadecimal number"
    if digits.startswith("0b"):
        return "a binary number"
    if len(digits) > 1 and digits[0] == "0" and "." not in digits:
        return "an octal number"
    if "_" in digits:
        return "a number with its '_' left out"
    return "a number"
