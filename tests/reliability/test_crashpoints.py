"""Crash-point enumeration: the real daemon dies at every named point and recovers.

For each name in :data:`nbankd.seams.DEPOSIT_POINTS`, the real ``nbankd``
runs on a mixed batch (small, large, zero-byte, the same content under two names,
a folder resource, a file with a sidecar, an invalid name with a sidecar, an
auto-id file with a ``.done`` marker) with ``NBANKD_CRASH_AT=<point>``, dies there
by SIGKILL, is restarted without it and settles; then every invariant of
:mod:`reliability.invariants` must hold, and a second recovery must change
nothing. The embedded registry runs every point; the real django-neurobank server
runs every point too (the registry-related ones are where it differs).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, wait_for, work_entries
from nbankd.archive.opening import create_archive
from nbankd.control.client import call
from nbankd.seams import DEPOSIT_POINTS as POINTS
from reliability import figures
from reliability.invariants import (
    Input,
    assert_same,
    check,
    journal_in_flight,
    read_reasons,
    read_receipts,
    snapshot,
)

# every crash point, in pipeline order; the test below fails if one is missing here
ENUMERATED = (
    "after-journal-add",
    "after-claim-rename",
    "stage-copied",
    "after-claim",
    "after-stage",
    "after-lookup",
    "after-register-request",
    "after-register",
    "after-publish-link",
    "after-publish",
    "after-round-fsyncs",
    "after-verify",
    "after-receipt-append",
    "after-record",
    "after-release-source",
    "after-release-unlink",
    "after-reject-name",
    "after-reason-temp",
    "after-reject-reason",
    "after-reject-move",
    "after-put-back",
)
# the input whose claimed copy is appended to mid-copy to reach after-put-back
GROWING = "grow.bin"
GROWN_TAIL = b" and the rest the rig wrote later"


def test_enumeration_covers_every_crash_point() -> None:
    """The parametrisation below is exactly seams.DEPOSIT_POINTS, so no point is forgotten."""
    assert ENUMERATED == POINTS


class Batch:
    """The mixed batch of inputs for one run, over a main inbox and a marker inbox."""

    def __init__(self, h: DaemonHarness, dup_codes: tuple[str, ...] = ("duplicate",)) -> None:
        self.main = h.inbox
        self.marked = h.root / "inbox-marked"
        dup = os.urandom(10_000)
        main, marked = self.main, self.marked
        # names are unique per test: the django-neurobank server is shared by the session
        t = self.tag = h.archive_name
        self.growing = Input(
            main, f"{t}-{GROWING}", data=b"GROW" + os.urandom(300_000), expect="deposited"
        )
        self.rest = [
            Input(main, f"{t}-small.bin", data=os.urandom(2_000), expect="deposited"),
            Input(main, f"{t}-large.bin", data=os.urandom(3 << 20), expect="deposited"),
            Input(main, f"{t}-empty.bin", data=b"", expect="rejected", codes=("empty",)),
            Input(main, f"{t}-dupA.bin", data=dup, codes=dup_codes),
            Input(main, f"{t}-dupB.bin", data=dup, codes=dup_codes),
            Input(
                main,
                f"{t}-sess01",
                tree={"a.dat": os.urandom(5_000), "sub/b.dat": os.urandom(1_000)},
                expect="deposited",
            ),
            Input(
                main,
                f"{t}-rec7.wav",
                data=os.urandom(4_000),
                sidecar=f"id: rec7-{t}\nmetadata: {{rig: r1}}\n".encode(),
                expect="deposited",
            ),
            Input(
                main,
                "bad name.bin",
                data=os.urandom(1_500),
                sidecar=b"metadata: {note: kept with the rejected file}\n",
                expect="rejected",
                codes=("invalid-name",),
            ),
            Input(marked, "auto.bin", data=os.urandom(6_000), marker=True, expect="deposited"),
        ]

    @property
    def inputs(self) -> list[Input]:
        return [self.growing, *self.rest]

    @property
    def inboxes(self) -> list[Path]:
        return [self.main, self.marked]

    def grown(self) -> None:
        """The growing input's expected final bytes after it was appended to."""
        assert self.growing.data is not None
        self.growing = Input(
            self.main, self.growing.relpath, data=self.growing.data + GROWN_TAIL, expect="deposited"
        )


def configure(h: DaemonHarness, batch: Batch) -> None:
    inbox = {
        "archive": h.archive_name,
        "dtype": h.dtype,
        "settle_seconds": 0.3,
        "rescan_every": "2s",
    }
    h.extra_config = {
        "inboxes": [
            {**inbox, "path": str(batch.main), "directories": "resources"},
            {**inbox, "path": str(batch.marked), "auto_id": True, "ready": "marker"},
        ]
    }
    create_archive(h.archive, h.registry_address, allow_directories=True)
    h.write_config()


def finished(h: DaemonHarness, batch: Batch) -> bool:
    try:
        done = len(read_receipts(h.state_dir))
        done += sum(len(read_reasons(i / "rejected")) for i in batch.inboxes)
    except (AssertionError, ValueError):
        return False  # a receipt line or reason being written right now
    return done >= len(batch.inputs) and not journal_in_flight(h.state_dir)


