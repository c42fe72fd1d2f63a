"""Sync calls per file of a burst, and the limits that bound it (issue #16, item 6).

    .venv/bin/python bench/syscounts.py               # 500 files of 4 KiB
    .venv/bin/python bench/syscounts.py --quick       # 50 files, short disk loops
    .venv/bin/python bench/syscounts.py --files 2000 --no-save

For one burst of N files of 4 KiB (random bytes), counts the calls that wait for
the disk (fsync, fdatasync, sync_file_range, syncfs, sync, msync) made by

- ``nbankd`` with its embedded registry, the burst of ``bench/scenarios/burst.py``
  (``nbankd_burst``) with ``strace -f -y`` attached to the daemon from READY=1
  until it is stopped (start-up and shut-down are left out);
- ``nbank deposit`` of N files against the bench's django-neurobank site (fast
  hasher), run under ``strace -f -y``, and the site's gunicorn processes during
  that command (strace attached to them: their SQLite commits are the registry's
  share of a hand deposit);

and sorts every call by the path strace prints for its file descriptor (``-y``):
the journal, the registry's database, data files, stub folders, ... Journal
commits per file are counted as the fsync/fdatasync calls on ``journal.sqlite3-wal``
(the journal runs in WAL mode with ``synchronous=FULL``: one sync of the WAL per
durable commit; syncs of ``journal.sqlite3`` itself are checkpoints).

Beside the counts, the same run measures what bounds a burst on this machine: the
untraced files/s of both (the bench's own burst functions: traced speed is not
representative), nbankd's CPU per file in that untraced burst (one core's ceiling,
the GIL), and the synchronous commit rate of the disk holding ``--work-dir``: a
loop that creates a file, writes 4 KiB, fdatasyncs it and fsyncs its folder, on
one thread and on four. Results go to ``bench/results/syscounts-<UTC>.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

# the repository root, not bench/ (whose modules must not shadow the standard library)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import pyspy  # noqa: E402
from bench.common import NBANK, machine_info, run_timed, versions, wait_for  # noqa: E402
from bench.context import Context, unique  # noqa: E402
from bench.run import RESULTS  # noqa: E402
from bench.scenarios.burst import (  # noqa: E402
    make_files,
    nbank_burst,
    nbankd_burst,
    registry_dtype,
)
from bench.server import Server, process_tree  # noqa: E402
from nbankd.archive.layout import RESOURCES_NAME, STAGING_NAME  # noqa: E402
from nbankd.config.model import EMBEDDED_DB_NAME  # noqa: E402
from nbankd.daemon.service import state_paths  # noqa: E402
from nbankd.names import WORK_DIR_NAME  # noqa: E402

SYNC_CALLS = ("fsync", "fdatasync", "sync_file_range", "syncfs", "sync", "msync")
STRACE_ARGS = ("-f", "-y", "-qq", "-e", "trace=" + ",".join(SYNC_CALLS))

JOURNAL = "journal database (journal.sqlite3, -wal)"
REGISTRY = "registry database"
DATA = "data files (staging/, resources/)"
STUBS = "stub folders (resources/XX)"
TOP_FOLDERS = "resources/ and staging/ folders"
RECEIPTS = "receipts (folder and .jsonl)"
WORK = f"inbox work folder ({WORK_DIR_NAME})"
INBOX = "inbox folder"
OTHER = "other"
CATEGORIES = (JOURNAL, REGISTRY, DATA, STUBS, TOP_FOLDERS, RECEIPTS, WORK, INBOX, OTHER)
#: fsync/fdatasync of the journal's WAL: one per durable commit (synchronous=FULL)
COMMITS = "journal commits (syncs of journal.sqlite3-wal)"
CHECKPOINTS = "journal checkpoints (syncs of journal.sqlite3)"

# "1234 fsync(7</var/tmp/x/state/journal.sqlite3-wal>) = 0" (pid first with -f)
_CALL = re.compile(r"^(?:\d+\s+)?(" + "|".join(SYNC_CALLS) + r")\((.*)$")
_FD_PATH = re.compile(r"^\d+<(.*?)>(?=[,) ]|$)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/syscounts.py",
        description="sync calls per file of a burst (strace), nbankd and nbank deposit, "
        "with the disk's commit rate and nbankd's CPU per file",
    )
    p.add_argument("--files", type=int, help="files in the burst (default 500; quick: 50)")
    p.add_argument("--quick", action="store_true", help="50 files, 1 s disk loops")
    p.add_argument(
        "--disk-seconds", type=float, help="length of each disk loop (default 3; quick: 1)"
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where scratch folders go: the disk being measured (default /var/tmp)",
    )
    p.add_argument("--server-workers", type=int, default=2, help="gunicorn workers (default 2)")
    p.add_argument("--output", type=Path, help="result JSON (default bench/results/syscounts-*)")
    p.add_argument("--no-save", action="store_true", help="print the table, write no JSON")
    p.add_argument("--keep", action="store_true", help="keep scratch folders and traces")
    return p


# -- where a call went ------------------------------------------------------------------


def _covers(prefix: Path | None, path: str) -> bool:
    """``path`` is ``prefix``, a file beside it named PREFIX-* (-wal, -journal), or under it."""
    if prefix is None:
        return False
    p = str(prefix)
    return path == p or path.startswith((p + "-", p + "/"))


@dataclass
class Layout:
    """The folders and databases a traced process writes, to sort its sync calls."""

    journal: Path | None = None
    registry: Path | None = None  # a database file, or the folder holding one
    receipts: Path | None = None
    archives: list[Path] = field(default_factory=list)
    inboxes: list[Path] = field(default_factory=list)

    @classmethod
    def of_daemon(cls, config_path: Path) -> Layout:
        """From the configuration ``bench.nbankd_proc.Nbankd`` wrote for a daemon."""
        cfg = yaml.safe_load(config_path.read_text())
        state_dir = Path(cfg["state_dir"])
        paths = state_paths(state_dir)
        return cls(
            journal=paths["journal"],
            registry=state_dir / EMBEDDED_DB_NAME if cfg["registry"] == "embedded" else None,
            receipts=paths["receipts"],
            archives=[Path(a["path"]) for a in cfg["archives"]],
            inboxes=[Path(i["path"]) for i in cfg["inboxes"]],
        )

    def category(self, path: str | None) -> str:
        if path is None:  # sync(), msync(): no file descriptor
            return OTHER
        path = path.removesuffix(" (deleted)")
        if _covers(self.journal, path):
            return JOURNAL
        if _covers(self.registry, path):
            return REGISTRY
        if _covers(self.receipts, path):
            return RECEIPTS
        for archive in self.archives:
            for top in (archive / RESOURCES_NAME, archive / STAGING_NAME):
                if path == str(top):
                    return TOP_FOLDERS
                if path.startswith(str(top) + "/"):
                    rel = path[len(str(top)) + 1 :].split("/")
                    if top.name == RESOURCES_NAME and len(rel) == 1 and len(rel[0]) == 2:
                        return STUBS
                    return DATA
        for inbox in self.inboxes:
            if _covers(inbox / WORK_DIR_NAME, path):
                return WORK
            if path == str(inbox):
                return INBOX
        return OTHER


@dataclass
class Counts:
    """Sync calls of one traced process tree, by category, by call and by path."""

    by_category: collections.Counter[str] = field(default_factory=collections.Counter)
    by_call: collections.Counter[str] = field(default_factory=collections.Counter)
    by_path: collections.Counter[str] = field(default_factory=collections.Counter)
    other: collections.Counter[str] = field(default_factory=collections.Counter)  # paths
    commits: int = 0
    checkpoints: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_category.values())


def count_trace(trace: Path, layout: Layout) -> Counts:
    """Reads an ``strace -f -y`` output file and sorts its sync calls."""
    counts = Counts()
    wal = f"{layout.journal}-wal" if layout.journal else None
    for line in trace.read_text(errors="replace").splitlines():
        m = _CALL.match(line)
        if m is None:  # "<... fsync resumed>", exits and signals: counted at the call
            continue
        call, args = m.groups()
        fd = _FD_PATH.match(args)
        path = fd.group(1) if fd else None
        category = layout.category(path)
        counts.by_category[category] += 1
        if category == OTHER:
            counts.other[path or f"({call}, no file)"] += 1
        counts.by_call[call] += 1
        counts.by_path[path or f"({call}, no file)"] += 1
        if call in ("fsync", "fdatasync") and path is not None:
            counts.commits += path == wal
            counts.checkpoints += path == str(layout.journal)
    return counts


# -- tracing --------------------------------------------------------------------------------


def strace_binary() -> str | None:
    return shutil.which("strace")


def _traced_by(pids: list[int], tracer: int) -> bool:
    """Every thread of every pid is traced by ``tracer`` (its TracerPid)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            status = (task / "status").read_text()
            line = next(x for x in status.splitlines() if x.startswith("TracerPid:"))
            if int(line.split()[1]) != tracer:
                return False
    return True


