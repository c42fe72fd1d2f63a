"""Deposit policy: what identifier, datatype and metadata an input gets.

Pure functions over small frozen records: no I/O, no clock, no randomness
except through the ``token`` a caller passes in. Tested by tables in
``tests/deposit/test_policy.py``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from nbankd import errors
from nbankd.filekind import FileKind
from nbankd.names import MARKER_SUFFIX, SIDECAR_SUFFIXES
from nbankd.registry.base import RESOURCE_NAME_MAX, SLUG_RE, unstorable_metadata

BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
AUTO_ID_LENGTH = 8
SIDECAR_KEYS = frozenset({"id", "dtype", "metadata"})
SIDECAR_MAX_BYTES = 1 << 20
STORED_NAME_MAX = 255  # bytes in a file name (NAME_MAX of ext4, xfs, btrfs, NFS)


@dataclass(frozen=True)
class InboxRules:
    """The parts of an inbox's configuration and its archive's policy that decide a deposit."""

    dtype: str | None
    dtype_by_extension: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    path_metadata: re.Pattern[str] | None = None
    auto_id: bool = False
    auto_id_type: str | None = None  # None/"base36" or "uuid"
    keep_extensions: bool = True
    allow_directories: bool = False
    directory_resource: bool = False  # this input is a top-level folder resource


@dataclass(frozen=True)
class Sidecar:
    """What a ``NAME.nbank.yaml|json`` file next to an input asks for."""

    id: str | None = None
    dtype: str | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """Everything decided about an input before any byte is copied."""

    name: str
    dtype: str
    metadata_json: str  # canonical JSON of the merged metadata
    target_name: str  # file name under resources/<stub>/
    auto: bool = False  # the identifier was chosen automatically

    @property
    def metadata(self) -> dict[str, Any]:
        return json.loads(self.metadata_json)


class PolicyError(errors.NbankdError):
    """An input cannot be deposited as it is; ``code`` says why (for NAME.reason)."""

    def __init__(self, code: str, message: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self._code = code

    @property  # type: ignore[override]
    def code(self) -> str:  # instance-level code, unlike the class-level ones
        return self._code


def parse_sidecar(text: str, *, json_format: bool, source: str) -> Sidecar:
    """Parses a sidecar's text; raises PolicyError(code="bad-sidecar") naming the file."""
    import yaml

    from nbankd.deposit import bounded

    try:
        data = bounded.load_json(text) if json_format else bounded.load_yaml(text)
    except bounded.TooBig as err:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source} is over a limit: {err}",
            "a sidecar holds id, dtype and a modest metadata mapping; shrink it and "
            "requeue the file",
        ) from err
    except (ValueError, yaml.YAMLError) as err:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source} is not valid {'JSON' if json_format else 'YAML'}: {err}",
            "fix the sidecar and requeue the file",
        ) from err
    if data is None:
        return Sidecar()
    if not isinstance(data, dict):
        raise PolicyError(
            "bad-sidecar", f"sidecar {source} must be a mapping with keys id, dtype, metadata"
        )
    unknown = set(map(str, data)) - SIDECAR_KEYS
    if unknown:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source} has unknown keys: {_some(sorted(unknown))}",
            "allowed keys are id, dtype and metadata",
        )
    sid, dtype, metadata = data.get("id"), data.get("dtype"), data.get("metadata")
    for key, value in (("id", sid), ("dtype", dtype)):
        if value is not None and not isinstance(value, str):
            raise PolicyError("bad-sidecar", f"sidecar {source}: '{key}' must be a string")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise PolicyError("bad-sidecar", f"sidecar {source}: 'metadata' must be a mapping")
    if not all(isinstance(k, str) for k in metadata):
        raise PolicyError("bad-sidecar", f"sidecar {source}: 'metadata' keys must be strings")
    where = nul_in(metadata)
    if where is not None:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source}: metadata {where} holds a NUL character (\\0), which a "
            "registry on PostgreSQL cannot store",
            "remove the \\0 from the sidecar and requeue the input",
        )
    metadata = _as_json(metadata, source)
    unstorable = unstorable_metadata(metadata)  # a lone surrogate ("\udc80"): not UTF-8
    if unstorable is not None:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source}: {unstorable}",
            "write the text as UTF-8 characters and requeue the input",
        )
    size = len(json.dumps(metadata, ensure_ascii=False).encode())
    if size > SIDECAR_MAX_BYTES:  # aliases can make a small text large
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source}: its metadata, aliases expanded, is {size:,} bytes of JSON, "
            f"over the {SIDECAR_MAX_BYTES // (1 << 20)} MiB a sidecar may hold",
            "keep large data in the file itself; sidecars hold identifiers and metadata",
        )
    return Sidecar(id=sid, dtype=dtype, metadata=metadata)


#: unknown keys a bad-sidecar message names (the count has them all), and characters of each
NAMED_KEYS, KEY_SHOWN = 5, 64


