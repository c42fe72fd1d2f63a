"""What the daemon has done since it started, counted as items finish: the running
totals behind its metrics (deposits, bytes, rejections, failed steps, registry and
archive errors, latency).

Pure bookkeeping: :meth:`Tally.record` folds one item, as a worker hands it back,
into the totals; the daemon calls it under its lock and copies the tally into each
snapshot. Totals start at zero with the process, as Prometheus counters do; each
inbox's last deposit does not (a restart must not make a silent rig look fresh, nor
drop its timestamp): :func:`last_deposits` reads it back from the receipts logs.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from nbankd.archive.fsops import open_log
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State
from nbankd.deposit.outcomes import ARCHIVE_CODES, REGISTRY_CODES
from nbankd.deposit.receipts import receipts_path
from nbankd.timefmt import from_iso

#: bytes read from the end of a receipts log for its last deposit (more, doubling up
#: to RECEIPTS_TAIL_MAX, only while that holds no whole line)
RECEIPTS_TAIL = 64 * 1024
RECEIPTS_TAIL_MAX = 4 * 1024 * 1024

#: upper bounds (seconds) of the deposit latency histogram's buckets
LATENCY_BUCKETS = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 3600.0, math.inf)


@dataclass
class Latency:
    """A histogram of seconds from an input's claim being journaled to its deposit."""

    buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    total: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for n, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[n] += 1
                break
        self.total += seconds
        self.count += 1

    def copy(self) -> Latency:
        return Latency(list(self.buckets), self.total, self.count)


@dataclass
class Tally:
    """Running totals, keyed by inbox (and archive, outcome, code)."""

    deposits: Counter[tuple[str, str, str]] = field(
        default_factory=Counter
    )  # inbox, archive, outcome
    deposited_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)  # inbox, archive
    rejections: Counter[tuple[str, str]] = field(default_factory=Counter)  # inbox, code
    failures: Counter[str] = field(default_factory=Counter)  # error code of a step to retry
    latency: dict[str, Latency] = field(default_factory=dict)  # inbox -> histogram
    last_deposit: dict[str, float] = field(default_factory=dict)  # inbox -> time
    registry_errors: int = 0  # failed steps whose error is the registry's
    archive_errors: Counter[str] = field(default_factory=Counter)  # archive name -> same

    def record(self, item: Item, *, attempts_before: int) -> None:
        """Folds in an item a worker handed back (``attempts_before``: its failed
        attempts when the worker took it, so a failure is counted once)."""
        if item.state is State.DONE:
            outcome = "already-deposited" if item.already else "deposited"
            self.deposits[(item.inbox, item.archive, outcome)] += 1
            self.deposited_bytes[(item.inbox, item.archive)] += item.size or 0
            if item.finished is not None:
                self.last_deposit[item.inbox] = item.finished
                seconds = max(0.0, item.finished - item.created)
                self.latency.setdefault(item.inbox, Latency()).observe(seconds)
        elif item.state is State.REJECTED:
            code = json.loads(item.reason_json or "{}").get("code") or "rejected"
            self.rejections[(item.inbox, str(code))] += 1
        elif item.attempts > attempts_before and item.error_code:
            self.failures[item.error_code] += 1
            if item.error_code in REGISTRY_CODES:
                self.registry_errors += 1
            elif item.error_code in ARCHIVE_CODES:
                self.archive_errors[item.archive] += 1

    def copy(self) -> Tally:
        return Tally(
            deposits=Counter(self.deposits),
            deposited_bytes=Counter(self.deposited_bytes),
            rejections=Counter(self.rejections),
            failures=Counter(self.failures),
            latency={k: v.copy() for k, v in self.latency.items()},
            last_deposit=dict(self.last_deposit),
            registry_errors=self.registry_errors,
            archive_errors=Counter(self.archive_errors),
        )


def last_deposits(receipts_dir: Path, inboxes: Iterable[str]) -> dict[str, float]:
    """Inbox -> when its last deposit finished, as its receipts log says (to the
    second); an inbox without a log, or whose log's end cannot be read, is left out.
    Only each log's end is read."""
    out: dict[str, float] = {}
    for inbox in inboxes:
        try:
            when = _last_receipt_time(receipts_path(receipts_dir, inbox), inbox)
        except OSError:
            continue
        if when is not None:
            out[inbox] = when
    return out


def _last_receipt_time(path: Path, inbox: str) -> float | None:
    """The newest ``time`` of the whole receipt lines at the end of ``path``."""
    try:  # a FIFO there is refused, never waited on (NotALog, an OSError)
        f = os.fdopen(open_log(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return None
    with f:
        size = f.seek(0, os.SEEK_END)
        want = RECEIPTS_TAIL
        while True:
            start = max(0, size - want)
            f.seek(start)
            tail = f.read(size - start)
            lines = tail.split(b"\n")
            if start > 0:
                lines = lines[1:]  # the first is cut short by where the read began
            newest = None
            for line in lines[:-1]:  # the last is torn, or empty after the final newline
                when = _receipt_time(line, inbox)
                if when is not None and (newest is None or when > newest):
                    newest = when
            if newest is not None or start == 0 or want >= RECEIPTS_TAIL_MAX:
                return newest
            want *= 2


def _receipt_time(line: bytes, inbox: str) -> float | None:
    try:
        receipt = json.loads(line.decode("utf-8", "surrogateescape"))
        if not isinstance(receipt, dict) or receipt.get("inbox") not in (None, inbox):
            return None
        time = receipt.get("time")
        return from_iso(time) if isinstance(time, str) else None
    except (ValueError, OverflowError):
        return None


__all__ = ["LATENCY_BUCKETS", "Latency", "Tally", "last_deposits"]
