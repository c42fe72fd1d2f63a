"""Receipts: one JSON line per deposit, per inbox, under ``state_dir/receipts/``.

The journal is the source of truth; the receipts log is the durable, greppable
record a person or script reads (``nbankctl history`` reads it). Appending is
idempotent by token: a receipt whose token is already in the log's tail, on a whole
line, is not written twice when a step is replayed after a crash. Every line is
UTF-8 JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from nbankd.archive.fsops import NotALog, append_durable, open_log
from nbankd.archive.syncs import fsync_soon

_TAIL_BYTES = 256 * 1024


def receipts_path(receipts_dir: Path, inbox_key: str) -> Path:
    """``<slug of the inbox path>-<short hash>.jsonl``: readable and collision-free."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", inbox_key).strip("-")[-60:] or "inbox"
    digest = hashlib.sha1(inbox_key.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return receipts_dir / f"{slug}-{digest}.jsonl"


def _already_logged(path: Path, token: str, *, from_storage: bool = False) -> bool:
    """True when the log's tail holds the receipt of ``token``; then the log is fsynced
    again. ``from_storage`` (a retried record step): the tail is read from storage, not
    the page cache, which after a failed writeback shows a line the disk never got (the
    kernel marks such pages clean and a second fsync succeeds without writing them).
    Anything but a regular file at ``path`` raises :class:`~nbankd.archive.fsops.NotALog`
    (a FIFO is never waited on)."""
    try:
        f = os.fdopen(open_log(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return False
    with f:
        if from_storage:
            os.fsync(f.fileno())  # what is dirty goes out; what failed stays clean
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - _TAIL_BYTES))
        tail = f.read()
        found = _holds(tail, token)
        if found and not from_storage:  # from storage: fsynced just above
            fsync_soon(f.fileno())
        return found


def _holds(tail: bytes, token: str) -> bool:
    """Whether a whole receipt line of ``tail`` is ``token``'s: a line cut short (a
    full disk, a crash) names the token but is no receipt, so it does not count."""
    needle = f'"token": "{token}"'.encode()
    complete = tail.rfind(b"\n")  # a torn last line does not count (no newline)
    start = 0
    while complete >= 0 and (at := tail.find(needle, start, complete)) >= 0:
        first = tail.rfind(b"\n", 0, at) + 1
        end = tail.find(b"\n", at, complete + 1)  # found: ``complete`` at the latest
        try:
            receipt = json.loads(tail[first:end].decode("utf-8", "surrogateescape"))
        except ValueError:
            receipt = None
        if isinstance(receipt, dict) and receipt.get("token") == token:
            return True
        start = end + 1
    return False


#: a lone surrogate: a byte of a name that is not UTF-8, as Python keeps it
_SURROGATE = re.compile("[\ud800-\udfff]")


def receipt_line(receipt: Mapping[str, Any]) -> bytes:
    """``receipt`` as one line of UTF-8 JSON; a name's bytes that are not UTF-8 are
    written as JSON escapes (``\\udcff``), which :func:`read_receipts` reads back as
    they were, so any JSON reader can read every line of the log."""
    text = json.dumps(dict(receipt), sort_keys=True, ensure_ascii=False)
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return (text + "\n").encode("utf-8")


def append_receipt(
    receipts_dir: Path,
    inbox_key: str,
    receipt: Mapping[str, Any],
    *,
    retried: bool = False,
    first: bool = False,
) -> Path:
    """Appends ``receipt`` as one line and fsyncs it, unless the log holds it already
    (``retried``: as read from storage); returns the log's path. ``first``: the caller
    knows no receipt of this token was ever written (its first record step, in the
    process that made the token), so the log's tail is not read."""
    receipts_dir.mkdir(parents=True, exist_ok=True)
    path = receipts_path(receipts_dir, inbox_key)
    token = str(receipt["token"])
    if not (first and not retried) and _already_logged(path, token, from_storage=retried):
        return path
    append_durable(path, receipt_line(receipt), mode=0o640, sync=fsync_soon)
    return path


def read_receipts(receipts_dir: Path) -> Iterator[dict[str, Any]]:
    """Every receipt in every log (order within a log preserved). A log's name that is
    not a regular file (a FIFO, a socket, a device) holds no receipt: the daemon never
    writes one into it (the deposit waits, its status naming the path); it is passed
    over, never waited on."""
    if not receipts_dir.is_dir():
        return
    for path in sorted(receipts_dir.glob("*.jsonl")):
        try:
            fd = open_log(path, os.O_RDONLY)
        except (NotALog, FileNotFoundError):
            continue
        with open(fd, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        yield json.loads(line)
                    except ValueError:
                        continue  # a line torn by a crash (rewritten in full on replay)
