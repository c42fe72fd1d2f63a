"""Receipts and history, reviewed hostilely: the lab's record of what was deposited,
where and when, after short writes, odd ``--since`` values, registry moves and big
logs. Each test names the behaviour expected; the ones marked *guard* pass today and
keep a behaviour that held up."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from fixtures.daemon import DaemonHarness
from fixtures.steps_env import Env
from nbankd.control import handlers
from nbankd.deposit import moves
from nbankd.deposit.lifecycle import State, Step, advance
from nbankd.deposit.receipts import append_receipt, read_receipts, receipts_path
from nbankd.names import WORK_DIR_NAME

NBANKCTL = str(Path(sys.executable).with_name("nbankctl"))


def _tokens(env: Env) -> list[str]:
    return [r["token"] for r in read_receipts(env.root / "receipts")]


def _record_on_a_filling_disk(env: Env, item: Any, room: int) -> tuple[Any, Any]:
    """The record step of ``item`` run while its receipts log can grow by ``room`` bytes
    only: the append is cut short (a short write, then EFBIG, as a full disk's ENOSPC
    or a quota's EDQUOT cut it). The outcome is journaled as the daemon does."""
    log = receipts_path(env.root / "receipts", env.spec.key)
    size = log.stat().st_size if log.exists() else 0
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + room, hard))
    try:
        item, outcome = env.steps.run(item, Step.RECORD)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    progress = advance(item.progress, Step.RECORD, outcome, 0.0)
    return env.journal.save(item.with_progress(progress)), outcome


def _receipt_line(env: Env, item: Any, scratch: Path) -> bytes:
    """The receipt line the record step would append for ``item`` (written into
    ``scratch`` instead of the receipts folder; the item is not saved)."""
    real = env.steps.receipts_dir
    env.steps.receipts_dir = scratch
    try:
        _, outcome = env.steps.run(item, Step.RECORD)
    finally:
        env.steps.receipts_dir = real
    assert outcome.kind == "ok", outcome
    [line] = receipts_path(scratch, env.spec.key).read_bytes().splitlines()
    return line


# -- a receipt cut short, then ended by the next one -----------------------------------


def test_a_receipt_cut_short_by_a_full_disk_is_written_in_full_on_retry(
    env: Env, tmp_path: Path
) -> None:
    """A receipt a full disk cut short after its token leaves no part of itself in the
    log, and is written in full, once, when its record step is retried after another
    deposit's receipt: every deposit leaves one readable receipt."""
    a = env.until(env.drop("a0000001.dat", os.urandom(64)), State.VERIFIED)
    b = env.until(env.drop("b0000001.dat", os.urandom(64)), State.VERIFIED)
    line = _receipt_line(env, a, tmp_path / "scratch")
    cut = line.index(b'"url": "') + 12  # inside the URL, the last field: after the token
    a, outcome = _record_on_a_filling_disk(env, a, cut)
    assert outcome.kind == "transient", outcome  # the input waits, as on ENOSPC
    log = receipts_path(env.root / "receipts", env.spec.key)
    left = log.read_bytes() if log.exists() else b""
    assert a.token.encode() not in left and (not left or left.endswith(b"\n"))

    # space comes back; the other input records first (backoff jitter decides), then
    # the first one's retry
    b = env.until(b, State.DONE)
    a = env.until(a, State.DONE)
    assert a.state is State.DONE and b.state is State.DONE
    assert not (env.inbox / "a0000001.dat").exists()  # deposited: the source is gone
    assert sorted(_tokens(env)) == sorted([a.token, b.token])


# -- history over a big log ----------------------------------------------------------


def _daemon_reading(state_dir: Path) -> Any:
    """What the history handler reads of a daemon: its clock and its state_dir."""
    return SimpleNamespace(clock=time.time, config=SimpleNamespace(state_dir=state_dir))


def _write_receipts(receipts_dir: Path, inbox: str, count: int) -> None:
    """``count`` receipts in ``inbox``'s log, as years of deposits leave them."""
    receipts_dir.mkdir(parents=True, exist_ok=True)
    with open(receipts_path(receipts_dir, inbox), "w", encoding="utf-8") as f:
        for n in range(count):
            r = {
                "token": f"{n:032x}",
                "source": f"{inbox}/bird{n % 100}/rec{n:07d}.wav",
                "inbox": inbox,
                "id": f"rec{n:07d}",
                "url": f"https://lab.example.org/neurobank/resources/rec{n:07d}/",
                "sha1": f"{n:040x}",
                "size": 1234,
                "dtype": "vocalization-wav",
                "archive": "birdsong",
                "archive_path": f"/home/data/birdsong/resources/re/rec{n:07d}.wav",
                "time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(1.6e9 + n)),
                "outcome": "deposited",
            }
            f.write(json.dumps(r, sort_keys=True) + "\n")


