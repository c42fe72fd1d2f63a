"""Moving a claimed input to the rejected folder (with its reason), or back to the inbox.

Both moves stay on the inbox's filesystem and never overwrite: files move with
``link()`` + ``unlink()``, folders with ``renameat2(RENAME_NOREPLACE)``. The
chosen destination is journaled before anything is written, so replaying the
step after a crash finishes the same move instead of starting another.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from nbankd.archive import fsops
from nbankd.deposit import crashpoints
from nbankd.deposit.journal import Item
from nbankd.deposit.spec import InboxSpec

REASON_SUFFIX = ".reason"
NAME_MAX = 255


def reason_name(basename: bytes) -> bytes:
    """``NAME.reason``, with NAME shortened when the whole would not fit in 255 bytes."""
    suffix = REASON_SUFFIX.encode()
    if len(basename) + len(suffix) <= NAME_MAX:
        return basename + suffix
    keep = NAME_MAX - len(suffix) - 9
    digest = hashlib.sha1(basename).hexdigest()[:8]
    head = basename[:keep]
    try:
        basename.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        head = head.decode("utf-8", "ignore").encode()  # never split a character
    return head + b"~" + digest.encode() + suffix


def _free_name(folder: Path, basename: bytes) -> bytes:
    """``basename``, or ``stem~N.ext`` for the first N that names nothing in ``folder``."""
    candidate = basename
    stem, dot, ext = basename.rpartition(b".") if b"." in basename[1:] else (basename, b"", b"")
    n = 1
    while os.path.lexists(folder / os.fsdecode(candidate)) or os.path.lexists(
        folder / os.fsdecode(reason_name(candidate))
    ):
        candidate = stem + b"~%d" % n + dot + ext
        if len(candidate) > NAME_MAX:
            candidate = candidate[-NAME_MAX:]
        n += 1
    return candidate


def write_file_atomic(path: Path, data: bytes) -> None:
    """Writes ``path`` whole or not at all: temp file in the same folder, fsync, rename."""
    tmp = path.with_name(f".{path.name[:200]}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)  # our own reason file: replacing an earlier attempt's is intended
    fsops.fsync_dir(path.parent)


def _move_no_replace(src: Path, dst: Path) -> None:
    """Moves a file or folder to ``dst`` without ever replacing something there."""
    if os.path.lexists(dst) and not os.path.lexists(src):
        return  # done by an earlier attempt
    fsops.move_noreplace(src, dst)


def move_to_rejected(
    spec: InboxSpec,
    item: Item,
    *,
    work: Path,
    sidecar_work: Path | None,
    now: float,
    save: Callable[[Item], Item],
) -> Item:
    """Writes ``NAME.reason`` then moves the input (and sidecar, marker) to rejected_dir."""
    rel = item.relpath
    sub = os.path.dirname(rel)
    folder = spec.rejected_dir / os.fsdecode(sub)
    folder.mkdir(parents=True, exist_ok=True)
    if item.rejected_relpath is None:
        chosen = _free_name(folder, os.path.basename(rel))
        item = save(replace(item, rejected_relpath=os.path.join(sub, chosen)))
    assert item.rejected_relpath is not None
    dest_name = os.path.basename(item.rejected_relpath)
    dest = folder / os.fsdecode(dest_name)
    reason = json.loads(item.reason_json or "{}")
    reason.update(
        {
            "code": reason.get("code") or item.error_code or "rejected",
            "message": reason.get("message") or item.error_message or "",
            "hint": reason.get("hint") or "",
            "time": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
            "sha1": item.sha1,
            "original_path": str(spec.path / item.relpath_str),
            "original_name": os.fsdecode(os.path.basename(rel)),
            "rejected_path": str(dest),
            "identifier": item.name,
            "requeue": f"nbankctl requeue {dest}",
        }
    )
    reason_path = folder / os.fsdecode(reason_name(dest_name))
    write_file_atomic(
        reason_path, (json.dumps(reason, indent=2, ensure_ascii=False) + "\n").encode()
    )
    crashpoints.reached("after-reject-reason")
    if os.path.lexists(work):
        _move_no_replace(work, dest)
    if sidecar_work is not None and os.path.lexists(sidecar_work) and item.sidecar_relpath:
        side_dest = folder / os.fsdecode(dest_name + item.sidecar_relpath[len(rel) :])
        if not os.path.lexists(side_dest):
            _move_no_replace(sidecar_work, side_dest)
    if item.marker_relpath is not None:
        marker = spec.path / os.fsdecode(item.marker_relpath)
        if os.path.lexists(marker):
            _move_no_replace(marker, folder / os.fsdecode(dest_name + b".done"))
    crashpoints.reached("after-reject-move")
    return replace(item, reason_json=json.dumps(reason))


def put_back(spec: InboxSpec, item: Item, *, work: Path, sidecar_work: Path | None) -> None:
    """Returns a claimed input to its place in the inbox (it changed: still being written)."""
    src_rel = item.relpath
    dest = spec.path / os.fsdecode(src_rel)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if os.path.lexists(work):
        if os.path.lexists(dest):
            dest = dest.parent / os.fsdecode(_free_name(dest.parent, os.path.basename(src_rel)))
        _move_no_replace(work, dest)
    if sidecar_work is not None and item.sidecar_relpath and os.path.lexists(sidecar_work):
        side_dest = spec.path / os.fsdecode(item.sidecar_relpath)
        if not os.path.lexists(side_dest):
            _move_no_replace(sidecar_work, side_dest)
