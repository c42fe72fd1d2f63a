"""``nbankctl archive check`` against ``nbank archive check`` on the same archive (issue #17).

    .venv/bin/python bench/check_archive.py                # 1,000 x 64 KiB + 4 x 16 MiB, 3 reps
    .venv/bin/python bench/check_archive.py --repeats 5 --small 2000

Runs on its own: starts a django-neurobank site (gunicorn, as ``bench/run.py`` does),
makes an archive with ``nbank init`` and fills it with ``nbank deposit`` (so both tools
check an archive nbank made), then times, in each repetition and in alternating
order, ``nbank archive check ARCHIVE`` and ``nbankctl archive check ARCHIVE``: both
read and hash every file, both must exit 0. As root, the page cache is dropped before
every timed run (cold reads). Prints both medians, every repetition and the median of
the per-repetition ratios (nbank / nbankctl); the issue asks for at least 1.5x.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the repository root, not bench/ (whose modules must not shadow the standard library)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import NBANK, NBANKCTL, ScenarioResult, drop_caches, run_timed  # noqa: E402
from bench.context import Context, unique  # noqa: E402
from bench.run import _byte_compile, print_table  # noqa: E402
from bench.scenarios.burst import make_files, registry_dtype  # noqa: E402

TARGET = 1.5
NBANK_TOOL = "nbank archive check"
CTL_TOOL = "nbankctl archive check"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/check_archive.py",
        description="nbankctl archive check against nbank archive check, same run",
    )
    p.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--small", type=int, default=1000, help="64 KiB files (default 1000)")
    p.add_argument("--big", type=int, default=4, help="16 MiB files (default 4)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the scratch folder goes: the disk being measured (default /var/tmp)",
    )
    p.add_argument("--keep", action="store_true", help="keep the scratch folder")
    return p


def _deposit(
    ctx: Context, env: dict[str, str], dtype: str, archive: Path, files: list[Path]
) -> None:
    """``nbank deposit`` of ``files`` into ``archive`` (in batches: argv stays short)."""
    for i in range(0, len(files), 200):
        batch = [str(f) for f in files[i : i + 200]]
        proc = subprocess.run(
            [NBANK, "deposit", "-d", dtype, str(archive), *batch],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"nbank deposit failed:\n{proc.stderr[-3000:]}")


def run(ctx: Context, *, small: int, big: int) -> ScenarioResult:
    res = ScenarioResult("check_archive", params={"small_64KiB": small, "big_16MiB": big})
    server = ctx.server("fast")
    root = ctx.scratch("check-archive")
    env = ctx.nbank_env(server, root / "home")
    env["NBANKD_CONFIG"] = str(root / "no-nbankd-config.yaml")  # nbank.json names the registry
    try:
        folder = root / unique("chk")
        ctx.nbank_init(server, folder, root / "home")
        dtype = registry_dtype(ctx, server)
        ctx.log(f"  depositing {small} x 64 KiB + {big} x 16 MiB with nbank deposit")
        files = make_files(root / "src", unique("s"), small, 64 << 10)
        files += make_files(root / "src", unique("g"), big, 16 << 20)
        _deposit(ctx, env, dtype, folder, files)
        cold = True
        commands = {
            NBANK_TOOL: [NBANK, "archive", "check", str(folder)],
            CTL_TOOL: [NBANKCTL, "archive", "check", str(folder)],
        }
        for rep in range(ctx.repeats):
            order = [NBANK_TOOL, CTL_TOOL] if rep % 2 == 0 else [CTL_TOOL, NBANK_TOOL]
            took = {}
            for tool in order:
                cold &= drop_caches()
                took[tool] = run_timed(commands[tool], env=env, timeout=1800)
                res.add(tool, "s", took[tool])
            ctx.log(
                f"  rep {rep + 1}/{ctx.repeats}: nbank {took[NBANK_TOOL]:.3f} s, "
                f"nbankctl {took[CTL_TOOL]:.3f} s"
            )
        if not cold:
            res.notes.append("page cache could NOT be dropped: runs were not cold")
    finally:
        ctx.discard(root)
    ratio = res.ratio("nbank / nbankctl", NBANK_TOOL, CTL_TOOL)
    res.target(
        "nbankctl archive check vs nbank archive check",
        f">= {TARGET}x faster",
        f"{ratio:.2f}x",
        ratio >= TARGET,
    )
    return res


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _byte_compile()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbankd-bench-check-", dir=args.work_dir))
    ctx = Context(work=work, repeats=args.repeats, keep=args.keep)
    t0 = time.monotonic()
    try:
        res = run(ctx, small=args.small, big=args.big)
    finally:
        ctx.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    res.seconds = time.monotonic() - t0
    print_table(res)
    nbank_s, ctl_s = res.metrics[NBANK_TOOL].median, res.metrics[CTL_TOOL].median
    print(
        f"\nnbank archive check {nbank_s:.3f} s; nbankctl archive check {ctl_s:.3f} s; "
        f"ratio {res.ratios['nbank / nbankctl']:.2f}x (target {TARGET}x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
