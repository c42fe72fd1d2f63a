"""Search filters of the embedded registry: django-neurobank's ResourceFilter in SQL.

:func:`compile_search` turns the keyword filters of ``Registry.search`` into a
WHERE clause over ``resource r JOIN datatype d``. The semantics follow the
server (django-filter plus the view's ``metadata__`` handling on PostgreSQL):

- plain filters are django-filter filters: values are stripped, an empty value
  skips the filter, a boolean filter given something other than
  true/false/1/0 is skipped, a bad date or number is a 400-style rejection;
- ``metadata__K[__K2...][__lookup]`` compares JSON values (the value is parsed
  as JSON when it parses, so ``"3"`` matches the number 3); ``__neq`` turns a
  condition into an exclusion, and, as Django does, all exclusions are applied
  together as one ``NOT (a AND b ...)``, each guarded so resources without
  metadata are kept, while resources whose metadata lacks the key are dropped;
- ``metadata__experimenter`` and ``metadata__animal`` search the fields.

The clauses call the SQL functions ``nb_text`` and ``nb_json``, which
:mod:`nbankd.registry.embedded_json` registers on each connection.

Unknown filter names are ignored, as django-filter ignores them.
Case-insensitive matching upper-cases both sides one character at a time
(PostgreSQL's ``UPPER``: "ß" stays "ß"), in Python so that it works beyond ASCII.
Text that is not UTF-8 (lone surrogates) is bound as bytes and matches nothing.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from typing import Any

from nbankd import errors
from nbankd.registry import embedded_rules as rules
from nbankd.registry import rejections

# django-filter's BooleanWidget vocabulary, matched lower-cased and unstripped as it
# does; anything else skips the filter
_BOOL_VALUES: dict[str, bool] = {"true": True, "1": True, "false": False, "0": False}
# values the view accepts for metadata__K__isnull, case-insensitively
_ISNULL_VALUES = {"true": True, "1": True, "false": False, "0": False}

_TEXT_LOOKUPS = frozenset(
    {
        "exact",
        "iexact",
        "contains",
        "icontains",
        "startswith",
        "istartswith",
        "endswith",
        "iendswith",
        "regex",
        "iregex",
    }
)
_COMPARE_LOOKUPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
# lookups Django knows on a JSON key; any other trailing part is a nested key
_JSON_LOOKUPS = (
    _TEXT_LOOKUPS
    | set(_COMPARE_LOOKUPS)
    | {"in", "isnull", "has_key", "has_keys", "has_any_keys", "contained_by"}
)
_CORE_LOOKUPS = _TEXT_LOOKUPS | set(_COMPARE_LOOKUPS) | {"in", "isnull"}
_CORE_COLUMNS = {"experimenter": "r.experimenter", "animal": "r.animal"}
_INT64 = (-(2**63), 2**63 - 1)

STAMP_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def format_stamp(when: datetime) -> str:
    """A UTC time as stored: fixed width, so text order is time order."""
    return when.astimezone(UTC).strftime(STAMP_FORMAT)


@dataclass
class Compiled:
    """A WHERE clause (AND of ``where``) and its parameters; ``empty`` matches nothing."""

    where: list[str] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    empty: bool = False

    def add(self, sql: str, *params: Any) -> None:
        self.where.append(sql)
        self.params.extend(params)


# --- values ----------------------------------------------------------------------------


def _reject(param: str, message: str) -> errors.RegistryRejected:
    return rejections.classify({param: [message]})


def _char(value: object) -> str | None:
    """django-filter CharFilter cleaning: stripped text, None when empty (filter skipped)."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _bool(value: object) -> bool | None:
    if isinstance(value, bool):
        return value
    return _BOOL_VALUES.get(str(value).lower()) if value is not None else None


_LOOSE_DATETIME = re.compile(
    r"(\d{4})-(\d{1,2})-(\d{1,2})[T ](\d{1,2}):(\d{1,2})"
    r"(?::(\d{1,2})(?:[.,](\d{1,6})\d{0,6})?)?\s*(Z|[+-]\d{2}(?::?\d{2})?)?$"
)


