"""Registry commands of nbankctl, named and behaving like ``nbank`` 0.13's.

``init``, ``search``, ``info``, ``locate``, ``verify``, ``modify``, ``dtype
list|add``, ``archive list|check`` and ``registry-info`` work against a
django-neurobank URL or the embedded registry (see :mod:`nbankctl.registry_access`).
What nbank prints goes to standard output here too (``search``, ``info``,
``modify``, ``dtype list``, ``archive list``); what nbank logs goes to standard
error (``registry-info``, ``dtype add``, ``init``). ``--json`` (before or after the
command word) writes JSON to standard output for every command.
Exit status: 0 ok, 1 problems found (unknown id, verify mismatch, check
findings), 2 usage or configuration error, 3 registry unreachable.
"""

from __future__ import annotations

import argparse
import grp
import json
import math
import os
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nbankctl import check_cmds
from nbankctl.registry_access import describe, open_registry
from nbankctl.report import Report
from nbankd import errors
from nbankd.archive.layout import DEFAULT_UMASK
from nbankd.archive.opening import create_archive
from nbankd.names import is_utf8, printable
from nbankd.registry.base import CORE_FIELDS, SLUG_RE, Registry

_ALIASES: dict[str, Any] = {"True": True, "False": False, "None": None}


def _no_constant(name: str) -> Any:
    raise ValueError(name)


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):  # 1e400: JSON cannot carry it
        raise ValueError(text)
    return number


def parse_value(text: str) -> Any:
    """A -k value: JSON when it parses (True/False/None too), else the text itself.
    NaN, Infinity and numbers too large for a float stay text, as nbank keeps them (a
    registry's JSON cannot hold them)."""
    if text in _ALIASES:
        return _ALIASES[text]
    try:
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite)
    except ValueError:
        if text.lstrip().startswith(("[", "{")):
            raise ValueError(f"{text!r} looks like JSON but does not parse") from None
        return text


class KeyValue(argparse.Action):
    """Collects ``-k KEY=VALUE`` options into a dict."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        key, sep, raw = str(values).partition("=")
        if not sep or not key:
            parser.error(f"{option_string} {values}: expected KEY=VALUE")
        if key in CORE_FIELDS:
            parser.error(f"{option_string} {key}: {key} is not metadata; use --{key}")
        try:
            value = parse_value(raw)
        except ValueError as err:
            parser.error(f"{option_string} {key}: {err}")
        current = dict(getattr(namespace, self.dest) or {})
        current[key] = value
        setattr(namespace, self.dest, current)


def metadata_key(text: str) -> str:
    if text in CORE_FIELDS:
        raise argparse.ArgumentTypeError(f"{text} is not metadata; use --{text}")
    return text


def octal(text: str) -> int:
    try:
        return int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an octal number") from None


@contextmanager
def registry_for(
    args: argparse.Namespace, *, fallback_url: str | None = None
) -> Iterator[Registry]:
    registry = open_registry(args, fallback_url=fallback_url)
    try:
        yield registry
    finally:
        registry.close()


def dump(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def warn(text: str) -> None:
    print(f"nbankctl: {text}", file=sys.stderr)


def log(text: str) -> None:
    """A message nbank writes through its logger: on standard error."""
    print(text, file=sys.stderr, flush=True)


def _filter_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _as_given(value: Any) -> str:
    """A -k value as text, any undecodable byte of it kept (JSON would escape it)."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def require_utf8(given: Iterable[tuple[str, str | None]]) -> None:
    """Refuses (usage error) the first of ``given`` ((what, value) pairs, None for a
    value not given) holding bytes that are not UTF-8: the registry's names, filters
    and metadata are UTF-8 text, and such an argument could not even be sent."""
    for what, value in given:
        if value is not None and not is_utf8(value):
            raise errors.UsageError(
                f"{what} '{printable(value)}' holds bytes that are not UTF-8 (shown as "
                "\\xNN): the registry's names, filters and metadata are UTF-8 text",
                hint="retype it in UTF-8",
            )


