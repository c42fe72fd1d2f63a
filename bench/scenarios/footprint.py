"""Scenario 5: memory and CPU of the daemon, idle and with a large backlog.

Idle: a daemon (embedded registry) watching 10 empty inboxes; after start-up,
CPU is sampled from ``/proc/PID/stat`` over a window (30 s by default) and RSS
from ``/proc/PID/status``, with the context switches of all its threads (its
wake-ups).

Backlog: a daemon watching one inbox, paused with ``nbankctl pause``, then given
100,000 finished files (a folder of them renamed into the inbox, then
``nbankctl rescan`` twice, ``settle_seconds`` apart, so every file is seen and
settled). Paused, nothing is claimed: the backlog stays while RSS and CPU are
measured. The scan time of the backlog is reported too. Afterwards ``nbankctl
queue`` checks that the daemon really holds every file as waiting.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from bench.common import (
    ScenarioResult,
    proc_cpu_seconds,
    proc_rss_mb,
    wait_for,
)
from bench.context import Context, unique
from bench.nbankd_proc import InboxSpec, Nbankd
from bench.scenarios.burst import EMBEDDED_DTYPE

SETTLE = 1.0


def _ctx_switches(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (task / "status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                total += int(line.split()[1])
    return total


def _sample(pid: int, window: float) -> dict[str, float]:
    """CPU % and wake-ups/s over ``window`` seconds, and RSS at its end."""
    cpu0, sw0, t0 = proc_cpu_seconds(pid), _ctx_switches(pid), time.monotonic()
    deadline = t0 + window
    peak = 0.0
    while time.monotonic() < deadline:
        peak = max(peak, proc_rss_mb(pid)[0])
        time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))  # sampling period
    wall = time.monotonic() - t0
    rss, hwm = proc_rss_mb(pid)
    return {
        "cpu_percent": 100 * (proc_cpu_seconds(pid) - cpu0) / wall,
        "wakeups_per_s": (_ctx_switches(pid) - sw0) / wall,
        "rss_mb": max(rss, peak),
        "hwm_mb": hwm,
    }


def _wait_quiet(pid: int, timeout: float) -> float:
    """Waits until the process uses < 2% CPU over half a second; returns seconds waited."""
    t0 = time.monotonic()

    def quiet() -> bool:
        c0 = proc_cpu_seconds(pid)
        time.sleep(0.5)  # the measuring window of the CPU reading
        return proc_cpu_seconds(pid) - c0 < 0.01

    wait_for(quiet, timeout, "the daemon to go quiet", interval=0)
    return max(0.0, time.monotonic() - t0 - 0.5)  # less the quiet window itself


def _idle(ctx: Context, window: float) -> dict[str, float]:
    root = ctx.scratch("idle")
    archive = unique("idle")
    daemon = Nbankd(
        root,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[
            InboxSpec(root / f"inbox{i}", archive, EMBEDDED_DTYPE, {"settle_seconds": SETTLE})
            for i in range(10)
        ],
    )
    try:
        daemon.start()
        _wait_quiet(daemon.pid, 60)
        return _sample(daemon.pid, window)
    finally:
        daemon.stop()
        ctx.discard(root)


def _make_backlog(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    prefix = unique("q")
    for i in range(n):
        # 16 distinct bytes: a distinct SHA-1 for every file
        (folder / f"{prefix}-{i:06d}.dat").write_bytes(os.urandom(16))


def _backlog(ctx: Context, n: int, window: float) -> dict[str, float]:
    root = ctx.scratch("backlog")
    archive = unique("bl")
    inbox = root / "inbox"
    daemon = Nbankd(
        root,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[InboxSpec(inbox, archive, EMBEDDED_DTYPE, {"settle_seconds": SETTLE})],
    )
    try:
        daemon.start()
        answer = daemon.ctl("pause")
        if answer.get("exit", 0):
            raise RuntimeError(f"nbankctl pause failed: {answer}")
        idle_rss = proc_rss_mb(daemon.pid)[0]
        batch = root / "batch"
        _make_backlog(batch, n)
        t0 = time.monotonic()
        os.rename(batch, inbox / "batch")
        daemon.ctl("rescan")
        first_scan = _wait_quiet(daemon.pid, 600)
        # past settle_seconds since the first sighting: a second scan marks them ready
        wait_for(lambda: time.monotonic() - t0 > SETTLE + 0.1, 10, "settle time", 0.05)
        daemon.ctl("rescan")
        _wait_quiet(daemon.pid, 600)
        out = _sample(daemon.pid, window)
        queue = daemon.ctl("queue")
        # every file counted by state (queue lists at most 1000 of them)
        counts = queue.get("counts") or {}
        waiting = (counts.get("pending") or {}).get("paused", 0)
        claimed = sum((counts.get("items") or {}).values())
        if waiting + claimed < n:
            raise RuntimeError(f"the daemon holds {waiting} waiting files, expected {n}")
        out.update(
            idle_rss_mb=idle_rss,
            scan_seconds=first_scan,
            waiting=waiting,
            hwm_after_queue_mb=proc_rss_mb(daemon.pid)[1],
        )
        return out
    finally:
        daemon.stop()
        ctx.discard(root)


def run(ctx: Context, *, backlog: int | None = None, window: float | None = None) -> ScenarioResult:
    n = backlog or (2000 if ctx.quick else 100_000)
    window = window or (5.0 if ctx.quick else 30.0)
    res = ScenarioResult(
        "footprint",
        params={"idle_inboxes": 10, "backlog_files": n, "window_s": window},
    )
    for rep in range(ctx.repeats):
        ctx.log(f"  footprint rep {rep + 1}/{ctx.repeats}: idle, 10 inboxes, {window:.0f} s")
        idle = _idle(ctx, window)
        res.add("idle CPU", "%", idle["cpu_percent"])
        res.add("idle wake-ups", "/s", idle["wakeups_per_s"])
        res.add("idle RSS", "MiB", idle["rss_mb"])
        ctx.log(f"    idle: {idle['cpu_percent']:.2f}% CPU, {idle['rss_mb']:.0f} MiB")
        ctx.log(f"  footprint rep {rep + 1}/{ctx.repeats}: backlog of {n} files")
        bl = _backlog(ctx, n, window)
        res.add("backlog RSS", "MiB", bl["rss_mb"])
        res.add("backlog peak RSS (VmHWM)", "MiB", bl["hwm_mb"])
        res.add("backlog CPU (paused)", "%", bl["cpu_percent"])
        res.add("backlog first scan", "s", bl["scan_seconds"])
        res.add("backlog peak RSS after `queue`", "MiB", bl["hwm_after_queue_mb"])
        ctx.log(f"    backlog: {bl['rss_mb']:.0f} MiB (peak {bl['hwm_mb']:.0f})")
    cpu = res.metrics["idle CPU"].median
    rss = res.metrics["idle RSS"].median
    brss = res.metrics["backlog peak RSS (VmHWM)"].median
    res.target("footprint: idle CPU", "near zero (< 0.5%)", f"{cpu:.2f}%", cpu < 0.5)
    res.target("footprint: idle RSS", "< 100 MB", f"{rss * 1.048576:.0f} MB", rss * 1.048576 < 100)
    res.target(
        f"footprint: RSS with {n} backlog",
        "< 250 MB",
        f"{brss * 1.048576:.0f} MB peak",
        brss * 1.048576 < 250,
    )
    return res