def scanned_once(h: DaemonHarness) -> bool:
    status = call(h.socket_path, "status")
    return status["queue"] == 0 and all(i["last_scan"] for i in status["inboxes"])


def crash_and_recover(
    h: DaemonHarness,
    point: str,
    *,
    crashing_env: dict[str, str] | None = None,
    after_crash: Callable[[DaemonHarness], None] | None = None,
    dup_codes: tuple[str, ...] = ("duplicate",),
    nth: int = 1,
) -> dict[str, Any]:
    """The whole scenario for one crash point; returns figures for the report.

    ``crashing_env`` is added to the environment of the run that crashes (another
    release's code, for one); ``after_crash`` looks at what it left behind;
    ``dup_codes`` are the codes a rejected duplicate may carry; ``nth``: the daemon
    dies the nth time an input reaches the point."""
    batch = Batch(h, dup_codes)
    configure(h, batch)
    at = point if nth == 1 else f"{point}:{nth}"
    env = {"NBANKD_CRASH_AT": at, **(crashing_env or {})}
    go = h.root / "go"
    if point == "after-put-back":
        # hold every copy after its bytes are staged until the test has appended to the
        # claimed growing file: the daemon sees it changed and puts it back
        env |= {"NBANKD_PAUSE_AT": "stage-copied", "NBANKD_PAUSE_UNTIL": str(go)}
    h.start(env=env)
    t0 = time.monotonic()
    batch.growing.write(h.root)
    if point == "after-put-back":
        claimed = wait_for(
            lambda: [
                p
                for p in work_entries(batch.main / ".nbank")
                if p.is_file() and p.read_bytes()[:4] == b"GROW"
            ],
            30,
            "the growing file to be claimed",
        )[0]
        with open(claimed, "ab") as f:
            f.write(GROWN_TAIL)
        batch.grown()
        go.touch()
    for inp in batch.rest:
        inp.write(h.root)
    try:
        code = h.wait_exit(timeout=60)
    except subprocess.TimeoutExpired:
        h.dump_log()
        pytest.fail(f"the batch never reached crash point {point}")
    log = h.log_path.read_text(errors="replace")
    if code != -signal.SIGKILL:
        h.dump_log()
    assert code == -signal.SIGKILL, f"nbankd exited with {code}, not SIGKILL at {point}"
    assert f"crash point {point} reached" in log, f"nbankd died, but not at {point}"
    if after_crash is not None:
        after_crash(h)

    h.start()
    wait_for(lambda: finished(h, batch), 90, f"every input to finish after a crash at {point}")
    h.stop()
    counts = check(h, batch.inputs, inboxes=batch.inboxes)
    dups = [r for r in read_receipts(h.state_dir) if "-dup" in Path(r["source"]).name]
    assert len(dups) == 1, f"the same content was deposited {len(dups)} times"

    before = snapshot(h, batch.inboxes)
    h.start()
    wait_for(lambda: scanned_once(h), 30, "the second recovery to scan every inbox")
    h.stop()
    assert_same(before, snapshot(h, batch.inboxes))
    # reached only when every invariant held: one kill, nothing lost or doubled
    return {
        "point": point,
        "seconds": round(time.monotonic() - t0, 2),
        "kills": 1,
        "losses": 0,
        "duplicates": 0,
        **counts.to_json(),
    }


@pytest.fixture
def embedded(daemon_factory: Callable[..., DaemonHarness]) -> DaemonHarness:
    return daemon_factory()


@pytest.fixture
def django(daemon_factory: Callable[..., DaemonHarness], request: Any) -> DaemonHarness:
    server = request.getfixturevalue("django_registry")
    h = daemon_factory(registry=server.url, auth=(server.username, server.password))
    h.dtype = "dt" + h.archive_name
    server.add_datatype(h.dtype, "application/octet-stream")
    return h


@pytest.mark.parametrize("point", ENUMERATED)
def test_crash_at_point_with_embedded_registry(embedded: DaemonHarness, point: str) -> None:
    """Killed at this point, the daemon recovers with every input exactly once (embedded)."""
    figures.record("crashpoints-embedded", point, crash_and_recover(embedded, point))


#: the points every deposited input of the batch passes: reached three times at least
#: (after-round-fsyncs is reached once per round, not per input, and always inside a
#: round: the tests above already crash there mid-round)
DEPOSIT_PATH = tuple(
    p
    for p in ENUMERATED
    if not p.startswith(("after-journal", "after-reject", "after-reason", "after-put"))
    and p != "after-round-fsyncs"
)


@pytest.mark.parametrize("point", DEPOSIT_PATH)
def test_crash_mid_round_at_point_recovers(embedded: DaemonHarness, point: str) -> None:
    """Killed the third time an input reaches this point, while the small inputs move
    through their steps together in one round (some steps done and not yet saved, others
    not started), the daemon recovers with every input exactly once."""
    figures.record("crashpoints-mid-round", point, crash_and_recover(embedded, point, nth=3))


@pytest.mark.parametrize("point", ENUMERATED)
def test_crash_at_point_with_django_registry(django: DaemonHarness, point: str) -> None:
    """Killed at this point, the daemon recovers with every input exactly once (django)."""
    figures.record("crashpoints-django", point, crash_and_recover(django, point))
