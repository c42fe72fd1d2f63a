"""``--profile``: samples every nbankd the benchmarks start with py-spy, and says where
the time went.

py-spy (``pip install py-spy``; found on PATH or at ``$NBANKD_BENCH_PYSPY``) records
raw stacks of every thread, including time blocked in system calls and on locks
(``--idle``), so an fsync or a lock wait shows up as the function waiting. The
summary attributes each sample of a deposit worker (and of the main thread) to the
innermost nbankd function on its stack. Profiling slows the daemon: never mix
profiled numbers with the figures of a benchmark run.
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


def find_pyspy() -> str | None:
    return os.environ.get("NBANKD_BENCH_PYSPY") or shutil.which("py-spy")


@dataclass
class Profiler:
    pyspy: str
    folder: Path
    rate: int = 100
    summaries: list[dict[str, object]] = field(default_factory=list)
    _procs: dict[int, tuple[subprocess.Popen[bytes], Path, str]] = field(default_factory=dict)

    def attach(self, pid: int, label: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        out = self.folder / f"{label}-{pid}.raw"
        proc = subprocess.Popen(
            [
                self.pyspy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(self.rate),
                "--format",
                "raw",
                "--threads",
                *(() if os.environ.get("NBANKD_BENCH_PYSPY_CPU") else ("--idle",)),
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._procs[pid] = (proc, out, label)

    def detach(self, pid: int) -> None:
        entry = self._procs.pop(pid, None)
        if entry is None:
            return
        proc, out, label = entry
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if out.exists():
            self.summaries.append({"label": label, "raw": str(out), **summarize(out)})


def summarize(raw: Path, top: int = 12) -> dict[str, object]:
    """Shares of samples per innermost nbankd function, for the deposit workers, the
    lane (small files in rounds), its registering threads and main."""
    by_role: dict[str, collections.Counter[str]] = {
        role: collections.Counter() for role in ("workers", "lane", "remote", "main")
    }
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        role = _role(frames[0])
        if role is None:
            continue
        ours = [f for f in frames if "nbankd/" in f]
        # idle workers wait in the pool's queue: not interesting
        key = ours[-1] if ours else "(idle, waiting for work)"
        by_role[role][key] += int(count)
    out: dict[str, object] = {}
    for role, counter in by_role.items():
        total = sum(counter.values()) or 1
        out[role] = [
            {"share": round(n / total, 3), "where": where} for where, n in counter.most_common(top)
        ]
    return out


def _role(thread: str) -> str | None:
    """Which of :func:`summarize`'s roles a py-spy thread label (``thread (TID): NAME``)
    belongs to, by the names nbankd gives its threads."""
    if "deposit-lane" in thread:
        return "lane"
    if "deposit-remote" in thread:
        return "remote"
    if "deposit_" in thread:
        return "workers"
    return "main" if "MainThread" in thread else None


#: set by run.py when --profile is given; nbankd_proc attaches to every daemon it starts
PROFILER: Profiler | None = None
