"""Why a path is, or is not, being deposited (``nbankctl explain FILE``).

:func:`explain` looks at one path and answers with a JSON-safe dict: a stable
``state`` (see :data:`STATES`), a sentence for people (``message``) and the
facts behind it. It accepts a path in an inbox, in an inbox's rejected folder
(the rejected file, its ``.reason``, sidecar or marker), or the original path
of an input that has since been deposited or rejected.

It only reads: the journal, the configuration, what the daemon's last scan
concluded (settle verdicts, skipped entries) and ``lstat`` of the path, reached
from the inbox's folder without following a link (a linked folder on the way is
answered as such, whatever lies beyond it). A ``.reason`` file on disk speaks only
for an input the journal knows nothing of, and never for a path outside its folder.
"""

from __future__ import annotations

import fnmatch
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from nbankd.archive.layout import stored_file
from nbankd.config import InboxConfig
from nbankd.daemon.explain_look import Look, exists_below, look, read_reason_below
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State
from nbankd.deposit.rejection import reason_name
from nbankd.filekind import FileKind
from nbankd.names import MARKER_SUFFIX, REASON_SUFFIX, SIDECAR_SUFFIXES, WORK_DIR_NAME, printable
from nbankd.shellwords import requeue_command
from nbankd.timefmt import iso
from nbankd.watch import settle
from nbankd.watch.scan import EntryKind, owner_of

STATES = (
    "not-in-inbox",  # the path is in no configured inbox
    "inbox",  # the path is an inbox folder itself
    "internal",  # nbankd's work folder (.nbank) or something in it
    "ignored",  # matches an ignore pattern
    "not-watched",  # in a sub-folder of a non-recursive inbox
    "folder",  # a plain folder (files mode): its files are inputs one by one
    "sidecar",  # NAME.nbank.yaml|json: deposited or rejected with NAME
    "marker",  # NAME.done: NAME is ready once it has settled
    "unsupported",  # symlink (or a linked folder on the way), hard link, FIFO, socket, device
    "settling",  # changed recently; waiting until unchanged for settle_seconds
    "waiting-for-marker",  # settled; waiting for NAME.done
    "stalled",  # still changing after stall_after
    "ready",  # will be claimed by the next scan
    "paused",  # ready, but its inbox is paused
    "waiting-for-archive",  # ready, but the archive is not usable right now
    "not-seen",  # present but not seen by a scan yet
    "in-flight",  # a deposit item is working on it
    "deposited",  # in the archive; source removed
    "rejected",  # in the rejected folder with a reason
    "in-rejected-folder",  # in the rejected folder, but nothing records why
    "not-found",  # nothing there and nothing journaled
    "hidden",  # a folder on the way cannot be searched by the daemon's user
)


class InboxView(Protocol):
    """What the daemon knows about one inbox (``view.InboxState`` fits)."""

    config: InboxConfig
    paused: bool
    verdicts: dict[str, Any]
    skipped: dict[str, str]
    stalled: tuple[str, ...]
    archive_problem: str | None
    placement_problem: str | None


class JournalView(Protocol):
    def active_for(self, inbox: str, relpath: bytes) -> Item | None: ...

    def latest_for(self, inbox: str, relpath: bytes) -> Item | None: ...

    def find_rejected(self, inbox: str, rejected_relpath: bytes) -> Item | None: ...


def locate(
    path: str | os.PathLike[str], configs: Mapping[str, InboxConfig]
) -> tuple[str, str] | None:
    """``(inbox key, relpath)`` for a path inside a configured inbox (symlinks tried last)."""
    text = os.path.abspath(os.fspath(path))
    for candidate in (text, os.path.realpath(text)):
        for key, config in configs.items():
            for root in (str(config.path), os.path.realpath(config.path)):
                if candidate == root:
                    return key, ""
                if candidate.startswith(root.rstrip("/") + "/"):
                    return key, os.path.relpath(candidate, root)
    return None


