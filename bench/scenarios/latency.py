"""Scenario 4: latency of files arriving at a steady rate, ``settle_seconds: 1``.

A writer creates one file at a time in the inbox at a fixed rate, the way a rig
writes (open, write, close, in place). Latency is the time from the file being
closed to its receipt appearing in the receipt log, minus ``settle_seconds`` (the
wait the configuration asks for). Inotify watching (``watch: auto``), so the
figure is what the daemon adds on top of the settle time. Runs against the
embedded registry and against django-neurobank.
"""

from __future__ import annotations

import os
import time

from bench.common import ScenarioResult, percentile, wait_for
from bench.context import Context, unique
from bench.nbankd_proc import InboxSpec, Nbankd, ReceiptTail
from bench.scenarios.burst import EMBEDDED_DTYPE, registry_dtype
from bench.server import Server

SETTLE = 1.0


def _one_run(
    ctx: Context, server: Server | None, rate: float, count: int, size: int
) -> list[float]:
    root = ctx.scratch("latency")
    archive = unique("lat")
    inbox = root / "inbox"
    dtype = EMBEDDED_DTYPE if server is None else registry_dtype(ctx, server)
    daemon = Nbankd(
        root,
        registry="embedded" if server is None else server.url,
        auth=None if server is None else server.auth,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[InboxSpec(inbox, archive, dtype, {"settle_seconds": SETTLE, "watch": "auto"})],
    )
    prefix = unique("l")
    finished: dict[str, float] = {}
    try:
        daemon.start()
        with ReceiptTail(daemon.receipts_dir, interval=0.005) as tail:
            start = time.monotonic()
            for i in range(count):
                # the arrival schedule of the load generator, not a synchronisation wait
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                path = inbox / f"{prefix}-{i:05d}.dat"
                with path.open("wb") as f:
                    f.write(os.urandom(size))
                finished[str(path)] = time.time()
            wait_for(lambda: tail.count() >= count, 60 + count, f"{count} receipts", 0.01)
        got = {r["source"]: t for t, r in tail.stamps()}
        return [got[src] - t - SETTLE for src, t in finished.items()]
    finally:
        daemon.stop()
        ctx.discard(root)


def run(
    ctx: Context, *, rate: float | None = None, seconds: float | None = None, size: int = 65536
) -> ScenarioResult:
    rate = rate or 5.0
    seconds = seconds or (6.0 if ctx.quick else 60.0)
    count = max(1, int(rate * seconds))
    res = ScenarioResult(
        "latency",
        params={
            "rate_per_s": rate,
            "files_per_run": count,
            "size_bytes": size,
            "settle_seconds": SETTLE,
            "watch": "auto (inotify)",
        },
    )
    fast = ctx.server("fast")
    all_emb: list[float] = []
    for rep in range(ctx.repeats):
        for name, server in (("embedded", None), ("django", fast)):
            ctx.log(f"  latency rep {rep + 1}/{ctx.repeats} ({name}): {count} files at {rate}/s")
            lat = _one_run(ctx, server, rate, count, size)
            if server is None:
                all_emb += lat
            res.add(f"{name} p50", "s", percentile(lat, 50))
            res.add(f"{name} p99", "s", percentile(lat, 99))
            res.add(f"{name} max", "s", max(lat))
            ctx.log(f"    p50 {percentile(lat, 50):.3f} s, p99 {percentile(lat, 99):.3f} s")
    p99 = res.metrics["embedded p99"].median
    p99d = res.metrics["django p99"].median
    res.target("latency: p99 beyond settle_seconds (embedded)", "< 1 s", f"{p99:.2f} s", p99 < 1.0)
    res.target("latency: p99 beyond settle_seconds (django)", "< 1 s", f"{p99d:.2f} s", p99d < 1.0)
    return res
