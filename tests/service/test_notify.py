"""sd_notify messages over real AF_UNIX datagram sockets, and the worker liveness check."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from nbankd.service.notify import (
    Heartbeat,
    Notifier,
    format_message,
    notify_address,
    stale_workers,
    watchdog_interval_from,
)

RECV_TIMEOUT_S = 5.0


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(RECV_TIMEOUT_S)
    return sock


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = _bind(path)
    yield sock, path
    sock.close()


@pytest.fixture
def notifier(listener: tuple[socket.socket, str]) -> Notifier:
    return Notifier({"NOTIFY_SOCKET": listener[1]})


def _recv(listener: tuple[socket.socket, str]) -> bytes:
    return listener[0].recv(4096)


def test_ready_sends_ready_1(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """ready() sends exactly READY=1."""
    assert notifier.ready() is True
    assert _recv(listener) == b"READY=1"


def test_ready_with_status(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """ready(status) sends READY=1 and the STATUS line in one datagram."""
    notifier.ready("watching 3 inboxes")
    assert _recv(listener) == b"READY=1\nSTATUS=watching 3 inboxes"


def test_status_text(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """status() sends STATUS=<text> byte-exact, UTF-8 encoded."""
    notifier.status("dépôt de 2 fichiers")
    assert _recv(listener) == "STATUS=dépôt de 2 fichiers".encode()


def test_status_cut_at_newline(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """A status with a newline is cut there, so it cannot inject another assignment."""
    notifier.status("ok\nREADY=1")
    assert _recv(listener) == b"STATUS=ok"


def test_watchdog_ping(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """watchdog() sends exactly WATCHDOG=1."""
    notifier.watchdog()
    assert _recv(listener) == b"WATCHDOG=1"


def test_watchdog_trigger(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """watchdog_trigger() sends WATCHDOG=trigger."""
    notifier.watchdog_trigger()
    assert _recv(listener) == b"WATCHDOG=trigger"


def test_stopping(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """stopping() sends exactly STOPPING=1."""
    notifier.stopping()
    assert _recv(listener) == b"STOPPING=1"


def test_reloading_has_monotonic_usec(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    """reloading() sends RELOADING=1 with MONOTONIC_USEC on CLOCK_MONOTONIC, in µs."""
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = _recv(listener).split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_extend_timeout(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """extend_timeout(usec) sends EXTEND_TIMEOUT_USEC=<usec>."""
    notifier.extend_timeout(90_000_000)
    assert _recv(listener) == b"EXTEND_TIMEOUT_USEC=90000000"


def test_extend_timeout_with_a_status(
    notifier: Notifier, listener: tuple[socket.socket, str]
) -> None:
    """extend_timeout(usec, status) sends both in one message."""
    notifier.extend_timeout(60_000_000, "adopting archive main: 3 entries done")
    assert (
        _recv(listener)
        == b"EXTEND_TIMEOUT_USEC=60000000\nSTATUS=adopting archive main: 3 entries done"
    )


def test_extend_timeout_rejects_zero(notifier: Notifier) -> None:
    """extend_timeout needs a positive duration (a programming error otherwise)."""
    with pytest.raises(ValueError):
        notifier.extend_timeout(0)


def test_abstract_namespace_socket() -> None:
    """A NOTIFY_SOCKET starting with @ reaches a socket in the abstract namespace."""
    name = f"nbankd-test-{uuid.uuid4().hex}"
    sock = _bind("\0" + name)
    try:
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(4096) == b"READY=1"
    finally:
        sock.close()


def test_reads_process_environment(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """By default the notifier takes NOTIFY_SOCKET from the process environment."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener[1])
    notifier = Notifier()
    assert notifier.enabled
    notifier.watchdog()
    assert _recv(listener) == b"WATCHDOG=1"


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without NOTIFY_SOCKET every call is a silent no-op returning False."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.backend == "none"
    with capture_logs() as logs:
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    assert logs == []


