"""What ``nbankctl deposit`` says: a line per input on stderr (as nbank logs), the
``-j`` records on stdout, and the failures it records for the exit status; the same
whether the deposit ran here or in the daemon."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from nbankctl.report import Report
from nbankd.deposit.lifecycle import State
from nbankd.names import without_controls

#: seconds a step that fails for a while (registry unreachable) is retried
DEFAULT_WAIT = 30.0


def say(args: argparse.Namespace, text: str) -> None:
    """A progress line: on stderr, as nbank logs it (stdout carries only -j records);
    control characters of a file's name or a registry's text shown as text."""
    print(without_controls(text), file=sys.stderr)


def emit(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json_out or args.json:
        print(json.dumps(record, default=str), flush=True)


def _gone(source: str) -> str:
    """What to tell of an input gone from its folder before this deposit took it."""
    stem = Path(source).stem
    return (
        f"it is no longer in its folder: another deposit (someone else's?) may have "
        f"stored it meanwhile; `nbankctl search {stem}` (or `nbankctl search -H SHA1`, "
        "given a copy's SHA-1) finds it if so"
    )


def report_outcomes(
    args: argparse.Namespace, report: Report, described: list[dict[str, Any]]
) -> None:
    """Says how each input ended (stderr; -j lines on stdout) and records failures."""
    unreachable = False
    for d in described:
        record, state = d["record"], d["state"]
        source = record["source"]
        if state == State.DONE and record.get("already"):
            say(
                args,
                f"{source}: already deposited as {record['id']} ({d['url']}): the archive "
                "holds these bytes under that id; this copy was removed",
            )
        elif state == State.DONE:
            say(args, f"{source}: deposited as {record['id']} ({d['url']})")
        elif "id" in record:  # recorded, then changed by a writer: back in place
            say(args, f"{source}: deposited as {record['id']} ({d['url']}), but {record['note']}")
        elif d.get("pending") and d["held"] is None:
            if os.path.lexists(source):
                then = "it is still there, and the next `nbankctl deposit` (or nbankd) tries again"
            elif state != State.CLAIMING:  # taken: on its way into the archive
                then = "the next `nbankctl deposit` (or nbankd) finishes it"
            else:  # never taken, and gone from its folder
                then = _gone(source)
            say(args, f"{source}: not deposited yet ({state}: {record['error']}); {then}")
            unreachable |= d["code"] in ("registry-unavailable", "auth")
        elif d["held"] is not None:
            say(
                args,
                f"{source}: unfinished ({state}: {record['error']}); kept safe as "
                f"{d['held']}; the next `nbankctl deposit` finishes it",
            )
            unreachable |= d["code"] in ("registry-unavailable", "auth")
        else:
            say(args, f"{source}: not deposited: {record['error']}")
            if state == State.CANCELLED and not os.path.lexists(source):
                say(args, f"  {_gone(source)}")
            if d["where"] is not None and d["where"] != source:
                record = {**record, "kept_at": d["where"]}
                say(
                    args,
                    f"  kept at {d['where']}: it could not be put back where it was (its "
                    "name taken meanwhile, or its folder refusing the move); move it back "
                    "by hand, under another name if need be",
                )
        if state != State.DONE:
            report.failed()
        emit(args, record)
    if unreachable:
        report.unreachable()


__all__ = ["DEFAULT_WAIT", "emit", "report_outcomes", "say"]