def in_rejected(config: InboxConfig, relpath: str) -> tuple[Path, str] | None:
    """(the rejected folder, absolute, and the path relative to it) when ``relpath``
    lies inside the inbox's rejected folder or an earlier one still there (after
    ``rejected_dir`` changed); the relative path is ``""`` for the folder itself."""
    found = config.rejected_dir_of(relpath)
    if found is None:
        return None
    return config.path / found[0], found[1]


def rejected_folder_for(config: InboxConfig, item: Item) -> Path:
    """The rejected folder, current or earlier, that ``item``'s rejection went to (as
    its journaled reason says), else the current one."""
    try:
        where = json.loads(item.reason_json or "{}").get("rejected_path")
    except (ValueError, AttributeError):
        where = None
    if isinstance(where, str) and item.rejected_relpath:
        parts = [p for p in os.fsdecode(item.rejected_relpath).split("/") if p]
        folder = Path(where)
        for _ in parts:
            folder = folder.parent
        for rel in config.rejected_dirs:
            if folder == config.path / rel:
                return folder
    return config.rejected_path


def _went_elsewhere(item: Item, path: Path) -> bool:
    """Whether ``item``'s journaled reason puts it at another path than ``path``: the
    same name in another rejected folder (``rejected_dir`` changed since)."""
    try:
        where = json.loads(item.reason_json or "{}").get("rejected_path")
    except (ValueError, AttributeError):
        return False
    return isinstance(where, str) and where != str(path)


def shortened_reason_target(rrel: str, reason: Mapping[str, Any]) -> str | None:
    """For the reason file ``rrel`` (relative to its rejected folder) whose name was
    shortened, the input it explains (relative to the same folder): the last name of
    the ``rejected_path`` it holds, taken only when that input's reason file would be
    called exactly ``rrel``. Anything else the file says (a path elsewhere, another
    folder) is not taken: whoever writes the inbox can write such a file."""
    where = reason.get("rejected_path")
    if not isinstance(where, str):
        return None
    sub, name = os.path.split(rrel)
    base = os.path.basename(where)
    if base in ("", ".", "..") or "\x00" in base:
        return None
    try:
        if reason_name(os.fsencode(base)) != os.fsencode(name):
            return None
    except UnicodeEncodeError:  # a lone surrogate: no file's name
        return None
    return os.path.join(sub, base)


def rejected_item(
    key: str,
    config: InboxConfig,
    rrel: str,
    journal: JournalView,
    folder: Path | None = None,
) -> tuple[str, Item | None, dict[str, Any] | None]:
    """For a path in a rejected folder (``folder``, absolute; the current one by
    default): the rejected input's relpath, item and reason.

    ``rrel`` may name the input itself, its ``.reason`` file, sidecar or marker. An
    item whose rejection went to the same name in another rejected folder is not
    this input's.
    """
    folder = config.rejected_path if folder is None else folder

    def find(cand: str) -> Item | None:
        item = journal.find_rejected(key, os.fsencode(cand))
        return None if item is None or _went_elsewhere(item, folder / cand) else item

    candidates = [rrel]
    for suffix in (REASON_SUFFIX, *SIDECAR_SUFFIXES, MARKER_SUFFIX):
        if rrel.endswith(suffix) and len(rrel) > len(suffix):
            candidates.append(rrel[: -len(suffix)])
    for cand in candidates:
        item = find(cand)
        if item is not None:
            return cand, item, reason_for(config, cand, item, folder)
    if rrel.endswith(REASON_SUFFIX):  # a shortened reason name: the file says which
        on_disk = _read_reason_in(config, folder, rrel)
        cand = shortened_reason_target(rrel, on_disk) if on_disk else None
        if cand is not None:
            item = find(cand)
            if item is not None:
                return cand, item, reason_for(config, cand, item, folder)
            return cand, None, on_disk
    reason = reason_for(config, rrel, None, folder)
    return rrel, None, reason


