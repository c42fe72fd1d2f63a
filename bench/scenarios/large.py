"""Scenario 2: one large file, across filesystems and on one, with cold caches.

Across filesystems the inbox is a private tmpfs (mounted by this process inside
``unshare -m``) and the archive is on the work disk: nbankd with ``verify: true``
(the default) and ``verify: false``, ``nbank deposit`` of the same kind of file,
and the limit measured in the same run: ``cp`` plus ``sync FILE`` (an fsync of
the copy) onto the disk, and SHA-1 throughput of the same bytes (hashlib, 4 MiB reads as nbankd
uses). The single-pass limit is the slower of the two (a copy that hashes as it
goes can at best overlap them). On one filesystem (inbox and archive on the
disk) nbankd uses ``placement: rename``, against ``nbank deposit`` (which
renames too) and the limit of reading and hashing the file once from the disk.

Before each timed run the page cache is dropped (``sync; echo 3 >
/proc/sys/vm/drop_caches``; tmpfs pages are memory and stay). The bytes the
daemon read from storage (``read_bytes`` in ``/proc/PID/io``) show whether
verification read the archive copy back from the disk rather than the cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import NBANK, ScenarioResult, drop_caches, free_bytes, fs_type, run_timed
from bench.context import Context, unique
from bench.nbankd_proc import InboxSpec, Nbankd, ReceiptTail
from bench.scenarios.burst import registry_dtype
from bench.server import Server

SETTLE = 1.0
BLOCK = 4 << 20


def _io(pid: int) -> dict[str, int]:
    """/proc/PID/io: rchar (bytes read by syscalls), read_bytes (fetched from storage)..."""
    out = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = int(value)
    return out


def _unique_copy(master: Path, dest: Path) -> Path:
    """Copies ``master`` to ``dest`` with a fresh first 16 bytes (a new SHA-1 each time)."""
    shutil.copyfile(master, dest)
    with dest.open("r+b") as f:
        f.write(os.urandom(16))
    return dest


def _make_master(path: Path, size: int) -> None:
    chunk = os.urandom(BLOCK)
    with path.open("wb") as f:
        written = 0
        while written < size:
            n = min(BLOCK, size - written)
            f.write(chunk[:n] if written else os.urandom(n))
            written += n


def _sha1_seconds(path: Path) -> float:
    t0 = time.perf_counter()
    digest = hashlib.sha1()
    buf = bytearray(BLOCK)
    view = memoryview(buf)
    with path.open("rb", buffering=0) as f:
        while n := f.readinto(view):
            digest.update(view[:n])
    return time.perf_counter() - t0


class _Mounts:
    """A tmpfs mounted for the run (needs root in a private mount namespace)."""

    def __init__(self, where: Path, size: int) -> None:
        self.where = where
        self.size = size
        self.mounted = False

    def __enter__(self) -> _Mounts:
        self.where.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0 and os.environ.get("NBANKD_BENCH_UNSHARED"):
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={self.size}", "benchtmpfs", str(self.where)],
                capture_output=True,
                text=True,
            )
            self.mounted = proc.returncode == 0
        return self

    def __exit__(self, *exc: object) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.where)], capture_output=True)


def _nbankd_one(
    ctx: Context,
    server: Server,
    source: Path,
    inbox: Path,
    root: Path,
    options: dict[str, Any],
    size: int,
) -> dict[str, float]:
    """Deposits one file with a fresh daemon; returns seconds and bytes read from storage."""
    archive = unique("large")
    daemon = Nbankd(
        root,
        registry=server.url,
        auth=server.auth,
        archives=[{"path": str(root / archive), "name": archive, "create": True}],
        inboxes=[
            InboxSpec(
                inbox, archive, registry_dtype(ctx, server), {"settle_seconds": SETTLE, **options}
            )
        ],
    )
    try:
        daemon.start()
        cold = drop_caches()
        io0 = _io(daemon.pid)
        with ReceiptTail(daemon.receipts_dir, interval=0.005) as tail:
            t0 = time.time()
            os.rename(source, inbox / source.name)
            deadline = time.monotonic() + 600
            while tail.count() < 1:
                if daemon.proc is not None and daemon.proc.poll() is not None:
                    raise RuntimeError(f"nbankd exited:\n{daemon.log_tail()}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no receipt after 600 s:\n{daemon.log_tail()}")
                time.sleep(0.005)  # receipt-tail poll interval
            t1 = tail.stamps()[0][0]
        io1 = _io(daemon.pid)
        return {
            "seconds": t1 - t0 - SETTLE,
            "read_ratio": (io1["read_bytes"] - io0["read_bytes"]) / size,
            "syscall_read_ratio": (io1["rchar"] - io0["rchar"]) / size,
            "cold": float(cold),
        }
    finally:
        daemon.stop()
        ctx.discard(root)


def _nbank_one(ctx: Context, server: Server, source: Path, root: Path) -> dict[str, float]:
    home = root / "home"
    env = ctx.nbank_env(server, home)
    archive_dir = root / unique("nblarge")
    ctx.nbank_init(server, archive_dir, home)
    try:
        cold = drop_caches()
        t0 = time.perf_counter()
        run_timed(
            [NBANK, "deposit", "-d", registry_dtype(ctx, server), str(archive_dir), str(source)],
            env=env,
        )
        t_dep = time.perf_counter() - t0
        for stored in (archive_dir / "resources").rglob("*.bin"):
            fd = os.open(stored, os.O_RDONLY)  # what nbank leaves unsynced, made durable
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        t_sync = time.perf_counter() - t0
        return {"seconds": t_dep, "with_sync": t_sync, "cold": float(cold)}
    finally:
        ctx.discard(root)


def run(ctx: Context, *, mib: int | None = None) -> ScenarioResult:
    mib = mib or (64 if ctx.quick else 1024)
    size = mib << 20
    res = ScenarioResult("large", params={"size_mib": mib, "settle_seconds": SETTLE})
    need = 4 * size + (256 << 20)
    if free_bytes(ctx.work) < need:
        raise RuntimeError(
            f"{ctx.work} has {free_bytes(ctx.work) >> 20} MiB free; the large-file scenario "
            f"needs {need >> 20} MiB: pass --large-mib with a smaller size"
        )
    server = ctx.server("fast")
    with _Mounts(ctx.work / "tmpfs", 3 * size + (64 << 20)) as mnt:
        src_fs = mnt.where if mnt.mounted else ctx.work / "not-tmpfs"
        src_fs.mkdir(exist_ok=True)
        res.params["inbox_fs"] = fs_type(src_fs)
        res.params["archive_fs"] = fs_type(ctx.work)
        if not mnt.mounted:
            res.notes.append(
                "no private tmpfs (not root, or --no-unshare): the 'cross-filesystem' runs "
                "had inbox and archive on the same disk"
            )
        master = src_fs / "master.bin"
        ctx.log(f"  writing a {mib} MiB random file")
        _make_master(master, size)
        disk_master = ctx.work / "disk-master.bin"
        shutil.copyfile(master, disk_master)
        cold_all = True
        for rep in range(ctx.repeats):
            ctx.log(f"  large rep {rep + 1}/{ctx.repeats}")
            # the limit: cp + sync onto the disk, and SHA-1 of the same bytes
            src = _unique_copy(master, src_fs / "limit.bin")
            dest = ctx.work / "limit-copy.bin"
            cold_all &= drop_caches()
            t_cp = run_timed(["sh", "-c", f"cp '{src}' '{dest}' && sync '{dest}'"])
            dest.unlink()
            t_sha = _sha1_seconds(src)
            src.unlink()
            res.add("limit cp+sync", "MB/s", size / 1e6 / t_cp)
            res.add("limit sha1 (tmpfs bytes)", "MB/s", size / 1e6 / t_sha)
            res.add("limit single pass", "MB/s", size / 1e6 / max(t_cp, t_sha))
            res.add("limit serial cp+sha1", "MB/s", size / 1e6 / (t_cp + t_sha))
            for name, opts in (
                ("nbankd verify", {}),
                ("nbankd verify:false", {"verify": False}),
            ):
                root = ctx.scratch("large-nbankd")
                inbox = src_fs / f"inbox-{rep}-{'v' if not opts else 'nv'}"
                src = _unique_copy(master, src_fs / f"{unique('big')}.bin")
                out = _nbankd_one(ctx, server, src, inbox, root, opts, size)
                shutil.rmtree(inbox, ignore_errors=True)
                cold_all &= bool(out["cold"])
                res.add(name, "MB/s", size / 1e6 / out["seconds"])
                res.add(f"{name} storage reads / size", "x", out["read_ratio"])
                res.add(f"{name} bytes read / size", "x", out["syscall_read_ratio"])
                ctx.log(f"    {name}: {size / 1e6 / out['seconds']:.0f} MB/s")
            src = _unique_copy(master, src_fs / f"{unique('big')}.bin")
            out = _nbank_one(ctx, server, src, ctx.scratch("large-nbank"))
            res.add("nbank deposit", "MB/s", size / 1e6 / out["seconds"])
            res.add("nbank deposit + sync", "MB/s", size / 1e6 / out["with_sync"])
            ctx.log(f"    nbank deposit: {size / 1e6 / out['seconds']:.0f} MB/s")
            # one filesystem: placement rename (nbankd) and rename (nbank)
            root = ctx.scratch("large-rename")
            src = _unique_copy(disk_master, ctx.work / f"{unique('big')}.bin")
            cold_all &= drop_caches()
            t_read = _sha1_seconds(src)
            res.add("limit one read+sha1 from disk", "MB/s", size / 1e6 / t_read)
            # a verified deposit: the single pass, then the archive copy read back and hashed
            res.add("limit two pass", "MB/s", size / 1e6 / (max(t_cp, t_sha) + t_read))
            out = _nbankd_one(ctx, server, src, root / "inbox", root, {"placement": "rename"}, size)
            res.add("nbankd rename (same fs)", "MB/s", size / 1e6 / out["seconds"])
            res.add("nbankd rename storage reads / size", "x", out["read_ratio"])
            res.add("nbankd rename bytes read / size", "x", out["syscall_read_ratio"])
            src = _unique_copy(disk_master, ctx.work / f"{unique('big')}.bin")
            out = _nbank_one(ctx, server, src, ctx.scratch("large-nbank-rn"))
            res.add("nbank deposit (same fs)", "MB/s", size / 1e6 / out["seconds"])
        disk_master.unlink()
        master.unlink()
    if not cold_all:
        res.notes.append("page cache could NOT be dropped (not root?): runs were not cold")
    lim = res.ratio(
        "nbankd verify:false / single-pass limit", "nbankd verify:false", "limit single pass"
    )
    vs = res.ratio("nbankd verify:false / nbank deposit", "nbankd verify:false", "nbank deposit")
    res.ratio(
        "nbankd verify:false / nbank deposit + sync", "nbankd verify:false", "nbank deposit + sync"
    )
    res.ratio("nbankd verify / single-pass limit", "nbankd verify", "limit single pass")
    two = res.ratio("nbankd verify / two-pass limit", "nbankd verify", "limit two pass")
    res.ratio(
        "nbankd rename / nbank deposit (same fs)",
        "nbankd rename (same fs)",
        "nbank deposit (same fs)",
    )
    reads = res.metrics["nbankd verify storage reads / size"].median
    reads_nv = res.metrics["nbankd verify:false storage reads / size"].median
    res.target("large: verify:false vs single-pass limit", ">= 85%", f"{lim:.0%}", lim >= 0.85)
    res.target("large: verify:false vs nbank deposit", "> 1x", f"{vs:.2f}x", vs > 1)
    res.target("large: verify vs two-pass limit", ">= 85%", f"{two:.0%}", two >= 0.85)
    res.target(
        "large: verification reads storage",
        "archive copy re-read from disk (read_bytes ~ 1x size)",
        f"{reads:.2f}x size with verify, {reads_nv:.2f}x without",
        reads >= 0.95 and reads_nv < 0.5,
    )
    return res
