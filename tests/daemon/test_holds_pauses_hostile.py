"""Hostile review of the hold on an archive holding resources the embedded registry
has no record of (:mod:`nbankd.daemon.late_archives`, kept in
``state_dir/held-archives.json``), of ``--adopt-archives`` run while an archive is
held, and of the interpolating logger and nbankd's last error line
(:mod:`nbankd.service.logshape`, :func:`nbankd.service.logwriter.say_within`).

Real daemon subprocesses, real archives and embedded registries, real FIFOs;
polling with deadlines, never sleeps."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from fixtures.adoption import add_mirror, held_said, hold_late_archive, plant
from fixtures.daemon import NBANKD, DaemonHarness, raw_explain, status_json, wait_for
from nbankd import errors
from nbankd.archive.opening import create_archive
from nbankd.config import Config, load_config
from nbankd.daemon import adopt, late_archives
from nbankd.daemon.registry_setup import open_configured_registry

Factory = Callable[..., DaemonHarness]


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def drop_into(folder: Path, name: str, data: bytes) -> None:
    """Writes a file into an inbox as a rig would: elsewhere, then renamed in."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".drop-{name}"
    tmp.write_bytes(data)
    os.rename(tmp, folder / name)


def first_scans(h: DaemonHarness) -> int:
    return int(status_json(h)[1]["inboxes"][0]["scans"])


def scans_later(h: DaemonHarness, n: int) -> None:
    start = first_scans(h)
    wait_for(lambda: first_scans(h) >= start + n, 30, f"{n} more scans of the inbox")


def started_or_refused(h: DaemonHarness, timeout: float = 30.0) -> bool:
    """Starts ``h``: True once it is ready, False when it exited first (refused);
    fails when it did neither within ``timeout`` seconds (a hang)."""
    try:
        h.start(timeout=timeout)
    except AssertionError:
        assert h.proc is not None
        assert h.proc.poll() is not None, f"nbankd neither started nor exited in {timeout} s"
        return False
    return True


# --- the record of holds: what may stand at state_dir/held-archives.json ------------------


def test_a_fifo_as_the_record_of_holds_never_hangs_the_start(daemon_factory: Factory) -> None:
    """A FIFO standing at held-archives.json lets nbankd start or refuse, naming it, never hang."""
    h = daemon_factory()
    h.state_dir.mkdir()
    os.mkfifo(h.state_dir / late_archives.HELD_NAME)
    if started_or_refused(h):
        h.stop()
    assert late_archives.HELD_NAME in h.log_path.read_text(errors="replace")


def test_a_deeply_nested_record_of_holds_is_damage_not_a_crash(daemon_factory: Factory) -> None:
    """A held-archives.json of deeply nested brackets is a damaged record (every
    archive checked again), and nbankd starts."""
    h = daemon_factory()
    h.state_dir.mkdir()
    (h.state_dir / late_archives.HELD_NAME).write_text("[" * 200_000)
    ok = started_or_refused(h)
    if not ok:
        h.dump_log()
    assert ok, "nbankd refused to start over a damaged held-archives.json"
    h.stop()


# --- the hold lifted -------------------------------------------------------------------


def test_a_hold_outlives_an_archive_that_lists_empty_for_a_moment(tmp_path: Path) -> None:
    """A held archive whose resources/ lists empty for a while (its filesystem not
    mounted yet under an empty mount point) is still held once its resources are back."""
    path = tmp_path / "nbankd.yaml"
    path.write_text(
        "registry: embedded\nstate_dir: state\n"
        "archives: [{path: birds, name: birds, create: true}, {path: lost, name: lost}]\n"
        "inboxes: [{path: inbox, archive: birds, dtype: wav}]\n"
    )
    cfg = load_config(path)
    cfg.state_dir.mkdir()
    registry = open_configured_registry(cfg)
    lost = tmp_path / "lost"
    try:
        create_archive(lost, registry.url)
        registry.add_archive("lost", "neurobank", str(lost))
        registry.add_datatype("wav")
        plant(lost, "lost01.wav", b"stored under a registry that was lost")
        late = late_archives.LateArchives(cfg)
        assert late.problem(registry, "lost", lost) is not None  # held
        (lost / "resources").rename(tmp_path / "away")
        (lost / "resources").mkdir()  # an empty mount point: the filesystem not there yet
        late.problem(registry, "lost", lost)
        (lost / "resources").rmdir()
        (tmp_path / "away").rename(lost / "resources")  # mounted again
        held = late.problem(registry, "lost", lost)
        assert held is not None and "state_dir lost" in held
        again = late_archives.LateArchives(cfg)  # and after a restart
        assert again.problem(registry, "lost", lost) is not None
    finally:
        registry.close()