def _some(keys: list[str]) -> str:
    """The first :data:`NAMED_KEYS` of ``keys`` (each cut short), then how many more: a
    sidecar of thousands of keys gives a message of a line, not of a megabyte."""
    shown = [k if len(k) <= KEY_SHOWN else k[:KEY_SHOWN] + "..." for k in keys[:NAMED_KEYS]]
    more = f" and {len(keys) - NAMED_KEYS} more" if len(keys) > NAMED_KEYS else ""
    return ", ".join(shown) + more


def _as_json(value: Any, source: str, where: str = "") -> Any:
    """``value`` as JSON can hold it: dates and times as their text (as a YAML date
    was always registered), anything else JSON cannot hold exactly (binary, sets,
    NaN, infinities, keys that are not text or numbers) a bad-sidecar error naming
    where it is. Never a Python repr registered as if it were the value."""
    shown = where or "metadata"
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise PolicyError(
                "bad-sidecar",
                f"sidecar {source}: metadata {shown!r} is {value}, which JSON cannot hold",
                "give a number or a text instead and requeue the input",
            )
        return value
    if isinstance(value, datetime.date):  # datetime.datetime too
        return str(value)
    if isinstance(value, list):
        return [_as_json(v, source, f"{where}[{n}]") for n, v in enumerate(value)]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, datetime.date):
                key = str(key)
            elif isinstance(key, bool | int | float) or key is None:
                key = json.dumps(key)  # as JSON writes such a key
            elif not isinstance(key, str):
                raise PolicyError(
                    "bad-sidecar",
                    f"sidecar {source}: metadata {shown!r} has a key {key!r} that is not text",
                    "quote the key and requeue the input",
                )
            path = f"{where}.{key}" if where else key
            if key in out:
                raise PolicyError(
                    "bad-sidecar",
                    f"sidecar {source}: metadata {path!r} is given twice (once as text, "
                    "once as a number or date)",
                    "keep one of them and requeue the input",
                )
            out[key] = _as_json(item, source, path)
        return out
    raise PolicyError(
        "bad-sidecar",
        f"sidecar {source}: metadata {shown!r} is a {type(value).__name__} "
        "(a YAML tag such as !!binary or !!set), which JSON cannot hold",
        "give it as text, a number, a list or a mapping and requeue the input",
    )


def nul_in(value: Any, where: str = "") -> str | None:
    """Where in a JSON value a NUL character is (a key or a text), or None. django-neurobank
    on PostgreSQL answers 500 to one (its JSON column refuses it), so it is refused
    before registering, as a permanent error rather than an endless retry."""
    if isinstance(value, str):
        return repr(where or "value") if "\x00" in value else None
    if isinstance(value, list):
        for n, item in enumerate(value):
            found = nul_in(item, f"{where}[{n}]")
            if found is not None:
                return found
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if "\x00" in str(key):
                return repr(path)
            found = nul_in(item, path)
            if found is not None:
                return found
    return None


def check_sidecar_entry(mode: int, nlink: int, *, source: str) -> None:
    """Refuses a sidecar that is not a plain, singly linked file (guarantee 7: never read)."""
    if FileKind.of_mode(mode, nlink) is not FileKind.FILE:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source} is not a plain file (a link, FIFO, socket or device); "
            "nbankd never reads those",
            "replace it with a regular file and requeue the input",
        )


