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