# --- the ways out the hold names ---------------------------------------------------------


def test_a_hold_adoption_cannot_end_says_what_keeps_it(daemon_factory: Factory) -> None:
    """After --adopt-archives, an archive still held because its first stored resource
    could not be adopted (its name since recorded with other bytes) is released, or
    status names what keeps it held: never the same advice that did not work."""
    h = daemon_factory()
    add_mirror(h)
    hold_late_archive(h)  # kept01 stored in the held archive; new01 waits
    # the rig's numbering started again after state_dir was lost: another kept01
    drop_into(h.root / "inbox2", "kept01.wav", b"a new recording with an old name")
    wait_for(lambda: h.receipt("kept01"), 60, "the new kept01 to be deposited into mirror")
    h.stop()
    h.start(args=["--adopt-archives"], timeout=120)
    # logged during the start, by the log writer's thread: it may follow READY=1
    wait_for(
        lambda: "conflict: kept01 is registered" in h.log_path.read_text(errors="replace"),
        60,
        "the adoption's conflict logged",
    )
    wait_for(lambda: held_said(h) or h.receipt("new01"), 60, "new01 to be held or deposited")
    scans_later(h, 2)
    lines = [d for d in status_json(h)[1]["degraded"] if "state_dir lost" in d]
    assert all("kept01" in d or "adoption-skipped" in d for d in lines), lines
    h.stop()


def test_an_adoption_through_a_held_archive_ends_its_hold_over_restarts(
    daemon_factory: Factory,
) -> None:
    """--adopt-archives that went through a held archive, its only resource skipped,
    ends the hold: the waiting input is deposited, and a plain restart does not hold
    the archive again over what adoption-skipped.json names."""
    h = daemon_factory()
    add_mirror(h)
    hold_late_archive(h)
    drop_into(h.root / "inbox2", "kept01.wav", b"a new recording with an old name")
    wait_for(lambda: h.receipt("kept01"), 60, "the new kept01 to be deposited into mirror")
    h.stop()
    h.start(args=["--adopt-archives"], timeout=120)
    wait_for(lambda: h.receipt("new01"), 60, "new01 to be deposited once adopted through")
    skipped = json.loads((h.state_dir / "adoption-skipped.json").read_text())
    assert any("kept01" in line for line in skipped["first"])
    h.stop()
    h.start()
    h.drop("new02.wav", b"after a plain restart")
    wait_for(lambda: h.receipt("new02"), 60, "new02 to be deposited after a plain restart")
    assert not held_said(h)
    h.stop()


def _two_archives(tmp_path: Path) -> Config:
    path = tmp_path / "nbankd.yaml"
    path.write_text(
        "registry: embedded\nstate_dir: state\n"
        "archives: [{path: birds, name: birds, create: true}, {path: lost, name: lost}]\n"
        "inboxes: [{path: inbox, archive: birds, dtype: wav}]\n"
    )
    cfg = load_config(path)
    cfg.state_dir.mkdir()
    return cfg


def test_an_archive_whose_resources_cannot_be_listed_waits_to_be_checked(tmp_path: Path) -> None:
    """An archive whose resources/ cannot be listed is not taken for empty: its
    deposits wait, status told why, and it is held once its resources list again."""
    cfg = _two_archives(tmp_path)
    registry = open_configured_registry(cfg)
    lost = tmp_path / "lost"
    try:
        create_archive(lost, registry.url)
        registry.add_archive("lost", "neurobank", str(lost))
        plant(lost, "lost01.wav", b"stored under a registry that was lost")
        (lost / "resources").rename(tmp_path / "away")
        (lost / "resources").write_bytes(b"")  # not a folder: listing it fails
        late = late_archives.LateArchives(cfg)
        waits = late.problem(registry, "lost", lost, ask=False)
        assert waits is not None and "cannot be listed" in waits
        assert "lost" in late.pending
        (lost / "resources").unlink()
        (tmp_path / "away").rename(lost / "resources")
        held = late.problem(registry, "lost", lost)
        assert held is not None and "state_dir lost" in held
    finally:
        registry.close()


def test_a_damaged_record_of_holds_releases_an_archive_that_lists_empty(tmp_path: Path) -> None:
    """Under a damaged held-archives.json an archive whose resources/ lists empty is
    released (it was never found holding anything), and the record is removed."""
    cfg = _two_archives(tmp_path)
    registry = open_configured_registry(cfg)
    try:
        for name in ("birds", "lost"):
            create_archive(tmp_path / name, registry.url)
            registry.add_archive(name, "neurobank", str(tmp_path / name))
        (cfg.state_dir / late_archives.HELD_NAME).write_text("{not json")
        late = late_archives.LateArchives(cfg)
        assert late.problem(registry, "birds", tmp_path / "birds") is None
        assert late.problem(registry, "lost", tmp_path / "lost") is None
        assert not (cfg.state_dir / late_archives.HELD_NAME).exists()
    finally:
        registry.close()


