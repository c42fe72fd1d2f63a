"""Hostile sidecars (``NAME.nbank.yaml|json``) and metadata: untrusted input written by
anyone who can write an inbox. Each test names the behaviour a user relies on; the
ones marked "guard" pass today and pin what held up under attack.

The steps are driven directly on an embedded registry (``env``) or on the session's
real django-neurobank (``django_env``); the cases that depend on how the scan pairs
sidecars with inputs run the real daemon (``daemon_factory``)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import nbankctl, wait_for
from fixtures.django_server import DjangoServer
from fixtures.steps_env import Env, env_on
from nbankd.archive import opening
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import FINAL, State, Step, next_step
from nbankd.metadata_readers import read_file_metadata
from nbankd.registry.http import HttpRegistry


def _with_sidecar(env: Env, name: str, sidecar: bytes, suffix: str = ".nbank.yaml") -> Item:
    """``name`` (random bytes) and its sidecar in the inbox, journaled as a scan would."""
    (env.inbox / name).write_bytes(os.urandom(2048))
    (env.inbox / (name + suffix)).write_bytes(sidecar)
    return env.journal_existing(name, sidecar=os.fsencode(name + suffix))


def _drive(env: Env, item: Item, steps: int = 14) -> Item:
    """Runs up to ``steps`` steps (backoffs skipped): enough for any deposit or
    rejection to end; an item still not final after that is waiting for ever."""
    for _ in range(steps):
        if item.state in FINAL:
            break
        step = next_step(item.progress, float("inf"))
        assert step is not None, item
        item = env.step(item, step)
    return item


@pytest.fixture
def django_env(tmp_path: Path, django_registry: DjangoServer) -> Any:
    """An Env depositing through the real django-neurobank server."""
    server = django_registry
    registry = HttpRegistry(server.url, (server.username, server.password))
    archive = opening.create_archive(tmp_path / "arch", registry.url)
    name = server.add_archive(str(archive.path))
    dtype = server.add_datatype(content_type="application/octet-stream")
    made = env_on(tmp_path, registry, archive, name, dtype)
    yield made
    made.journal.close()
    registry.close()


# -- identifiers -----------------------------------------------------------------------


def test_a_sidecar_id_too_long_for_a_stored_name_is_refused_before_registering(
    env: Env,
) -> None:
    """A sidecar id of 255 characters is a valid registry name, but with the kept
    extension its stored name exceeds NAME_MAX: the input must be rejected at claim,
    never registered and then stuck for ever failing to publish (a record without file)."""
    long_id = "a" * 255
    item = _drive(env, _with_sidecar(env, "rec.dat", f"id: {long_id}\n".encode()))
    assert env.registry.get_resource(long_id) is None, "registered although it can never be filed"
    assert item.state is State.REJECTED, (item.state, item.error_code, item.error_message)


# -- metadata values a sidecar can write but JSON cannot hold ---------------------------


def test_a_date_key_in_nested_sidecar_metadata_is_decided_not_retried_as_a_bug(
    env: Env,
) -> None:
    """``metadata: {sessions: {2024-01-01: good}}`` (YAML makes the key a date) is
    either deposited (key as text) or rejected as bad-sidecar at claim, never an
    'unexpected error ... this is a bug' retried for ever with the input held."""
    item = _drive(env, _with_sidecar(env, "rec.dat", b"metadata: {sessions: {2024-01-01: good}}\n"))
    assert item.error_code != "internal", item.error_message
    assert item.state in (State.DONE, State.REJECTED), (item.state, item.error_message)


@pytest.mark.parametrize(
    ("value", "python_repr"),
    [("!!binary aGVsbG8=", "b'hello'"), ("!!set {a: null}", "{'a'}")],
)
def test_yaml_values_json_cannot_hold_are_never_registered_as_python_reprs(
    env: Env, value: str, python_repr: str
) -> None:
    """A YAML ``!!binary`` or ``!!set`` value is refused (bad-sidecar), not silently
    registered as the text of Python's repr (``"b'hello'"``), which no reader expects."""
    item = _drive(env, _with_sidecar(env, "rec.dat", f"metadata: {{v: {value}}}\n".encode()))
    record = env.registry.get_resource("rec")
    assert record is None or (record.metadata or {}).get("v") != python_repr, (
        f"registered {record.metadata if record else None} (state {item.state})"
    )