def reason_for(
    config: InboxConfig, rrel: str, item: Item | None, folder: Path | None = None
) -> dict[str, Any] | None:
    """The reason the journal kept for ``item``, else the ``NAME.reason`` on disk (in
    ``folder``, the current rejected folder by default): whoever writes the inbox can
    write that file too, so it only speaks for an input the journal knows nothing of."""
    if item is not None and item.reason_json:
        try:
            data = json.loads(item.reason_json)
        except ValueError:
            data = None
        if isinstance(data, dict):
            return data
    folder = config.rejected_path if folder is None else folder
    sub, base = os.path.split(os.fsencode(rrel))
    return _read_reason_in(config, folder, os.fsdecode(os.path.join(sub, reason_name(base))))


def _read_reason_in(config: InboxConfig, folder: Path, rel: str) -> dict[str, Any] | None:
    """The reason file ``rel`` of the rejected folder ``folder``, read from the inbox
    down without following a link (:func:`read_reason_below`): a folder on the way
    swapped for a link meanwhile is not gone through."""
    try:
        inside = folder.relative_to(config.path)
    except ValueError:  # not below the inbox (never so): walked from the folder itself
        return read_reason_below(folder, rel)
    return read_reason_below(config.path, f"{inside.as_posix()}/{rel}")


def _item_facts(item: Item, now: float) -> dict[str, Any]:
    return {
        "token": item.token,
        "state": str(item.state),
        "attempts": item.attempts,
        "next_attempt": iso(item.not_before) if item.not_before > now else None,
        "error_code": item.error_code,
        "error": item.error_message,
        "hint": item.error_hint,
        "id": item.name,
        "created": iso(item.created),
        "updated": iso(item.updated),
    }


def _deposited(item: Item) -> dict[str, Any]:
    stored = None
    if item.name and item.target_name:
        stored = str(stored_file(Path(item.archive_path), item.name, item.target_name))
    return {
        "id": item.name,
        "url": item.url,
        "sha1": item.sha1,
        "size": item.size,
        "archive": item.archive,
        "archive_file": stored,
        "time": iso(item.finished),
    }


def _rejected_answer(
    out: dict[str, Any],
    config: InboxConfig,
    rrel: str,
    item: Item | None,
    reason: Any,
    config_source: Path | None,
    folder: Path | None = None,
) -> dict[str, Any]:
    folder = config.rejected_path if folder is None else folder
    rejected_path = str(folder / rrel)
    present = exists_below(config.path, folder / rrel)
    original = (reason or {}).get("original_path")
    if item is not None:
        original = str(config.path / item.relpath_str)
    code = (reason or {}).get("code") or (item.error_code if item else None) or "rejected"
    message = (reason or {}).get("message") or (item.error_message if item else "") or ""
    out.update(
        state="rejected",
        reason=reason,
        rejected_path=rejected_path,
        original_path=original,
        present=present,
    )
    if item is not None:
        out["item"] = {"token": item.token, "finished": iso(item.finished)}
    if present:
        out["requeue"] = requeue_command(rejected_path, config_source)
        out["message"] = (
            f"rejected ({code}): {message}; the input is at {printable(rejected_path)}"
            f" -- fix the cause, then: {out['requeue']}"
        )
    else:
        out["message"] = (
            f"was rejected ({code}): {message}; it is no longer in the rejected folder "
            "(requeued or removed)"
        )
    return out


