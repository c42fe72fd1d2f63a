"""Second hostile review of two fixes: nbankd's log output (a bounded queue written by
a thread of its own, values and lines cut to size, secrets redacted first) and
``nbankctl explain`` (a path walked from its inbox down, no link followed).

Logs are rendered with the real chain (``configure_logging``) or by the real daemon;
explain runs against the real ``nbankd`` with links and folders made the way a local
user who can write an inbox (or a lab's administrator) would.

All findings fixed (kept as regression tests): a journald that takes no entry froze
the whole daemon (systemd.journal.send blocked in sendmsg holding the GIL; nbankd now
sends journal entries itself, never waiting); the short line of a log line that
failed to render showed its message's and its error's secrets unredacted; a URL
password as a key of a logged mapping was not redacted; a folder swapped for a link
between explain's walk and its read of NAME.reason had explain answer a .reason from
beyond the link. The rest are guards.
"""

from __future__ import annotations

import ctypes
import io
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import DaemonHarness, nbankctl, raw_explain, status_json, wait_for
from fixtures.mountns import MountNamespace
from nbankd.daemon.explain_look import read_reason_below
from nbankd.service.logs import configure_logging, get_logger, reset_logging

SECRET = "hunter2-Zq9"


@pytest.fixture
def logging_to() -> Iterator[io.StringIO]:
    """A text stream the json log chain writes to (the writer thread not started)."""
    old = os.environ.pop("JOURNAL_STREAM", None)
    out = io.StringIO()
    configure_logging("json", "info", out)
    yield out
    reset_logging()
    if old is not None:
        os.environ["JOURNAL_STREAM"] = old


class _Unprintable:
    """A value whose text cannot be made (the chain's renderer fails on it)."""

    def __str__(self) -> str:
        raise RuntimeError("no text")

    __repr__ = __str__


class _SecretError:
    """A value whose text fails with an error that quotes a secret."""

    def __str__(self) -> str:
        raise ValueError(f"cannot show token={SECRET}")

    __repr__ = __str__


# --- (a) secrets and the cut ------------------------------------------------------------


def test_a_secret_straddling_the_value_cut_is_still_hidden(logging_to: io.StringIO) -> None:
    """A password that starts just before a long value's 4 KiB cut does not reach the
    line, neither whole nor its first characters."""
    value = "x" * 4080 + f" password={SECRET}{'y' * 40}"
    get_logger().warning("long", detail=value)
    text = logging_to.getvalue()
    assert "hunter2" not in text and "Zq9" not in text


def test_a_secret_in_the_middle_of_a_long_traceback_is_hidden(logging_to: io.StringIO) -> None:
    """A URL password inside a traceback long enough to be cut (beginning and end
    kept) does not reach the line."""
    try:
        raise RuntimeError("x" * 9000 + f" https://alice:{SECRET}@registry.example/ " + "y" * 9000)
    except RuntimeError:
        get_logger().exception("failed")
    text = logging_to.getvalue()
    assert SECRET not in text and "hunter2" not in text


def test_a_secret_deep_in_a_nested_value_is_not_shown(logging_to: io.StringIO) -> None:
    """A password under a secret key nested deeper than the cut keeps, or past the
    32 entries a list keeps, reaches no line."""
    deep: Any = {"password": SECRET}
    for _ in range(10):
        deep = {"level": deep}
    many = [{"n": n} for n in range(40)] + [{"token": SECRET}]
    get_logger().warning("nested", deep=deep, many=many)
    assert SECRET not in logging_to.getvalue()


def test_a_line_that_fails_to_render_does_not_show_a_secret_of_its_message(
    logging_to: io.StringIO,
) -> None:
    """When a line cannot be rendered (a value whose text fails), the short line said
    instead hides a URL password of its message, as the line itself would have."""
    get_logger().error(
        f"registry https://alice:{SECRET}@registry.example/ refused", detail=_Unprintable()
    )
    text = logging_to.getvalue()
    assert text.strip(), "no line at all"
    assert SECRET not in text


def test_the_error_named_for_a_line_that_fails_to_render_hides_secrets(
    logging_to: io.StringIO,
) -> None:
    """The error named in the short line of a line that could not be rendered hides a
    ``token=...`` it quotes."""
    get_logger().error("upload refused", detail=_SecretError())
    text = logging_to.getvalue()
    assert "log_error" in text
    assert SECRET not in text


def test_a_url_password_in_a_key_of_a_logged_mapping_is_hidden(logging_to: io.StringIO) -> None:
    """A URL with a password used as a key of a logged mapping is shown without it."""
    get_logger().warning("registries", answers={f"https://bob:{SECRET}@reg.example/": 503})
    assert SECRET not in logging_to.getvalue()


