"""Status reasons for waiting inputs, and the retried registry start-up checks.

Real parts: a SQLite journal driven through the lifecycle's own transitions, a
registry URL on a closed loopback port (connection refused), the embedded registry.
"""

from __future__ import annotations

import socket
import textwrap
from dataclasses import replace
from pathlib import Path

from nbankd.config import Config, load_config
from nbankd.daemon.registry_setup import RegistrySetup, open_configured_registry
from nbankd.daemon.status import RECHECKS_TOLD_AFTER, waiting_problems
from nbankd.deposit.journal import Item, Journal
from nbankd.deposit.lifecycle import Outcome, State, Step, advance
from nbankd.registry.http import HttpRegistry


def closed_port_url() -> str:
    """A loopback URL nothing listens on (the port was just released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/neurobank/"


def config(tmp_path: Path, registry: str) -> Config:
    path = tmp_path / "nbankd.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            registry: {registry}
            state_dir: state
            archives:
              - {{path: archive, name: birds, create: true}}
            inboxes:
              - {{path: inbox, archive: birds, dtype: wav, rescan_every: 10s}}
            """
        )
    )
    return load_config(path)


def failed(journal: Journal, relpath: str, state: State, step: Step, outcome: Outcome) -> Item:
    """A journaled item in ``state`` whose ``step`` just ended with ``outcome``."""
    item = journal.add(
        token=relpath,
        inbox="/srv/inbox/rig3",
        relpath=relpath.encode(),
        kind="file",
        state=state,
        archive="birds",
        archive_path="/data/birds",
        placement="copy",
        verify=1,
        created=1.0,
        updated=1.0,
    )
    return journal.save(item.with_progress(advance(item.progress, step, outcome, 2.0)))


def test_waiting_inputs_name_what_they_wait_on(tmp_path: Path) -> None:
    """Inputs retrying after archive, registry or other errors each give one named line."""
    journal = Journal(tmp_path / "journal.sqlite3")
    full = Outcome("transient", "archive-unavailable", "[Errno 28] No space left on device")
    down = Outcome("transient", "registry-unavailable", "registry answered 503")
    bug = Outcome("transient", "internal", "KeyError: 'x'")
    bad = Outcome("permanent", "invalid-name", "bad name")
    failed(journal, "a.wav", State.CLAIMED, Step.STAGE, full)
    failed(journal, "b.wav", State.CLAIMED, Step.STAGE, full)
    failed(journal, "c.wav", State.STAGED, Step.LOOKUP, down)
    failed(journal, "d.wav", State.CLAIMED, Step.STAGE, bug)
    failed(journal, "e.wav", State.STAGED, Step.LOOKUP, bad)  # on its way to rejected/
    lines = waiting_problems(journal.unfinished())
    assert lines == [
        "archive birds (/data/birds): 2 input(s) waiting after archive-unavailable: "
        "[Errno 28] No space left on device",
        "inbox /srv/inbox/rig3: 1 input(s) waiting after internal: KeyError: 'x'",
        "registry: 1 input(s) waiting after registry-unavailable: registry answered 503",
    ]
    journal.close()


def test_a_wait_on_another_input_of_the_same_bytes_is_told_only_once_it_lasts(
    tmp_path: Path,
) -> None:
    """identifier-busy and sha1-held waits degrade status only from their 4th attempt."""
    journal = Journal(tmp_path / "journal.sqlite3")
    told = {}
    for code in ("identifier-busy", "sha1-held"):
        outcome = Outcome("recheck", code, f"waiting ({code})")
        item = failed(journal, f"{code}.wav", State.STAGED, Step.LOOKUP, outcome)
        for attempts in range(1, 7):
            waiting = item.with_progress(replace(item.progress, attempts=attempts))
            told[code, attempts] = bool(waiting_problems([waiting]))
    journal.close()
    assert told == {
        (code, n): n >= RECHECKS_TOLD_AFTER == 4
        for code in ("identifier-busy", "sha1-held")
        for n in range(1, 7)
    }


def test_start_up_checks_retry_until_the_registry_answers(tmp_path: Path) -> None:
    """Refused connections schedule capped retries; a run that succeeds clears them."""
    now = [1000.0]
    setup = RegistrySetup(lambda: now[0])
    down = config(tmp_path, closed_port_url())
    registry = HttpRegistry(down.registry, timeout=5)
    for _ in range(8):
        result = setup.run(down, registry, retry=True)
        assert result.retry and result.registry_problem
        assert setup.due is not None and now[0] + 1 <= setup.due <= now[0] + 10
        now[0] = setup.due
    assert setup.problems()[0].startswith("registry: start-up checks failed:")
    assert not (tmp_path / "archive" / "nbank.json").exists()
    registry.close()
    up = config(tmp_path, "embedded")
    embedded = open_configured_registry(up)
    result = setup.run(up, embedded, retry=True)
    assert not result.retry and result.registry_problem is None
    assert (setup.due, setup.failures, setup.problems()) == (None, 0, [])
    assert (tmp_path / "archive" / "nbank.json").is_file()
    assert embedded.find_archive_by_root(str(tmp_path / "archive")) is not None
    embedded.close()
