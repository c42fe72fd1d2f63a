"""The journal format: nbankd's own native-protocol entries to journald's socket, never
waiting (a socket of the test's stands in for journald, and a real one in CI)."""

from __future__ import annotations

import array
import io
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbankd.service import logwriter
from nbankd.service.logs import (
    JournalLogger,
    configure_logging,
    get_logger,
    reset_logging,
)


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield
    reset_logging()


def _decode(data: bytes) -> dict[str, str]:
    """Reads one entry of journald's native protocol (KEY=value, or KEY, length, value)."""
    fields: dict[str, str] = {}
    while data:
        line_end = data.index(b"\n")
        eq = data.find(b"=", 0, line_end)
        if eq >= 0:
            fields[data[:eq].decode()] = data[eq + 1 : line_end].decode()
            data = data[line_end + 1 :]
            continue
        key = data[:line_end].decode()
        (size,) = struct.unpack("<Q", data[line_end + 1 : line_end + 9])
        value = data[line_end + 9 : line_end + 9 + size]
        assert data[line_end + 9 + size : line_end + 10 + size] == b"\n"
        fields[key] = value.decode()
        data = data[line_end + 10 + size :]
    return fields


class _Journald:
    """A datagram socket bound where the journal entries go; reads them when asked."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def entries(self) -> list[dict[str, str]]:
        got = []
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(
                    1 << 20, socket.CMSG_SPACE(4), socket.MSG_DONTWAIT
                )
            except BlockingIOError:
                return got
            for level, kind, payload in ancillary:  # an entry too large: in a memfd
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                (fd,) = array.array("i", payload[:4])
                with os.fdopen(fd, "rb") as memfd:
                    data = memfd.read() if memfd.seek(0) == 0 else b""
            got.append(_decode(data))


@pytest.fixture
def journald(tmp_path: Path) -> Iterator[_Journald]:
    stand_in = _Journald(tmp_path / "journal-socket")
    yield stand_in
    stand_in.sock.close()


def test_journal_chain_sends_mapped_fields(journald: _Journald) -> None:
    """format journal sends MESSAGE, PRIORITY, NBANK_* fields and the caller's CODE_*."""
    assert configure_logging("journal", "info", journal_socket=journald.path) == "journal"
    get_logger(inbox="/srv/inbox/rig3").warning(
        "deposit waits", resource_id="a1b2c3d4", password="hunter2"
    )
    (fields,) = journald.entries()
    assert fields["MESSAGE"] == "deposit waits"
    assert fields["PRIORITY"] == "4"
    assert fields["SYSLOG_IDENTIFIER"] == "nbankd"
    assert fields["NBANK_RESOURCE_ID"] == "a1b2c3d4"
    assert fields["NBANK_INBOX"] == "/srv/inbox/rig3"
    assert fields["NBANK_PASSWORD"] == "[redacted]"
    assert fields["CODE_FILE"] == __file__
    assert fields["CODE_FUNC"] == "test_journal_chain_sends_mapped_fields"
    assert int(fields["CODE_LINE"]) > 0
    assert "NBANK_TIMESTAMP" not in fields


def test_multiline_values_keep_their_newlines(journald: _Journald) -> None:
    """A message with a traceback (newlines) arrives whole, in the length-prefixed form."""
    configure_logging("journal", "info", journal_socket=journald.path)
    try:
        raise ValueError("boom")
    except ValueError:
        get_logger().exception("step failed", item="line1\nline2")
    (fields,) = journald.entries()
    assert fields["MESSAGE"].startswith("step failed\nTraceback")
    assert "ValueError: boom" in fields["MESSAGE"]
    assert fields["NBANK_ITEM"] == "line1\nline2"


def test_journal_chain_routes_stdlib(journald: _Journald) -> None:
    """Stdlib warnings reach the journal with the stdlib caller as CODE_FUNC."""
    configure_logging("journal", "info", journal_socket=journald.path)
    logging.getLogger("watchdog.observers").error("inotify limit reached")
    (fields,) = journald.entries()
    assert fields["MESSAGE"] == "inotify limit reached"
    assert fields["PRIORITY"] == "3"
    assert fields["NBANK_LOGGER"] == "watchdog.observers"
    assert fields["CODE_FUNC"] == "test_journal_chain_routes_stdlib"


def test_an_entry_too_large_for_a_datagram_goes_in_a_memfd(journald: _Journald) -> None:
    """An entry larger than a datagram may be arrives whole, through a sealed memfd."""
    big = "x" * (4 << 20)
    JournalLogger(path=journald.path).msg(MESSAGE="big", NBANK_BIG=big)
    (fields,) = journald.entries()
    assert fields["MESSAGE"] == "big"
    assert fields["NBANK_BIG"] == big


def test_a_journald_taking_no_entry_drops_lines_at_once(journald: _Journald) -> None:
    """With journald's queue full, a log call returns at once and the entry is dropped,
    counted, and the status names journald."""
    configure_logging("journal", "info", journal_socket=journald.path)
    before = logwriter.OUTPUT.dropped
    deadline = time.monotonic() + 30
    while logwriter.OUTPUT.dropped == before:  # never read: the queue fills up
        assert time.monotonic() < deadline, "no entry was ever refused"
        get_logger().info("filling", pad="p" * 1000)
    problem = str(logwriter.OUTPUT.status()["problem"])
    assert f"journald ({journald.path})" in problem
    assert "journald takes no entry" in problem
    assert "stdout" not in problem


