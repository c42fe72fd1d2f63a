"""``nbankctl locate`` and ``nbankctl verify``: where resources are stored, and
whether files are the resources the registry records (as ``nbank``'s commands).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from nbankctl.registry_cmds import registry_for, warn
from nbankctl.report import Report
from nbankd import errors
from nbankd.hashing import hash_path
from nbankd.registry.base import SLUG_RE, LocationRecord, Registry
from nbankd.transfer.sources import stored_copy

# --- verify --------------------------------------------------------------------------


def _verify_one(reg: Registry, path: Path, id: str | None) -> tuple[bool, dict[str, Any]]:
    result: dict[str, Any] = {"path": str(path)}
    if not os.path.lexists(path):
        return False, {**result, "status": "missing", "message": "no such file or directory"}
    try:
        sha1 = hash_path(path)
    except OSError as err:
        return False, {**result, "status": "unreadable", "message": err.strerror or str(err)}
    result["sha1"] = sha1
    record = None
    if id is not None:
        record = reg.get_resource(id)
        if record is None:
            return False, {**result, "status": "not-found", "message": f"no resource '{id}'"}
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
            "message": f"FAILED to match record for {record.name} (registered {record.sha1})",
        }
    matches = [r.name for r in reg.search(sha1=sha1)]
    result["matches"] = matches
    if not matches:
        return False, {**result, "status": "no-match", "message": "no matches in registry"}
    text = ", ".join(matches)
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
                print(f"{path}: {result['message']}")


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


def cmd_locate(args: argparse.Namespace, report: Report) -> None:
    with registry_for(args) as reg:
        for id in args.id:
            try:
                locations = reg.get_locations(id)
            except errors.NotFound:
                print(f"{id:<20}\t(not found)")
                warn(f"no resource '{id}' in registry {reg.url}")
                report.failed()
                continue
            if not _locate_one(args, id, locations):
                report.failed()


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
                print(f"{id:<20}\t{text}")
                found = True
        return found
    path = next((p for p in map(stored_copy, locations) if p is not None), None)
    if path is None:
        warn(f"'{id}' has no copy on this host")
        return False
    if args.print0:
        print(str(path), end="\0")
        return True
    link = Path(args.link) / path.name
    try:
        link.symlink_to(path)
    except OSError as err:
        warn(f"cannot make link {link} -> {path}: {err.strerror or err}")
        return False
    print(f"{id:<20}\t-> {link}")
    return True


# --- parser --------------------------------------------------------------------------


def register(sub: Any, common: argparse.ArgumentParser) -> None:
    """Adds ``locate`` and ``verify`` to nbankctl's sub-command parser."""
    pp = sub.add_parser("locate", parents=[common], help="where resources are stored")
    pp.add_argument("-L", "--link", type=Path, metavar="DIR", help="symlink local copies in DIR")
    pp.add_argument("-0", "--print0", action="store_true", help="local paths, NUL-separated")
    pp.add_argument("id", nargs="+")
    pp.set_defaults(func=cmd_locate)

    pp = sub.add_parser("verify", parents=[common], help="check files against the registry")
    pp.add_argument("-i", "--id", help="compare FILE with the record of this resource")
    pp.add_argument("files", nargs="+", type=Path, metavar="FILE")
    pp.set_defaults(func=cmd_verify)


__all__ = ["cmd_locate", "cmd_verify", "location_text", "register"]