def test_two_keys_the_same_once_redacted_are_both_kept(logging_to: io.StringIO) -> None:
    """Two keys of a logged mapping differing only by a URL password are both shown,
    with their own values, neither password among them."""
    answers = {"https://bob:one@reg.example/": 503, "https://bob:two@reg.example/": 200}
    get_logger().warning("registries", answers=answers)
    doc = json.loads(logging_to.getvalue().splitlines()[-1])
    assert sorted(doc["answers"].values()) == [200, 503], doc
    assert "one@" not in json.dumps(doc) and "two@" not in json.dumps(doc)


# --- (a) the daemon's log output --------------------------------------------------------


def _log_docs(h: DaemonHarness) -> list[dict[str, Any]]:
    out = []
    for line in h.log_path.read_bytes().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def test_the_stopping_line_reaches_the_output_at_a_sigterm_stop(daemon_factory: Any) -> None:
    """A daemon stopped by SIGTERM while depositing exits 0 with its lines written out
    whole, the ``stopping`` line among them."""
    h: DaemonHarness = daemon_factory()
    h.start()
    for n in range(40):
        h.drop(f"s{n:02d}.wav", os.urandom(200 + n))
    wait_for(lambda: len(h.receipts()) >= 5, 60, "5 deposits")
    assert h.stop() == 0
    lines = [line for line in h.log_path.read_bytes().splitlines() if line.strip()]
    docs = [json.loads(line) for line in lines]
    assert any(d.get("event") == "stopping" for d in docs), lines[-5:]


def test_a_start_failing_after_the_writer_started_still_says_why(daemon_factory: Any) -> None:
    """A start that fails once the log writer runs (the control socket's folder is a
    file) exits non-zero, its lines logged so far written and the failing path named."""
    h: DaemonHarness = daemon_factory()
    h.write_config()
    (h.root / "sockdir").write_text("a file, not a folder")
    h.edit_config(lambda c: c.update(control_socket=str(h.root / "sockdir" / "c.sock")))
    with pytest.raises(AssertionError):
        h.start(timeout=30)
    code = h.wait_exit(30)
    out = h.log_path.read_text()
    assert code != 0
    assert '"event": "started"' in out
    assert "sockdir" in out


def _pipe_bytes(fd: int) -> int:
    """How many bytes wait in the pipe whose read end is ``fd`` (FIONREAD)."""
    import fcntl
    import termios

    buf = ctypes.c_int(0)
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf.value