def _present(
    out: dict[str, Any], view: InboxView, rel: str, path: Path, st: os.stat_result
) -> dict[str, Any]:
    """A path that exists in the inbox proper (``st``, its lstat) and no item is
    working on."""
    config = view.config
    patterns = [p for p in config.ignore if _pattern_hits(rel, p)]
    if patterns:
        out.update(state="ignored", pattern=patterns[0])
        out["message"] = f"ignored: matches the inbox's ignore pattern {patterns[0]!r}"
        return out
    top, _, below = rel.partition("/")
    if config.folder_resources and below:
        out.update(state="folder", resource=str(config.path / top))
        out["message"] = f"part of the folder resource {printable(top)}; explain that folder"
        return out
    if below and not config.recursive and config.directories == "files":
        out.update(state="not-watched")
        out["message"] = "in a sub-folder, and this inbox is not recursive"
        return out
    owner = owner_of(path.name, markers=config.ready == "marker")
    if owner is not None:
        kind, name = owner
        state = "sidecar" if kind is EntryKind.SIDECAR else "marker"
        out.update(state=state, belongs_to=str(path.with_name(name)))
        what = "deposited or rejected" if state == "sidecar" else "ready once settled"
        out["message"] = f"{state} of {printable(name)}: it is {what} with it"
        return out
    unsafe = _unsafe_kind(st)
    if unsafe is not None or rel in view.skipped:
        what = unsafe or view.skipped[rel]
        out.update(state="unsupported", kind=what)
        out["message"] = (
            f"unsupported: a {what}; nbankd never follows, reads or archives it and moves it "
            "to the rejected folder once it stops changing"
        )
        return out
    if stat.S_ISDIR(st.st_mode) and config.directories == "files":
        out.update(state="folder")
        out["message"] = "a folder: each file in it is deposited on its own"
        return out
    verdict = view.verdicts.get(rel)
    if verdict is None:
        out.update(state="not-seen")
        out["message"] = (
            "not seen by a scan yet; the next scan picks it up (nbankctl rescan to scan now)"
        )
        return out
    out["verdict"] = {"state": verdict.state.value, "reason": verdict.reason}
    out["seconds_left"] = verdict.seconds_left
    if verdict.state is settle.State.READY:
        if view.paused:
            out.update(state="paused", message="ready, but the inbox is paused (nbankctl resume)")
        elif view.archive_problem:
            out.update(
                state="waiting-for-archive",
                message=f"ready, waiting for the archive: {printable(view.archive_problem)}",
            )
        elif view.placement_problem:
            out.update(
                state="waiting-for-archive",
                message=f"ready, waiting: {printable(view.placement_problem)}",
            )
        else:
            out.update(state="ready", message="ready: the next scan claims it")
        return out
    out.update(state=verdict.state.value, message=verdict.reason)
    return out


def _pattern_hits(rel: str, pattern: str) -> bool:
    if "/" in pattern:
        return fnmatch.fnmatchcase(rel, pattern)
    return any(fnmatch.fnmatchcase(part, pattern) for part in rel.split("/"))


def _unsafe_kind(st: os.stat_result) -> str | None:
    kind = FileKind.of(st)
    if not kind.unsafe:
        return None
    if kind is FileKind.HARDLINK:
        return "hard link (the file has other names)"
    return kind.noun


def _linked(out: dict[str, Any], link: Path) -> dict[str, Any]:
    """The answer for a path beyond a linked folder: the same whatever lies there."""
    out.update(state="unsupported", kind="symbolic link", link=str(link))
    out["message"] = (
        f"unsupported: {printable(str(link))} is a symbolic link; nbankd never follows "
        "links, so nothing through it is deposited or looked at"
    )
    return out


