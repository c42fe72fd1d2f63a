"""Helpers shared by the scenarios: timing, statistics, machine facts, /proc readings."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NBANK = str(BIN / "nbank")
NBANKD = str(BIN / "nbankd")
NBANKCTL = str(BIN / "nbankctl")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    """Polls ``predicate`` every ``interval`` s until truthy; TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def median(values: Iterable[float]) -> float:
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0..100), nearest-rank on sorted values."""
    vals = sorted(values)
    if not vals:
        return float("nan")
    rank = max(1, min(len(vals), round(p / 100 * len(vals) + 0.5)))
    return vals[rank - 1]


@dataclass
class Metric:
    """One measured quantity of a scenario: its value per repetition and its median."""

    name: str
    unit: str
    values: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def median(self) -> float:
        return median(self.values)

    def as_json(self) -> dict[str, Any]:
        return {
            "unit": self.unit,
            "median": self.median,
            "values": self.values,
            **({"note": self.note} if self.note else {}),
        }


@dataclass
class Target:
    """A target from the issue: a ratio or bound, whether this run met it."""

    name: str
    wanted: str
    reached: str
    met: bool | None  # None: not measured in this run

    def as_json(self) -> dict[str, Any]:
        return {"wanted": self.wanted, "reached": self.reached, "met": self.met}


@dataclass
class ScenarioResult:
    name: str
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Metric] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def metric(self, name: str, unit: str, note: str = "") -> Metric:
        if name not in self.metrics:
            self.metrics[name] = Metric(name, unit, note=note)
        return self.metrics[name]

    def add(self, name: str, unit: str, value: float, note: str = "") -> None:
        self.metric(name, unit, note).values.append(value)

    def ratio(self, name: str, num: str, den: str) -> float:
        """Records and returns the median of per-repetition ratios num/den.

        Pairing the two figures of one repetition (taken minutes apart at most)
        cancels slow drifts in the machine's load; with unequal counts it is
        median(num) / median(den).
        """
        a, b = self.metrics[num].values, self.metrics[den].values
        if len(a) == len(b) and all(b):
            value = median(x / y for x, y in zip(a, b, strict=True))
        else:
            den_median = median(b)
            value = median(a) / den_median if den_median else float("nan")
        self.ratios[name] = value
        return value

    def target(self, name: str, wanted: str, reached: str, met: bool | None) -> None:
        self.targets.append(Target(name, wanted, reached, met))

    def as_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "metrics": {k: m.as_json() for k, m in self.metrics.items()},
            "ratios": self.ratios,
            "targets": {t.name: t.as_json() for t in self.targets},
            "notes": self.notes,
            "seconds": round(self.seconds, 1),
        }


# -- machine and versions ---------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fs_type(path: Path) -> str:
    """The filesystem type holding ``path`` (findmnt), or "unknown"."""
    try:
        out = subprocess.run(
            ["findmnt", "-n", "-o", "FSTYPE", "-T", str(path)],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


def machine_info(work_dir: Path) -> dict[str, Any]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    load = os.getloadavg()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "work_dir": str(work_dir),
        "work_dir_fs": fs_type(work_dir),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "python": platform.python_version(),
        "nbankd": _version("nbankd"),
        "nbankd_commit": commit + ("+dirty" if dirty else ""),
        "neurobank": _version("neurobank"),
        "django-neurobank": _version("django-neurobank"),
        "django": _version("django"),
        "gunicorn": _version("gunicorn"),
        "requests": _version("requests"),
    }


# -- /proc readings -------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MiB."""
    rss = hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm


def drop_caches() -> bool:
    """sync, then drops the page cache; False when not allowed (not root, container)."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def run_timed(argv: list[str], *, env: dict[str, str] | None = None, **kw: Any) -> float:
    """Runs a command to completion; returns its wall time. Raises on a non-zero exit."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, **kw)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[:4])}... exited {proc.returncode}:\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
        )
    return elapsed