@pytest.fixture
def stuck_log(daemon_factory: Any, tmp_path: Path) -> Iterator[tuple[DaemonHarness, int]]:
    """A started daemon whose stdout is a FIFO read by nobody (yet), filled up: the
    harness and the FIFO's read end."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    h: DaemonHarness = daemon_factory()
    h.log_path.symlink_to(fifo)
    h.dump_log = lambda: None  # type: ignore[method-assign]  # reading the FIFO would block
    try:
        h.start()
        n = 0
        deadline = time.monotonic() + 60
        while _pipe_bytes(reader) < 60_000:  # 64 KiB: the writer thread is blocked
            assert time.monotonic() < deadline, "the log pipe never filled"
            h.drop(f"fill{n:04d}.wav", os.urandom(100 + n))
            n += 1
            if n % 20 == 0:
                wait_for(lambda n=n: len(h.receipts()) >= n - 20, 60, "deposits")
        yield h, reader
    finally:
        os.close(reader)


def test_a_stuck_log_pipe_read_again_makes_status_healthy(
    stuck_log: tuple[DaemonHarness, int],
) -> None:
    """Status is degraded while nobody reads nbankd's stdout pipe, and healthy again
    (no log problem) once the pipe is read; deposits went on meanwhile."""
    h, reader = stuck_log
    h.drop("during.wav", b"deposited while the log is stuck")
    wait_for(lambda: h.receipt("during") is not None, 60, "a deposit while stuck")

    def stuck() -> bool:
        _rc, doc = status_json(h)
        return bool(doc["log"]["problem"])

    wait_for(stuck, 60, "status to tell the stuck log output")
    drained = bytearray()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                chunk = os.read(reader, 65536)
            except BlockingIOError:
                stop.wait(0.05)
                continue
            if not chunk:
                return
            drained.extend(chunk)

    thread = threading.Thread(target=drain, daemon=True)
    thread.start()
    try:

        def healthy() -> bool:
            _rc, doc = status_json(h)
            return doc["log"]["problem"] is None and not any(
                "log output" in line for line in doc["degraded"]
            )

        wait_for(healthy, 60, "status healthy once the log pipe is read")
        h.drop("after.wav", b"deposited after")
        wait_for(lambda: b"after.wav" in drained, 60, "the line of a later deposit")
    finally:
        stop.set()
        thread.join(5)
    for line in bytes(drained).splitlines():
        assert isinstance(json.loads(line), dict), line[:200]


def test_a_daemon_with_a_full_log_pipe_stops_promptly(
    stuck_log: tuple[DaemonHarness, int],
) -> None:
    """SIGTERM to a daemon whose stdout pipe is full and unread ends it with status 0
    within 20 seconds."""
    h, _reader = stuck_log
    assert h.proc is not None
    t0 = time.monotonic()
    h.proc.send_signal(signal.SIGTERM)
    code = h.wait_exit(60)
    assert code == 0
    assert time.monotonic() - t0 < 20


def test_deposits_go_on_when_journald_takes_no_entry(
    daemon_factory: Any, mount_ns: MountNamespace
) -> None:
    """With log.format journal and a journald that takes no entry (its socket's queue
    full: journald hung or swamped), files are still deposited and status answers."""
    mount_ns.mount_tmpfs(Path("/run/systemd"), "1m")
    folder = mount_ns.view(Path("/run/systemd/journal"))
    folder.mkdir()
    journald = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journald.bind(str(folder / "socket"))  # never read: a journald that hangs
    try:
        h: DaemonHarness = daemon_factory(
            wrap_argv=mount_ns.enter, extra_config={"log": {"format": "journal", "level": "debug"}}
        )
        h.start()
        for n in range(60):  # far more entries than a datagram socket's queue holds
            h.drop(f"j{n:02d}.wav", os.urandom(100 + n))
        wait_for(lambda: len(h.receipts()) == 60, 40, "60 deposits")
        code, _doc = status_json(h)
        assert code in (0, 1)
    finally:
        journald.close()


# --- (b) nbankctl explain ---------------------------------------------------------------


def _explain(h: DaemonHarness, path: str | Path) -> tuple[int, dict[str, Any]]:
    proc = nbankctl(h, "explain", "--json", str(path), timeout=60)
    return proc.returncode, json.loads(proc.stdout)


_LIBC = ctypes.CDLL(None, use_errno=True)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> None:
    """Swaps the entries ``a`` and ``b`` atomically (renameat2 RENAME_EXCHANGE)."""
    if _LIBC.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def test_a_folder_swapped_for_a_link_during_explain_never_shows_a_reason_beyond_it(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """An inbox writer swapping a folder of the rejected folder with a link to a folder
    they cannot read, over and over while asking explain, never gets a reason file of
    that folder in an answer."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "x.wav").write_bytes(b"not theirs")
    (private / "x.wav.reason").write_text(
        json.dumps({"code": "PRIVATE-CODE", "message": "private words"})
    )
    h: DaemonHarness = daemon_factory()
    h.start()
    sub = h.rejected / "sub"
    sub.mkdir(parents=True)
    (sub / "x.wav").write_bytes(b"planted")
    swap = h.rejected / "swap"
    swap.symlink_to(private)
    stop = threading.Event()

    def swapping() -> None:
        while not stop.is_set():
            _exchange(sub, swap)

    thread = threading.Thread(target=swapping, daemon=True)
    thread.start()
    answers: list[dict[str, Any]] = []
    leaked: list[str] = []
    try:
        deadline = time.monotonic() + 40
        while not leaked and len(answers) < 2000 and time.monotonic() < deadline:
            answers.append(raw_explain(h, str(sub / "x.wav")))
            text = json.dumps(answers[-1])
            if "PRIVATE" in text or "private words" in text:
                leaked.append(answers[-1]["result"]["message"])
    finally:
        stop.set()
        thread.join(5)
    assert len(answers) >= 50 or leaked, answers[:3]
    assert leaked == [], (len(answers), leaked)


@pytest.mark.parametrize("kind", ["link", "fifo", "file"])
def test_a_reason_read_below_a_folder_never_goes_through_a_link(tmp_path: Path, kind: str) -> None:
    """Reading ``sub/x.wav.reason`` from the inbox down gives nothing when ``sub`` is a
    link to a folder holding one (or the reason is a FIFO, or sub a file), and the
    reason itself when sub is a folder."""
    inbox, private = tmp_path / "inbox", tmp_path / "private"
    (inbox / "rejected").mkdir(parents=True)
    private.mkdir()
    (private / "x.wav.reason").write_text(json.dumps({"code": "PRIVATE-CODE"}))
    sub = inbox / "rejected" / "sub"
    if kind == "link":
        sub.symlink_to(private)
    elif kind == "fifo":
        sub.mkdir()
        os.mkfifo(sub / "x.wav.reason")
    else:
        sub.write_text("a file")
    assert read_reason_below(inbox, "rejected/sub/x.wav.reason") is None
    if kind == "link":
        sub.unlink()
        sub.mkdir()
        (sub / "x.wav.reason").write_text(json.dumps({"code": "OWN-CODE"}))
        assert read_reason_below(inbox, "rejected/sub/x.wav.reason") == {"code": "OWN-CODE"}


