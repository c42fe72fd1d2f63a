"""A FIFO (or a socket, a device) at a receipts log's path, reviewed hostilely: the
receipts are the lab's record of what was deposited, so none may go into something
that is not the log, and nothing that opens a log (the record step, its retry, the
start's read of the last deposits, ``nbankctl history``) may wait on a FIFO for ever.

The daemon tests run the real ``nbankd`` with a real FIFO made by ``mkfifo``."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fixtures.daemon import DaemonHarness, nbankctl, status_json, wait_for
from nbankd.archive.fsops import NotALog
from nbankd.deposit.receipts import append_receipt, read_receipts, receipts_path

INBOX = "/srv/inbox/rig1"


def _receipt(n: int, inbox: str = INBOX) -> dict[str, Any]:
    return {"token": f"{n:032x}", "inbox": inbox, "id": f"rec{n:04d}", "outcome": "deposited"}


def _within(seconds: float, fn: Callable[[], Any], fifo: Path) -> tuple[str, Any]:
    """("returned", value) or ("raised", error) of ``fn()``; fails the test when it is
    still running after ``seconds`` (waiting on ``fifo``: a writer is then opened and
    closed so that the thread ends)."""
    result: list[tuple[str, Any]] = []

    def run() -> None:
        try:
            result.append(("returned", fn()))
        except Exception as err:
            result.append(("raised", err))

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    hung = worker.is_alive()
    if hung:  # release a reader waiting for a writer
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(seconds)
    assert not hung, f"blocked on the FIFO at {fifo}"
    return result[0]


def test_a_retried_receipt_refuses_a_fifo_at_its_log_without_waiting(tmp_path: Path) -> None:
    """A retried record step, which first reads the log's tail for its receipt, refuses
    a FIFO at the log's path at once (naming it) instead of waiting for a writer."""
    folder = tmp_path / "receipts"
    folder.mkdir()
    fifo = receipts_path(folder, INBOX)
    os.mkfifo(fifo)
    how, err = _within(10, lambda: append_receipt(folder, INBOX, _receipt(1), retried=True), fifo)
    assert how == "raised" and isinstance(err, NotALog), err
    assert err.filename == str(fifo) and "a FIFO" in err.strerror


def test_history_passes_over_a_fifo_among_the_receipts_logs(tmp_path: Path) -> None:
    """History reads every receipts log but a FIFO named like one, which it passes over
    (it holds no receipt) instead of waiting for a writer."""
    folder = tmp_path / "receipts"
    append_receipt(folder, INBOX, _receipt(1))
    fifo = receipts_path(folder, "/srv/inbox/rig2")
    os.mkfifo(fifo)
    how, receipts = _within(10, lambda: list(read_receipts(folder)), fifo)
    assert how == "returned" and [r["id"] for r in receipts] == ["rec0001"], receipts


def test_a_fifo_at_a_receipts_log_does_not_hold_the_daemons_start(daemon_factory: Any) -> None:
    """A FIFO at an inbox's receipts log when the daemon starts (which reads each log's
    end for the inbox's last deposit) is passed over: the daemon becomes ready and
    answers status."""
    h: DaemonHarness = daemon_factory()
    folder = h.state_dir / "receipts"
    folder.mkdir(parents=True)
    os.mkfifo(receipts_path(folder, str(h.inbox)))
    h.start()
    code, _doc = status_json(h)
    assert code in (0, 1)
    h.stop()


def _unread(reader: int) -> bytes:
    """What was written into the FIFO of ``reader`` and not read yet."""
    try:
        return os.read(reader, 1 << 16)
    except BlockingIOError:  # a writer holds it open, and wrote nothing
        return b""


def test_a_deposit_whose_receipts_log_is_a_fifo_waits_told_then_gets_one_receipt(
    daemon_factory: Any,
) -> None:
    """With a FIFO at its receipts log's path, a deposit waits (stored, its input held,
    no receipt written into the FIFO), status names the FIFO's path; once the FIFO is
    removed the receipt is written, once, and the deposit finishes."""
    h: DaemonHarness = daemon_factory()
    h.start()
    folder = h.state_dir / "receipts"
    folder.mkdir(parents=True, exist_ok=True)
    log = receipts_path(folder, str(h.inbox))
    os.mkfifo(log)
    reader = os.open(log, os.O_RDONLY | os.O_NONBLOCK)  # keeps what is written into it
    try:
        h.drop("a0000001.dat", os.urandom(3000))

        def told() -> list[str]:
            code, doc = status_json(h)
            return [d for d in doc["degraded"] if str(log) in d] if code == 1 else []

        [line] = wait_for(told, 60, "status to name the FIFO at the receipts log")
        assert "receipts-unwritable" in line and "a FIFO" in line, line
        assert _unread(reader) == b"", "a receipt went into the FIFO"
        assert list(h.archive_files()) == ["a0000001.dat"]
        assert h.proc is not None and h.proc.poll() is None
    finally:
        os.close(reader)
    log.unlink()
    wait_for(
        lambda: [r["state"] for r in h.journal_rows()] == ["done"], 90, "the deposit to finish"
    )
    assert [r["id"] for r in h.receipts()] == ["a0000001"]
    proc = nbankctl(h, "history", "--id", "a0000001", "--json")
    assert proc.returncode == 0 and '"matched": 1' in proc.stdout, proc.stdout + proc.stderr
    h.stop()
