"""Two ways a log call or nbankd's last word could still raise or hang.

Noted by an earlier session and closed here:

- a log call whose ``%``-arguments do not fit its message (``log.info("x %s", a, b)``)
  raised inside structlog, before nbankd's guarded processor chain
  (:mod:`nbankd.service.logshape`) ever ran: a log call must never raise. The line is
  written as the message stands, with its arguments and the error (``log_error``);
- ``nbankd``'s final error line (a configuration it refuses) was printed to stderr
  without a bound: a stderr pipe nobody reads held the process for ever, its exit
  status never given. It is written within a deadline, the exit status kept.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.processes import stuck_pipe
from nbankd.service.logs import configure_logging, get_logger, reset_logging

NBANKD = str(Path(sys.executable).with_name("nbankd"))


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    reset_logging()


@pytest.mark.parametrize(
    "args", [("a", 1, 2), ("a",), ("a", "not a number")], ids=["extra", "few", "type"]
)
def test_a_log_call_whose_arguments_do_not_fit_its_message_never_raises(
    args: tuple[object, ...],
) -> None:
    """log.warning("x %s %d", *args) with too many, too few or mistyped arguments
    writes one line with the message as written, its arguments and the error."""
    out = io.StringIO()
    configure_logging("json", "info", out)
    message = "copied %s into %d"
    get_logger(inbox="/srv/inbox/rig3").warning(message, *args, size=3)
    (line,) = [json.loads(x) for x in out.getvalue().splitlines()]
    assert line["event"] == message and line["level"] == "warning", line
    assert line["inbox"] == "/srv/inbox/rig3" and line["size"] == 3, line
    assert line["positional"] == list(args) and "TypeError" in str(line["log_error"]), line


def test_a_log_call_whose_arguments_fit_is_interpolated_as_before() -> None:
    """Positional and by-name arguments that fit are interpolated into the message,
    and a level filtered out never formats them."""
    out = io.StringIO()
    configure_logging("console", "info", out)
    log = get_logger()
    log.info("copied %s of %d", "a.wav", 3)
    log.bind(inbox="rig3").info("copied %(name)s", {"name": "b.wav"})
    log.debug("never formatted %d", "not a number")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "copied a.wav of 3" in lines[0] and "copied b.wav" in lines[1], lines
    assert "rig3" in lines[1] and "log error" not in out.getvalue(), lines


def test_nbankds_last_error_line_never_holds_its_exit_on_a_stuck_stderr(tmp_path: Path) -> None:
    """nbankd refusing its configuration exits with its status (2) even when its stderr
    is a pipe nobody reads, within seconds, never blocked writing the error."""
    config = tmp_path / "config.yaml"
    config.write_text("inboxes: not a list\n")
    r, w = stuck_pipe()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY_"))}
    try:
        proc = subprocess.Popen(
            [NBANKD, "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=w,
            env=env,
        )
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("nbankd hangs writing its last error to a stderr nobody reads")
    finally:
        os.close(w)
        os.close(r)
    assert code == 2, code
