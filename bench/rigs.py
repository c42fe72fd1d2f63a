"""A lab of rigs against one registry (issue #18, item 5): how many rigs a registry host serves.

    .venv/bin/python bench/rigs.py              # 400 files per rig, 1/2/4 rigs, both hashers
    .venv/bin/python bench/rigs.py --files 200 --rigs 1,4 --hasher default
    .venv/bin/python bench/rigs.py --quick      # 1 rig, 20 files, fast hasher (a smoke run)

Runs on its own. It starts a private PostgreSQL cluster and django-neurobank on it
under gunicorn with the test fixtures' code (``tests/fixtures/postgres.py``,
``tests/fixtures/django_server.py``), once per password hasher: the fast MD5 hasher
the tests use, and Django's default PBKDF2, which a lab runs and which every
authenticated request pays. For each rig count it starts that many real ``nbankd``
daemons (``bench/nbankd_proc.py``), each with its own state directory, inbox and
registry user, depositing into one shared archive; stages N files of 4 KiB beside
each inbox, renames them all in at once (rigs interleaved), and measures until
every receipt is written:

- total files/s: all files / (last receipt - first rename);
- p50 and p99 of (receipt appears - the file was renamed into its inbox), which
  includes the inbox's ``settle_seconds``;
- CPU seconds (user + system) of gunicorn's and of PostgreSQL's whole process trees,
  from ``/proc/PID/stat`` (reaped children included: PostgreSQL starts a backend per
  connection), and of the daemons, over the same interval.

Prints one table, with the machine's load average at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# the repository root, not bench/ (whose modules must not shadow the standard library);
# tests/ for the fixtures' modules (``fixtures.postgres``, ``fixtures.django_server``)
REPO = Path(__file__).resolve().parent.parent
sys.path[0] = str(REPO)
sys.path.insert(1, str(REPO / "tests"))

from bench.common import percentile, proc_cpu_seconds, wait_for  # noqa: E402
from bench.nbankd_proc import InboxSpec, Nbankd, ReceiptTail  # noqa: E402
from bench.run import _byte_compile  # noqa: E402
from bench.scenarios.burst import make_files  # noqa: E402
from bench.server import DEFAULT_HASHER, FAST_HASHER, process_tree  # noqa: E402
from fixtures import django_server as site  # noqa: E402
from fixtures.postgres import PostgresDatabase, private_postgres  # noqa: E402
from nbankd.archive.opening import create_archive  # noqa: E402

HASHERS = {"fast": FAST_HASHER, "default": DEFAULT_HASHER}
FILE_SIZE = 4096
SETTLE = 1.0
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: the line of the fixtures' settings that picks the test-only hasher
_FIXTURE_HASHERS = 'PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]'


@dataclass
class Row:
    hasher: str
    rigs: int
    files: int
    seconds: float
    files_per_s: float
    p50: float
    p99: float
    gunicorn_cpu: float
    postgres_cpu: float
    nbankd_cpu: float


def _counts(text: str) -> list[int]:
    """``1,2,4`` as a list of positive rig counts (argparse reports a bad one, exit 2)."""
    try:
        counts = [int(x) for x in text.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want positive counts, e.g. 1,2,4")
    return counts


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/rigs.py",
        description="1, 2 and 4 nbankd rigs against one PostgreSQL-backed django-neurobank",
    )
    p.add_argument("--files", type=int, help="4 KiB files per rig (default 400; quick: 20)")
    p.add_argument("--rigs", type=_counts, help="rig counts, comma-separated (default 1,2,4)")
    p.add_argument("--hasher", choices=("fast", "default", "both"), help="(default both)")
    p.add_argument("--quick", action="store_true", help="1 rig, 20 files, fast hasher only")
    p.add_argument("--server-workers", type=int, default=2, help="gunicorn workers (default 2)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the scratch folder goes: the disk being measured (default /var/tmp)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p


# -- /proc --------------------------------------------------------------------------


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process tree: each living process's own user + system time
    plus that of its reaped children (cutime + cstime), so short-lived workers
    (a PostgreSQL backend per connection) count after they exit."""
    total = 0
    for p in process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(f) for f in fields[11:15])
    return total / CLK_TCK


def _postmaster_pid(db: PostgresDatabase) -> int:
    return int((Path(db.host) / "data" / "postmaster.pid").read_text().split()[0])


# -- the registry -------------------------------------------------------------------


