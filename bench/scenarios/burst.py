"""Scenario 1: a burst of small files dropped into an inbox, until all are deposited.

Four ways of depositing the same kind of files (random bytes, so every SHA-1 is
new), each timed from the moment the first file appears until the last is
deposited:

- ``nbankd-embedded``: nbankd with its embedded SQLite registry;
- ``nbankd-django``: nbankd against django-neurobank (gunicorn);
- ``nbank-deposit``: ``nbank deposit`` of the files against the same server;
- ``bare-post``: the server's own limit, a client that only POSTs the
  resources nbankd would register (same body, same number of threads as
  nbankd's deposit workers), credentials on every POST as nbankd sends them.

nbankd's time is measured from the renames into the inbox to the last receipt,
minus ``settle_seconds`` (the wait the user asked for, not work). The ratios use
a server with the fast MD5 password hasher; the same three django runs are
repeated on a few hundred files with Django's default PBKDF2 hasher.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from bench.common import NBANK, ScenarioResult, proc_cpu_seconds, run_timed, wait_for
from bench.context import Context, unique
from bench.nbankd_proc import InboxSpec, Nbankd, ReceiptTail
from bench.server import Server
from nbankd.daemon.service import WORKERS

SETTLE = 1.0
EMBEDDED_DTYPE = "bench-file"


def make_files(folder: Path, prefix: str, n: int, size: int) -> list[Path]:
    """n files of random bytes (distinct SHA-1s) named PREFIX-00000.dat..."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"{prefix}-{i:05d}.dat"
        path.write_bytes(os.urandom(size))
        out.append(path)
    return out


def registry_dtype(ctx: Context, server: Server) -> str:
    """The datatype the benchmarks use on ``server`` (created once per run)."""
    if server.url not in ctx.dtypes:
        ctx.dtypes[server.url] = server.add_datatype(unique("bench-dt"))
    return ctx.dtypes[server.url]


def nbankd_burst(
    ctx: Context,
    server: Server | None,
    n: int,
    size: int,
    *,
    settle: float = SETTLE,
    stub_names: int = 0,
) -> dict[str, float]:
    """Drops n files into a running daemon's inbox; returns files/s and timings. With
    ``stub_names``, the stub folder the files go to already holds that many names."""
    root = ctx.scratch("burst-nbankd")
    archive = unique("burst")
    dtype = EMBEDDED_DTYPE if server is None else registry_dtype(ctx, server)
    daemon = Nbankd(
        root,
        registry="embedded" if server is None else server.url,
        auth=None if server is None else server.auth,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[InboxSpec(root / "inbox", archive, dtype, {"settle_seconds": settle})],
    )
    prefix = unique("b")
    files = make_files(root / "src", prefix, n, size)
    try:
        daemon.start()
        if stub_names:  # other resources filed under the same first two characters
            stub = root / archive / "resources" / prefix[:2]
            stub.mkdir(exist_ok=True)
            for i in range(stub_names):
                (stub / f"{prefix}-old{i:06d}.old").touch()
        cpu0 = server.server_cpu_seconds() if server else 0.0
        own0 = proc_cpu_seconds(daemon.pid)
        with ReceiptTail(daemon.receipts_dir) as tail:
            t0 = time.time()
            for f in files:
                os.rename(f, root / "inbox" / f.name)
            rejected = root / "inbox" / "rejected"

            def done() -> bool:
                if rejected.is_dir() and any(rejected.glob("*.reason")):
                    raise RuntimeError(f"nbankd rejected files; see {rejected}")
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise RuntimeError(f"nbankd exited; log tail:\n{daemon.log_tail()}")
                return tail.count() >= n

            wait_for(done, timeout=60 + n * 2.0, what=f"{n} receipts", interval=0.02)
        stamps = [t for t, _ in tail.stamps()]
        elapsed = max(stamps) - t0 - settle
        server_cpu = (server.server_cpu_seconds() - cpu0) if server else 0.0
        own_cpu = proc_cpu_seconds(daemon.pid) - own0
        deposited = len(list((root / archive / "resources").rglob("*.dat")))
        if deposited != n:
            raise RuntimeError(f"{deposited} files in the archive, expected {n}")
        return {
            "files_per_s": n / elapsed,
            "seconds": elapsed,
            "first_receipt_s": min(stamps) - t0 - settle,
            "server_cpu_ms_per_file": 1000 * server_cpu / n,
            "nbankd_cpu_ms_per_file": 1000 * own_cpu / n,
            "nbankd_cpu_share": own_cpu / elapsed,
        }
    finally:
        daemon.stop()
        ctx.discard(root)


def nbank_burst(ctx: Context, server: Server, n: int, size: int) -> dict[str, float]:
    """``nbank deposit`` of n fresh files in one command."""
    root = ctx.scratch("burst-nbank")
    home = root / "home"
    archive_dir = root / unique("nbarch")
    env = ctx.nbank_env(server, home)
    ctx.nbank_init(server, archive_dir, home)
    files = make_files(root / "src", unique("n"), n, size)
    try:
        cpu0 = server.server_cpu_seconds()
        elapsed = run_timed(
            [
                NBANK,
                "deposit",
                "-d",
                registry_dtype(ctx, server),
                str(archive_dir),
                *map(str, files),
            ],
            env=env,
            timeout=3600 + n * 5,
        )
        server_cpu = server.server_cpu_seconds() - cpu0
        deposited = len(list((archive_dir / "resources").rglob("*.dat")))
        if deposited != n:
            raise RuntimeError(f"nbank deposited {deposited} of {n} files")
        return {
            "files_per_s": n / elapsed,
            "seconds": elapsed,
            "server_cpu_ms_per_file": 1000 * server_cpu / n,
        }
    finally:
        ctx.discard(root)