@dataclass
class Attached:
    """``strace -f -y -p PID...`` following running processes, until :meth:`stop`."""

    proc: subprocess.Popen[bytes]
    output: Path

    @classmethod
    def start(cls, strace: str, pids: list[int], output: Path) -> Attached:
        argv = [strace, *STRACE_ARGS, "-o", str(output)]
        for pid in pids:
            argv += ["-p", str(pid)]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(
            lambda: proc.poll() is not None or _traced_by(pids, proc.pid),
            timeout=60,
            what=f"strace to attach to {pids}",
        )
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError(f"strace -p {pids} exited {proc.returncode}: {err[-1000:]}")
        return cls(proc, output)

    def stop(self) -> None:
        """Detaches (SIGINT) and waits until the output file is complete."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=60)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@dataclass
class DaemonTracer:
    """Traces each nbankd that ``bench.nbankd_proc.Nbankd`` starts, through the hook it
    offers for samplers (``bench.pyspy.PROFILER``: attached once READY=1 arrives,
    detached before the daemon is stopped), so the counts cover the burst only."""

    strace: str
    folder: Path
    work: Path  # Context.work: a daemon's folder is WORK/<label>
    traces: list[tuple[Path, Layout]] = field(default_factory=list)
    _live: dict[int, Attached] = field(default_factory=dict)

    def attach(self, pid: int, label: str) -> None:
        layout = Layout.of_daemon(self.work / label / "nbankd.yaml")
        out = self.folder / f"{label}-{pid}.strace"
        self._live[pid] = Attached.start(self.strace, [pid], out)
        self.traces.append((out, layout))

    def detach(self, pid: int) -> None:
        attached = self._live.pop(pid, None)
        if attached is not None:
            attached.stop()


def traced_nbankd(
    ctx: Context, strace: str, folder: Path, n: int, size: int
) -> tuple[dict[str, float], Counts]:
    """The bench's embedded-registry burst with strace attached to the daemon."""
    tracer = DaemonTracer(strace, folder, ctx.work)
    saved, pyspy.PROFILER = pyspy.PROFILER, tracer  # type: ignore[assignment]
    try:
        out = nbankd_burst(ctx, None, n, size)
    finally:
        pyspy.PROFILER = saved
    [(trace, layout)] = tracer.traces
    return out, count_trace(trace, layout)