def test_history_with_a_limit_holds_only_that_many_receipts_in_memory(tmp_path: Path) -> None:
    """`history --limit 50` over a log of 40,000 receipts (a few years of one rig) keeps
    about 50 of them in the daemon's memory, not every receipt ever written: readers
    (the lab group) may run it, up to 32 at once."""
    _write_receipts(tmp_path / "receipts", "/srv/inbox/rig3", 40_000)
    daemon = _daemon_reading(tmp_path)
    tracemalloc.start()
    try:
        result = handlers.history(daemon, {"limit": 50})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [r["id"] for r in result["receipts"][:2]] == ["rec0039999", "rec0039998"]
    assert result["matched"] == 40_000
    assert peak < 16 * 1024 * 1024, f"{peak / 2**20:.0f} MiB held for 50 receipts"


# -- --since -------------------------------------------------------------------------


def _ctl(h: DaemonHarness, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    return subprocess.run(
        [NBANKCTL, "-c", str(h.config_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _receipt(h: DaemonHarness, n: int, when: str, **extra: Any) -> dict[str, Any]:
    r = {
        "token": f"{n:032x}",
        "source": f"{h.inbox}/rec{n:04d}.dat",
        "inbox": str(h.inbox),
        "id": f"rec{n:04d}",
        "url": f"{h.registry_address}resources/rec{n:04d}/",
        "sha1": f"{n:040x}",
        "size": 1,
        "dtype": h.dtype,
        "archive": h.archive_name,
        "archive_path": f"{h.archive}/resources/re/rec{n:04d}.dat",
        "time": when,
        "outcome": "deposited",
    }
    r.update(extra)
    return r


@pytest.fixture
def h(daemon_factory: Any) -> DaemonHarness:
    harness: DaemonHarness = daemon_factory()
    harness.start()
    return harness


def test_history_since_a_basic_iso_date_means_that_date(h: DaemonHarness) -> None:
    """`history --since 20240501` (an ISO 8601 date in its basic form, which the help's
    "or an ISO date" invites) lists the deposits since 1 May 2024, not those of the
    last 20,240,501 seconds (234 days back from today)."""
    folder = h.state_dir / "receipts"
    append_receipt(folder, str(h.inbox), _receipt(h, 1, "2024-04-30T12:00:00+00:00"))
    append_receipt(folder, str(h.inbox), _receipt(h, 2, "2024-05-02T12:00:00+00:00"))
    proc = _ctl(h, "history", "--since", "20240501", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)["receipts"]] == ["rec0002"]


def test_history_since_a_date_out_of_range_is_a_usage_error(h: DaemonHarness) -> None:
    """`history --since 0001-01-01` (a date without zone at the edge of the calendar) is
    a usage error (exit 2) naming --since, not an internal error (exit 1, which says
    "problems found")."""
    proc = _ctl(h, "history", "--since", "0001-01-01")
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "since" in proc.stderr and "internal" not in proc.stderr


# -- registry moves ------------------------------------------------------------------

EMBEDDED = "file:///var/lib/nbankd/registry.sqlite3/"
SERVER = "https://neurobank.example.org/neurobank/"
NEW_SERVER = "https://nb2.example.org/neurobank/"


def test_history_follows_moves_round_three_registries_to_where_records_are(
    tmp_path: Path,
) -> None:
    """Records moved embedded -> server -> new server -> embedded again (the lab gives
    up its servers) are all in the embedded registry: every receipt, whichever registry
    it was written under, shows the embedded registry's URL."""
    assert moves.record_move(tmp_path, EMBEDDED, SERVER, time="2024-01-01T00:00:00+00:00")
    assert moves.record_move(tmp_path, SERVER, NEW_SERVER, time="2024-06-01T00:00:00+00:00")
    assert moves.record_move(tmp_path, NEW_SERVER, EMBEDDED, time="2025-01-01T00:00:00+00:00")
    receipts = [
        {"id": n, "url": f"{base}resources/{n}/"}
        for n, base in (("a", EMBEDDED), ("b", SERVER), ("c", NEW_SERVER))
    ]
    shown = moves.follow(receipts, tmp_path)
    assert [r["url"] for r in shown] == [f"{EMBEDDED}resources/{n}/" for n in "abc"]


# -- what the receipts log holds and how history shows it ------------------------------


def test_a_receipts_log_is_utf8_json_lines_whatever_the_names(env: Env) -> None:
    """A deposit from a folder whose name is not UTF-8 leaves a log that is still UTF-8
    JSON lines (the undecodable byte written as a JSON escape): a script reading it as
    the documented JSON lines gets every receipt, and the source's bytes round-trip."""
    folder = os.fsdecode(b"bird\xff")
    (env.inbox / folder).mkdir()
    item = env.until(env.drop(f"{folder}/rec00001.dat", b"one"), State.DONE)
    env.until(env.drop("rec00002.dat", b"two"), State.DONE)
    log = receipts_path(env.root / "receipts", env.spec.key)
    receipts = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    first = receipts[0]
    assert first["token"] == item.token
    assert os.fsencode(first["source"]) == os.fsencode(env.inbox) + b"/bird\xff/rec00001.dat"


@pytest.mark.parametrize(
    "folder",
    [
        pytest.param("c\u009b2J", id="C1-CSI"),  # 8-bit CSI: ESC [ to many terminals
        pytest.param("\u202egnp.exe", id="bidi-override"),  # shows as exe.png...
    ],
)
def test_history_shows_names_without_terminal_controls(folder: str) -> None:
    """`nbankctl history` shows a source folder's C1 control or bidirectional override
    escaped (as it does C0 controls: \\x1b), so a name cannot drive the terminal or
    show as another name."""
    from nbankctl import render

    receipt = {
        "time": "2024-05-01T12:00:00+00:00",
        "id": "rec1",
        "size": 1,
        "source": f"/srv/inbox/{folder}/rec1.wav",
        "url": "https://x/resources/rec1/",
    }
    text = render.history({"receipts": [receipt], "matched": 1})
    assert "\u009b" not in text and "\u202e" not in text, repr(text)


# -- guards: these hold today ------------------------------------------------------


def test_guard_history_skips_a_torn_line_and_filters_inboxes_exactly(
    daemon_factory: Any,
) -> None:
    """*Guard*: a torn line (kill -9 mid-append) hides no later receipt, and `--inbox
    inbox` never matches the receipts of `inbox2`, whose name it starts."""
    h: DaemonHarness = daemon_factory()
    h.write_config()
    cfg = yaml.safe_load(h.config_path.read_text())
    second = dict(cfg["inboxes"][0], path=str(h.root / "inbox2"))
    cfg["inboxes"].append(second)
    h.config_path.write_text(yaml.safe_dump(cfg))
    h.start()
    folder = h.state_dir / "receipts"
    log = append_receipt(folder, str(h.inbox), _receipt(h, 1, "2024-05-01T12:00:00+00:00"))
    with open(log, "ab") as f:  # half a line: a crash mid-append
        f.write(json.dumps(_receipt(h, 2, "2024-05-01T12:00:01+00:00")).encode()[:100])
    append_receipt(folder, str(h.inbox), _receipt(h, 3, "2024-05-01T12:00:02+00:00"))
    other = _receipt(h, 4, "2024-05-01T12:00:03+00:00", inbox=str(h.root / "inbox2"))
    append_receipt(folder, str(h.root / "inbox2"), other)
    proc = _ctl(h, "history", "--inbox", "inbox", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["id"] for r in json.loads(proc.stdout)["receipts"]] == ["rec0003", "rec0001"]
    proc = _ctl(h, "history", "--json")
    assert [r["id"] for r in json.loads(proc.stdout)["receipts"]] == [
        "rec0004",
        "rec0003",
        "rec0001",
    ]


def test_guard_a_full_disk_holds_the_deposit_until_its_receipt_is_written(
    env: Env, tmp_path: Path
) -> None:
    """*Guard*: a receipt that cannot be written (the disk fills mid-line) keeps the
    input in its inbox, waiting; once there is room the retry writes the receipt in full
    and only then is the source removed."""
    a = env.until(env.drop("a0000001.dat", os.urandom(64)), State.VERIFIED)
    line = _receipt_line(env, a, tmp_path / "scratch")
    a, outcome = _record_on_a_filling_disk(env, a, len(line) // 2)
    assert outcome.kind == "transient" and a.state is State.VERIFIED
    assert any(p.is_file() for p in (env.inbox / WORK_DIR_NAME).iterdir())  # still held
    a = env.until(a, State.DONE)
    assert a.state is State.DONE and _tokens(env) == [a.token]
