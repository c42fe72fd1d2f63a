"""The log output: a log call never raises and, with the writer thread, never waits;
lines dropped are counted and told; values and lines are bounded; the exit writes the
queue out (see nbankd.service.logwriter and nbankd.service.logshape)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, status_json, wait_for
from nbankd.service import logshape, logwriter
from nbankd.service.logs import configure_logging, get_logger, reset_logging
from nbankd.service.logwriter import STUCK_AFTER, LogOutput

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    reset_logging()


class _FullStream(io.StringIO):
    """A text stream whose every write fails with ENOSPC, counting the attempts."""

    def __init__(self) -> None:
        super().__init__()
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        raise OSError(28, "No space left on device")


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_writer_writes_lines_in_order() -> None:
    """With the writer thread, lines reach the stream in the order they were logged."""
    output = LogOutput()
    read_end, write_end = os.pipe()
    write = logwriter.stream_writer(os.fdopen(write_end, "w", closefd=False))
    output.start()
    try:
        for n in range(500):
            output.submit(write, "pipe", f"line {n}", 10)
        assert output.flush(30)
    finally:
        output.stop(5)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as got:
        assert got.read().decode().splitlines() == [f"line {n}" for n in range(500)]
    assert output.dropped == 0


def test_a_failing_stream_is_tried_again_only_after_a_backoff() -> None:
    """Lines for a stream whose write fails are dropped and counted without a write
    each; the stream is tried again once its backoff has passed."""
    clock = _Clock()
    output = LogOutput(clock=clock)
    stream = _FullStream()
    write = logwriter.stream_writer(stream)
    for n in range(100):
        output.submit(write, "full", f"line {n}", 10)
    assert stream.attempts == 1
    assert output.dropped == 100
    assert "No space left on device" in str(output.status()["problem"])
    clock.now += logwriter.BACKOFF_FIRST + 0.1
    output.submit(write, "full", "again", 5)
    assert stream.attempts == 2


def test_a_blocked_stream_never_blocks_the_caller() -> None:
    """Logging to a pipe nobody reads returns at once: lines over the queue's size are
    dropped and counted, and the status says the output is stuck."""
    clock = _Clock()
    output = LogOutput(clock=clock)
    read_end, write_end = os.pipe()
    write = logwriter.stream_writer(os.fdopen(write_end, "w", closefd=False))
    output.start()
    try:
        started = time.monotonic()
        for n in range(logwriter.QUEUE_LINES + 5000):
            output.submit(write, "pipe", f"line {n:06d} " + "x" * 100, 110)
        assert time.monotonic() - started < 20
        assert output.dropped > 0
        assert output.status()["problem"] is None

        def stuck_told() -> bool:  # time passes, for the writer blocked in its write
            clock.now += STUCK_AFTER + 1
            return "has taken no line" in str(output.status()["problem"])

        wait_for(stuck_told, 60, "the stuck output told")
    finally:
        os.close(read_end)  # the blocked write ends (EPIPE): the writer goes on
        output.stop(5)
        os.close(write_end)


def test_a_value_whose_str_raises_gives_a_line_saying_so() -> None:
    """A log call with a value that cannot be rendered does not raise: a short line
    names the event and the error."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

        __repr__ = __str__

    out = io.StringIO()
    configure_logging("json", "info", out)
    get_logger().info("deposited", value=Unprintable())
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["event"] == "deposited"
    assert "no text" in doc["log_error"]


_BAD_RECORD_SCRIPT = """
import logging
from nbankd.service.logs import configure_logging
from nbankd.service.logwriter import OUTPUT
configure_logging("json", "info")
logging.getLogger("somelib").error("%s and %s", "one")
print(OUTPUT.dropped)
"""


def test_a_stdlib_record_that_cannot_be_formatted_is_counted_silently() -> None:
    """A stdlib record whose message cannot be formatted writes nothing to stderr (a
    traceback there could block) and is counted as dropped."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.run(
        [sys.executable, "-c", _BAD_RECORD_SCRIPT], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == ["1"]


def test_long_values_are_cut_to_size() -> None:
    """A 1 MB value and a list of 100 000 entries give one JSON line well under
    journald's LineMax, saying how much was cut."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    get_logger().info("big", text="t" * 1_000_000, keys=[f"key{n}" for n in range(100_000)])
    (line,) = out.getvalue().splitlines()
    assert len(line.encode()) <= logshape.LINE_MAX
    doc = json.loads(line)
    assert doc["text"].endswith(f"... [{1_000_000 - logshape.VALUE_MAX} more characters]")
    assert doc["keys"][-1] == f"... and {100_000 - logshape.ITEMS_MAX} more"


def test_many_long_fields_still_give_one_bounded_line() -> None:
    """An event with 100 fields of 4 KiB each is rendered again short: one JSON line
    under LINE_MAX that still holds the event."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    get_logger().warning("wide", **{f"field{n}": "v" * 4000 for n in range(100)})
    (line,) = out.getvalue().splitlines()
    assert len(line.encode()) <= logshape.LINE_MAX
    assert json.loads(line)["event"] == "wide"


_EXIT_SCRIPT = """
import sys
from nbankd.service.logs import configure_logging, get_logger
from nbankd.service.logwriter import start_writer
configure_logging("json", "info")
start_writer()
for n in range(int(sys.argv[1])):
    get_logger().info("line", n=n)
"""


def _run_logging_script(lines: int, stdout: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("JOURNAL_STREAM", None)
    return subprocess.Popen(
        [sys.executable, "-c", _EXIT_SCRIPT, str(lines)],
        stdout=stdout,
        stderr=subprocess.PIPE,
        env=env,
    )


def test_queued_lines_are_written_out_at_exit(tmp_path: Path) -> None:
    """A process that logs through the writer thread and exits at once still writes
    every line it logged."""
    with open(tmp_path / "out", "wb") as out:
        proc = _run_logging_script(2000, out)
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = (tmp_path / "out").read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == list(range(2000))


def test_a_stuck_stdout_does_not_stop_the_exit() -> None:
    """A process whose stdout is a pipe nobody reads exits soon after its last log
    line, with status 0 and no fatal error."""
    read_end, write_end = os.pipe()
    try:
        proc = _run_logging_script(20_000, write_end)
        _out, err = proc.communicate(timeout=60)
    finally:
        os.close(write_end)
        os.close(read_end)
    assert proc.returncode == 0, err
    assert b"Fatal" not in err


def test_status_tells_lines_dropped_when_stdout_is_a_full_device(daemon_factory: Any) -> None:
    """With stdout on /dev/full, nbankctl status is degraded, naming the failing log
    output, and counts the log lines dropped."""
    h: DaemonHarness = daemon_factory()
    h.log_path.symlink_to("/dev/full")
    h.dump_log = lambda: None  # type: ignore[method-assign]  # reading /dev/full never ends
    h.start()
    h.drop("a.wav", os.urandom(1000))
    wait_for(lambda: len(h.receipts()) == 1, 60, "a deposit")
    code, doc = status_json(h)
    assert code == 1
    assert doc["log"]["dropped"] > 0
    assert any("log output fails" in line for line in doc["degraded"]), doc["degraded"]