def test_a_nan_in_a_sidecar_is_rejected_not_blamed_on_the_registry(django_env: Env) -> None:
    """``gain: .nan`` cannot be sent as JSON: the input is rejected with a reason
    naming the sidecar, not left waiting for ever as 'registry unreachable' (which
    marks the registry down in status and fires outage alerts)."""
    item = _drive(django_env, _with_sidecar(django_env, "rec.dat", b"metadata: {gain: .nan}\n"))
    assert item.error_code != "registry-unavailable", item.error_message
    assert item.state is State.REJECTED, (item.state, item.error_code, item.error_message)


def test_sidecar_aliases_expanding_past_what_a_registry_takes_are_refused_at_claim(
    django_env: Env,
) -> None:
    """A sidecar under the 1 MiB limit whose aliases expand one 900 kB text into
    3.6 MB of metadata is refused (bad-sidecar): bounded expansion means bounded bytes,
    not an input that waits for ever on the registry's 400 blamed on the registry."""
    text = b"x" * 900_000
    sidecar = b"metadata:\n  notes: &n " + text + b"\n  copies: [*n, *n, *n]\n"
    assert len(sidecar) < 1 << 20
    item = _drive(django_env, _with_sidecar(django_env, "rec.dat", sidecar))
    assert item.state is State.REJECTED, (item.state, item.error_code, item.error_message)
    reason = json.loads(item.reason_json or "{}")
    assert reason.get("code") == "bad-sidecar", reason
    assert "aliases expanded" in reason.get("message", ""), reason


# -- how the scan pairs sidecars with inputs (real daemon) -------------------------------


def test_an_input_with_two_sidecars_waits_until_one_is_removed(daemon_factory: Any) -> None:
    """rec.dat with both rec.dat.nbank.yaml and rec.dat.nbank.json waits, named, until
    one is removed (never deposited with one while the other is left in the inbox to
    become the metadata of the next rec.dat); then it is deposited with the one left."""
    h = daemon_factory(inbox_options={"auto_id": True, "settle_seconds": 0.3})
    h.start()
    try:
        (h.inbox / "rec.dat.nbank.yaml").write_text("metadata: {bird: b1}\n")
        (h.inbox / "rec.dat.nbank.json").write_text('{"metadata": {"bird": "b2"}}')
        h.drop("rec.dat", b"first recording")
        src = str(h.inbox / "rec.dat")
        wait_for(
            lambda: "two sidecars" in nbankctl(h, "explain", src).stdout,
            30,
            "the daemon to say the input waits for one sidecar to go",
        )
        assert h.receipts() == []
        assert (h.inbox / "rec.dat").read_bytes() == b"first recording"
        (h.inbox / "rec.dat.nbank.json").unlink()
        h.wait_settled(1)
    finally:
        h.stop()
    with h.open_registry() as reg:
        [first] = reg.search(sha1=hashlib.sha1(b"first recording").hexdigest())
        record = reg.get_resource(first.name)
    assert record is not None and record.metadata == {"bird": "b1"}, record


def test_a_folder_named_like_a_sidecar_is_not_swept_into_rejected(daemon_factory: Any) -> None:
    """A folder ``rec.dat.nbank.yaml/`` (which the scan descends, its files being inputs)
    is not taken as rec.dat's sidecar: the recording waiting inside it stays in the inbox,
    never moved into the rejected folder under another input's reason."""
    h = daemon_factory(inbox_options={"ready": "marker", "recursive": True})
    h.start()
    (h.inbox / "rec.dat.nbank.yaml").mkdir()
    inner = h.inbox / "rec.dat.nbank.yaml" / "inner.dat"
    inner.write_bytes(b"a recording waiting for its marker")
    h.drop("rec.dat", b"outer recording")
    (h.inbox / "rec.dat.done").write_bytes(b"")
    h.wait_settled(1)
    h.stop()
    swept = h.rejected / "rec.dat.nbank.yaml" / "inner.dat"
    assert not swept.exists(), "an input of its own was moved into rejected/ as a sidecar"
    assert inner.read_bytes() == b"a recording waiting for its marker"


