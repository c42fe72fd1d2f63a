"""``file_metadata: read | skip | override``: the datatype's metadata reader (a real
plugin package built by tests/test_metadata_readers.py's ``reader_package``) run on
the staged bytes by the deposit steps."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_zip_directories import drop_folder

from fixtures.daemon import status_json, wait_for, work_entries
from fixtures.readers import read_with
from fixtures.steps_env import Env
from nbankd.archive.staging import STAGED_PREFIX
from nbankd.daemon.status import waiting_problems
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.names import WORK_DIR_NAME
from test_metadata_readers import reader_package

DTYPES = ("wav-rec", "named-rec", "broken-rec")


@pytest.fixture
def plugins(env: Env) -> Path:
    """The reader package, used by the env's steps; its datatypes registered."""
    where = reader_package(env.root / "plugins")
    read_with(env, where)
    for dtype in DTYPES:
        env.registry.add_datatype(dtype)
    return where


def configure(env: Env, **changes: object) -> None:
    """Replaces settings of the env's inbox (a reload)."""
    spec = replace(env.spec, config=replace(env.spec.config, **changes))  # type: ignore[arg-type]
    env.spec = spec
    env.steps.inboxes = lambda key: spec if key == spec.key else None


def registered(env: Env, item: Item) -> dict[str, object]:
    assert item.name is not None
    record = env.registry.get_resource(item.name)
    assert record is not None
    return dict(record.metadata)


def test_read_registers_the_files_metadata(env: Env, plugins: Path) -> None:
    """read: the file's metadata is registered with the inbox's."""
    configure(env, dtype="wav-rec", metadata={"rig": "r3"})
    item = env.until(env.drop("song.wav", b"RIFFzf12"), State.DONE)
    assert registered(env, item) == {
        "rig": "r3",
        "sampling_rate": 20000,
        "channels": 2,
        "bird": "zf12",
    }


def test_a_file_the_reader_rejects_is_rejected_with_its_message(env: Env, plugins: Path) -> None:
    """A file the reader rejects goes to rejected/ with the reader's message; nothing
    is registered or stored."""
    configure(env, dtype="wav-rec")
    item = env.until(env.drop("junk.wav", b"not a wav"), State.REJECTED)
    reason = json.loads(item.reason_json or "{}")
    assert (reason["code"], reason["message"]) == (
        "invalid-file",
        "the wav-rec reader rejects the file: no RIFF header",
    )
    assert (env.inbox / "rejected" / "junk.wav").read_bytes() == b"not a wav"
    assert env.stored() == [] and env.registry.get_resource("junk") is None


def test_read_rejects_given_metadata_that_differs(env: Env, plugins: Path) -> None:
    """read: inbox metadata that differs from the file's rejects the file, naming the key."""
    configure(env, dtype="wav-rec", metadata={"bird": "zf13"})
    item = env.until(env.drop("song.wav", b"RIFFzf12"), State.REJECTED)
    reason = json.loads(item.reason_json or "{}")
    assert reason["code"] == "metadata-mismatch"
    assert "bird is 'zf12' there but 'zf13' was given" in reason["message"]


def test_override_registers_the_given_values(env: Env, plugins: Path) -> None:
    """override: where the inbox's metadata differs from the file's, it is registered."""
    configure(env, dtype="wav-rec", metadata={"bird": "zf13"}, file_metadata="override")
    item = env.until(env.drop("song.wav", b"RIFFzf12"), State.DONE)
    assert registered(env, item)["bird"] == "zf13"
    assert registered(env, item)["sampling_rate"] == 20000


def test_skip_runs_no_reader(env: Env, plugins: Path) -> None:
    """skip: a file the reader would reject is deposited with the given metadata only."""
    configure(env, dtype="wav-rec", metadata={"rig": "r3"}, file_metadata="skip")
    item = env.until(env.drop("junk.wav", b"not a wav"), State.DONE)
    assert registered(env, item) == {"rig": "r3"}


def test_an_unloadable_reader_makes_the_input_wait(env: Env, plugins: Path) -> None:
    """A reader that cannot be imported leaves the input claimed and waiting (never
    rejected), staging/ empty, and the inbox reported as waiting on it."""
    configure(env, dtype="broken-rec")
    item = env.step(env.step(env.drop("rec.dat", b"data"), Step.CLAIM), Step.STAGE)
    assert item.state is State.CLAIMED and item.attempts == 1
    assert item.error_code == "metadata-reader-unavailable"
    assert "labreaders_missing_module" in (item.error_message or "")
    assert os.listdir(env.inbox / WORK_DIR_NAME) == [item.token]
    assert not [p for p in os.listdir(env.archive.staging_dir) if p.startswith(STAGED_PREFIX)]
    [line] = waiting_problems([item])
    assert line.startswith(f"inbox {env.spec.key}: 1 input(s) waiting after metadata-reader")


def test_a_repaired_reader_lets_the_waiting_input_through(env: Env, plugins: Path) -> None:
    """Once the reader's module is installed, the waiting input is deposited."""
    configure(env, dtype="broken-rec")
    item = env.step(env.step(env.drop("rec.dat", b"data"), Step.CLAIM), Step.STAGE)
    assert item.state is State.CLAIMED
    (plugins / "labreaders_missing_module.py").write_text("def read(path):\n    return {'ok': 1}\n")
    done = env.until(replace(item, not_before=0.0), State.DONE)
    assert done.state is State.DONE and registered(env, done) == {"ok": 1}


