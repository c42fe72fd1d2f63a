"""End to end: the sd_notify protocol and the watchdog, through a real $NOTIFY_SOCKET."""

from __future__ import annotations

import time
from typing import Any

from fixtures.daemon import DaemonHarness, wait_for


def test_ready_status_and_stopping_are_sent(daemon_factory: Any) -> None:
    """nbankd sends READY=1 with a status line, STATUS after a deposit, and STOPPING=1."""
    h: DaemonHarness = daemon_factory()
    h.start()
    ready = h.wait_message(lambda m: "READY=1" in m)
    assert "STATUS=queue 0; last deposit none" in ready
    h.drop("rec.wav", b"data")
    h.wait_message(lambda m: "STATUS=" in m and "last deposit rec" in m, 30)
    h.proc.terminate()  # type: ignore[union-attr]
    h.wait_message(lambda m: "STOPPING=1" in m, 10)
    assert h.wait_exit() == 0


def test_watchdog_pings_arrive_at_half_the_interval(daemon_factory: Any) -> None:
    """With WATCHDOG_USEC set, WATCHDOG=1 pings keep arriving."""
    h: DaemonHarness = daemon_factory()
    h.start(env={"WATCHDOG_USEC": "400000"})
    for _ in range(3):
        count = sum("WATCHDOG=1" in m for m in h.messages)
        h.wait_message(lambda m, c=count: sum("WATCHDOG=1" in x for x in h.messages) > c, 10)
    h.stop()


def test_wedged_worker_stops_the_watchdog_pings(daemon_factory: Any) -> None:
    """A worker stuck inside a step (test seam) makes the daemon withhold its pings."""
    h: DaemonHarness = daemon_factory()
    h.start(
        env={
            "WATCHDOG_USEC": "400000",
            "NBANKD_HANG_AT": "after-stage",
            "NBANKD_WEDGE_AFTER": "1",
        }
    )
    h.wait_message(lambda m: "WATCHDOG=1" in m)
    h.drop("stuck.wav", b"never finishes")
    wait_for(
        lambda: "withholding watchdog ping" in h.log_path.read_text(errors="replace"),
        30,
        "the daemon to notice the wedged worker",
    )
    # everything sent before the decision is already queued on the socket: take it first
    h._notify.setblocking(False)
    while True:
        try:
            h.messages.append(h._notify.recv(4096).decode())
        except BlockingIOError:
            break
    h._notify.setblocking(True)
    before = len(h.messages)
    # drain for three watchdog intervals: no ping may arrive while the worker is stuck
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        h._notify.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            h.messages.append(h._notify.recv(4096).decode())
        except TimeoutError:
            break
    assert not any("WATCHDOG=1" in m for m in h.messages[before:])
    h.kill9()