# -- metadata readers --------------------------------------------------------------------

_FORKING_READER = """
import os, time

def forky(path):
    if os.fork() == 0:  # a helper left behind, as some libraries start one
        time.sleep(3600)
        os._exit(0)
    return {"channels": 2}
"""


def test_a_reader_that_answers_and_leaves_a_forked_helper_is_read(tmp_path: Path) -> None:
    """A reader that returns its metadata at once but leaves a forked process running
    gives its answer (the helper killed), not 'did not finish within N s' after the
    whole time limit, which makes every input of that datatype wait for ever."""
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "forkreader.py").write_text(_FORKING_READER)
    info = plugins / "forkreader-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: forkreader\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[nbank.metadata_readers]\nfork-rec = forkreader:forky\n"
    )
    f = tmp_path / "rec.wav"
    f.write_bytes(b"RIFF....")
    started = time.monotonic()
    # a limit a loaded machine's reader start stays well within; the helper outlives it
    result = read_file_metadata("fork-rec", f, search_path=[*sys.path, str(plugins)], timeout=60)
    assert (result.status, dict(result.metadata)) == ("read", {"channels": 2}), result.message
    assert time.monotonic() - started < 30  # not the whole limit


# -- guards (pass today) -----------------------------------------------------------------


def test_guard_a_sidecar_linked_to_a_secret_is_never_read(env: Env, tmp_path: Path) -> None:
    """Guard: a sidecar that is a symlink to a file only the daemon can read is refused
    (bad-sidecar) and its target's text never reaches the registry or the reason."""
    secret = tmp_path / "secret.yaml"
    secret.write_text("metadata: {password: hunter2}\n")
    (env.inbox / "rec.dat").write_bytes(os.urandom(100))
    (env.inbox / "rec.dat.nbank.yaml").symlink_to(secret)
    item = env.journal_existing("rec.dat", sidecar=b"rec.dat.nbank.yaml")
    item = _drive(env, item)
    assert item.state is State.REJECTED
    reason = (env.inbox / "rejected" / "rec.dat.reason").read_text()
    assert "bad-sidecar" in reason and "hunter2" not in reason
    assert env.registry.get_resource("rec") is None
    assert (env.inbox / "rejected" / "rec.dat.nbank.yaml").is_symlink()


def test_guard_a_sidecar_swapped_after_the_claim_changes_nothing(env: Env) -> None:
    """Guard: the identifier and metadata are fixed at claim and journaled; a sidecar
    written at the old path afterwards is not read again and stays in the inbox."""
    item = _with_sidecar(env, "rec.dat", b"id: first\nmetadata: {bird: b1}\n")
    item = env.step(item, Step.CLAIM)
    assert item.state is State.CLAIMED
    (env.inbox / "rec.dat.nbank.yaml").write_bytes(b"id: second\nmetadata: {bird: b2}\n")
    item = _drive(env, item)
    assert item.state is State.DONE
    record = env.registry.get_resource("first")
    assert record is not None and record.metadata == {"bird": "b1"}
    assert env.registry.get_resource("second") is None
    assert (env.inbox / "rec.dat.nbank.yaml").exists()


def test_guard_alias_bombs_and_duplicate_keys_are_rejected_with_the_file(env: Env) -> None:
    """Guard: a billion-laughs sidecar and one naming a key twice are refused at claim
    (bad-sidecar), the input kept with them in the rejected folder."""
    levels = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 9):
        levels.append(f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]")
    bomb = ("metadata:\n" + "".join(f"  {line}\n" for line in levels)).encode()
    for name, text in (("bomb.dat", bomb), ("dup.dat", b"id: one\nid: two\n")):
        item = _drive(env, _with_sidecar(env, name, text))
        assert (item.state, item.error_code) == (State.REJECTED, None), item.error_message
        assert "bad-sidecar" in (env.inbox / "rejected" / f"{name}.reason").read_text()
        assert (env.inbox / "rejected" / f"{name}.nbank.yaml").read_bytes() == text