def explain(
    path: str | os.PathLike[str],
    inboxes: Mapping[str, InboxView],
    journal: JournalView,
    *,
    now: float,
    config_source: Path | None = None,
) -> dict[str, Any]:
    """Explains one path; see the module docstring and :data:`STATES`. Requeue
    commands name ``config_source`` (the daemon's configuration file) with ``-c``."""
    text = os.path.abspath(os.fspath(path))
    out: dict[str, Any] = {"path": text, "inbox": None, "relpath": None}
    where = locate(text, {k: v.config for k, v in inboxes.items()})
    if where is None:
        names = ", ".join(sorted(inboxes)) or "none"
        out.update(state="not-in-inbox", message=f"not in any inbox (inboxes: {names})")
        return out
    key, rel = where
    view = inboxes[key]
    config = view.config
    out.update(inbox=key, relpath=rel)
    if rel == "":
        out.update(state="inbox", paused=view.paused, message="an inbox folder")
        return out
    found = in_rejected(config, rel)
    if found is None and rel.split("/")[0] == WORK_DIR_NAME:
        out.update(state="internal", message="nbankd's work folder: in-progress files")
        return out
    seen: Look = look(config.path, rel)  # lstat of the path, never through a link
    if seen.link is not None:
        return _linked(out, seen.link)
    if found is not None:
        folder, rrel = found
        earlier = folder != config.rejected_path
        if rrel == "":
            out.update(state="internal", message="the inbox's rejected folder")
            if earlier:
                out["message"] = (
                    f"an earlier rejected folder of the inbox (rejected_dir is now "
                    f"{config.rejected_dir}): nbankd never deposits what it holds; requeue "
                    "or move out what is in it, then remove it to have it scanned again"
                )
            return out
        input_rel, item, reason = rejected_item(key, config, rrel, journal, folder)
        if item is None and reason is None:
            present = seen.st is not None
            out.update(state="in-rejected-folder" if present else "not-found")
            out["message"] = (
                "in the rejected folder, but no reason is recorded for it"
                if present
                else "nothing there, and nothing journaled under that name"
            )
            return out
        return _rejected_answer(out, config, input_rel, item, reason, config_source, folder)
    relb = os.fsencode(rel)
    active = journal.active_for(key, relb)
    if active is not None:
        facts = _item_facts(active, now)
        out.update(state="in-flight", item=facts)
        msg = f"being deposited: {facts['state']}, attempt {active.attempts}"
        if active.error_code:
            msg += f"; last error ({active.error_code}): {active.error_message}"
            if active.error_hint:
                msg += f" (to fix: {active.error_hint})"
        if facts["next_attempt"]:
            msg += f"; next attempt at {facts['next_attempt']}"
        out["message"] = msg
        return out
    latest = journal.latest_for(key, relb)
    if seen.st is not None:
        out = _present(out, view, rel, Path(text), seen.st)
        if latest is not None:
            out["previous"] = {"state": str(latest.state), **_deposited(latest)}
        return out
    blocked = seen.blocked if latest is None else None
    if blocked is not None:
        out.update(
            state="hidden",
            message=f"the daemon's user cannot look inside {blocked[0]} ({blocked[1]}), "
            "so nothing there can be deposited; give that user read and search (x) "
            "permission on it",
        )
        return out
    if latest is None:
        out.update(state="not-found", message="nothing there, and nothing journaled for it")
        return out
    if latest.state is State.DONE:
        facts = _deposited(latest)
        out.update(state="deposited", **facts)
        out["message"] = f"deposited as {facts['id']} ({facts['url']}) at {facts['time']}"
        return out
    if latest.state is State.REJECTED and latest.rejected_relpath is not None:
        rrel = os.fsdecode(latest.rejected_relpath)
        folder = rejected_folder_for(config, latest)
        reason = reason_for(config, rrel, latest, folder)
        return _rejected_answer(out, config, rrel, latest, reason, config_source, folder)
    out.update(state="not-found", previous={"state": str(latest.state), "token": latest.token})
    out["message"] = {
        State.RETURNED: "nothing there now; it was put back (it changed while being "
        "deposited, or its archive left the configuration before anything was registered)",
        State.CANCELLED: "nothing there now; its claim was cancelled: "
        + (latest.error_message or "another process took it before it was claimed"),
    }.get(latest.state, f"nothing there now (last item: {latest.state})")
    return out


__all__ = ["STATES", "InboxView", "JournalView", "explain", "locate", "rejected_item"]