def sidecar_text(raw: bytes, *, source: str) -> str:
    """The text of a sidecar read with a limit of ``SIDECAR_MAX_BYTES + 1`` bytes.

    Refuses, rather than silently cutting or altering, a sidecar that is too large
    or not UTF-8 (either would change the metadata registered).
    """
    if len(raw) > SIDECAR_MAX_BYTES:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source} is larger than {SIDECAR_MAX_BYTES // (1 << 20)} MiB",
            "keep large data in the file itself; sidecars hold identifiers and metadata",
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PolicyError(
            "bad-sidecar",
            f"sidecar {source} is not UTF-8 text (byte {err.start})",
            "save it as UTF-8 and requeue the input",
        ) from None


def check_identifier(name: str, *, origin: str) -> str:
    """Returns ``name`` if the registry would accept it as a resource name."""
    if not SLUG_RE.fullmatch(name) or len(name) > RESOURCE_NAME_MAX:
        raise PolicyError(
            "invalid-name",
            f"{origin} {name!r} is not a valid identifier",
            "identifiers may contain only letters, digits, '-' and '_' (at most 255); "
            "rename the file, give an 'id' in a sidecar, or set auto_id: true",
        )
    return name


def auto_identifier(token: bytes, id_type: str | None) -> str:
    """An automatic identifier derived from ``token`` (16 random bytes chosen at claim).

    Deriving it from the journaled token makes the name known before registering,
    so registration can be repeated after a crash without minting a second record.
    """
    if len(token) < 16:
        raise ValueError("token must have at least 16 bytes")
    if id_type == "uuid":
        return str(uuid.UUID(bytes=token[:16], version=4))
    n = int.from_bytes(token[:8], "big")
    chars = []
    for _ in range(AUTO_ID_LENGTH):
        n, r = divmod(n, 36)
        chars.append(BASE36[r])
    return "".join(chars)


def replacement_identifier(token: bytes, taken: str, id_type: str | None) -> str:
    """A new automatic identifier for an input whose automatic identifier ``taken``
    turned out to be in use: derived from the token and the taken name, so each
    replacement differs and is journaled before it is used."""
    return auto_identifier(hashlib.sha256(token + taken.encode()).digest(), id_type)


def identifier_stem(basename: str) -> str:
    """The identifier a file name gives: the name without its (last) extension.

    neurobank takes ``Path.stem``; so do we, so ``a.b.wav`` is ``a.b``.
    """
    return PurePosixPath(basename).stem if basename not in ("", ".", "..") else basename


def choose_dtype(relpath: str, rules: InboxRules, sidecar: Sidecar) -> str:
    if sidecar.dtype:
        return sidecar.dtype
    suffix = PurePosixPath(relpath).suffix.lower()
    if suffix and suffix in rules.dtype_by_extension:
        return rules.dtype_by_extension[suffix]
    if rules.dtype:
        return rules.dtype
    raise PolicyError(
        "no-dtype",
        f"no datatype for {relpath!r}: the inbox has no 'dtype' and no "
        f"'dtype_by_extension' entry matches {suffix or 'a file without extension'}",
        "add 'dtype' to the inbox, an extension mapping, or a sidecar with 'dtype'",
    )


def merge_metadata(relpath: str, rules: InboxRules, sidecar: Sidecar) -> dict[str, Any]:
    """Inbox metadata, then ``path_metadata`` groups, then the sidecar: later wins."""
    merged: dict[str, Any] = dict(rules.metadata)
    if rules.path_metadata is not None:
        match = rules.path_metadata.search(relpath)
        if match:
            merged.update({k: v for k, v in match.groupdict().items() if v is not None})
    merged.update(sidecar.metadata)
    return merged


def target_name(name: str, basename: str, *, keep_extensions: bool, is_dir: bool) -> str:
    """The stored name: the identifier, plus the source's extension when kept."""
    if keep_extensions and not is_dir:
        return name + PurePosixPath(basename).suffix
    return name


def plan(
    relpath: str, rules: InboxRules, sidecar: Sidecar, *, token: bytes, is_dir: bool = False
) -> Plan:
    """Decides identifier, datatype, metadata and stored name for one input.

    Raises PolicyError with the rejection code when the input cannot be deposited.
    """
    basename = PurePosixPath(relpath).name
    auto = False
    if is_dir and not rules.allow_directories:
        raise PolicyError(
            "directory-not-allowed",
            f"{relpath!r} is a folder and the archive does not allow directory resources",
            "set allow_directories in the archive's nbank.json, or use directories: files",
        )
    if sidecar.id is not None:
        name = check_identifier(sidecar.id, origin="sidecar id")
    elif rules.auto_id:
        name = auto_identifier(token, rules.auto_id_type)
        auto = True
    else:
        stem = basename if is_dir else identifier_stem(basename)
        name = check_identifier(stem, origin="file name")
    dtype = choose_dtype(relpath, rules, sidecar)
    metadata = merge_metadata(relpath, rules, sidecar)
    stored = target_name(name, basename, keep_extensions=rules.keep_extensions, is_dir=is_dir)
    try:
        stored_bytes = len(stored.encode("utf-8"))
    except UnicodeEncodeError:  # an extension with bytes that are not UTF-8
        raise PolicyError(
            "invalid-name",
            f"the stored name {stored!r} of {relpath!r} is not UTF-8: the registry and the "
            "journal keep names as text",
            "rename the file so that its extension is UTF-8 text, or set "
            "keep_extensions: false, and requeue it",
        ) from None
    if stored_bytes > STORED_NAME_MAX:  # decided before anything is registered
        raise PolicyError(
            "invalid-name",
            f"the stored name of {relpath!r}, the identifier {name!r} with its extension, "
            f"is {stored_bytes} bytes: a file name holds at most {STORED_NAME_MAX}",
            "give a shorter 'id' in the sidecar (or set keep_extensions: false) and "
            "requeue the input",
        )
    return Plan(
        name=name,
        dtype=dtype,
        metadata_json=json.dumps(metadata, sort_keys=True, default=str),
        target_name=stored,
        auto=auto,
    )


def sidecar_paths(relpath: str) -> tuple[str, ...]:
    return tuple(relpath + s for s in SIDECAR_SUFFIXES)


def marker_path(relpath: str) -> str:
    return relpath + MARKER_SUFFIX