def test_the_reader_sees_the_inputs_name(env: Env, plugins: Path) -> None:
    """The reader reads the staged copy under the input's own name."""
    configure(env, dtype="named-rec")
    item = env.until(env.drop("take_1.wav", b"x"), State.DONE)
    assert registered(env, item) == {"name": "take_1.wav"}


def test_a_zipped_folder_is_read_as_its_zip(env: Env, plugins: Path) -> None:
    """With directories: zip, the reader reads the folder's zip, named <folder>.zip as
    nbank names it."""
    configure(env, dtype="named-rec", directories="zip")
    item = env.until(drop_folder(env.journal, env.spec, "rec8", {"a": b"1"}), State.DONE)
    assert item.state is State.DONE and registered(env, item) == {"name": "rec8.zip"}


def test_the_reader_runs_with_placement_rename(env: Env, plugins: Path) -> None:
    """With placement: rename the reader reads the claimed file itself."""
    configure(env, dtype="wav-rec", placement="rename")
    dropped = env.drop("song.wav", b"RIFFzf12")
    item = env.until(replace(dropped, placement="rename"), State.DONE)
    assert item.state is State.DONE and registered(env, item)["bird"] == "zf12"


def test_the_mode_is_fixed_at_claim(env: Env, plugins: Path) -> None:
    """The file_metadata mode is journaled at claim: a reload to skip afterwards still
    reads (and rejects) the claimed file."""
    configure(env, dtype="wav-rec")
    item = env.until(env.drop("junk.wav", b"not a wav"), State.CLAIMED)
    assert item.file_metadata == "read"
    configure(env, file_metadata="skip")
    assert env.until(item, State.REJECTED).state is State.REJECTED


# --- the daemon -------------------------------------------------------------------------


def test_the_daemon_rejects_a_file_its_reader_rejects(daemon_factory: Any, tmp_path: Path) -> None:
    """The daemon runs the installed reader: a file it rejects is rejected with its message,
    a valid one is registered with the file's metadata."""
    plugins = reader_package(tmp_path / "plugins")
    h = daemon_factory()
    h.dtype = "wav-rec"
    h.start(env={"PYTHONPATH": str(plugins)})
    h.drop("good.wav", b"RIFFzf12")
    h.drop("junk.wav", b"junk")
    h.wait_settled(2)
    h.stop()
    [reason] = h.reasons()
    assert "the wav-rec reader rejects the file: no RIFF header" in reason["message"]
    [receipt] = h.receipts()
    registry = h.open_registry()
    try:
        record = registry.get_resource(receipt["id"])
    finally:
        registry.close()
    assert record is not None and record.metadata["bird"] == "zf12"


def test_an_unloadable_reader_makes_the_daemon_degraded(
    daemon_factory: Any, tmp_path: Path
) -> None:
    """A reader that cannot be imported keeps the file in the work folder and makes
    nbankctl status degraded, naming the inbox and the reader."""
    plugins = reader_package(tmp_path / "plugins")
    h = daemon_factory()
    h.dtype = "broken-rec"
    h.start(env={"PYTHONPATH": str(plugins)})
    h.drop("rec.dat", b"data")

    def degraded() -> tuple[int, list[str]] | None:
        code, doc = status_json(h)
        lines = [line for line in doc["degraded"] if "metadata-reader-unavailable" in line]
        return (code, lines) if lines else None

    code, [line] = wait_for(degraded, 60, "the status to report the unusable reader")
    h.stop()
    assert code == 1
    assert line.startswith(f"inbox {h.inbox}: 1 input(s) waiting")
    assert "labreaders_missing_module" in line
    assert h.reasons() == [] and h.receipts() == []
    assert len(work_entries(h.inbox / WORK_DIR_NAME)) == 1


# --- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["read", "skip", "override"])
def test_file_metadata_takes_each_mode(tmp_path: Path, mode: str) -> None:
    """file_metadata accepts read, skip and override."""
    from nbankd.config import load_config

    text = f"archives: [{{path: a}}]\ninboxes: [{{path: in, dtype: x, file_metadata: {mode}}}]\n"
    (tmp_path / "nbankd.yaml").write_text(text)
    [inbox] = load_config(tmp_path / "nbankd.yaml").inboxes
    assert inbox.file_metadata == mode


def test_file_metadata_defaults_to_read(tmp_path: Path) -> None:
    """Without file_metadata an inbox reads files with their datatype's reader."""
    from nbankd.config import load_config

    (tmp_path / "nbankd.yaml").write_text(
        "archives: [{path: a}]\ninboxes: [{path: in, dtype: x}]\n"
    )
    [inbox] = load_config(tmp_path / "nbankd.yaml").inboxes
    assert inbox.file_metadata == "read"


def test_a_bad_file_metadata_value_names_the_key_and_choices(tmp_path: Path) -> None:
    """An unknown file_metadata value is an error naming the key and the three choices."""
    from nbankd.config import config_problems

    text = "archives: [{path: a}]\ninboxes: [{path: in, dtype: x, file_metadata: always}]\n"
    (tmp_path / "nbankd.yaml").write_text(text)
    [problem] = [p for p in config_problems(tmp_path / "nbankd.yaml") if p.is_error]
    assert problem.key == "inboxes[0].file_metadata"
    assert "read" in problem.message and "skip" in problem.message
    assert "override" in problem.message
