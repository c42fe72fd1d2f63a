"""What the daemon has done since it started, counted as items finish: the running
totals behind its metrics (deposits, bytes, rejections, failed steps, registry and
archive errors, latency).

Pure bookkeeping: :meth:`Tally.record` folds one item, as a worker hands it back,
into the totals; the daemon calls it under its lock and copies the tally into each
snapshot. Totals start at zero with the process, as Prometheus counters do.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field

from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State
from nbankd.deposit.outcomes import ARCHIVE_CODES, REGISTRY_CODES

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


__all__ = ["LATENCY_BUCKETS", "Latency", "Tally"]