def metadata_given(option: str, metadata: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(what, KEY=VALUE) of each -k (or -K) option, for :func:`require_utf8`."""
    return [(option, f"{key}={_as_given(value)}") for key, value in metadata.items()]


# --- registry-info, dtype, archive list -------------------------------------------


def cmd_registry_info(args: argparse.Namespace, report: Report) -> None:
    with registry_for(args) as reg:
        info = {"address": reg.url, "backend": reg.backend, **reg.info()}
        if args.json:
            dump(info)
            return
        log("registry info:")
        log(f"  - address: {printable(describe(reg))}")
        for key, value in info.items():
            if key not in ("address", "backend"):
                log(f"  - {printable(str(key))}: {printable(str(value))}")


def cmd_dtype_list(args: argparse.Namespace, report: Report) -> None:
    with registry_for(args) as reg:
        dtypes = reg.list_datatypes()
    if args.json:
        dump([d.to_json() for d in dtypes])
    for d in [] if args.json else dtypes:
        print(f"{printable(d.name):<25}\t({printable(d.content_type)})")


def cmd_dtype_add(args: argparse.Namespace, report: Report) -> None:
    with registry_for(args) as reg:
        dtype = reg.add_datatype(args.dtype_name, args.content_type)
    if args.json:
        dump(dtype.to_json())
    else:
        name, content_type = printable(dtype.name), printable(dtype.content_type)
        log(f"added datatype {name} (content-type: {content_type})")


def cmd_archive_list(args: argparse.Namespace, report: Report) -> None:
    require_utf8([("-n", args.name), ("--scheme", args.scheme)])
    filters = {k: v for k, v in (("name", args.name), ("scheme", args.scheme)) if v}
    with registry_for(args) as reg:
        archives = reg.list_archives(**filters)
    if args.json:
        dump([a.to_json() for a in archives])
        return
    for a in archives:
        where = a.root if a.scheme == "neurobank" else f"{a.scheme}://{a.root}"
        print(f"{printable(a.name):<25}\t{printable(where)}")


# --- init ----------------------------------------------------------------------------


def _holds_resources(root: Path) -> bool:
    """Whether the archive folder ``root`` has anything in ``resources/`` (or cannot
    be read: counted as in use)."""
    try:
        with os.scandir(root / "resources") as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True


def cmd_init(args: argparse.Namespace, report: Report) -> None:
    """Registers the folder as an archive, then makes it (as nbank: messages on stderr;
    with ``--json`` the archive's record, registry and ``nbank.json`` on stdout)."""
    root = Path(args.directory).expanduser().resolve()
    name = args.name or root.name
    if not SLUG_RE.match(name):
        raise errors.UsageError(
            f"'{name}' cannot be an archive name: only letters, digits, '-' and '_'",
            hint="give another name with -n NAME",
        )
    if args.group is not None:  # checked before registering, as nbank does
        try:
            grp.getgrnam(args.group)
        except KeyError:
            raise errors.UsageError(
                f"group '{args.group}' does not exist", hint="give an existing group with -g"
            ) from None
    existing = [n for n in ("nbank.json", "README.md", ".gitignore") if os.path.lexists(root / n)]
    with registry_for(args) as reg:
        by_name = reg.get_archive(name)
        by_root = reg.find_archive_by_root(str(root))
        if existing and (
            by_root is None
            or by_root.name != name
            or len(existing) == 3  # a whole archive: nothing to finish
            or _holds_resources(root)  # in use: never finished over (nbank.json moved aside?)
        ):
            # files there, and no half-made archive of this name to finish
            raise errors.UsageError(
                f"'{root / existing[0]}' already exists",
                hint="choose an empty or new folder; init never overwrites files",
            )
        if by_name is not None and (by_name.scheme, by_name.root) != ("neurobank", str(root)):
            raise errors.ArchiveTaken(
                f"registry {reg.url} already has an archive '{name}' at "
                f"{by_name.scheme}:{by_name.root}",
                hint="give another name with -n NAME",
            )
        if by_root is not None and by_root.name != name:
            raise errors.ArchiveTaken(
                f"registry {reg.url} already has {root} as archive '{by_root.name}'",
                hint=f"run: nbankctl init -n {by_root.name} {root}",
            )
        if by_root is None:
            record = reg.add_archive(name, "neurobank", str(root))
            if not args.json:
                log(f"registered '{root}' as archive '{name}'")
        else:  # an earlier init registered it, then failed to create the folder
            record = by_root
            if not args.json:
                log(f"archive '{name}' is already registered with root {root}")
        try:
            archive = create_archive(  # finishing an init that stopped half way
                root,
                reg.url,
                group=args.group,
                umask=args.umask,
                shared=args.shared,
                finish=bool(existing),
            )
        except errors.NbankdError as err:
            raise type(err)(
                f"archive '{name}' is registered but the folder could not be made: {err.message}",
                hint="fix this and run the same nbankctl init again",
            ) from err
        url = reg.url
    if args.json:
        dump(
            {
                "archive": record.to_json(),
                "registry": url,
                "registered": by_root is None,
                "path": str(root),
                "nbank_json": json.loads(archive.config_path.read_text()),
            }
        )
    else:
        log(f"initialized neurobank archive in {root}")


# --- search, info, modify ------------------------------------------------------------


def cmd_search(args: argparse.Namespace, report: Report) -> None:
    require_utf8(
        [
            ("the name", args.name),
            ("-d", args.dtype),
            ("-H", args.hash),
            ("-n", args.archive),
            ("-s", args.scheme),
            ("--experimenter", args.experimenter),
            ("--animal", args.animal),
            *metadata_given("-k", args.metadata or {}),
            *metadata_given("-K", args.metadata_neq or {}),
        ]
    )
    params: dict[str, str] = {}
    for param, value in (
        ("name", args.name),
        ("dtype", args.dtype),
        ("location", args.archive),
        ("scheme", args.scheme),
        ("experimenter", args.experimenter),
        ("animal__istartswith", args.animal),
    ):
        if value is not None:
            params[param] = value
    if args.hash is not None:
        full = re.fullmatch(r"[0-9a-fA-F]{40}", args.hash)
        params["sha1" if full else "sha1_contains"] = args.hash
    for option, given, suffix in (
        ("-k", args.metadata or {}, ""),
        ("-K", args.metadata_neq or {}, "__neq"),
    ):
        for key, value in given.items():
            params[f"metadata__{key}{suffix}"] = text = _filter_text(value)
            if "\0" in text:  # django-neurobank on PostgreSQL answers it with a 500
                raise errors.UsageError(
                    f"{option} {printable(key)}: its value holds a NUL character (\\u0000), "
                    "which no registry stores (django-neurobank on PostgreSQL cannot even "
                    "compare it)",
                    hint="no record holds such a value: drop that filter or that character",
                )
    if not params:
        raise errors.UsageError(
            "nbankctl search needs at least one filter",
            hint="e.g. a name fragment, -d DTYPE, -n ARCHIVE or -k KEY=VALUE",
        )
    with registry_for(args) as reg:
        for record in reg.search(**params):
            if args.json:
                dump(record.to_json())
            else:
                print(printable(record.name))


def cmd_info(args: argparse.Namespace, report: Report) -> None:
    with registry_for(args) as reg:
        found = {r.name: r for r in reg.get_resources(args.id)}
        url = reg.url
    for id in dict.fromkeys(args.id):
        record = found.get(id)
        if record is None:
            dump({"id": id, "error": "not found"})
            warn(f"no resource '{printable(id)}' in registry {url}")
            report.failed()
        else:
            dump(record.to_json())


def cmd_modify(args: argparse.Namespace, report: Report) -> None:
    require_utf8(
        [
            *metadata_given("-k", args.metadata or {}),
            *(("-K", key) for key in args.metadata_remove),
            ("--experimenter", args.experimenter),
            ("--animal", args.animal),
        ]
    )
    changes: dict[str, Any] = dict(args.metadata or {})
    for key in args.metadata_remove:
        changes[key] = None
    for field in CORE_FIELDS:
        value = getattr(args, field)
        if value is not None:
            changes[field] = value or None  # an empty value clears the field
    if not changes:
        raise errors.UsageError(
            "nothing to change", hint="give -k KEY=VALUE, -K KEY, --experimenter or --animal"
        )
    with registry_for(args) as reg:
        for id in dict.fromkeys(args.id):
            try:
                record = reg.update_metadata(id, changes)
            except errors.NotFound:
                dump({"name": id, "error": "not found"})
                warn(f"no resource '{printable(id)}' in registry {reg.url}")
                report.failed()
                continue
            dump(record.to_json())


# --- archive check -------------------------------------------------------------------
# nbank's ``archive check``, kept as the alias of ``check archive`` (nbankctl.check_cmds)


# --- parser --------------------------------------------------------------------------


def _core_fields(pp: argparse.ArgumentParser, what: str) -> None:
    pp.add_argument("--experimenter", metavar="USER", help=f"{what} the experimenter (username)")
    pp.add_argument("--animal", metavar="ID", help=f"{what} the animal")


def _json_out(pp: argparse.ArgumentParser) -> None:
    # SUPPRESS: a default here would undo a --json given before the command
    pp.add_argument(
        "-j",
        "--json-out",
        dest="json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="same as --json",
    )


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds the registry commands to nbankctl's sub-command parser."""
    pp = sub.add_parser("registry-info", parents=[common], help="information about the registry")
    pp.set_defaults(func=cmd_registry_info)

    pp = sub.add_parser("init", parents=[common], help="create and register an archive")
    pp.add_argument("directory", type=Path, help="folder for the archive (empty or new)")
    pp.add_argument("-n", dest="name", help="registry name (default: the folder's name)")
    pp.add_argument(
        "-u", dest="umask", type=octal, default=DEFAULT_UMASK, help="umask, octal (default 002)"
    )
    pp.add_argument("-g", "--group", help="group of the archive (default: your primary group)")
    pp.add_argument("--shared", action="store_true", help="users deposit under their own names")
    pp.set_defaults(func=cmd_init)

    pp = sub.add_parser("search", parents=[common], help="search for resources")
    _json_out(pp)
    pp.add_argument("-d", "--dtype", help="filter by datatype")
    pp.add_argument("-H", "--hash", help="filter by sha1 (whole, or any part of one)")
    pp.add_argument("-n", "--archive", help="filter by archive name")
    pp.add_argument("-s", "--scheme", help="filter by a location's scheme (neurobank, tape...)")
    pp.add_argument(
        "-k", dest="metadata", action=KeyValue, metavar="KEY=VALUE", default={},
        help="metadata KEY equals VALUE (JSON if it parses; repeatable)",
    )  # fmt: skip
    pp.add_argument(
        "-K", dest="metadata_neq", action=KeyValue, metavar="KEY=VALUE", default={},
        help="exclude metadata KEY equal to VALUE (repeatable)",
    )  # fmt: skip
    _core_fields(pp, "filter by")
    pp.add_argument("name", nargs="?", help="resource name or fragment")
    pp.set_defaults(func=cmd_search)

    pp = sub.add_parser("info", parents=[common], help="registry records of resources (JSON)")
    pp.add_argument("id", nargs="+")
    pp.set_defaults(func=cmd_info)

    pp = sub.add_parser("modify", parents=[common], help="change resources' metadata")
    pp.add_argument(
        "-k", dest="metadata", action=KeyValue, metavar="KEY=VALUE", default={},
        help="set metadata KEY to VALUE (JSON if it parses; repeatable)",
    )  # fmt: skip
    pp.add_argument(
        "-K",
        dest="metadata_remove",
        action="append",
        type=metadata_key,
        default=[],
        metavar="KEY",
        help="delete a metadata key",
    )
    _core_fields(pp, "set (empty clears)")
    pp.add_argument("id", nargs="+")
    pp.set_defaults(func=cmd_modify)

    dt = sub.add_parser("dtype", help="list and add datatypes").add_subparsers(metavar="COMMAND")
    pp = dt.add_parser("list", parents=[common], help="list datatypes")
    pp.set_defaults(func=cmd_dtype_list)
    pp = dt.add_parser("add", parents=[common], help="add a datatype")
    pp.add_argument("dtype_name")
    pp.add_argument("content_type", help="MIME type, e.g. audio/wav")
    pp.set_defaults(func=cmd_dtype_add)

    ar = sub.add_parser("archive", help="list and check archives").add_subparsers(metavar="COMMAND")
    pp = ar.add_parser("list", parents=[common], help="list archives")
    pp.add_argument("--scheme", help="filter by scheme")
    pp.add_argument("-n", "--name", help="filter by name")
    pp.set_defaults(func=cmd_archive_list)
    pp = ar.add_parser(
        "check", parents=[common], help="compare an archive with the registry (check archive)"
    )
    check_cmds.archive_options(pp)
    pp.add_argument("path", type=Path, help="the archive's folder")
    pp.set_defaults(func=check_cmds.cmd_check_archive)
