"""Hostile review of nbankd's logs (json / console output, reload of ``log:``), as an
inbox writer or an unlucky lab would meet them.

Every test runs the real ``nbankd``; file names and sidecars are written the way a
local user who can write an inbox would.

Findings, fixed: a log write that failed (ENOSPC, EPIPE) raised out of the log call
and killed nbankd at start or its lane thread later (items stayed in flight, status
healthy), and one that blocked (a full stdout pipe) stopped every thread; a bad-sidecar
reason listed every unknown key (a ~900 KB reason message and log line). The rest are
guards.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, wait_for


def _explain(h: DaemonHarness, path: str | Path) -> tuple[int, dict[str, Any]]:
    proc = nbankctl(h, "explain", "--json", str(path), timeout=60)
    return proc.returncode, json.loads(proc.stdout)


def _log_lines(h: DaemonHarness) -> list[bytes]:
    return [line for line in h.log_path.read_bytes().splitlines() if line.strip()]


# --- log output the daemon cannot write ----------------------------------------------


def test_deposits_go_on_when_stdout_is_a_full_device(daemon_factory: Any) -> None:
    """With stdout on /dev/full (every log write fails, ENOSPC), files are still deposited."""
    h: DaemonHarness = daemon_factory()
    h.log_path.symlink_to("/dev/full")
    h.dump_log = lambda: None  # type: ignore[method-assign]  # reading /dev/full never ends
    h.start()
    for n in range(3):
        h.drop(f"full{n}.wav", os.urandom(10_000 + n))
    wait_for(lambda: len(h.receipts()) == 3, 60, "3 deposits")
    assert h.reasons() == []


@pytest.fixture
def log_pipe(tmp_path: Path) -> Iterator[tuple[Path, list[int]]]:
    """A FIFO with a reader that never reads (the harness's daemon log goes to it), and
    the reader's descriptor in a list (a test closes it to break the pipe)."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = [os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)]
    yield fifo, reader
    for fd in reader:
        os.close(fd)


def test_deposits_go_on_after_the_log_pipe_breaks(
    daemon_factory: Any, log_pipe: tuple[Path, list[int]]
) -> None:
    """With stdout a pipe whose reader went away (``nbankd | tee`` with tee killed: each
    write is EPIPE), files dropped afterwards are still deposited."""
    fifo, reader = log_pipe
    h: DaemonHarness = daemon_factory()
    h.log_path.symlink_to(fifo)
    h.dump_log = lambda: None  # type: ignore[method-assign]  # reading the pipe would block
    h.start()
    os.close(reader.pop())
    for n in range(3):
        h.drop(f"epipe{n}.wav", os.urandom(10_000 + n))
    wait_for(lambda: len(h.receipts()) == 3, 30, "3 deposits")
    assert h.proc is not None and h.proc.poll() is None


def test_deposits_go_on_when_nobody_reads_the_log_pipe(
    daemon_factory: Any, log_pipe: tuple[Path, list[int]]
) -> None:
    """With stdout a pipe nobody reads (``nbankd | stuck-consumer``), once its buffer is
    full deposits still finish: data never waits on logs forever."""
    h: DaemonHarness = daemon_factory()
    h.log_path.symlink_to(log_pipe[0])
    h.dump_log = lambda: None  # type: ignore[method-assign]  # reading the pipe would block
    h.start()
    for n in range(100):  # debug logging fills the pipe's 64 KiB many times over
        h.drop(f"pipe{n:03d}.wav", os.urandom(100 + n))
    wait_for(lambda: len(h.receipts()) == 100, 30, "100 deposits")


# --- log injection through file names ------------------------------------------------

#: a name a local user can give a file: a newline and a whole forged JSON log line, a
#: carriage return, a terminal escape (clear screen) and a byte that is not UTF-8
FORGED_NAME = (
    b'x\n{"event": "forged", "level": "critical", "timestamp": "2026-01-01T00:00:00Z"}'
    b"\r\x1b[2J\xff.wav"
)


def test_json_logs_stay_one_object_per_line_with_a_forged_file_name(
    daemon_factory: Any,
) -> None:
    """A file name holding a newline, a JSON log line, an escape and a non-UTF-8 byte
    leaves every stdout line valid UTF-8 and one JSON object, and forges no event."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop(FORGED_NAME, b"forged name")
    h.wait_settled(1)
    # stopped first: the log writer's thread writes the deposit's lines out by the exit
    # (read while it runs, they may not be there yet, and the last one may be half there)
    assert h.stop() == 0
    lines = _log_lines(h)
    docs = [json.loads(line.decode("utf-8")) for line in lines]
    assert all(isinstance(d, dict) for d in docs)
    assert not any(d.get("event") == "forged" for d in docs)
    assert not any(b"\x1b" in line for line in lines)


def test_console_logs_show_a_forged_file_name_on_its_own_line(daemon_factory: Any) -> None:
    """In console format the same name yields no line that does not start with the
    daemon's own timestamp, and no raw terminal escape."""
    h: DaemonHarness = daemon_factory(extra_config={"log": {"format": "console", "level": "debug"}})
    h.start()
    h.drop(FORGED_NAME, b"forged name")
    h.wait_settled(1)
    assert h.stop() == 0  # every line written out whole (the log writer's thread)
    lines = _log_lines(h)
    assert lines
    assert all(line[:2] == b"20" and line[4:5] == b"-" for line in lines), lines[:5]
    assert not any(b"\x1b" in line for line in lines)
    assert not any(line.startswith(b'{"event": "forged"') for line in lines)


# --- explain -------------------------------------------------------------------------


def test_reload_from_json_to_console_while_depositing_loses_nothing(
    daemon_factory: Any,
) -> None:
    """Switching ``log`` from json/debug to console/info by reload while inputs arrive
    deposits every input, and the daemon then writes console lines."""
    h: DaemonHarness = daemon_factory()
    h.start()
    for n in range(20):
        h.drop(f"before{n:02d}.wav", os.urandom(1000 + n))
    h.reload_with(lambda cfg: cfg.update(log={"format": "console", "level": "info"}))
    for n in range(20):
        h.drop(f"after{n:02d}.wav", os.urandom(2000 + n))
    h.wait_settled(40)
    assert len(h.receipts()) == 40
    assert h.reasons() == []

    def console_deposits() -> bool:  # written by the log writer's thread, after the fact
        lines = _log_lines(h)
        return not lines[-1].startswith(b"{") and b"deposited" in b"\n".join(lines[-40:])

    try:
        wait_for(console_deposits, 60, "console lines of the deposits after the reload")
    except AssertionError:
        raise AssertionError(f"the log's last lines: {_log_lines(h)[-5:]}") from None


# --- bounded messages ------------------------------------------------------------------

#: journald's default LineMax: a longer stdout line is split, and a split JSON line
#: parses as no object at all
JOURNAL_LINE_MAX = 48 * 1024


def test_a_sidecar_with_many_unknown_keys_gives_a_bounded_reason_and_log_line(
    daemon_factory: Any,
) -> None:
    """A sidecar of just under 1 MiB naming thousands of unknown keys is rejected with a
    reason message and log lines each shorter than journald's line limit."""
    h: DaemonHarness = daemon_factory()
    h.start()
    keys = {f"unknown_key_{n:06d}_{'k' * 40}": 1 for n in range(15_000)}
    sidecar = json.dumps(keys).encode()
    assert len(sidecar) < 1 << 20
    h.drop("many.wav.nbank.json", sidecar)
    h.drop("many.wav", b"the input")
    h.wait_settled(1)
    [reason] = h.reasons()
    assert reason["code"] == "bad-sidecar"
    longest = max(len(line) for line in _log_lines(h))
    assert longest < JOURNAL_LINE_MAX, longest
    assert len(reason["message"]) < JOURNAL_LINE_MAX, len(reason["message"])
