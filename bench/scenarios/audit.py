"""Scenario 3: auditing an archive, nbankd against ``nbank archive check``.

Same archive, same registry: nbankd deposits a mix of small and larger files
into an archive registered with django-neurobank; then, with cold caches each
time, ``nbankctl audit --full`` (every file re-read and hashed; the daemon's
``max_mb_per_s`` cap set to 0 so the hardware is the limit) is timed against
``nbank archive check`` of that archive (which also hashes every file), and an
incremental ``nbankctl audit`` with nothing changed is timed too.

Large: an embedded registry with 100,000 resources (records written in one
transaction, files written directly into the archive's layout with the modes
nbankd gives them: generated, not deposited one by one). After one priming
audit, the incremental ``nbankctl audit`` with nothing changed is timed with a
cold page cache (the target, under 10 s) and again warm. With the default
``scrub_days: 30`` and ``every: 24h`` an incremental run also re-reads the
rolling slice, 1/30 of the files.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import NBANK, ScenarioResult, drop_caches, run_timed
from bench.context import Context, unique
from bench.nbankd_proc import InboxSpec, Nbankd, ReceiptTail
from bench.scenarios.burst import EMBEDDED_DTYPE, make_files, registry_dtype
from bench.server import Server
from nbankd.registry.embedded_search import format_stamp

AUDIT_SETTINGS = {"every": "24h", "scrub_days": 30, "max_mb_per_s": 0}
ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def _audit(daemon: Nbankd, *, full: bool) -> tuple[float, dict[str, Any]]:
    """Runs ``nbankctl audit [--full] --json``; returns (seconds, report)."""
    t0 = time.perf_counter()
    report = daemon.ctl("audit", *(["--full"] if full else []))
    elapsed = time.perf_counter() - t0
    if not isinstance(report, dict) or "archives" not in report:
        raise RuntimeError(f"nbankctl audit gave no report: {str(report)[:500]}")
    if not report.get("ok"):
        raise RuntimeError(f"the audit found problems: {str(report)[:2000]}")
    return elapsed, report


def _fill(
    ctx: Context, daemon: Nbankd, inbox: Path, files: int, size: int, big: int, big_size: int
) -> int:
    """Deposits ``files`` small and ``big`` larger files through the daemon; returns bytes."""
    src = daemon.root / "src"
    made = make_files(src, unique("s"), files, size) + make_files(src, unique("g"), big, big_size)
    with ReceiptTail(daemon.receipts_dir) as tail:
        for f in made:
            os.rename(f, inbox / f.name)
        deadline = time.monotonic() + 120 + len(made) * 2
        while tail.count() < len(made):
            if time.monotonic() > deadline or (daemon.proc and daemon.proc.poll() is not None):
                raise RuntimeError(f"filling the archive stalled:\n{daemon.log_tail()}")
            time.sleep(0.1)  # poll interval while the daemon deposits
    return files * size + big * big_size


def _same_archive(ctx: Context, server: Server, res: ScenarioResult) -> None:
    files = 200 if ctx.quick else 2000
    size = 64 << 10
    big, big_size = (2, 8 << 20) if ctx.quick else (4, 64 << 20)
    root = ctx.scratch("audit-django")
    archive = unique("aud")
    inbox = root / "inbox"
    daemon = Nbankd(
        root,
        registry=server.url,
        auth=server.auth,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[InboxSpec(inbox, archive, registry_dtype(ctx, server), {"settle_seconds": 0.5})],
        extra={"audit": AUDIT_SETTINGS},
    )
    try:
        daemon.start()
        total = _fill(ctx, daemon, inbox, files, size, big, big_size)
        res.params.update(
            same_archive_resources=files + big,
            same_archive_mb=round(total / 1e6),
        )
        env = ctx.nbank_env(server, root / "home")
        cold = True
        for rep in range(ctx.repeats):
            ctx.log(f"  audit rep {rep + 1}/{ctx.repeats}: {files + big} resources, django")
            cold &= drop_caches()
            t_full, report = _audit(daemon, full=True)
            hashed = sum(a.get("hashed", 0) for a in report["archives"])
            if hashed < files + big:
                raise RuntimeError(f"a full audit hashed {hashed} of {files + big} resources")
            res.add("nbankd full audit", "s", t_full)
            for phase, seconds in report["archives"][0].get("timings", {}).items():
                res.add(f"full audit: phase {phase}", "s", float(seconds))
            cold &= drop_caches()
            t_nbank = run_timed([NBANK, "archive", "check", str(root / archive)], env=env)
            res.add("nbank archive check", "s", t_nbank)
            cold &= drop_caches()
            t_inc, _ = _audit(daemon, full=False)
            res.add("nbankd incremental audit", "s", t_inc)
            ctx.log(f"    full {t_full:.1f} s, nbank check {t_nbank:.1f} s, incr {t_inc:.1f} s")
        if not cold:
            res.notes.append("page cache could NOT be dropped: audit runs were not cold")
    finally:
        daemon.stop()
        ctx.discard(root)


def _random_names(n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(secrets.choice(ALPHABET) for _ in range(8)))
    return sorted(names)


def _generate(archive: Path, db: Path, archive_name: str, n: int, size: int) -> None:
    """Writes n resources into the archive layout and the embedded registry, in bulk."""
    resources = archive / "resources"
    names = _random_names(n)
    rows = []
    stamp = format_stamp(datetime.now(UTC))
    for name in names:
        stub = resources / name[:2]
        if not stub.is_dir():
            stub.mkdir()
            stub.chmod(0o2775)
        data = os.urandom(size)
        path = stub / f"{name}.dat"
        path.write_bytes(data)
        path.chmod(0o444)
        rows.append((name, hashlib.sha1(data).hexdigest(), stamp))
    os.sync()
    conn = sqlite3.connect(db, isolation_level=None, timeout=60)
    try:
        conn.execute("BEGIN IMMEDIATE")
        dtype_id = conn.execute(
            "SELECT id FROM datatype WHERE name = ?", (EMBEDDED_DTYPE,)
        ).fetchone()[0]
        archive_id = conn.execute(
            "SELECT id FROM archive WHERE name = ?", (archive_name,)
        ).fetchone()[0]
        conn.executemany(
            "INSERT INTO resource (name, sha1, dtype_id, created_on, created_by) "
            "VALUES (?, ?, ?, ?, 'bench')",
            [(name, sha1, dtype_id, when) for name, sha1, when in rows],
        )
        conn.execute(
            "INSERT INTO location (resource_id, archive_id) "
            "SELECT id, ? FROM resource WHERE created_by = 'bench'",
            (archive_id,),
        )
        conn.execute("COMMIT")
    finally:
        conn.close()


def _hundred_k(ctx: Context, n: int, res: ScenarioResult) -> None:
    root = ctx.scratch("audit-100k")
    archive = unique("big")
    daemon = Nbankd(
        root,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[InboxSpec(root / "inbox", archive, EMBEDDED_DTYPE, {"settle_seconds": 1})],
        extra={"audit": AUDIT_SETTINGS},
    )
    try:
        daemon.start()  # creates and registers the archive
        daemon.stop(final=False)
        ctx.log(f"  generating {n} resources (files and embedded registry records)")
        t0 = time.perf_counter()
        _generate(root / archive, daemon.state_dir / "registry.sqlite3", archive, n, 1024)
        res.params["large_archive_resources"] = n
        res.params["large_archive_generate_s"] = round(time.perf_counter() - t0, 1)
        daemon.start()
        ctx.log("  priming audit (first run reads every file)")
        t_first, _ = _audit(daemon, full=False)
        res.add(f"first audit, {n} resources", "s", t_first)
        for _rep in range(ctx.repeats):
            drop_caches()
            t_inc, report = _audit(daemon, full=False)
            hashed = sum(a.get("hashed", 0) for a in report["archives"])
            res.add(f"incremental audit, {n} resources, nothing changed", "s", t_inc)
            res.add(f"incremental audit, {n} resources: files re-read", "files", hashed)
            timings = report["archives"][0].get("timings", {})
            for phase, seconds in timings.items():
                res.add(f"incremental {n}: phase {phase}", "s", float(seconds))
            t_warm, _ = _audit(daemon, full=False)
            res.add(f"incremental audit, {n} resources, warm cache", "s", t_warm)
            ctx.log(
                f"    incremental {t_inc:.1f} s cold, {t_warm:.1f} s warm "
                f"({hashed} files re-read: the rolling slice)"
            )
    finally:
        daemon.stop()
        ctx.discard(root)


def run(ctx: Context, *, big: int | None = None) -> ScenarioResult:
    n = big or (2000 if ctx.quick else 100_000)
    res = ScenarioResult("audit", params={"audit": AUDIT_SETTINGS})
    _same_archive(ctx, ctx.server("fast"), res)
    ratio = res.ratio("nbank check / nbankd full audit", "nbank archive check", "nbankd full audit")
    res.target(
        "audit: full vs nbank archive check", ">= 1.5x faster", f"{ratio:.2f}x", ratio >= 1.5
    )
    _hundred_k(ctx, n, res)
    inc = res.metrics[f"incremental audit, {n} resources, nothing changed"].median
    res.target(
        f"audit: incremental, {n} resources, nothing changed",
        "< 10 s" + ("" if n >= 100_000 else " (at 100k; this run is smaller)"),
        f"{inc:.1f} s",
        inc < 10 if n >= 100_000 else None,
    )
    return res