def test_adoption_over_an_archive_whose_resources_cannot_be_listed_is_unfinished(
    tmp_path: Path,
) -> None:
    """--adopt-archives over an archive whose resources/ cannot be listed does not
    finish (never counted as holding nothing), naming it, and keeps the marker."""
    cfg = _two_archives(tmp_path)
    registry = open_configured_registry(cfg)
    try:
        create_archive(tmp_path / "lost", registry.url)
        shutil.rmtree(tmp_path / "lost" / "resources")
        (tmp_path / "lost" / "resources").write_bytes(b"")
        with pytest.raises(errors.ArchiveUnavailable, match="resources"):
            adopt.adopt(cfg, registry)
        assert adopt.marker_path(cfg).exists()
    finally:
        registry.close()


# --- what the user is told while held ---------------------------------------------------


def test_explain_tells_why_an_input_of_a_held_archive_waits(daemon_factory: Factory) -> None:
    """nbankctl explain of an input waiting for a held archive says the archive is held
    over a lost state_dir and names a way out."""
    h = daemon_factory()
    hold_late_archive(h)

    def said() -> str:
        return json.dumps(raw_explain(h, str(h.inbox / "new01.wav")))

    wait_for(lambda: "state_dir lost" in said(), 30, "explain to tell the hold")
    assert "--adopt-archives" in said()
    assert h.receipt("new01") is None
    h.stop()


def test_a_manual_deposit_into_a_held_archive_is_refused_and_keeps_the_hold(
    daemon_factory: Factory,
) -> None:
    """nbankctl deposit into a held archive is refused with the files left in place,
    and the hold stays (the waiting input is not deposited)."""
    h = daemon_factory()
    hold_late_archive(h)
    outside = h.root / "outside"
    outside.mkdir()
    (outside / "hand01.wav").write_bytes(b"deposited by hand")
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("nbankctl")), "-c", str(h.config_path),
         "deposit", "-d", h.dtype, str(h.archive), str(outside / "hand01.wav")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "state_dir lost" in proc.stdout + proc.stderr
    assert (outside / "hand01.wav").read_bytes() == b"deposited by hand"
    scans_later(h, 2)
    assert held_said(h) and h.receipt("new01") is None and h.receipt("hand01") is None
    assert (h.state_dir / late_archives.HELD_NAME).exists()
    h.stop()


# --- logs -------------------------------------------------------------------------------

_LOG_SCRIPT = textwrap.dedent(
    """
    import io, json, logging, structlog
    from nbankd.service.logs import configure_logging
    buf = io.StringIO()
    configure_logging("json", "info", stream=buf, journal_socket="/nonexistent")
    log = structlog.get_logger("t")
    log.bind(k=1).info("bound %d", "not a number")
    log.bind(k=1, j=2).unbind("k").warning("unbound %s %s", "one")
    log.new(n=3).error("new %(x)s", {"y": 1})
    try:
        raise ValueError("inner")
    except ValueError:
        log.exception("failed %s", "fine")
    log.log(logging.ERROR, "at level %d", object())
    log.debug("filtered %d", "never formatted")
    print(buf.getvalue())
    """
)


def test_log_calls_with_misfit_arguments_each_give_one_line() -> None:
    """Log calls whose %-arguments do not fit (bound, unbound, new, exception, log at a
    level) each give their line, with the bound context and the traceback kept."""
    proc = subprocess.run(
        [sys.executable, "-c", _LOG_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [x["event"] for x in lines] == [
        "bound %d",
        "unbound %s %s",
        "new %(x)s",
        "failed fine",
        "at level %d",
    ]
    assert lines[0]["k"] == 1 and "log_error" in lines[0]
    assert "k" not in lines[1] and lines[1]["j"] == 2
    assert lines[2]["n"] == 3
    assert "ValueError: inner" in lines[3]["exception"]


def test_nbankds_last_error_line_reaches_a_piped_stderr(tmp_path: Path) -> None:
    """nbankd refusing a bad configuration says why on a stderr pipe read only at its
    exit (a healthy pipe: the line is never lost to the deadline)."""
    bad = tmp_path / "nbankd.yaml"
    bad.write_text("registry: embedded\nstate_dir: state\narchives: 7\n")
    proc = subprocess.run([NBANKD, "-c", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert f"nbankd: {bad}: 1 problem in the configuration" in proc.stderr, proc.stderr
    assert "archives" in proc.stderr.split("1 problem", 1)[1], proc.stderr