def parse_datetime(text: str) -> datetime | None:
    """ISO 8601 as Django's ``parse_datetime`` takes it; naive times are UTC."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        m = _LOOSE_DATETIME.match(text)
        if not m:
            return None
        year, month, day, hour, minute, second, micro, tz = m.groups()
        tzinfo = None
        if tz == "Z":
            tzinfo = UTC
        elif tz:
            minutes = 60 * int(tz[1:3]) + (int(tz[-2:]) if len(tz) > 3 else 0)
            tzinfo = timezone(timedelta(minutes=-minutes if tz[0] == "-" else minutes))
        try:
            when = datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second or 0),
                int((micro or "0").ljust(6, "0")),
                tzinfo=tzinfo,
            )
        except ValueError:
            return None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _datetime_value(param: str, value: object) -> str | None:
    text = _char(value)
    if text is None:
        return None
    when = parse_datetime(text)
    if when is None:
        raise _reject(param, "Enter a valid date/time.")
    return format_stamp(when)


def _sql_number(v: int | float) -> int | float:
    if isinstance(v, int) and not _INT64[0] <= v <= _INT64[1]:
        return float(v)
    return v


def _json_path(keys: list[str]) -> str:
    """A JSON1 path for nested keys; digit keys index arrays, as in Django, which tries
    int() and falls back to the key (so "²", a digit int() refuses, is a key)."""
    parts = ["$"]
    for key in keys:
        index = None
        if key.isdigit():
            with contextlib.suppress(ValueError):
                index = int(key)
        parts.append(f"[{index}]" if index is not None else "." + json.dumps(key))
    return "".join(parts)


# --- the filters -------------------------------------------------------------------------


def _exists_location(condition: str) -> str:
    return (
        "EXISTS (SELECT 1 FROM location l JOIN archive a ON a.id = l.archive_id "
        f"WHERE l.resource_id = r.id AND {condition})"
    )


def _plain_filters(filters: Mapping[str, object], out: Compiled) -> None:
    def text(name: str, sql: Callable[[str], tuple[str, list[Any]]]) -> None:
        value = _char(filters.get(name))
        if value is not None:
            clause, params = sql(value)
            out.add(clause, *params)

    text("name", lambda v: ("nb_text(r.name, 'icontains', ?)", [v]))
    text("sha1", lambda v: ("r.sha1 = ?", [v.lower()]))
    text("sha1_contains", lambda v: ("nb_text(r.sha1, 'icontains', ?)", [v]))
    text("dtype", lambda v: ("nb_text(d.name, 'icontains', ?)", [v]))
    text("location", lambda v: (_exists_location("nb_text(a.name, 'icontains', ?)"), [v]))
    text("archive", lambda v: (_exists_location("a.name = ?"), [v]))
    has_location = _bool(filters.get("has_location"))
    if has_location is not None:
        out.add(("" if has_location else "NOT ") + _exists_location("1"))
    text("created_by", lambda v: ("nb_text(r.created_by, 'icontains', ?)", [v]))
    text("scheme", lambda v: (_exists_location("nb_text(a.scheme, 'istartswith', ?)"), [v]))
    # exclusions keep resources with no value for the field
    for col in ("experimenter", "animal"):
        text(col, lambda v, c=col: (f"r.{c} = ?", [v]))
    for col in ("experimenter", "animal"):
        text(f"{col}__neq", lambda v, c=col: (f"NOT (r.{c} = ? AND r.{c} IS NOT NULL)", [v]))
    for col in ("experimenter", "animal"):
        isnull = _bool(filters.get(f"{col}__isnull"))
        if isnull is not None:
            out.add(f"r.{col} IS {'' if isnull else 'NOT '}NULL")
    text("animal__istartswith", lambda v: ("nb_text(r.animal, 'istartswith', ?)", [v]))

    # created_on, created_on__year, created_on__range: validated together, as a form
    problems: dict[str, list[str]] = {}
    clauses: list[tuple[str, list[Any]]] = []
    try:
        stamp = _datetime_value("created_on", filters.get("created_on"))
        if stamp is not None:
            clauses.append(("r.created_on = ?", [stamp]))
    except errors.RegistryRejected as err:
        problems.update(err.fields)
    year_text = _char(filters.get("created_on__year"))
    if year_text is not None:
        try:
            year = Decimal(year_text)
            if not year.is_finite():
                raise InvalidOperation
        except InvalidOperation:
            problems["created_on__year"] = ["Enter a number."]
        else:
            y = int(year)  # truncated, as Django does
            if not 1 <= y <= 9999:
                clauses.append(("0", []))
            else:
                clauses.append(
                    (
                        "r.created_on BETWEEN ? AND ?",
                        [f"{y:04d}-01-01T00:00:00.000000Z", f"{y:04d}-12-31T23:59:59.999999Z"],
                    )
                )
    range_text = filters.get("created_on__range")
    if range_text is not None and str(range_text) != "":
        ends = str(range_text).split(",")
        if len(ends) != 2:
            problems["created_on__range"] = ["Range query expects two values."]
        else:
            stamps: list[str] = []
            for end in ends:
                if end == "":  # an open end matches nothing, as on the server
                    clauses.append(("0", []))
                    continue
                when = parse_datetime(end.strip())
                if when is None:
                    problems["created_on__range"] = ["Enter a valid date/time."]
                    break
                stamps.append(format_stamp(when))
            else:
                if len(stamps) == 2:
                    clauses.append(("r.created_on BETWEEN ? AND ?", stamps))
    if problems:
        raise rejections.classify(problems)
    for clause, params in clauses:
        out.add(clause, *params)


@dataclass
class _Condition:
    sql: str
    params: list[Any]
    guard: str | None  # added inside an exclusion, as Django does for nullable columns


def _core_condition(param: str, column: str, lookup: str, value: object) -> _Condition:
    if lookup == "isnull":
        return _Condition(f"{column} IS {'' if value else 'NOT '}NULL", [], None)
    if lookup not in _CORE_LOOKUPS:
        raise _reject(param, f"unsupported lookup '{lookup}'")
    text = str(value)
    guard = f"{column} IS NOT NULL"
    if lookup == "exact":
        return _Condition(f"{column} = ?", [text], guard)
    if lookup in _COMPARE_LOOKUPS:
        return _Condition(f"{column} {_COMPARE_LOOKUPS[lookup]} ?", [text], guard)
    if lookup == "in":
        # Django iterates a string given to __in: one character per value
        chars = sorted(set(text))
        if not chars:
            return _Condition("0", [], guard)
        return _Condition(f"{column} IN ({', '.join('?' * len(chars))})", chars, guard)
    return _Condition(f"nb_text({column}, ?, ?)", [lookup, text], guard)


def _json_equal_sql(path: str, value: Any) -> tuple[str, list[Any]]:
    """JSON equality of the value at ``path`` with a Python value; NULL when absent."""
    jt = "json_type(r.metadata, ?)"
    if value is None:
        return f"{jt} = 'null'", [path]
    if isinstance(value, bool):
        return f"{jt} = ?", [path, "true" if value else "false"]
    if isinstance(value, int | float):
        return (
            f"({jt} IN ('integer', 'real') AND json_extract(r.metadata, ?) = ?)",
            [path, path, _sql_number(value)],
        )
    if isinstance(value, str):
        return f"({jt} = 'text' AND json_extract(r.metadata, ?) = ?)", [path, path, value]
    return (
        f"({jt} IS NOT NULL AND nb_json(r.metadata -> ?, 'in', ?))",
        [path, path, json.dumps([value])],
    )


def _metadata_condition(keys: list[str], lookup: str, value: Any) -> _Condition:
    path = _json_path(keys)
    guard = "r.metadata IS NOT NULL"
    if lookup == "isnull":
        return _Condition(
            f"json_type(r.metadata, ?) IS {'' if value else 'NOT '}NULL", [path], None
        )
    if lookup == "exact":
        sql, params = _json_equal_sql(path, value)
        return _Condition(sql, params, None if value is None else guard)
    if lookup in _TEXT_LOOKUPS and lookup != "contains":
        # the key's value as text, as PostgreSQL's ->> gives it
        as_text = (
            "CASE json_type(r.metadata, ?) WHEN 'text' THEN json_extract(r.metadata, ?) "
            "WHEN 'null' THEN NULL ELSE r.metadata -> ? END"
        )
        return _Condition(
            f"nb_text({as_text}, ?, ?)", [path, path, path, lookup, str(value)], guard
        )
    if lookup == "in" and isinstance(value, str):
        value = list(value)
    elif lookup in ("has_keys", "has_any_keys") and not isinstance(value, list):
        value = list(str(value))
    return _Condition("nb_json(r.metadata -> ?, ?, ?)", [path, lookup, json.dumps(value)], guard)


def _metadata_filters(filters: Mapping[str, object], out: Compiled) -> None:
    includes: list[_Condition] = []
    excludes: list[_Condition] = []
    for param, raw in filters.items():
        if not param.startswith("metadata__"):
            continue
        k = param
        exclude = k.endswith("__neq")
        if exclude:
            k = k[: -len("__neq")]
        parts = k.removeprefix("metadata__").split("__")
        value: Any = raw if isinstance(raw, str) else json.dumps(raw)
        core = _CORE_COLUMNS.get(parts[0])
        if k.endswith("__isnull"):
            flag = _ISNULL_VALUES.get(str(raw).lower()) if not isinstance(raw, bool) else raw
            if flag is None:
                raise _reject(param, "must be true or false")
            value = flag
        elif core is None:
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        if core is not None:
            lookup = "__".join(parts[1:]) or "exact"
            cond = _core_condition(param, core, lookup, value)
        else:
            if len(parts) > 1 and parts[-1] in _JSON_LOOKUPS:
                keys, lookup = parts[:-1], parts[-1]
            else:
                keys, lookup = parts, "exact"
            cond = _metadata_condition(keys, lookup, value)
        (excludes if exclude else includes).append(cond)
    for cond in includes:
        out.add(cond.sql, *cond.params)
    if excludes:
        terms: list[str] = []
        params: list[Any] = []
        for cond in excludes:
            terms.append(f"({cond.sql})")
            params.extend(cond.params)
            if cond.guard:
                terms.append(cond.guard)
        out.add(f"NOT ({' AND '.join(terms)})", *params)


def compile_search(filters: Mapping[str, object]) -> Compiled:
    """Compiles ``Registry.search`` filters; raises RegistryRejected for bad values."""
    out = Compiled()
    _plain_filters(filters, out)
    _metadata_filters(filters, out)
    out.params = [rules.bindable(p) for p in out.params]  # text no record can hold
    return out