def bare_posts(
    ctx: Context, server: Server, n: int, size: int, threads: int = WORKERS
) -> dict[str, float]:
    """POSTs n resource records (nbankd's body) from ``threads`` threads; returns records/s."""
    archive = server.add_archive(unique("bare"), ctx.work / unique("bare-root"))
    dtype = registry_dtype(ctx, server)
    prefix = unique("p")
    bodies = [
        {
            "dtype": dtype,
            "name": f"{prefix}-{i:05d}",
            "sha1": hashlib.sha1(os.urandom(size)).hexdigest(),
            "locations": [archive],
            "metadata": {},
        }
        for i in range(n)
    ]
    local = threading.local()
    url = server.url + "resources/"

    def post(body: dict[str, Any]) -> None:
        session = getattr(local, "session", None)
        if session is None:
            session = local.session = requests.Session()
            session.headers["Accept"] = "application/json"
        r = session.post(url, json=body, auth=server.auth, timeout=(5, 300))
        if r.status_code != 201:
            raise RuntimeError(f"POST resources/ -> {r.status_code} {r.text[:200]}")

    cpu0 = server.server_cpu_seconds()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for future in [pool.submit(post, b) for b in bodies]:
            future.result()
    elapsed = time.perf_counter() - t0
    server_cpu = server.server_cpu_seconds() - cpu0
    return {
        "files_per_s": n / elapsed,
        "seconds": elapsed,
        "server_cpu_ms_per_file": 1000 * server_cpu / n,
    }


def _record(res: ScenarioResult, name: str, out: dict[str, float]) -> None:
    res.add(f"{name} files/s", "files/s", out["files_per_s"])
    res.add(f"{name} server CPU/file", "ms", out["server_cpu_ms_per_file"])
    if "nbankd_cpu_ms_per_file" in out:  # the daemon's own CPU: the limit when it is busy
        res.add(f"{name} nbankd CPU/file", "ms", out["nbankd_cpu_ms_per_file"])
        res.add(f"{name} nbankd CPU (cores busy)", "x", out["nbankd_cpu_share"])
    if "first_receipt_s" in out:
        res.add(f"{name} first receipt", "s", out["first_receipt_s"])


def run(
    ctx: Context,
    *,
    n: int | None = None,
    size: int = 4096,
    slow_n: int | None = None,
    full_stub: int = 0,
) -> ScenarioResult:
    n = n or (100 if ctx.quick else 2000)
    slow_n = slow_n if slow_n is not None else (8 if ctx.quick else 200)
    res = ScenarioResult(
        "burst",
        params={
            "files": n,
            "size_bytes": size,
            "settle_seconds": SETTLE,
            "nbankd_workers": WORKERS,
            "bare_post_threads": WORKERS,
            "default_hasher_files": slow_n,
            "server_workers": ctx.server_workers,
            "full_stub_names": full_stub,
        },
    )
    fast = ctx.server("fast")
    full = f"nbankd-embedded, {full_stub:,} names in the stub folder"
    for rep in range(ctx.repeats):
        ctx.log(f"  burst rep {rep + 1}/{ctx.repeats}: {n} x {size} B")
        for name, fn in (
            ("nbankd-embedded", lambda: nbankd_burst(ctx, None, n, size)),
            ("nbankd-django", lambda: nbankd_burst(ctx, fast, n, size)),
            ("nbank-deposit", lambda: nbank_burst(ctx, fast, n, size)),
            ("bare-post", lambda: bare_posts(ctx, fast, n, size)),
            *(
                [(full, lambda: nbankd_burst(ctx, None, n, size, stub_names=full_stub))]
                if full_stub
                else []
            ),
        ):
            out = fn()
            ctx.log(f"    {name}: {out['files_per_s']:.1f} files/s")
            _record(res, name, out)
    emb = res.ratio("embedded / nbank-deposit", "nbankd-embedded files/s", "nbank-deposit files/s")
    dj = res.ratio(
        "nbankd-django / nbank-deposit", "nbankd-django files/s", "nbank-deposit files/s"
    )
    lim = res.ratio("nbankd-django / bare-post", "nbankd-django files/s", "bare-post files/s")
    res.target("burst: embedded vs nbank deposit", ">= 10x", f"{emb:.1f}x", emb >= 10)
    res.target("burst: django vs nbank deposit", ">= 1.5x", f"{dj:.2f}x", dj >= 1.5)
    res.target("burst: django vs bare-POST limit", ">= 80%", f"{lim:.0%}", lim >= 0.8)
    if full_stub:  # no target: what a folder of many names costs, beside none
        res.ratio(f"{full} / nbankd-embedded", f"{full} files/s", "nbankd-embedded files/s")
    if slow_n:
        slow = ctx.server("default")
        for rep in range(ctx.repeats):
            ctx.log(f"  burst (default hasher) rep {rep + 1}/{ctx.repeats}: {slow_n} files")
            for name, fn in (
                ("default-hasher nbankd-django", lambda: nbankd_burst(ctx, slow, slow_n, size)),
                ("default-hasher nbank-deposit", lambda: nbank_burst(ctx, slow, slow_n, size)),
                ("default-hasher bare-post", lambda: bare_posts(ctx, slow, slow_n, size)),
            ):
                out = fn()
                ctx.log(f"    {name}: {out['files_per_s']:.2f} files/s")
                _record(res, name, out)
        res.ratio(
            "default hasher: nbankd-django / nbank-deposit",
            "default-hasher nbankd-django files/s",
            "default-hasher nbank-deposit files/s",
        )
        res.ratio(
            "default hasher: nbankd-django / bare-post",
            "default-hasher nbankd-django files/s",
            "default-hasher bare-post files/s",
        )
    return res
