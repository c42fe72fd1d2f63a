"""``nbankctl locate`` and ``nbankctl verify``: where resources are stored, and
whether files are the resources the registry records (as ``nbank``'s commands).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from nbankctl.registry_access import Choice, choose, configured, open_chosen
from nbankctl.registry_cmds import registry_for, warn
from nbankctl.report import Report
from nbankd import errors
from nbankd.hashing import NameNotUtf8, hash_path
from nbankd.names import printable
from nbankd.registry.base import SLUG_RE, LocationRecord, Registry
from nbankd.registry.urls import normalise, same_registry
from nbankd.transfer.sources import stored_copy

# --- verify --------------------------------------------------------------------------


def _verify_one(reg: Registry, path: Path, id: str | None) -> tuple[bool, dict[str, Any]]:
    """(whether ``path`` is a registered resource, the result): its fields as found, its
    ``message`` for a terminal (names from the registry or the disk shown by
    :func:`~nbankd.names.printable`)."""
    result: dict[str, Any] = {"path": str(path)}
    if not os.path.lexists(path):
        return False, {**result, "status": "missing", "message": "no such file or directory"}
    try:
        sha1 = hash_path(path)
    except NameNotUtf8 as err:
        return False, {
            **result,
            "status": "not-verifiable",
            "message": f"not verifiable: '{printable(str(err.filename))}' is {err.strerror}",
        }
    except OSError as err:
        why = printable(err.strerror or str(err))
        return False, {**result, "status": "unreadable", "message": why}
    result["sha1"] = sha1
    record = None
    if id is not None:
        record = reg.get_resource(id)
        if record is None:
            why = f"no resource '{printable(id)}'"
            return False, {**result, "status": "not-found", "message": why}
    elif SLUG_RE.match(path.stem):
        record = reg.get_resource(path.stem)  # named after its id, as in an archive
    if record is not None:
        result["id"] = record.name
        if record.sha1 is None:
            return False, {**result, "status": "no-hash", "message": "no registered hash"}
        if record.sha1.lower() == sha1:
            return True, {**result, "status": "ok", "message": "OK"}
        return False, {
            **result,
            "status": "mismatch",
            "message": f"FAILED to match record for {printable(record.name)} "
            f"(registered {printable(record.sha1)})",
        }
    # only records of this SHA-1: a server or proxy ignoring the filter answers others
    matches = [r.name for r in reg.search(sha1=sha1) if (r.sha1 or "").lower() == sha1]
    result["matches"] = matches
    if not matches:
        return False, {**result, "status": "no-match", "message": "no matches in registry"}
    text = ", ".join(printable(m) for m in matches)
    return True, {**result, "status": "match", "message": f"matches registry resource {text}"}


def cmd_verify(args: argparse.Namespace, report: Report) -> None:
    if args.id is not None and len(args.files) != 1:
        raise errors.UsageError("-i ID compares exactly one FILE with the record of ID")
    with registry_for(args) as reg:
        for path in args.files:
            ok, result = _verify_one(reg, Path(path), args.id)
            if not ok:
                report.failed()
            if args.json:
                print(json.dumps(result))
            else:
                print(f"{printable(str(path))}: {result['message']}")


# --- locate --------------------------------------------------------------------------


def location_text(loc: LocationRecord) -> str | None:
    """How nbank shows a location: a local path, tape://TAPE:N/ID, or a URL; None if unreachable."""
    if loc.scheme == "neurobank":
        path = stored_copy(loc)
        return None if path is None else str(path)
    if loc.scheme == "tape":
        return f"tape://{loc.root}/{loc.resource_name}"
    if loc.scheme in ("http", "https"):
        return f"{loc.scheme}://{loc.root.rstrip('/')}/{loc.resource_name}/"
    return None


#: the path of a resource's full URL as nbank's ``parse_resource_url`` reads it: the
#: registry's path, then ``resources/ID`` (``<registry>resources/<id>/``)
_RESOURCE_PATH = re.compile(r"(\S+?/)resources/([-_~0-9a-zA-Z]+)/?$")