def test_a_stuck_output_is_named_as_the_output_in_use(journald: _Journald) -> None:
    """The status of a stuck log output names journald with the journal format, and
    stdout with json on stdout: never stdout for the journal."""
    configure_logging("journal", "info", journal_socket=journald.path)
    name, hint = logwriter.OUTPUT.output
    assert name == f"journald ({journald.path})" and "stdout" not in hint
    with open(1, "w", closefd=False) as stdout:
        configure_logging("json", "info", stdout)
    assert logwriter.OUTPUT.output[0] == "nbankd's stdout"


def test_auto_uses_journal_under_journal_stream(
    journald: _Journald, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto picks the journal when stderr is $JOURNAL_STREAM and journald's socket is
    there, and json when the socket is not."""
    st = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert configure_logging("auto", "info", io.StringIO(), journal_socket=journald.path) == (
        "journal"
    )
    missing = journald.path + "-missing"
    assert configure_logging("auto", "info", io.StringIO(), journal_socket=missing) == "json"


def test_journal_unreachable_falls_back_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """If no journald listens, the entry is written to stderr, not lost."""
    configure_logging("journal", "info", journal_socket=str(tmp_path / "none"))
    get_logger().error("still here", item="a.wav")
    line = json.loads(capsys.readouterr().err.strip())
    assert line["MESSAGE"] == "still here"
    assert line["NBANK_ITEM"] == "a.wav"


def test_journal_needs_no_systemd_python(tmp_path: Path) -> None:
    """format journal works where systemd-python cannot be imported."""
    stand_in = _Journald(tmp_path / "journal-socket")
    script = (
        "import sys\n"
        "sys.modules['systemd'] = None\n"
        "from nbankd.service.logs import configure_logging, get_logger\n"
        f"configure_logging('journal', 'info', journal_socket={stand_in.path!r})\n"
        "get_logger().info('no extra')\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    (fields,) = stand_in.entries()
    assert fields["MESSAGE"] == "no extra"
    stand_in.sock.close()


class _FailingStream(io.StringIO):
    """A text stream whose every write fails (stderr gone too)."""

    def write(self, text: str) -> int:
        raise OSError(32, "Broken pipe")


def test_journal_and_its_fallback_unreachable_never_raise(tmp_path: Path) -> None:
    """With journald and the fallback stream both failing, a log call returns quietly
    and the entry is counted as dropped."""
    before = logwriter.OUTPUT.dropped
    logger = JournalLogger(fallback=_FailingStream(), path=str(tmp_path / "none"))
    logger.msg(MESSAGE="lost", PRIORITY="3")
    assert logwriter.OUTPUT.dropped == before + 1


# --- a real journald (CI step; `pytest -m journald`) -----------------------------------

# Runs inside a private mount namespace (unshare -m): tmpfs over /run and the persistent
# journal folder, so the hand-started journald and its sockets are visible to this helper
# only. Prints journalctl's JSON entries for the resource id given in argv[1].
_JOURNALD_HELPER = r"""
import json, os, socket, subprocess, sys
rid = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/run"], check=True)
if os.path.isdir("/var/log/journal"):
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", "/var/log/journal"], check=True)
os.makedirs("/run/systemd/journal")
ready = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
ready.bind("/run/nbankd-test-notify")
ready.settimeout(30)
journald = subprocess.Popen(
    ["/lib/systemd/systemd-journald"],
    env={**os.environ, "NOTIFY_SOCKET": "/run/nbankd-test-notify"},
)
try:
    while b"READY=1" not in ready.recv(4096).split(b"\n"):
        pass
    from nbankd.service.logs import JournalLogger, configure_logging, get_logger
    assert configure_logging("journal", "info") == "journal"
    get_logger(inbox="/srv/inbox/rig3", item="bird1/a.wav").info(
        "deposited", resource_id=rid, password="hunter2"
    )
    get_logger().warning("two\nlines", resource_id=rid)
    JournalLogger().msg(MESSAGE="big", NBANK_RESOURCE_ID=rid, NBANK_BIG="b" * (1 << 20))
    subprocess.run(["journalctl", "--sync"], check=True)
    out = subprocess.run(
        ["journalctl", "--no-pager", "--all", "-o", "json", f"NBANK_RESOURCE_ID={rid}"],
        check=True, capture_output=True, text=True,
    ).stdout
    sys.stdout.write(out)
finally:
    journald.terminate()
    journald.wait(timeout=30)
"""


@pytest.mark.journald
def test_real_journald_receives_structured_fields() -> None:
    """Entries reach a real journald, queryable with journalctl NBANK_RESOURCE_ID=...,
    a multi-line message and an entry too large for a datagram whole."""
    for tool in ("/lib/systemd/systemd-journald", shutil.which("unshare"), "/usr/bin/journalctl"):
        if tool is None or not os.path.exists(tool):
            pytest.fail(
                f"the journald test needs {tool or 'unshare'} (Debian: systemd, util-linux)"
            )
    rid = f"t{os.getpid()}x{time.monotonic_ns() % 10**9}"
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            _JOURNALD_HELPER,
            rid,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    entry, lines, big = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert entry["MESSAGE"] == "deposited"
    assert entry["PRIORITY"] == "6"
    assert entry["SYSLOG_IDENTIFIER"] == "nbankd"
    assert entry["NBANK_RESOURCE_ID"] == rid
    assert entry["NBANK_INBOX"] == "/srv/inbox/rig3"
    assert entry["NBANK_ITEM"] == "bird1/a.wav"
    assert entry["NBANK_PASSWORD"] == "[redacted]"
    assert entry["_TRANSPORT"] == "journal"
    assert entry["CODE_FUNC"] == "<module>"
    assert lines["MESSAGE"] == "two\nlines"
    assert lines["PRIORITY"] == "4"
    assert big["MESSAGE"] == "big"
    assert big["NBANK_BIG"] == "b" * (1 << 20)