def test_send_failure_is_logged_once(tmp_path: Path) -> None:
    """A socket nobody listens on never raises; the failure is logged once, not per call."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    with capture_logs() as logs:
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
        assert notifier.status("x") is False
    assert [entry["log_level"] for entry in logs] == ["warning"]
    assert "gone.sock" in logs[0]["notify_socket"]


def test_failure_logged_again_after_recovery(tmp_path: Path) -> None:
    """After a successful send, a new failure is logged again."""
    path = tmp_path / "flaky.sock"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    with capture_logs() as logs:
        notifier.watchdog()
        sock = _bind(str(path))
        try:
            assert notifier.watchdog() is True
            assert sock.recv(4096) == b"WATCHDOG=1"
        finally:
            sock.close()
            path.unlink()
        notifier.watchdog()
    assert len(logs) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract/name", "\0abstract/name"),
        ("@", None),
        ("relative/path", None),
        ("vsock:2:1234", None),
    ],
)
def test_notify_address(value: str | None, expected: str | None) -> None:
    """NOTIFY_SOCKET values map to a path, an abstract address, or None."""
    assert notify_address(value) == expected


def test_format_message_rejects_bad_key() -> None:
    """A key containing '=' cannot be sent."""
    with pytest.raises(ValueError):
        format_message({"A=B": 1})


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "OURS"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": "junk"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "sixty"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    """The ping interval is half of WATCHDOG_USEC, and None unless the watchdog is ours."""
    pid = os.getpid()
    env = {k: (str(pid) if v == "OURS" else v) for k, v in environ.items()}
    assert watchdog_interval_from(env, pid) == expected
    assert Notifier(env).watchdog_interval() == expected


def test_watchdog_interval_for_another_pid() -> None:
    """WATCHDOG_PID naming the parent (inherited variables) disables the watchdog."""
    env = {"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getppid())}
    assert Notifier(env).watchdog_interval() is None


@pytest.mark.parametrize(
    ("beats", "now", "max_age", "stale"),
    [
        ({}, 100.0, 10.0, []),
        ({"scanner": 95.0, "depositor": 99.0}, 100.0, 10.0, []),
        ({"scanner": 95.0, "depositor": 80.0}, 100.0, 10.0, ["depositor"]),
        ({"scanner": 90.0}, 100.0, 10.0, []),
        ({"scanner": 89.9}, 100.0, 10.0, ["scanner"]),
        ({"b": 1.0, "a": 2.0, "c": 99.0}, 100.0, 10.0, ["a", "b"]),
        ({"scanner": 105.0}, 100.0, 10.0, []),
    ],
    ids=[
        "no workers",
        "fresh beats",
        "one stale worker",
        "exactly max_age",
        "just past max_age",
        "several stale, sorted",
        "beat in the future",
    ],
)
def test_liveness_table(
    beats: dict[str, float], now: float, max_age: float, stale: list[str]
) -> None:
    """A worker is stale once its last beat is more than max_age old."""
    assert stale_workers(beats, now, max_age) == stale
    heartbeat = Heartbeat()
    for name, at in beats.items():
        heartbeat.beat(name, now=at)
    assert heartbeat.stale(now, max_age) == stale
    assert heartbeat.healthy(now, max_age) is (not stale)


def test_forget_stops_watching() -> None:
    """A worker that finished on purpose and was forgotten no longer counts."""
    heartbeat = Heartbeat()
    heartbeat.beat("audit", now=0.0)
    heartbeat.beat("scanner", now=100.0)
    assert not heartbeat.healthy(100.0, 10.0)
    heartbeat.forget("audit")
    heartbeat.forget("never-registered")
    assert heartbeat.healthy(100.0, 10.0)


def test_beats_from_threads_use_the_clock() -> None:
    """Beats from worker threads are stamped with the heartbeat's clock."""
    heartbeat = Heartbeat(clock=lambda: 42.0)
    workers = [threading.Thread(target=heartbeat.beat, args=(f"w{i}",)) for i in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert heartbeat.snapshot() == {f"w{i}": 42.0 for i in range(4)}


def test_ping_only_when_healthy(notifier: Notifier, listener: tuple[socket.socket, str]) -> None:
    """watchdog_if_healthy pings with live workers and stays silent with a wedged one."""
    heartbeat = Heartbeat()
    heartbeat.beat("scanner", now=100.0)
    assert notifier.watchdog_if_healthy(heartbeat, 10.0, now=105.0) == []
    assert _recv(listener) == b"WATCHDOG=1"
    assert notifier.watchdog_if_healthy(heartbeat, 10.0, now=200.0) == ["scanner"]
    notifier.status("marker")
    assert _recv(listener) == b"STATUS=marker"


def test_explicit_environment_uses_the_builtin_sender(
    listener: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An explicit environ, or use_systemd=False, always sends the datagram itself."""
    monkeypatch.setenv("NOTIFY_SOCKET", listener[1])
    assert Notifier({"NOTIFY_SOCKET": listener[1]}).backend == "socket"
    assert Notifier(use_systemd=False).backend == "socket"
    assert Notifier().backend in ("socket", "systemd-python")