def _without_userinfo(word: str) -> str:
    """A URL without its ``user:password@``, if any."""
    parts = urlsplit(word)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def resource_url(word: str) -> tuple[str, str] | None:
    """(registry URL, id) of a resource's full URL, read as ``nbank`` reads one (its
    ``deposit`` prints them); None for a word that is not a URL (an id); ValueError
    for a URL that is not a resource's. A ``user:password@`` in the URL is dropped:
    never said in a message, nor sent anywhere."""
    parts = urlsplit(_without_userinfo(word))
    if not (parts.scheme and parts.netloc):
        return None
    match = _RESOURCE_PATH.match(parts.path)
    if match is None:
        raise ValueError(
            f"{urlunsplit(parts)} is not the URL of a resource (REGISTRY/resources/ID/)"
        )
    return urlunsplit((parts.scheme, parts.netloc, match.group(1), "", "")), match.group(2)


@dataclass(frozen=True)
class _Target:
    """One word of ``locate``: the id to look up, and the registry its URL names."""

    id: str
    registry: str | None = None  # a resource URL's registry; None for a plain id
    problem: str | None = None  # why a URL names no resource


def _target(word: str) -> _Target:
    try:
        parsed = resource_url(word)
    except ValueError as err:
        try:
            shown = _without_userinfo(word)
        except ValueError:  # not even a URL (an unclosed IPv6 bracket): an id, as nbank
            return _Target(word)
        return _Target(shown, problem=str(err))
    return _Target(word) if parsed is None else _Target(parsed[1], parsed[0])


def _not_located(args: argparse.Namespace, id: str, mark: str, why: str) -> None:
    """Says that ``id`` is not located: ``ID  MARK`` on stdout as nbank does (a JSON
    line with --json), and why on stderr."""
    if args.json:
        print(json.dumps({"id": id, "locations": [], "error": why}))
    else:
        print(f"{printable(id):<20}\t{mark}")
    warn(printable(why))


def cmd_locate(args: argparse.Namespace, report: Report) -> None:
    """Locates each id or resource URL (nbank takes both). A URL is looked up in the
    registry in use when it names that registry (or, configured, one of its
    ``registry_aliases``); a URL of another registry is refused, naming the command that
    looks there: its answer would not come from the registry the command was pointed
    at, and credentials meant for one registry must not go to another. With no
    registry configured at all (no -r, $NBANK_REGISTRY, -c or $NBANKD_CONFIG, and no
    default configuration), a URL is looked up in its own registry, as nbank does
    (anonymously: no credentials go to a host only named in a URL)."""
    targets = [_target(word) for word in args.id]
    try:
        choice = choose(args)
    except errors.ConfigError:
        from nbankd.config.model import CONFIG_ENV  # loaded by choose() already

        named = bool(getattr(args, "config", None)) or bool(os.environ.get(CONFIG_ENV))
        if named or not any(t.registry for t in targets):
            raise
        _locate_by_own_registry(args, report, targets)
        return
    reg = open_chosen(choice, args)
    try:
        aliases: tuple[str, ...] | None = None  # read once, when a URL needs them
        for t in targets:
            other = t.registry is not None and not same_registry(t.registry, reg.url)
            if other and aliases is None:
                aliases = _aliases(args, choice, reg.url)
            if other and not same_registry(t.registry or "", reg.url, aliases or ()):
                why = (
                    f"the URL of '{t.id}' names registry {t.registry}, not the registry in "
                    f"use ({reg.url}, from {choice.source}); to locate it there: "
                    f"nbankctl -r {t.registry} locate {t.id}"
                )
                _not_located(args, t.id, "(another registry)", why)
                report.failed()
                continue
            _locate_in(args, report, reg, t)
    finally:
        reg.close()