@dataclass
class Registry:
    server: site.DjangoServer
    gunicorn_pid: int


@contextmanager
def serve_registry(
    folder: Path, db: PostgresDatabase, hasher: str, workers: int
) -> Iterator[Registry]:
    """django-neurobank on ``db`` under gunicorn, with the password hasher ``hasher``:
    the fixtures' site, its hasher line replaced before any user is made."""
    database = repr(db.django_settings())
    site.write_site(folder, database)
    settings = folder / site.SITE_PACKAGE / "settings.py"
    text = settings.read_text()
    if _FIXTURE_HASHERS not in text:
        raise RuntimeError(f"{settings}: the fixtures' PASSWORD_HASHERS line has changed")
    settings.write_text(text.replace(_FIXTURE_HASHERS, f"PASSWORD_HASHERS = [{hasher!r}]"))
    python = sys.executable
    site._run_manage(python, folder, ["migrate", "--noinput"])
    admin, admin_pw = f"bench-admin-{secrets.token_hex(3)}", secrets.token_urlsafe(16)
    code = (
        "from django.contrib.auth.models import User\n"
        f"User.objects.create_superuser({admin!r}, 'a@example.org', {admin_pw!r})\n"
    )
    site._run_manage(python, folder, ["shell", "--no-imports", "-c", code])
    log_path = folder / "gunicorn.log"
    proc, url = site._start_gunicorn(python, folder, workers, log_path)
    try:
        site._wait_ready(url, proc, log_path)
        server = site.DjangoServer(url, admin, admin_pw, admin, admin_pw, folder, python, log_path)
        yield Registry(server, proc.pid)
    finally:
        site._stop(proc)


# -- one measurement ----------------------------------------------------------------


def _rig_users(server: site.DjangoServer, count: int) -> list[tuple[str, str]]:
    """``count`` registry users (superusers, as the lab-of-rigs tests make), one shell."""
    users = [(site.unique_name("rig"), secrets.token_urlsafe(12)) for _ in range(count)]
    code = "from django.contrib.auth.models import User\n" + "".join(
        f"User.objects.create_superuser({u!r}, 'rig@example.org', {p!r})\n" for u, p in users
    )
    server.shell(code)
    return users


def measure(
    registry: Registry, db: PostgresDatabase, root: Path, hasher: str, rigs: int, n: int
) -> Row:
    """``rigs`` daemons, ``n`` files each dropped at once; waits for every receipt."""
    server = registry.server
    dtype = server.add_datatype(site.unique_name("rigsdt"))
    archive_name = site.unique_name("rigs")
    archive = root / "archive"
    create_archive(archive, server.url)
    server.add_archive(str(archive), archive_name)
    daemons: list[Nbankd] = []
    for rig, user in enumerate(_rig_users(server, rigs)):
        rig_root = root / f"rig{rig}"
        (rig_root / "inbox").mkdir(parents=True)
        options = {"settle_seconds": SETTLE, "metadata": {"rig": f"rig{rig}"}}
        daemons.append(
            Nbankd(
                rig_root,
                registry=server.url,
                auth=user,
                archives=[{"path": str(archive), "name": archive_name, "create": True}],
                inboxes=[InboxSpec(rig_root / "inbox", archive_name, dtype, options)],
            )
        )
    staged = [make_files(d.root / "src", f"r{i}-{secrets.token_hex(3)}", n, FILE_SIZE)
              for i, d in enumerate(daemons)]  # fmt: skip
    tails = [ReceiptTail(d.receipts_dir, interval=0.02) for d in daemons]
    try:
        for d in daemons:
            d.start()
        for t in tails:
            t.__enter__()
        postmaster = _postmaster_pid(db)
        g0, p0 = tree_cpu_seconds(registry.gunicorn_pid), tree_cpu_seconds(postmaster)
        d0 = sum(proc_cpu_seconds(d.pid) for d in daemons)
        dropped: dict[str, float] = {}
        for i in range(n):  # rigs interleaved: every inbox fills at the same moment
            for d, files in zip(daemons, staged, strict=True):
                os.rename(files[i], d.root / "inbox" / files[i].name)
                dropped[files[i].name] = time.time()

        def done() -> bool:
            for d in daemons:
                if d.proc is not None and d.proc.poll() is not None:
                    raise RuntimeError(f"nbankd {d.root.name} exited:\n{d.log_tail()}")
                if any((d.root / "inbox" / "rejected").glob("*.reason")):
                    raise RuntimeError(f"{d.root.name} rejected files: see its inbox/rejected")
            return all(t.count() >= n for t in tails)

        wait_for(done, timeout=120 + rigs * n * 1.0, what=f"{rigs * n} receipts", interval=0.05)
        g1, p1 = tree_cpu_seconds(registry.gunicorn_pid), tree_cpu_seconds(postmaster)
        d1 = sum(proc_cpu_seconds(d.pid) for d in daemons)
    finally:
        for t in tails:
            t.__exit__(None, None, None)
        for d in daemons:
            d.stop()
    latencies = []
    last = 0.0
    for t in tails:
        for stamp, receipt in t.stamps():
            latencies.append(stamp - dropped[Path(receipt["source"]).name])
            last = max(last, stamp)
    seconds = last - min(dropped.values())
    stored = sum(1 for p in (archive / "resources").rglob("*.dat") if p.is_file())
    if stored != rigs * n:
        raise RuntimeError(f"{stored} files in the shared archive, expected {rigs * n}")
    return Row(
        hasher=hasher,
        rigs=rigs,
        files=rigs * n,
        seconds=seconds,
        files_per_s=rigs * n / seconds,
        p50=percentile(latencies, 50),
        p99=percentile(latencies, 99),
        gunicorn_cpu=g1 - g0,
        postgres_cpu=p1 - p0,
        nbankd_cpu=d1 - d0,
    )


