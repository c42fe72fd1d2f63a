"""Human-readable output for the daemon commands (aligned tables), and ``--json``.

Every function takes a command's result (the reply's JSON) and returns text.
File names may hold undecodable bytes or control characters: they go through
:func:`~nbankd.names.printable` so one entry is always one line.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from nbankd.names import printable, without_controls
from nbankd.timefmt import human_duration, iso


def write(text: str, stream: Any = None) -> None:
    """Writes ``text`` and a newline; characters the stream cannot encode are escaped."""
    stream = stream or sys.stdout
    encoding = getattr(stream, "encoding", None) or "utf-8"
    buffer = getattr(stream, "buffer", None)
    data = (text + "\n").encode(encoding, "backslashreplace")
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode(encoding))


def to_json(result: Any) -> str:
    """``--json`` output: the result as indented JSON (lone surrogates stay escaped)."""
    return json.dumps(result, indent=2, ensure_ascii=False, sort_keys=True)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces; None shows as ``-``."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, v in enumerate(row):
            widths[i] = max(widths[i], len(v))
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return printable(str(value))


def ago(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "never"
    return f"{human_duration((now or time.time()) - t)} ago"


def when(iso: str | None) -> str:
    return iso.replace("T", " ").replace("+00:00", "Z") if iso else "-"


# --- status ----------------------------------------------------------------------


def status(result: dict[str, Any]) -> str:
    degraded = result.get("degraded") or []
    head = (
        f"nbankd {result.get('version')} (pid {result.get('pid')}), "
        f"up {human_duration(result.get('uptime') or 0)}: "
        + ("DEGRADED" if degraded else "healthy")
    )
    reg = result.get("registry") or {}
    lines = [head, f"registry: {reg.get('backend')} {reg.get('url')}"]
    if reg.get("problem"):
        lines[-1] += f" (problem: {printable(str(reg['problem']))})"
    last = result.get("last_deposit")
    last_text = f"{last['id']} at {when(iso(last.get('time')))}" if last else "none"
    lines.append(f"queue: {result.get('queue', 0)} item(s); last deposit: {last_text}")
    err = result.get("last_error")
    if err:
        lines.append(f"last error: {err.get('code', '')} {printable(str(err.get('error')))}")
    lines.append(audit_line(result))
    rows = []
    for ib in result.get("inboxes", []):
        rows.append(
            [
                ib["path"],
                ib.get("archive"),
                _watch_cell(ib),
                ib.get("paused"),
                ib.get("in_flight"),
                ib.get("deposited"),
                ib.get("in_rejected_folder", ib.get("rejected")),
                len(ib.get("stalled") or ()),
                ago(ib.get("last_scan")),
            ]
        )
    lines += [
        "",
        table(
            [
                "INBOX",
                "ARCHIVE",
                "WATCH",
                "PAUSED",
                "IN FLIGHT",
                "DEPOSITED",
                "REJECTED",
                "STALLED",
                "LAST SCAN",
            ],
            rows,
        ),
    ]
    for ib in result.get("inboxes", []):
        if ib.get("archive_problem"):
            problem = printable(str(ib["archive_problem"]))  # may quote a lab member's nbank.json
            lines.append(f"  {printable(ib['path'])}: archive problem: {problem}")
        unowned = ib.get("unowned_work_files") or []
        if unowned:
            shown = ", ".join(printable(n) for n in unowned[:5])
            more = f" and {len(unowned) - 5} more" if len(unowned) > 5 else ""
            lines.append(f"  {printable(ib['path'])}: not owned in .nbank/: {shown}{more}")
    if degraded:
        lines += ["", "degraded:"] + [f"  - {printable(str(d))}" for d in degraded]
    return "\n".join(lines)


def _watch_cell(inbox: dict[str, Any]) -> str:
    """The WATCH column: the configured mode, and what happens when that differs."""
    wanted, actual = inbox.get("watch"), inbox.get("watch_mode")
    if actual is None or wanted == "poll" or actual == "inotify":
        return str(wanted)
    return f"{wanted} (polling)"


def audit_line(result: dict[str, Any]) -> str:
    """status's audit line: disabled, or the last result, the next run, and one under way."""
    disabled = result.get("audit_disabled")
    if disabled:
        return f"audit: DISABLED ({printable(str(disabled))})"
    last = result.get("last_audit")
    if not last:
        text = "audit: last never"
    else:
        if last.get("error") and not last.get("findings"):
            verdict = f"FAILED ({printable(str(last['error']))})"
        elif last.get("ok"):
            verdict = "clean"
        else:
            verdict = f"{_problem_count(last)} PROBLEM(S)"
        kind = "full" if last.get("full") else "incremental"
        text = f"audit: last {when(last.get('finished'))} {kind}, {verdict}"
    text += (
        f"; next {when(result.get('next_audit')) if result.get('next_audit') else 'not scheduled'}"
    )
    running = result.get("audit_running")
    if running:
        text += f"; running since {when(running.get('since'))}"
        if running.get("planned"):
            text += f" ({running.get('hashed', 0)}/{running['planned']} read)"
    return text