def _aliases(args: argparse.Namespace, choice: Choice, url: str) -> tuple[str, ...]:
    """The configuration's ``registry_aliases``: those of the configuration that chose
    the registry in use, or, when -r or $NBANK_REGISTRY chose it, those of the
    configuration naming that same registry (its URL, or an embedded registry's
    ``registry_url``). A configuration that cannot be read then lends none: it was not
    asked for."""
    if choice.config is not None:
        return choice.config.registry_aliases
    try:
        config = configured(args)
    except Exception:  # not asked for: whatever breaks its reading lends no aliases
        return ()
    if config is None:
        return ()
    served = config.registry_url if config.embedded else config.registry
    if served is None or not same_registry(served, url):
        return ()
    return config.registry_aliases


def _locate_in(args: argparse.Namespace, report: Report, reg: Registry, t: _Target) -> None:
    if t.problem is not None:
        _not_located(args, t.id, "(not found)", t.problem)
        report.failed()
        return
    try:
        locations = reg.get_locations(t.id)
    except errors.NotFound:
        _not_located(args, t.id, "(not found)", f"no resource '{t.id}' in registry {reg.url}")
        report.failed()
        return
    if not _locate_one(args, t.id, locations):
        report.failed()


def _locate_by_own_registry(
    args: argparse.Namespace, report: Report, targets: list[_Target]
) -> None:
    """No registry is configured: each resource URL is looked up in its own registry;
    a plain id cannot be (nbank: "no registry to resolve short identifier")."""
    from nbankd.registry.http import HttpRegistry

    # anonymously, as nbank does: no credentials of any kind go to a host the user only
    # named in a URL (netrc's "default" entry would match every host)
    if getattr(args, "auth", None):
        warn(
            "note: -a is not used: no registry is configured, and a URL's is looked up anonymously"
        )
    opened: dict[str, Registry] = {}
    try:
        for t in targets:
            if t.registry is None:
                why = f"no registry to look up the identifier '{t.id}' in: give -r URL"
                _not_located(args, t.id, "[no registry to resolve short identifier]", why)
                report.failed()
                continue
            reg = opened.get(normalise(t.registry))
            if reg is None:
                reg = opened[normalise(t.registry)] = HttpRegistry(t.registry, None)
            _locate_in(args, report, reg, t)
    finally:
        for reg in opened.values():
            reg.close()


def _locate_one(args: argparse.Namespace, id: str, locations: list[LocationRecord]) -> bool:
    """Prints the locations of one resource; False if none is reachable from here."""
    if args.json:
        out = [{**loc.to_json(), "address": location_text(loc)} for loc in locations]
        print(json.dumps({"id": id, "locations": out}))
        return any(item["address"] for item in out)
    if args.link is None and not args.print0:
        found = False
        for loc in locations:
            text = location_text(loc)
            if text is not None:
                print(f"{printable(id):<20}\t{printable(text)}")
                found = True
        return found
    path = next((p for p in map(stored_copy, locations) if p is not None), None)
    if path is None:
        warn(f"'{printable(id)}' has no copy on this host")
        return False
    if args.print0:
        print(str(path), end="\0")
        return True
    link = Path(args.link) / path.name
    try:
        link.symlink_to(path)
    except OSError as err:
        shown = f"{printable(str(link))} -> {printable(str(path))}"
        warn(f"cannot make link {shown}: {printable(err.strerror or str(err))}")
        return False
    print(f"{printable(id):<20}\t-> {printable(str(link))}")
    return True


# --- parser --------------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``locate`` and ``verify`` to nbankctl's sub-command parser."""
    pp = sub.add_parser("locate", parents=[common], help="where resources are stored")
    pp.add_argument("-L", "--link", type=Path, metavar="DIR", help="symlink local copies in DIR")
    pp.add_argument("-0", "--print0", action="store_true", help="local paths, NUL-separated")
    pp.add_argument(
        "id", nargs="+", help="a resource's id, or its full URL (REGISTRY/resources/ID/)"
    )
    pp.set_defaults(func=cmd_locate)

    pp = sub.add_parser("verify", parents=[common], help="check files against the registry")
    pp.add_argument("-i", "--id", help="compare FILE with the record of this resource")
    pp.add_argument("files", nargs="+", type=Path, metavar="FILE")
    pp.set_defaults(func=cmd_verify)


__all__ = ["cmd_locate", "cmd_verify", "location_text", "register", "resource_url"]
