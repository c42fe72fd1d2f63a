"""Runs the nbankd benchmarks (issue #8) and writes bench/results/<timestamp>.json.

    .venv/bin/python bench/run.py             # every scenario, 3 repetitions
    .venv/bin/python bench/run.py --quick     # small sizes, 1 repetition (a smoke run)
    .venv/bin/python bench/run.py --scenario burst --scenario latency

Everything is set up here: a django-neurobank server under gunicorn, the real
`nbank` client, the real `nbankd` daemon. Prints a table of medians, ratios and
targets (met / not met) per scenario. Run as root for cold-cache and tmpfs runs
(the large-file scenario re-runs this command inside `unshare -m` to mount a
private tmpfs); without root those parts are skipped with a note.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# the repository root, not bench/ (whose modules must not shadow the standard library)
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench import pyspy  # noqa: E402
from bench.common import ScenarioResult, machine_info, versions  # noqa: E402
from bench.context import Context  # noqa: E402
from bench.pyspy import find_pyspy  # noqa: E402

SCENARIOS = ("burst", "large", "audit", "latency", "footprint")
RESULTS = Path(__file__).resolve().parent / "results"
UNSHARED_ENV = "NBANKD_BENCH_UNSHARED"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bench/run.py", description="nbankd benchmarks against nbank and the hardware"
    )
    p.add_argument("--quick", action="store_true", help="small sizes, one repetition (smoke run)")
    p.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable; default: all)",
    )
    p.add_argument("--repeats", type=int, help="repetitions per scenario (default 3; quick: 1)")
    p.add_argument(
        "--work-dir",
        type=Path,
        default=Path("/var/tmp"),
        help="where scratch folders go: the disk being measured (default /var/tmp)",
    )
    p.add_argument("--output", type=Path, help="result JSON (default bench/results/<time>.json)")
    p.add_argument("--no-save", action="store_true", help="print the table, write no JSON")
    p.add_argument("--keep", action="store_true", help="keep scratch folders")
    p.add_argument("--server-workers", type=int, default=2, help="gunicorn workers (default 2)")
    p.add_argument("--burst-files", type=int, help="burst size (default 2000; quick: 100)")
    p.add_argument(
        "--slow-hasher-files",
        type=int,
        help="files for the default-hasher comparison (default 200; quick: 8; 0 skips it)",
    )
    p.add_argument(
        "--full-stub-names",
        type=int,
        default=0,
        help="also burst (embedded) into a stub folder already holding this many names "
        "(default 0: not run)",
    )
    p.add_argument("--large-mib", type=int, help="large file size in MiB (default 1024)")
    p.add_argument(
        "--audit-resources", type=int, help="resources for the 100k audit (default 100000)"
    )
    p.add_argument("--backlog-files", type=int, help="footprint backlog (default 100000)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="sample every nbankd with py-spy and report where its time goes "
        "(slows it: do not use the figures of a profiled run)",
    )
    p.add_argument(
        "--no-unshare",
        action="store_true",
        help="do not re-run inside `unshare -m` (large file: no tmpfs inbox)",
    )
    return p


def _fmt(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def print_table(res: ScenarioResult) -> None:
    print(f"\n== {res.name} ({res.seconds:.0f} s) ==")
    if res.params:
        print("   " + ", ".join(f"{k}={v}" for k, v in res.params.items()))
    width = max([len(m) for m in res.metrics] + [len(r) for r in res.ratios] + [20])
    for m in res.metrics.values():
        runs = " ".join(_fmt(v) for v in m.values)
        print(f"   {m.name:<{width}}  {_fmt(m.median):>10} {m.unit:<8}  [{runs}]")
    for name, value in res.ratios.items():
        print(f"   {name:<{width}}  {_fmt(value):>10} x")
    for t in res.targets:
        verdict = "met" if t.met else "NOT MET" if t.met is False else "not measured"
        print(f"   target {t.name}: want {t.wanted}, reached {t.reached}: {verdict}")
    for note in res.notes:
        print(f"   note: {note}")


def _print_profiles(summaries: list[dict[str, Any]]) -> None:
    for s in summaries:
        print(f"\n== profile of nbankd in {s['label']} (share of samples, innermost nbankd frame)")
        for role in ("workers", "lane", "remote", "main"):
            print(f"   {role}:")
            for row in s.get(role, [])[:8]:
                print(f"     {row['share']:6.1%}  {row['where']}")


def _maybe_unshare(args: argparse.Namespace, argv: list[str]) -> None:
    """Re-runs this command in a private mount namespace (for the tmpfs inbox)."""
    wanted = args.scenario is None or "large" in args.scenario
    if not wanted or args.no_unshare or os.environ.get(UNSHARED_ENV) or os.geteuid() != 0:
        return
    if shutil.which("unshare") is None:
        return
    os.environ[UNSHARED_ENV] = "1"
    os.execvp(
        "unshare",
        ["unshare", "--mount", "--propagation", "private", sys.executable, __file__, *argv],
    )


def _run_scenario(name: str, ctx: Context, args: argparse.Namespace) -> ScenarioResult:
    module = importlib.import_module(f"bench.scenarios.{name}")
    kwargs = {
        "burst": {
            "n": args.burst_files,
            "slow_n": args.slow_hasher_files,
            "full_stub": args.full_stub_names,
        },
        "large": {"mib": args.large_mib},
        "audit": {"big": args.audit_resources},
        "latency": {},
        "footprint": {"backlog": args.backlog_files},
    }[name]
    return module.run(ctx, **kwargs)


def _byte_compile() -> None:
    """Byte-compiles nbankd's source, as ``pip install`` does for an installed package:
    an editable checkout run with ``PYTHONDONTWRITEBYTECODE`` would otherwise compile
    every module on each ``nbankctl`` call, which ``nbank``, installed, never pays."""
    import compileall

    import nbankctl
    import nbankd

    for package in (nbankd, nbankctl):
        compileall.compile_dir(Path(package.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    _maybe_unshare(args, argv)
    scenarios = args.scenario or list(SCENARIOS)
    repeats = args.repeats or (1 if args.quick else 3)
    _byte_compile()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nbankd-bench-", dir=args.work_dir))
    ctx = Context(
        work=work,
        repeats=repeats,
        quick=args.quick,
        server_workers=args.server_workers,
        keep=args.keep,
    )
    if args.profile:
        pyspy_bin = find_pyspy()
        if pyspy_bin is None:
            print("--profile needs py-spy (pip install py-spy, or $NBANKD_BENCH_PYSPY)")
            return 2
        pyspy.PROFILER = pyspy.Profiler(
            pyspy_bin, work / "profiles", rate=int(os.environ.get("NBANKD_BENCH_PYSPY_RATE", "100"))
        )
    started = datetime.now(UTC)
    doc: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["bench/run.py", *argv]),
        "quick": args.quick,
        "repeats": repeats,
        "machine": machine_info(work),
        "versions": versions(),
        "private_mount_namespace": bool(os.environ.get(UNSHARED_ENV)),
        "scenarios": {},
        "errors": {},
    }
    print(f"nbankd benchmarks: {', '.join(scenarios)}; {repeats} repetition(s); scratch {work}")
    failed = False
    try:
        for name in scenarios:
            print(f"\n-- {name}", flush=True)
            t0 = time.monotonic()
            try:
                res = _run_scenario(name, ctx, args)
            except Exception as err:  # report and go on with the other scenarios
                failed = True
                traceback.print_exc()
                doc["errors"][name] = f"{type(err).__name__}: {err}"
                continue
            res.seconds = time.monotonic() - t0
            doc["scenarios"][name] = res.as_json()
            print_table(res)
    finally:
        ctx.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if pyspy.PROFILER is not None:
        doc["profiles"] = pyspy.PROFILER.summaries
        _print_profiles(pyspy.PROFILER.summaries)
    doc["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if not args.no_save:
        out = args.output or RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
        print(f"\nresults: {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