def _problem_count(last: dict[str, Any]) -> int:
    """Findings plus archives that could not be checked (an unmounted archive is a
    problem with no finding); older daemons send only ``findings`` and ``problems``."""
    if "problem_count" in last:
        return int(last["problem_count"])
    errors = sum(1 for p in last.get("problems") or () if "finding(s)" not in str(p))
    return int(last.get("findings", 0)) + errors


# --- queue, history ----------------------------------------------------------------


def queue(result: dict[str, Any]) -> str:
    items = result.get("items") or []
    pending = result.get("pending") or []
    lines: list[str] = []
    if items:
        rows = [
            [
                i["token"][:8],
                i["inbox"],
                i["relpath"],
                i["state"],
                i["status"],
                i["attempts"],
                when(i.get("next_attempt")) if i.get("next_attempt") else None,
                f"{i['error_code']}: {i['error']}" if i.get("error_code") else None,
            ]
            for i in items
        ]
        lines.append(
            table(
                ["TOKEN", "INBOX", "PATH", "STATE", "STATUS", "ATTEMPTS", "NEXT", "LAST ERROR"],
                rows,
            )
        )
    else:
        lines.append("no deposits in flight")
    if pending:
        lines += [
            "",
            "waiting in inboxes:",
            table(
                ["INBOX", "PATH", "STATE", "REASON"],
                [[p["inbox"], p["relpath"], p["state"], p["reason"]] for p in pending],
            ),
        ]
    if result.get("truncated"):
        counts = result.get("counts") or {}
        total_items = sum((counts.get("items") or {}).values())
        total_pending = sum((counts.get("pending") or {}).values())
        lines += [
            "",
            f"(listed {len(items)} of {total_items} in flight and {len(pending)} of "
            f"{total_pending} waiting; --json counts them by state)",
        ]
    if result.get("fresh") is False:
        lines += ["", f"(inboxes as last scanned, {when(result.get('scanned'))}: a scan is slow)"]
    return "\n".join(lines)


def history(result: dict[str, Any]) -> str:
    receipts = result.get("receipts") or []
    if not receipts:
        return "no deposits match"
    rows = [
        [when(r.get("time")), r.get("id"), r.get("size"), r.get("source"), r.get("url")]
        for r in receipts
    ]
    text = table(["TIME", "ID", "SIZE", "SOURCE", "URL"], rows)
    if result.get("matched", len(receipts)) > len(receipts):
        text += f"\n({len(receipts)} of {result['matched']} shown; use --limit)"
    return text


# --- explain, requeue, and the small ones -------------------------------------------


_EXPLAIN_FACTS = (
    ("inbox", "inbox"),
    ("id", "identifier"),
    ("url", "url"),
    ("archive_file", "stored as"),
    ("time", "time"),
    ("rejected_path", "rejected file"),
    ("original_path", "original path"),
    ("pattern", "pattern"),
    ("belongs_to", "belongs to"),
)


def explain(result: dict[str, Any]) -> str:
    """explain's answer; every text in it through :func:`printable` (a reason file's
    fields are written by whoever writes the inbox)."""

    def shown(value: Any) -> str:
        return printable(str(value))

    lines = [
        f"{shown(result['path'])}: {shown(result['state'])}",
        # its names are quoted already (requeue's command to paste among them)
        f"  {without_controls(str(result.get('message', '')))}",
    ]
    for key, label in _EXPLAIN_FACTS:
        if result.get(key):
            lines.append(f"  {label}: {shown(result[key])}")
    reason = result.get("reason")
    if isinstance(reason, dict):
        lines.append(f"  reason: {shown(reason.get('code'))}: {shown(reason.get('message'))}")
        if reason.get("hint"):
            lines.append(f"  hint: {shown(reason['hint'])}")
    item = result.get("item")
    if isinstance(item, dict) and result.get("state") == "in-flight":
        lines.append(
            f"  item {shown(item.get('token'))}: {shown(item.get('state'))}, "
            f"attempts {shown(item.get('attempts'))}"
        )
    previous = result.get("previous")
    if isinstance(previous, dict):
        earlier = f"{shown(previous.get('state'))} {shown(previous.get('id') or '')}"
        lines.append(f"  earlier: {earlier}".rstrip())
    return "\n".join(lines)


