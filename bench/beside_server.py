"""What a load beside django-neurobank costs its bare-POST rate (issue #16's limit).

    .venv/bin/python bench/beside_server.py                 # 2,000 POSTs, 2 rounds
    .venv/bin/python bench/beside_server.py --quick         # 50 POSTs, 1 round

The burst's django targets compare nbankd, which shares this machine's cores with
the server, to the server's bare-POST rate. This measures what sharing costs: the
bench's own bare-POST client (``bench/scenarios/burst.py``: 4 threads, nbankd's
body and credentials) run alone, then beside one synthetic load at a time, each a
separate process started just before the POSTs and killed after them:

- ``fsync N/s``: creates 4 KiB files at N per second, ``fdatasync`` on each, and
  fsyncs their folder twice per three files (about nbankd's sync calls per file in
  a burst against django-neurobank), on the disk of ``--work-dir``;
- ``cpu 0.5 core``: a busy loop for 5 ms of every 10 ms (about the half core nbankd
  keeps busy in that burst), then the same at ``nice 10`` and ``nice 19``.

Prints records/s and the server's CPU per record for each, round after round; a
load's cost is how far the rate falls from the alone rows of the same run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.context import Context
from bench.scenarios.burst import bare_posts

FSYNC_LOAD = r"""
import os, sys, time
folder, rate = sys.argv[1], float(sys.argv[2])
os.makedirs(folder, exist_ok=True)
dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
i, t0 = 0, time.monotonic()
while True:
    for _ in range(3):
        fd = os.open(f"{folder}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(4096))
        os.fdatasync(fd)
        os.close(fd)
        i += 1
    os.fsync(dfd)
    os.fsync(dfd)
    ahead = t0 + i / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
"""

CPU_LOAD = r"""
import sys, time
duty = float(sys.argv[1])
while True:
    start = time.monotonic()
    while time.monotonic() - start < 0.01 * duty:
        pass
    time.sleep(0.01 * (1 - duty))
"""


def loads(work: Path, quick: bool) -> list[tuple[str, list[str] | None]]:
    """(label, argv of the load process or None for none), in the order run; the fsync
    loads write into new folders under ``work``."""
    py = sys.executable
    rows: list[tuple[str, list[str] | None]] = [
        ("alone", None),
        ("fsync 190 files/s", [py, "-c", FSYNC_LOAD, str(work / "fsync-190"), "190"]),
        ("cpu 0.5 core", [py, "-c", CPU_LOAD, "0.5"]),
    ]
    if not quick:
        rows += [
            ("fsync 600 files/s", [py, "-c", FSYNC_LOAD, str(work / "fsync-600"), "600"]),
            ("cpu 0.5 core, nice 10", ["nice", "-n", "10", py, "-c", CPU_LOAD, "0.5"]),
            ("cpu 0.5 core, nice 19", ["nice", "-n", "19", py, "-c", CPU_LOAD, "0.5"]),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="50 POSTs, one round, three rows")
    ap.add_argument("--posts", type=int, help="POSTs per row (default 2000; quick: 50)")
    ap.add_argument("--rounds", type=int, help="rounds over every row (default 2; quick: 1)")
    ap.add_argument("--work-dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args(argv)
    posts = args.posts or (50 if args.quick else 2000)
    rounds = args.rounds or (1 if args.quick else 2)
    work = Path(tempfile.mkdtemp(dir=args.work_dir, prefix="nbankd-beside-"))
    ctx = Context(work=work, repeats=1, quick=args.quick)
    try:
        server = ctx.server("fast")
        print(f"{'load':24s} {'records/s':>10s} {'server CPU/record':>18s}", flush=True)
        for _ in range(rounds):
            for label, load in loads(ctx.scratch("round"), args.quick):
                proc = subprocess.Popen(load) if load else None
                try:
                    out = bare_posts(ctx, server, posts, 4096)
                finally:
                    if proc is not None:
                        proc.kill()
                        proc.wait()
                print(
                    f"{label:24s} {out['files_per_s']:10.1f} "
                    f"{out['server_cpu_ms_per_file']:15.2f} ms",
                    flush=True,
                )
    finally:
        ctx.close()
        ctx.discard(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