# -- the table ----------------------------------------------------------------------

HEADER = (
    "hasher",
    "rigs",
    "files",
    "seconds",
    "files/s",
    "p50 s",
    "p99 s",
    "gunicorn CPU s",
    "PostgreSQL CPU s",
    "registry ms/file",
    "registry cores",
    "nbankd CPU s",
)


def _cells(r: Row) -> tuple[str, ...]:
    registry = r.gunicorn_cpu + r.postgres_cpu
    return (
        r.hasher,
        str(r.rigs),
        str(r.files),
        f"{r.seconds:.1f}",
        f"{r.files_per_s:.1f}",
        f"{r.p50:.2f}",
        f"{r.p99:.2f}",
        f"{r.gunicorn_cpu:.1f}",
        f"{r.postgres_cpu:.1f}",
        f"{1000 * registry / r.files:.1f}",
        f"{registry / r.seconds:.2f}",
        f"{r.nbankd_cpu:.1f}",
    )


def print_table(rows: list[Row], load_start: tuple[float, ...], settle: float) -> None:
    load_end = os.getloadavg()
    print(
        f"\n== rigs: one django-neurobank on PostgreSQL, {FILE_SIZE // 1024} KiB files, "
        f"settle_seconds {settle:g} (in the latencies) =="
    )
    print(f"   {os.cpu_count()} cores; load average at start "
          f"{' '.join(f'{x:.2f}' for x in load_start)}, at end "
          f"{' '.join(f'{x:.2f}' for x in load_end)}")  # fmt: skip
    table = [HEADER, *(_cells(r) for r in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    for row in table:
        print("   | " + " | ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) + " |")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    files = args.files if args.files is not None else (20 if args.quick else 400)
    rigs = args.rigs or ([1] if args.quick else [1, 2, 4])
    hasher = args.hasher or ("fast" if args.quick else "both")
    hashers = ["fast", "default"] if hasher == "both" else [hasher]
    if files < 1:
        print("bench/rigs.py: --files must be at least 1", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    _byte_compile()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbankd-bench-rigs-", dir=args.work_dir))
    rows: list[Row] = []
    print(f"rigs benchmark: {files} files per rig, rigs {rigs}, hashers {hashers}; scratch {work}")
    try:
        with private_postgres() as db:
            for h in hashers:
                with serve_registry(work / f"site-{h}", db, HASHERS[h], args.server_workers) as reg:
                    for count in rigs:
                        print(f"-- {h} hasher, {count} rig(s)", flush=True)
                        root = work / f"{h}-{count}"
                        rows.append(measure(reg, db, root, h, count, files))
                        print(f"   {rows[-1].files_per_s:.1f} files/s, p99 {rows[-1].p99:.2f} s")
                        if not args.keep:
                            shutil.rmtree(root, ignore_errors=True)
    except subprocess.SubprocessError as err:
        print(f"bench/rigs.py: {err}", file=sys.stderr)
        return 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows, load_start, SETTLE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