def requeue(result: dict[str, Any]) -> tuple[str, str]:
    """(stdout text, stderr text)."""
    done = [
        f"requeued {printable(r['rejected_path'])} -> {printable(r['requeued'])}"
        for r in result.get("requeued", [])
    ]
    failed = [f"not requeued: {printable(f['message'])}" for f in result.get("failed", [])]
    if not done and not failed:
        done = ["nothing to requeue"]
    return "\n".join(done), "\n".join(failed)


def paused(result: dict[str, Any], verb: str) -> str:
    lines = [f"{verb}: {printable(k)}" for k in result.get("changed", [])]
    states = result.get("paused") or {}
    lines += [f"  {printable(k)}: {'paused' if v else 'running'}" for k, v in states.items()]
    return "\n".join(lines)


def rescan(result: dict[str, Any]) -> str:
    return "\n".join(f"rescan requested: {printable(k)}" for k in result.get("rescan", []))


def reload(result: dict[str, Any]) -> str:
    state = "reloaded" if result.get("done") else "reload still running"
    lines = [f"configuration {state}: {result.get('source')} ({result.get('inboxes')} inboxes)"]
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)


# --- audit ------------------------------------------------------------------------


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def audit(report: dict[str, Any]) -> str:
    """An audit report: per archive its numbers, findings and nbank's summary line."""
    kind = "full" if report.get("full") else "incremental"
    archives = report.get("archives") or []
    n = report.get("findings", 0) + sum(1 for a in archives if a.get("error"))
    if report.get("ok"):
        verdict = "clean"
    elif report.get("registry_outage"):
        verdict = "registry unreachable"
    else:
        verdict = f"{n} problem(s)" if n else "FAILED"
    lines = [f"audit {report.get('id')} ({kind}, {report.get('trigger')}): {verdict}"]
    if report.get("error"):
        lines.append(f"error: {printable(str(report['error']))}")
    for a in archives:
        head = f"archive {a.get('name')} ({printable(str(a.get('path')))})"
        if a.get("error"):
            lines.append(f"{head}: {a.get('state')}: {printable(str(a['error']))}")
            continue
        lines.append(
            f"{head}: {a.get('stored', 0)} stored, {a.get('registered_after', 0)} registered, "
            f"{a.get('hashed', 0)} read ({_size(int(a.get('bytes_hashed', 0)))})"
            + (f", {a['skipped_in_flight']} in flight" if a.get("skipped_in_flight") else "")
        )
        for f in a.get("findings") or []:
            who = " : ".join(str(x) for x in (f.get("resource"), f.get("path")) if x is not None)
            detail = f" ({f['detail']})" if f.get("detail") else ""
            lines.append(f"  {printable(who)} - {f.get('kind')}{printable(detail)}")
        counts = a.get("counts") or {}
        summary = [f"Resources in registry: {a.get('registered_after', 0)}"]
        summary += [f"{label}: {count}" for label, count in counts.items()]
        lines.append("  " + "; ".join(summary))
    homeless = report.get("registry_findings") or []
    if homeless:
        lines.append(f"registry: {len(homeless)} resource(s) with no location")
        lines += [f"  {printable(str(f.get('resource')))} - {f.get('kind')}" for f in homeless]
    elsewhere = 0
    for o in report.get("not_audited") or []:
        if o.get("scheme") == "neurobank" and o.get("accessibility") != "offline":
            elsewhere += 1  # another daemon's archive: counted, not listed
            continue
        lines.append(
            f"not audited: {o.get('name')} ({o.get('scheme')}:{printable(str(o.get('root')))}): "
            f"{o.get('reason')}"
        )
    if elsewhere:
        lines.append(f"not audited: {elsewhere} other archive(s) not configured in this daemon")
    if report.get("report"):
        lines.append(f"report: {printable(str(report['report']))}")
    return "\n".join(lines)


def audit_progress(state: dict[str, Any]) -> str:
    """One line while nbankctl waits for an audit."""
    progress = state.get("progress") or {}
    text = f"audit {state.get('state')}"
    if progress.get("archive"):
        text += f": {progress['archive']} {progress.get('phase', '')}"
    if progress.get("planned"):
        text += f" {progress.get('hashed', 0)}/{progress['planned']}"
    return text
