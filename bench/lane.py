"""The deposit lane's CPU per small file, in one process (#16).

    .venv/bin/python bench/lane.py                   # 1,000 files of 4 KiB, 3 runs
    .venv/bin/python bench/lane.py --files 200 --runs 1 --profile 25

The burst scenario measures the whole daemon, whose figures move by a fifth from
one run to the next on this machine. This measures one part of it with less around
it: N files journaled at once (no watcher, no settle time, no scanning), then moved
by :func:`nbankd.deposit.rounds.run_round` in rounds of at most 64 (the lane's
batch) until every one is deposited, with the embedded registry, a ``verify: true``
copy into an archive under ``--work-dir``, and the daemon's JSON log lines written
to ``/dev/null``. It prints the process CPU time and wall time per file of the
rounds alone; ``--profile N`` adds cProfile's N most expensive functions and the
number of Python function calls per file (which, unlike the time, does not depend
on the machine's mood).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nbankd.archive import opening
from nbankd.config.model import ArchiveConfig, InboxConfig
from nbankd.deposit import inboxfs
from nbankd.deposit.journal import Journal
from nbankd.deposit.lifecycle import FINAL
from nbankd.deposit.rounds import run_round
from nbankd.deposit.spec import InboxSpec
from nbankd.deposit.steps import Steps
from nbankd.names import WORK_DIR_NAME
from nbankd.registry.factory import open_registry
from nbankd.service.logs import configure_logging

BATCH = 64
SIZE = 4096


def one_run(work: Path, n: int, profile: int, dump: Path | None = None) -> dict[str, float]:
    """Deposits n fresh files in rounds; returns CPU and wall µs per file (and the
    function calls per file when profiled)."""
    root = Path(tempfile.mkdtemp(prefix="lane-", dir=work))
    try:
        inbox = root / "inbox"
        inbox.mkdir()
        registry = open_registry("embedded", embedded_db=root / "registry.sqlite3")
        archive = opening.create_archive(root / "arch", registry.url)
        registry.add_datatype("bench-file")
        registry.add_archive("arch", "neurobank", str(archive.path))
        work_id, rejected_id = inboxfs.prepare_folders(
            inbox, work=WORK_DIR_NAME, rejected="rejected"
        )
        spec = InboxSpec.of(
            InboxConfig(path=inbox, archive="arch", dtype="bench-file"),
            ArchiveConfig(name="arch", path=archive.path),
            work_id=work_id,
            rejected_id=rejected_id,
        )
        journal = Journal(root / "journal.sqlite3")
        steps = Steps(
            journal=journal,
            registry=registry,
            inboxes=lambda key: spec if key == spec.key else None,
            receipts_dir=root / "receipts",
        )
        prefix = secrets.token_hex(3)
        rows = []
        for i in range(n):
            name = f"{prefix}-{i:05d}.dat"
            (inbox / name).write_bytes(os.urandom(SIZE))
            st = os.lstat(inbox / name)
            rows.append(
                {
                    "token": secrets.token_hex(16),
                    "inbox": spec.key,
                    "relpath": os.fsencode(name),
                    "kind": "file",
                    "archive": "arch",
                    "archive_path": str(archive.path),
                    "placement": "copy",
                    "verify": 1,
                    "seen_identity": json.dumps({"dev": st.st_dev, "ino": st.st_ino}),
                    "created": 0.0,
                    "updated": 0.0,
                }
            )
        os.sync()
        pending = journal.add_many(rows)
        prof = cProfile.Profile() if profile else None
        cpu0, wall0 = time.process_time(), time.perf_counter()
        if prof is not None:
            prof.enable()
        while pending:
            batch, pending = pending[:BATCH], pending[BATCH:]
            while batch:
                moved = run_round(steps, batch, now=float("inf"))
                errors = [m.error for m in moved if m.error is not None]
                if errors:
                    raise RuntimeError(f"a step failed: {errors[0]!r}")
                batch = [m.item for m in moved if m.item.state not in FINAL]
        if prof is not None:
            prof.disable()
        cpu1, wall1 = time.process_time(), time.perf_counter()
        unfinished = journal.unfinished()
        if unfinished:
            raise RuntimeError(f"{len(unfinished)} items not finished")
        stored = len(list(archive.resources_dir.rglob("*.dat")))
        if stored != n:
            raise RuntimeError(f"{stored} files stored, expected {n}")
        out = {
            "cpu_us_per_file": 1e6 * (cpu1 - cpu0) / n,
            "wall_us_per_file": 1e6 * (wall1 - wall0) / n,
        }
        if prof is not None:
            stats = pstats.Stats(prof, stream=sys.stderr)
            out["calls_per_file"] = stats.total_calls / n  # type: ignore[attr-defined]
            stats.sort_stats("tottime").print_stats(profile)
            if dump is not None:
                stats.dump_stats(dump)
        journal.close()
        registry.close()
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=1000, help="files per run (default 1000)")
    p.add_argument("--runs", type=int, default=3, help="runs (default 3)")
    p.add_argument("--work-dir", type=Path, default=Path("/var/tmp"), help="scratch folder")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile: N functions")
    p.add_argument(
        "--dump", type=Path, metavar="FILE", help="with --profile: pstats file of the last run"
    )
    args = p.parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as devnull:
        saved, sys.stdout = sys.stdout, devnull
        try:
            configure_logging("json", "info")  # the daemon's log lines, into /dev/null
        finally:
            sys.stdout = saved
        for k in range(args.runs):
            saved, sys.stdout = sys.stdout, devnull
            try:
                out = one_run(args.work_dir, args.files, args.profile, args.dump)
            finally:
                sys.stdout = saved
            shown = ", ".join(f"{key} {value:.0f}" for key, value in out.items())
            print(f"run {k + 1}: {args.files} files: {shown}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
