"""Hostile review of the metadata readers (nbankd.metadata_readers) as deposits run them.

The readers are a real plugin package built here, as tests/test_metadata_readers.py
builds its own: a module and a ``.dist-info`` folder whose ``entry_points.txt``
declares them in ``nbank.metadata_readers``, on the child's search path (or on
nbankctl's PYTHONPATH). Each reader stands for a lab's buggy plugin: it opens the file
it is given for update, appends a note, rewrites a header keeping the file's times,
deletes it through its real path, answers with deeply nested JSON, or leaves a helper
process behind.

Every test here fails on the code as reviewed; its docstring names the behaviour
expected.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, make_backend
from fixtures.readers import plugin_package, read_with
from fixtures.steps_env import Env
from nbankd import seams
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import FINAL, State, Step, next_step
from nbankd.metadata_readers import read_file_metadata

READERS = r"""
import os, signal
from pathlib import Path

def truncating(path):
    # opened for update by mistake (h5py < 3 opened files "a" by default): emptied
    with open(path, "r+b") as f:
        f.truncate(0)
    return {"ok": 1}

def appending(path):
    # notes that it read the file, in the file
    with open(path, "ab") as f:
        f.write(b"read by hostilereaders\n")
    return {"ok": 1}

def stamping(path):
    # fixes a header byte in place and keeps the file's times, as "cp -p" would
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.write(b"X")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return {"ok": 1}

def unlinking(path):
    # cleans up "its temporary file": the real path behind the name it was given
    os.unlink(os.path.realpath(path))
    return {"ok": 1}

def animal(path):
    # a bird's band number, as a number
    return {"animal": 7, "rate": 20000}

def deep(path):
    # a tree of channel groups: deep, but JSON the child itself could write
    value = 1
    for _ in range(980):
        value = [value]
    return {"groups": value}

def credentials(path):
    return {"creds": os.environ.get("CREDENTIALS_DIRECTORY")}

def helper(path):
    # starts a helper service in its own session (as a MATLAB engine or a JVM would)
    # and returns once it is up, with its process id
    r, w = os.pipe()
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            os.write(w, str(os.getpid()).encode())
            os.close(w)
            while True:
                signal.pause()
        os._exit(0)
    os.close(w)
    pid = int(os.read(r, 32))
    os.wait()
    return {"helper": pid}
"""

ENTRY_POINTS = """\
[nbank.metadata_readers]
trunc-rec = hostilereaders:truncating
append-rec = hostilereaders:appending
stamp-rec = hostilereaders:stamping
unlink-rec = hostilereaders:unlinking
animal-rec = hostilereaders:animal
deep-rec = hostilereaders:deep
creds-rec = hostilereaders:credentials
helper-rec = hostilereaders:helper
"""
DTYPES = (
    "trunc-rec",
    "append-rec",
    "stamp-rec",
    "unlink-rec",
    "animal-rec",
    "deep-rec",
    "creds-rec",
    "helper-rec",
)

#: a recording: what must never be lost or altered
DATA = b"RIFF" + b"recording " * 200


def package(root: Path) -> Path:
    """Writes the package hostilereaders (its module and dist-info) into ``root``."""
    return plugin_package(root, "hostilereaders", READERS, ENTRY_POINTS)


@pytest.fixture
def plugins(env: Env) -> Path:
    """The reader package, used by the env's steps; its datatypes registered."""
    where = package(env.root / "plugins")
    read_with(env, where)
    for dtype in DTYPES:
        env.registry.add_datatype(dtype)
    return where


@pytest.fixture
def ctl(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Backend]:
    """nbankctl over an embedded registry, the reader package on its PYTHONPATH."""
    b = make_backend("embedded", tmp_path, request)
    where = [str(package(tmp_path / "plugins")), b.env.get("PYTHONPATH", "")]
    b.env = dict(b.env, PYTHONPATH=os.pathsep.join(filter(None, where)))
    yield b
    b.registry.close()


def configure(env: Env, **changes: object) -> None:
    """Replaces settings of the env's inbox (a reload)."""
    spec = replace(env.spec, config=replace(env.spec.config, **changes))  # type: ignore[arg-type]
    env.spec = spec
    env.steps.inboxes = lambda key: spec if key == spec.key else None


def drive(env: Env, item: Item, steps: int = 16) -> Item:
    """Runs at most ``steps`` steps (backoff ignored), stopping at a final state."""
    for _ in range(steps):
        if item.state in FINAL:
            break
        step = next_step(item.progress, float("inf"))
        assert step is not None, item
        item = env.step(item, step)
    return item


def copies_of(data: bytes, *folders: Path) -> list[Path]:
    """The files under ``folders`` holding exactly ``data``."""
    return [
        p for folder in folders for p in folder.rglob("*") if p.is_file() and p.read_bytes() == data
    ]


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# --- a reader that writes to the file it is given ------------------------------------


@pytest.mark.parametrize("dtype", ["trunc-rec", "unlink-rec"])
def test_a_reader_never_destroys_an_input_placed_by_rename(
    env: Env, plugins: Path, dtype: str
) -> None:
    """Placed by rename, the claimed input is the recording's only copy: a reader that
    empties or deletes the file it is given must find it read-only (or nbankd must
    read a copy), never destroy the recording."""
    configure(env, dtype=dtype, placement="rename")
    drive(env, env.drop("song.wav", DATA, placement="rename"))
    assert copies_of(DATA, env.inbox, env.archive.resources_dir), (
        "the recording exists nowhere any more"
    )