@pytest.fixture
def linked_inbox(daemon_factory: Any) -> DaemonHarness:
    """A daemon whose inbox is configured as ROOT/data/inbox, ROOT/data a link to
    ROOT/mnt/data (a lab's /data -> /mnt/data), with one input rejected (a space in
    its name) and one deposited."""
    h: DaemonHarness = daemon_factory()
    (h.root / "mnt" / "data" / "inbox").mkdir(parents=True)
    (h.root / "data").symlink_to(h.root / "mnt" / "data")
    h.inbox = h.root / "data" / "inbox"
    h.rejected = h.inbox / "rejected"
    h.inbox_options["path"] = str(h.inbox)
    h.start()
    h.drop("bad name.wav", b"rejected: a space in the name")
    h.drop("good.wav", b"deposited")
    h.wait_settled(2)
    return h


@pytest.mark.parametrize("form", ["configured", "real"])
def test_explain_of_a_rejected_input_of_an_inbox_reached_through_a_link(
    linked_inbox: DaemonHarness, form: str
) -> None:
    """With the inbox's configured path going through a link, a rejected input is
    explained as rejected, present, with its requeue command, named by the
    configured path or by the real one."""
    h = linked_inbox
    base = h.inbox if form == "configured" else h.root / "mnt" / "data" / "inbox"
    rc, doc = _explain(h, base / "rejected" / "bad name.wav")
    assert rc == 0
    assert doc["state"] == "rejected", doc
    assert doc["present"] is True and "requeue" in doc, doc
    assert doc["reason"]["code"] == "invalid-name", doc


@pytest.mark.parametrize("form", ["configured", "real"])
def test_explain_of_the_original_paths_of_an_inbox_reached_through_a_link(
    linked_inbox: DaemonHarness, form: str
) -> None:
    """With the inbox's configured path going through a link, the original paths of a
    deposited and of a rejected input are explained as deposited and as rejected
    (still in the rejected folder, with its requeue command)."""
    h = linked_inbox
    base = h.inbox if form == "configured" else h.root / "mnt" / "data" / "inbox"
    rc1, good = _explain(h, base / "good.wav")
    rc2, bad = _explain(h, base / "bad name.wav")
    assert rc1 == rc2 == 0
    assert good["state"] == "deposited" and good["id"] == "good", good
    assert bad["state"] == "rejected" and bad["present"] is True and "requeue" in bad, bad


def test_explain_of_a_file_waiting_in_an_inbox_reached_through_a_link(
    linked_inbox: DaemonHarness,
) -> None:
    """A file waiting in a sub-folder of an inbox reached through a link is explained
    as one the scans see (not as unsupported, nor as nothing there)."""
    h = linked_inbox
    h.reload_with(lambda c: c["inboxes"][0].update(settle_seconds=600))
    h.drop("sub/wait.wav", b"waiting")
    rc, doc = _explain(h, h.inbox / "sub" / "wait.wav")
    assert rc == 0
    assert doc["state"] in ("settling", "not-seen"), doc


@pytest.mark.parametrize(
    "spelling",
    [
        "{inbox}//sub//wait.wav",
        "/{inbox}/sub/wait.wav",
        "{inbox}/./sub/./wait.wav",
        "{inbox}/sub/wait.wav/",
        "{inbox}/sub/../sub/wait.wav",
    ],
)
def test_explain_answers_every_spelling_of_a_path_as_the_path(
    daemon_factory: Any, spelling: str
) -> None:
    """Double slashes, a leading ``//``, ``.`` components, a trailing slash and a
    ``sub/..`` detour name the same waiting file: the same state as its plain path."""
    h: DaemonHarness = daemon_factory(inbox_options={"settle_seconds": 600})
    h.start()
    h.drop("sub/wait.wav", b"waiting")
    wait_for(lambda: _explain(h, h.inbox / "sub" / "wait.wav")[1]["state"] == "settling", 30)
    rc, doc = _explain(h, spelling.format(inbox=h.inbox))
    assert rc == 0
    assert doc["state"] == "settling", doc
    assert doc["relpath"] == "sub/wait.wav", doc


def test_explain_of_a_file_in_a_hidden_folder_says_ignored(daemon_factory: Any) -> None:
    """A file in a dot-folder of the inbox (``.cache/``) is explained as ignored by the
    ``.*`` pattern, as the scans skip it, never as waiting to be deposited."""
    h: DaemonHarness = daemon_factory()
    h.start()
    h.drop(".cache/x.wav", b"hidden")
    h.drop("seen.wav", b"deposited")
    h.wait_settled(1)
    rc, doc = _explain(h, h.inbox / ".cache" / "x.wav")
    assert rc == 0
    assert doc["state"] == "ignored", doc
    assert (h.inbox / ".cache" / "x.wav").exists()
