"""The main loop's wake-up queue, and signal handlers that can never hang the daemon."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

from nbankd.daemon.wakeup import Request, Wakeup

CHILD = textwrap.dedent(
    """
    import sys
    from nbankd.daemon.wakeup import Request, Wakeup, install_handlers

    wakeup = Wakeup()
    install_handlers(wakeup)
    print("ready", flush=True)
    reloads = 0
    stop = False
    while not stop:
        # The whole batch counts: a SIGTERM whose handler runs nested inside a
        # SIGHUP handler posts STOP before that handler's RELOAD.
        for request, signum in wakeup.wait(0.0005):
            if request is Request.RELOAD:
                reloads += 1
            elif request is Request.STOP:
                stop = True
    print(reloads, flush=True)
    sys.exit(0)
    """
)


def test_requests_come_back_in_the_order_posted() -> None:
    """wait() returns every pending request, first posted first."""
    w = Wakeup()
    w.set()
    w.post(Request.STOP, signal.SIGTERM)
    w.post(Request.RELOAD, signal.SIGHUP)
    assert w.wait(1.0) == [
        (Request.WAKE, None),
        (Request.STOP, signal.SIGTERM),
        (Request.RELOAD, signal.SIGHUP),
    ]
    assert w.pending() == []


def test_wait_with_nothing_posted_returns_nothing() -> None:
    """An idle wait ends at its timeout with an empty list."""
    assert Wakeup().wait(0.01) == []


def test_a_signal_storm_during_waits_never_hangs_the_loop() -> None:
    """Thousands of SIGHUPs landing inside wait(), then SIGTERM: the loop sees both and ends.

    A handler that took a lock (``Event.set``, logging) hung the daemon when a signal
    arrived while the main thread held that lock inside ``Event.wait``.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        for _ in range(3000):
            os.kill(child.pid, signal.SIGHUP)
        os.kill(child.pid, signal.SIGTERM)
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 0
    assert int(out.strip()) >= 1


def test_a_flood_of_wake_ups_queues_one() -> None:
    """A million wake-ups while the loop is busy queue one request, not a million."""
    w = Wakeup()
    for _ in range(1_000_000):
        w.set()
    assert w.pending() == [(Request.WAKE, None)]


def test_a_wake_up_after_the_queue_was_taken_is_queued_again() -> None:
    """Once the loop took the queue, the next wake-up is queued (never swallowed)."""
    w = Wakeup()
    w.set()
    assert w.wait(1.0) == [(Request.WAKE, None)]
    w.set()
    assert w.wait(1.0) == [(Request.WAKE, None)]


def test_a_wake_up_coming_while_the_queue_is_drained_is_never_lost() -> None:
    """Wake-ups from other threads racing the loop's draining: after the last one, the
    loop is always woken again (none swallowed by the one-queued rule)."""
    import threading

    w = Wakeup()
    done = threading.Event()

    def poster() -> None:
        for _ in range(20_000):
            w.set()
        done.set()

    t = threading.Thread(target=poster)
    t.start()
    while not done.is_set():
        w.pending()
    t.join()
    w.pending()  # whatever the race left is taken now ...
    w.set()  # ... so a wake-up after it must be queued
    assert w.wait(1.0) == [(Request.WAKE, None)]