@pytest.mark.parametrize(
    "dtype,verify", [("append-rec", True), ("stamp-rec", True), ("stamp-rec", False)]
)
def test_a_reader_that_alters_its_staged_copy_is_caught_before_registering(
    env: Env, plugins: Path, dtype: str, verify: bool
) -> None:
    """A reader that writes into the staged copy it reads is caught at the stage step
    (its input waits, unregistered): never a record whose bytes are not stored, never
    a copy other than the recording published, never the recording released."""
    configure(env, dtype=dtype, verify=verify)
    drive(env, env.drop("song.wav", DATA, verify=verify))
    stored = [p for p in env.archive.resources_dir.rglob("*") if p.is_file()]
    if env.registry.get_resource("song") is not None:
        assert [p.read_bytes() == DATA for p in stored] == [True], (
            "registered, but the archive holds no copy of the recording's bytes"
        )
    assert copies_of(DATA, env.inbox, env.archive.resources_dir)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "deposit"])
def test_nbankctl_deposit_never_lets_the_reader_alter_the_given_file(
    ctl: Backend, dry_run: bool
) -> None:
    """nbankctl deposit (same filesystem: placed by rename) and its dry run -y (which
    "changes nothing") leave the file named on the command line as it was, or deposit
    it whole: a reader that opens it for update never empties the recording."""
    archive, _ = ctl.archive()
    ctl.registry.add_datatype("trunc-rec", "application/octet-stream")
    src = ctl.tmp / "rig" / "song.wav"
    src.parent.mkdir()
    src.write_bytes(DATA)
    r = ctl.ctl(
        "deposit", str(archive.path), "-d", "trunc-rec", *(["-y"] if dry_run else []), str(src)
    )
    assert copies_of(DATA, src.parent, archive.resources_dir), (
        f"the recording is lost (exit {r.returncode}): {r.stdout.strip()} {r.stderr.strip()}"
    )


# --- what the reader answers ---------------------------------------------------------


def test_a_deeply_nested_answer_makes_the_input_wait_naming_the_reader(
    env: Env, plugins: Path
) -> None:
    """An answer nested deeper than nbankd's own stack allows is the reader's problem:
    the input waits as metadata-reader-unavailable, the datatype named, never an
    'unexpected error ... a bug in nbankd' raised out of read_file_metadata."""
    configure(env, dtype="deep-rec")
    item = env.step(env.step(env.drop("rec.dat", b"data"), Step.CLAIM), Step.STAGE)
    assert (item.error_code, "deep-rec" in (item.error_message or "")) == (
        "metadata-reader-unavailable",
        True,
    ), item.error_message


def test_a_lost_register_answer_is_found_ours_when_the_reader_gives_a_number(
    env: Env, plugins: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's {"animal": 7} is registered (the registry keeps the animal as text,
    "7"); when the registering request's answer is lost, the retry finds that record
    its own and goes on, never waiting for ever as 'identifier-busy' for an input
    that does not exist."""
    configure(env, dtype="animal-rec")
    item = env.drop("song.wav", DATA)
    for step in (Step.CLAIM, Step.STAGE, Step.LOOKUP):
        item = env.step(item, step)
    assert json.loads(item.metadata_json or "{}")["animal"] == 7
    monkeypatch.setattr(seams, "_raise", "after-register-request")  # the answer is lost
    item = env.step(item, Step.REGISTER)
    monkeypatch.setattr(seams, "_raise", "")
    assert item.state is State.CHECKED and env.registry.get_resource("song") is not None
    item = env.step(item, Step.REGISTER)
    assert (item.state, item.error_code) == (State.REGISTERED, None), item.error_message


# --- what the reader's process may keep or see ----------------------------------------


def test_no_process_the_reader_started_outlives_it(tmp_path: Path) -> None:
    """Whatever the reader started is ended with it, even in a session of its own: no
    process of the plugin's stays behind holding the deposited file open."""
    plugins = package(tmp_path / "plugins")
    src = tmp_path / "rec.dat"
    src.write_bytes(DATA)
    result = read_file_metadata("helper-rec", src, search_path=[*sys.path, str(plugins)])
    assert result.status == "read", result.message
    pid = result.metadata["helper"]
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    try:
        assert state in ("gone", "Z", "X"), f"the reader's helper {pid} still runs ({state})"
    finally:
        if state not in ("gone", "Z", "X"):
            os.kill(pid, signal.SIGKILL)


def test_the_reader_is_not_told_where_the_registry_password_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reader's process does not inherit $CREDENTIALS_DIRECTORY (systemd's
    LoadCredential=, where the registry's password is, "readable by the service
    alone"): someone else's code is not handed the way to the registry's password."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "registry").write_text("nbankd-rig3:the-password\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    plugins = package(tmp_path / "plugins")
    src = tmp_path / "rec.dat"
    src.write_bytes(DATA)
    result = read_file_metadata("creds-rec", src, search_path=[*sys.path, str(plugins)])
    assert result.status == "read", result.message
    assert "creds" not in result.metadata, result.metadata