def traced_nbank(
    ctx: Context, strace: str, folder: Path, server: Server, n: int, size: int
) -> tuple[dict[str, float], Counts, Counts]:
    """``nbank deposit`` of n fresh files under strace, and the server's calls meanwhile."""
    root = ctx.scratch("sync-nbank")
    home = root / "home"
    archive_dir = root / unique("nbarch")
    env = ctx.nbank_env(server, home)
    ctx.nbank_init(server, archive_dir, home)
    src = root / "src"
    files = make_files(src, unique("n"), n, size)
    client_trace, server_trace = folder / "nbank.strace", folder / "server.strace"
    try:
        attached = Attached.start(strace, process_tree(server.proc.pid), server_trace)
        try:
            elapsed = run_timed(
                [
                    strace,
                    *STRACE_ARGS,
                    "-o",
                    str(client_trace),
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
        finally:
            attached.stop()
        deposited = len(list((archive_dir / RESOURCES_NAME).rglob("*.dat")))
        if deposited != n:
            raise RuntimeError(f"nbank deposited {deposited} of {n} files")
    finally:
        ctx.discard(root)
    client = count_trace(client_trace, Layout(archives=[archive_dir], inboxes=[src]))
    on_server = count_trace(server_trace, Layout(registry=server.site_dir))
    return {"files_per_s": n / elapsed, "seconds": elapsed}, client, on_server


# -- the limits -----------------------------------------------------------------------------


def disk_commit_rate(folder: Path, threads: int, seconds: float, size: int) -> dict[str, float]:
    """Files/s of a loop that creates a file, writes ``size`` bytes, fdatasyncs it and
    fsyncs its folder (the least a durable deposit of one file costs), on ``threads``
    threads sharing one folder."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    deadline = time.monotonic() + seconds

    def loop(k: int) -> int:
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        done = 0
        try:
            while time.monotonic() < deadline:
                fd = os.open(folder / f"t{k}-{done}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    os.write(fd, data)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
                os.fsync(dfd)
                done += 1
        finally:
            os.close(dfd)
        return done

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(loop, range(threads)))
    elapsed = time.perf_counter() - t0
    shutil.rmtree(folder, ignore_errors=True)
    return {"threads": threads, "files": total, "seconds": elapsed, "files_per_s": total / elapsed}


# -- the table ------------------------------------------------------------------------------


def per_file(counts: Counts, n: int) -> dict[str, Any]:
    return {
        "calls_per_file": {c: counts.by_category[c] / n for c in CATEGORIES},
        "total_per_file": counts.total / n,
        "by_call_per_file": {c: counts.by_call[c] / n for c in SYNC_CALLS},
        COMMITS: counts.commits / n,
        CHECKPOINTS: counts.checkpoints / n,
        "calls": counts.total,
        "top_paths": counts.by_path.most_common(12),
        "other_paths": counts.other.most_common(12),
    }


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(doc: dict[str, Any]) -> str:
    """A markdown table: sync calls per file by category and by call, journal commits,
    then the speeds (untraced from the bench's burst functions, traced for reference)."""
    cols = doc["columns"]
    names = list(cols)
    lines = [
        "| sync calls per file | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for cat in CATEGORIES:
        row = [_cell(cols[c]["calls_per_file"][cat]) for c in names]
        lines.append(f"| {cat} | " + " | ".join(row) + " |")
    totals = [_cell(cols[c]["total_per_file"]) for c in names]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    for call in SYNC_CALLS:
        row = [_cell(cols[c]["by_call_per_file"][call]) for c in names]
        if any(r != "0.00" for r in row):
            lines.append(f"| of which {call} | " + " | ".join(row) + " |")
    for key in (COMMITS, CHECKPOINTS):
        lines.append(f"| {key} | " + " | ".join(_cell(cols[c].get(key)) for c in names) + " |")
    speeds = doc["speeds"]
    for key, label in (("untraced", "files/s untraced"), ("traced", "files/s traced (slowed)")):
        row = [_fmt_speed(speeds.get(c, {}).get(key)) for c in names]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt_speed(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def limits_text(doc: dict[str, Any]) -> list[str]:
    lim = doc["limits"]
    out = []
    for d in lim["disk"]:
        out.append(
            f"disk, create + write 4 KiB + fdatasync + fsync(folder), {d['threads']} thread(s): "
            f"{d['files_per_s']:.0f} files/s ({2 * d['files_per_s']:.0f} sync calls/s)"
        )
    if lim["disk_ceiling_files_per_s"] is not None:
        out.append(
            f"disk ceiling at nbankd's {lim['nbankd_sync_calls_per_file']:.2f} sync calls per file "
            f"(if each costs what the loop's do, 4 threads): "
            f"{lim['disk_ceiling_files_per_s']:.0f} files/s"
        )
    cpu = lim["nbankd_cpu_ms_per_file"]
    out.append(
        f"nbankd CPU per file (untraced burst): {cpu:.1f} ms, {lim['nbankd_cores_busy']:.2f} "
        f"cores busy -> ceiling {1000 / cpu:.0f} files/s on one core (GIL)"
    )
    out.append(
        f"10x `nbank deposit` (untraced {lim['nbank_files_per_s']:.1f} files/s) would need "
        f"{lim['target_files_per_s']:.0f} files/s: {lim['target_cpu_ms_per_file']:.2f} ms of "
        f"CPU and {lim['target_sync_calls_per_s']:.0f} sync calls/s at today's "
        f"{lim['nbankd_sync_calls_per_file']:.2f} per file"
    )
    return out


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    strace = strace_binary()
    if strace is None:
        print("bench/syscounts.py needs strace (apt-get install strace)")
        return 2
    n = args.files or (50 if args.quick else 500)
    seconds = args.disk_seconds or (1.0 if args.quick else 3.0)
    size = 4096
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbankd-syscounts-", dir=args.work_dir))
    traces = work / "traces"
    traces.mkdir()
    ctx = Context(
        work=work,
        repeats=1,
        quick=args.quick,
        server_workers=args.server_workers,
        keep=args.keep,
    )
    started = datetime.now(UTC)
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["bench/syscounts.py", *argv]),
        "files": n,
        "size_bytes": size,
        "machine": machine_info(work),
        "versions": versions(),
        "strace": " ".join(["strace", *STRACE_ARGS]),
        "journal_commits_counted_as": "fsync/fdatasync calls on journal.sqlite3-wal "
        "(WAL, synchronous=FULL: one per durable commit); checkpoints: on journal.sqlite3",
    }
    print(f"sync calls per file: {n} x {size} B; scratch {work}")
    try:
        server = ctx.server("fast")
        print("  untraced: nbankd (embedded registry)", flush=True)
        plain_nbankd = nbankd_burst(ctx, None, n, size)
        print(f"    {plain_nbankd['files_per_s']:.1f} files/s")
        print("  untraced: nbank deposit", flush=True)
        plain_nbank = nbank_burst(ctx, server, n, size)
        print(f"    {plain_nbank['files_per_s']:.1f} files/s")
        print("  traced: nbankd (embedded registry)", flush=True)
        traced_d, nbankd_counts = traced_nbankd(ctx, strace, traces, n, size)
        print("  traced: nbank deposit and the server", flush=True)
        traced_n, nbank_counts, server_counts = traced_nbank(ctx, strace, traces, server, n, size)
        print("  disk commit rate", flush=True)
        disk = [disk_commit_rate(work / f"disk-{k}", k, seconds, size) for k in (1, 4)]
    finally:
        ctx.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    both = Counts(
        nbank_counts.by_category + server_counts.by_category,
        nbank_counts.by_call + server_counts.by_call,
        nbank_counts.by_path + server_counts.by_path,
        nbank_counts.other + server_counts.other,
    )
    doc["columns"] = {
        "nbankd (embedded)": per_file(nbankd_counts, n),
        "nbank deposit": per_file(nbank_counts, n),
        "django-neurobank (during nbank)": per_file(server_counts, n),
        "nbank + server": per_file(both, n),
    }
    for name in ("nbank deposit", "django-neurobank (during nbank)", "nbank + server"):
        for key in (COMMITS, CHECKPOINTS):
            doc["columns"][name][key] = None  # no journal on that side
    doc["speeds"] = {
        "nbankd (embedded)": {
            "untraced": plain_nbankd["files_per_s"],
            "traced": traced_d["files_per_s"],
        },
        "nbank + server": {
            "untraced": plain_nbank["files_per_s"],
            "traced": traced_n["files_per_s"],
        },
    }
    nbankd_calls = nbankd_counts.total / n
    target = 10 * plain_nbank["files_per_s"]
    doc["limits"] = {
        "disk": disk,
        "nbankd_cpu_ms_per_file": plain_nbankd["nbankd_cpu_ms_per_file"],
        "nbankd_cores_busy": plain_nbankd["nbankd_cpu_share"],
        "nbankd_cpu_ceiling_files_per_s": 1000 / plain_nbankd["nbankd_cpu_ms_per_file"],
        "nbankd_sync_calls_per_file": nbankd_calls,
        "nbank_files_per_s": plain_nbank["files_per_s"],
        "target_files_per_s": target,
        "target_cpu_ms_per_file": 1000 / target,
        "target_sync_calls_per_s": target * nbankd_calls,
        "disk_ceiling_files_per_s": (
            2 * disk[-1]["files_per_s"] / nbankd_calls if nbankd_calls else None
        ),
    }
    doc["untraced"] = {"nbankd (embedded)": plain_nbankd, "nbank deposit": plain_nbank}
    doc["traced"] = {"nbankd (embedded)": traced_d, "nbank deposit": traced_n}
    doc["notes"] = [
        "traced files/s are slowed by strace (ptrace stops on every system call): "
        "read speeds from the untraced row",
        "nbankd is traced from READY=1 to its stop (start-up and shut-down left out); "
        "nbank deposit from its start to its exit; the server only during nbank deposit",
        "categories follow the path strace -y prints for the call's file descriptor",
    ]
    doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(table(doc))
    print()
    for line in limits_text(doc):
        print(f"- {line}")
    for name, col in doc["columns"].items():
        if col["other_paths"]:
            where = ", ".join(f"{p} ({k})" for p, k in col["other_paths"][:4])
            print(f"- {name}, other: {where}")
    for note in doc["notes"]:
        print(f"note: {note}")
    if not args.no_save:
        out = args.output or RESULTS / f"syscounts-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
