"""nbankctl's standard error (nbankctl.stderr): everything a command says there goes
through one writer that waits for a stuck stderr at most a deadline, then drops."""

from __future__ import annotations

import io
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, make_tar
from fixtures.processes import stuck_pipe
from nbankctl.stderr import BoundedStderr


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _read_until(fd: int, end: bytes) -> bytes:
    """What a pipe gives until it has given ``end``."""
    got = b""
    while not got.endswith(end):
        chunk = os.read(fd, 65536)
        assert chunk, got[-200:]
        got += chunk
    return got


def test_lines_reach_a_pipe_in_order() -> None:
    r, w = os.pipe()
    try:
        with os.fdopen(w, "w", closefd=False) as stream:
            out = BoundedStderr(stream)
            for n in range(100):
                print("line", n, file=out)
            out.write("no newline")
            out.flush()
            assert out.wait_written(10)
        expected = "".join(f"line {n}\n" for n in range(100)) + "no newline"
        assert _read_until(r, b"no newline").decode() == expected
    finally:
        os.close(w)
        os.close(r)


def test_a_stuck_pipe_drops_after_the_deadline_then_says_how_much_once_read() -> None:
    """The first write waits the deadline; later ones return at once, dropped; once the
    pipe is read again, a line says how much was dropped and writes go out again."""
    r, w = stuck_pipe()
    try:
        with os.fdopen(w, "w", closefd=False) as stream:
            out = BoundedStderr(stream, deadline=0.3)
            start = time.monotonic()
            out.write("first\n")  # blocked: waits the deadline
            waited = time.monotonic() - start
            assert 0.3 <= waited < 10
            start = time.monotonic()
            for _ in range(1000):
                out.write("dropped\n")
            out.flush()
            assert time.monotonic() - start < 0.3  # none of them waited
            _read_until(r, b"first\n")
            assert out.wait_written(10)
            out.write("again\n")
            assert out.wait_written(10)
        text = _read_until(r, b"again\n").decode()
        assert text == (
            "\nnbankctl: 8000 characters of standard error were dropped while nothing "
            "read it\nagain\n"
        )
    finally:
        os.close(w)
        os.close(r)


def test_a_stream_without_a_descriptor_is_written_through() -> None:
    buffer = io.StringIO()
    out = BoundedStderr(buffer)  # type: ignore[arg-type]
    print("hello", file=out, flush=True)
    assert buffer.getvalue() == "hello\n"


def test_a_closed_stderr_drops_without_raising() -> None:
    r, w = os.pipe()
    os.close(r)
    try:
        with os.fdopen(w, "w", closefd=False) as stream:
            out = BoundedStderr(stream)
            print("to nobody", file=out)  # EPIPE in the writer (SIGPIPE is ignored here)
            assert out.wait_written(10)
            print("still nothing raised", file=out)
    finally:
        os.close(w)


def test_a_command_saying_a_line_per_member_and_debug_exits_on_a_stuck_stderr(
    embedded: Backend,
) -> None:
    """tape register --debug (the registry line, a line per member, debug lines, the
    summary) on a stderr nobody reads exits with its usual status within 30 s."""
    _, arch = embedded.archive()
    members = []
    for n in range(20):
        data = embedded.blob(f"m{n}")
        members.append((f"{embedded.resource(data, arch)}.dat", data))
    tar = make_tar(embedded.tmp / "t.tar", members)
    argv = [NBANKCTL, *embedded.before, "--debug", "tape", "register", "-y", "TAPE", "0", str(tar)]
    assert embedded.ctl(*argv[1:]).returncode == 0
    r, w = stuck_pipe()
    try:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w, env=embedded.env
        )
        try:
            assert proc.wait(timeout=30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        os.close(w)
        os.close(r)
