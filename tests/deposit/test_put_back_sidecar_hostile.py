"""Hostile review of put-back with sidecars (rejection.put_back, _free_name,
_candidates, _put_back_where): odd names, sub-folders and links, crashes at the seam
``after-put-back``, writers taking names in between, and the rejection path's names."""

from __future__ import annotations

import itertools
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from fixtures.seam_hooks import Crash, at_seam
from fixtures.steps_env import Env
from nbankd.config.model import DEFAULT_IGNORE
from nbankd.deposit import rejection
from nbankd.deposit.identity import identity_json
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step
from nbankd.watch.scan import is_ignored

SIDECAR = b"dtype: test-file\nmetadata: {animal: bird7}\n"
SUFFIX = b".nbank.yaml"


class LoopGuard(Exception):
    """Raised when a name search goes on far past every name in the folder."""


def _claimed(env: Env, rel: bytes, *, data: bytes = b"", sidecar: bool = True) -> Item:
    """``rel`` (and ``rel.nbank.yaml``) written into the inbox, journaled and claimed."""
    path = Path(os.fsdecode(bytes(env.inbox) + b"/" + rel))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data or os.urandom(4096))
    if sidecar:
        Path(os.fsdecode(os.fsencode(path) + SUFFIX)).write_bytes(SIDECAR)
    item = env.journal_existing(rel, sidecar=rel + SUFFIX if sidecar else None)
    item = env.step(item, Step.CLAIM)
    assert item.state is State.CLAIMED, (item.error_code, item.error_message)
    assert not os.path.lexists(path)
    return item


def _claimed_by_hand(env: Env, rel: bytes, make: Callable[[Path], None], side: bytes) -> Item:
    """An input made by ``make`` and its sidecar ``side`` moved into the work folder as a
    claim leaves them (``<token>``, ``<token>.sidecar.yaml``), identity journaled."""
    token = secrets.token_hex(16)
    work = env.inbox / ".nbank"
    make(work / token)
    (work / f"{token}.sidecar.yaml").write_bytes(SIDECAR)
    is_dir = (work / token).is_dir()
    return env.journal.add(
        token=token,
        inbox=env.spec.key,
        relpath=rel,
        kind="dir" if is_dir else "file",
        archive=env.spec.archive_name,
        archive_path=str(env.archive.path),
        placement="copy",
        verify=1,
        sidecar_relpath=side,
        identity=identity_json(work / token, is_dir),
        created=time.time(),
        updated=0.0,
    )


def _put_back(env: Env, item: Item) -> None:
    with env.spec.open_fs() as fs:
        rejection.put_back(env.spec, item, fs=fs)


def _crash() -> None:
    raise Crash("after-put-back")


def _listing(folder: Path) -> dict[bytes, bytes | None]:
    """Every name in ``folder`` (not the work and rejected folders) and its bytes."""
    out: dict[bytes, bytes | None] = {}
    for name in os.listdir(os.fsencode(folder)):
        if name in (b".nbank", b"rejected"):
            continue
        p = os.fsencode(folder) + b"/" + name
        regular = os.path.isfile(p) and not os.path.islink(p)
        out[name] = Path(os.fsdecode(p)).read_bytes() if regular else None
    return out


def _sidecar_holders(folder: Path) -> list[bytes]:
    return sorted(n for n, data in _listing(folder).items() if data == SIDECAR)


# -- names -------------------------------------------------------------------------


def test_a_non_utf8_name_goes_back_with_its_sidecar(env: Env) -> None:
    """rec\\xff.dat (claimed as an inbox with automatic identifiers does) re-created
    meanwhile: the input goes back as rec\\xff~1.dat, its sidecar as
    rec\\xff~1.dat.nbank.yaml, the new file untouched."""
    rel = b"rec\xff.dat"
    item = _claimed_by_hand(env, rel, lambda p: p.write_bytes(b"mine"), rel + SUFFIX)
    (env.inbox / os.fsdecode(b"rec\xff.dat")).write_bytes(b"new")
    _put_back(env, item)
    got = _listing(env.inbox)
    assert sorted(got) == [b"rec\xff.dat", b"rec\xff~1.dat", b"rec\xff~1.dat" + SUFFIX]
    assert got[b"rec\xff.dat"] == b"new"
    assert got[b"rec\xff~1.dat"] == b"mine"
    assert got[b"rec\xff~1.dat" + SUFFIX] == SIDECAR


def test_a_name_of_the_longest_length_goes_back_with_its_sidecar(env: Env) -> None:
    """A 244-byte name (its sidecar's is 255): the free name found leaves room for the
    sidecar's suffix, and the pair goes back together."""
    rel = b"r" * 240 + b".dat"
    item = _claimed(env, rel, data=b"mine")
    (env.inbox / os.fsdecode(rel)).write_bytes(b"new")
    _put_back(env, item)
    got = _listing(env.inbox)
    [moved] = [n for n in got if n != rel and not n.endswith(SUFFIX)]
    assert got[moved] == b"mine" and moved.endswith(b"~1.dat") and len(moved) <= 244
    assert got[moved + SUFFIX] == SIDECAR
    assert got[rel] == b"new"


def test_a_long_name_is_not_put_back_as_a_hidden_file(env: Env) -> None:
    """A 244-byte name (claimed as an inbox with automatic identifiers does) taken
    meanwhile is put back under a name the scan still sees: cutting room for ``~1`` and
    the sidecar's suffix never makes it a dotfile, which the default ignore pattern
    ``.*`` hides from every scan (never deposited)."""
    rel = b"ab." + b"x" * 237 + b".dat"  # 244 bytes
    item = _claimed_by_hand(env, rel, lambda p: p.write_bytes(b"mine"), rel + SUFFIX)
    (env.inbox / os.fsdecode(rel)).write_bytes(b"new")
    _put_back(env, item)
    [moved] = [n for n, d in _listing(env.inbox).items() if d == b"mine"]
    assert not is_ignored(os.fsdecode(moved), DEFAULT_IGNORE), moved[:12]


def test_a_free_name_search_ends_when_its_candidates_repeat(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``a.<242 x>`` (244 bytes, with a sidecar): cut to 244 bytes from the front, its
    candidates ``a~N.<ext>`` are only ``0.<ext>`` to ``9.<ext>``; with those ten and
    its own name taken, put-back must end (choose otherwise or fail), not loop."""
    ext = b"x" * 242
    rel = b"a." + ext
    item = _claimed(env, rel)
    for name in [rel] + [b"%d." % d + ext for d in range(10)]:
        (env.inbox / os.fsdecode(name)).write_bytes(b"someone's")
    calls = itertools.count()
    real = rejection._is_temporary_name

    def guarded(name: bytes) -> bool:
        if next(calls) > 100_000:  # 11 names in the folder: 100,000 tries is a loop
            raise LoopGuard(name[:8])
        return real(name)

    monkeypatch.setattr(rejection, "_is_temporary_name", guarded)
    try:
        _put_back(env, item)
    except LoopGuard:
        pytest.fail("put_back never ends: its candidates cycle over 10 taken names")
    except OSError:
        pass  # failing is an answer; looping forever is not


# -- sub-folders and links ---------------------------------------------------------


def test_a_sub_folder_input_goes_back_with_its_sidecar(env: Env) -> None:
    """sub/rec.dat re-created while claimed: sub/rec~1.dat and its sidecar, in sub."""
    item = _claimed(env, b"sub/rec.dat", data=b"mine")
    (env.inbox / "sub" / "rec.dat").write_bytes(b"new")
    _put_back(env, item)
    got = _listing(env.inbox / "sub")
    assert got == {b"rec.dat": b"new", b"rec~1.dat": b"mine", b"rec~1.dat" + SUFFIX: SIDECAR}


@pytest.mark.parametrize("taken", [False, True])
def test_a_sub_folder_swapped_for_a_link_is_never_followed(
    env: Env, tmp_path: Path, taken: bool
) -> None:
    """sub/ replaced by a link to a folder outside the inbox: nothing is written there;
    input and sidecar go back as a pair at the inbox's top (under a free pair of names
    when the top already has rec.dat)."""
    item = _claimed(env, b"sub/rec.dat", data=b"mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(env.inbox / "sub", tmp_path / "old-sub")
    os.symlink(outside, env.inbox / "sub")
    if taken:
        (env.inbox / "rec.dat").write_bytes(b"new")
    _put_back(env, item)
    assert os.listdir(outside) == []
    name = b"rec~1.dat" if taken else b"rec.dat"
    got = _listing(env.inbox)
    assert got[name] == b"mine" and got[name + SUFFIX] == SIDECAR


def test_a_replay_after_a_link_swap_finds_the_input_at_the_top(
    env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sub/ swapped for a link, rec.dat taken at the top: the input went to the top as
    rec~1.dat when the process died; run again, its sidecar joins it as
    rec~1.dat.nbank.yaml, never beside the other rec.dat (whose metadata it would
    become)."""
    item = _claimed(env, b"sub/rec.dat", data=b"mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.rename(env.inbox / "sub", tmp_path / "old-sub")
    os.symlink(outside, env.inbox / "sub")
    (env.inbox / "rec.dat").write_bytes(b"new")
    at_seam(monkeypatch, "after-put-back", _crash)
    with pytest.raises(Crash):
        _put_back(env, item)
    assert _listing(env.inbox)[b"rec~1.dat"] == b"mine"
    _put_back(env, item)  # the replay
    assert os.listdir(outside) == []
    assert _sidecar_holders(env.inbox) == [b"rec~1.dat" + SUFFIX]


def test_links_at_the_candidate_names_are_never_written_through(env: Env, tmp_path: Path) -> None:
    """Dangling links at rec.dat and rec~1.dat.nbank.yaml (pointing outside) count as
    taken: nothing is created where they point, the pair goes back as rec~2."""
    item = _claimed(env, b"rec.dat", data=b"mine")
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside / "a", env.inbox / "rec.dat")
    os.symlink(outside / "b", env.inbox / ("rec~1.dat" + SUFFIX.decode()))
    _put_back(env, item)
    assert os.listdir(outside) == []
    got = _listing(env.inbox)
    assert got[b"rec~2.dat"] == b"mine" and got[b"rec~2.dat" + SUFFIX] == SIDECAR


# -- folders, odd sidecar names, old rows ------------------------------------------


def test_a_folder_input_goes_back_with_its_sidecar(env: Env) -> None:
    """A folder input sess (sidecar sess.nbank.yaml) whose name was taken by a new
    folder: sess~1/ with its files, and sess~1.nbank.yaml beside it."""

    def make(p: Path) -> None:
        p.mkdir()
        (p / "a.wav").write_bytes(b"mine")

    item = _claimed_by_hand(env, b"sess", make, b"sess" + SUFFIX)
    (env.inbox / "sess").mkdir()
    _put_back(env, item)
    assert (env.inbox / "sess~1" / "a.wav").read_bytes() == b"mine"
    assert os.listdir(env.inbox / "sess") == []
    assert _sidecar_holders(env.inbox) == [b"sess~1" + SUFFIX]


def test_a_sidecar_not_named_after_its_input_goes_back_under_its_own_name(env: Env) -> None:
    """A row whose sidecar is not NAME.nbank.yaml (rec.nbank.yaml for rec.dat): the
    input takes a free name, the sidecar its own; nothing is replaced."""
    item = _claimed_by_hand(env, b"rec.dat", lambda p: p.write_bytes(b"mine"), b"rec" + SUFFIX)
    (env.inbox / "rec.dat").write_bytes(b"new")
    _put_back(env, item)
    assert _listing(env.inbox) == {
        b"rec.dat": b"new", b"rec~1.dat": b"mine", b"rec" + SUFFIX: SIDECAR,
    }  # fmt: skip


def test_a_replay_of_an_old_row_without_identity_never_makes_the_sidecar_an_input(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A row journaled without identity (an older release) replayed after the input
    went to rec~1.dat (its sidecar's name rec.dat.nbank.yaml being taken): the sidecar
    is not put back as rec.dat.nbank~1.yaml, a name the scan deposits as an input."""
    item = _claimed(env, b"rec.dat", data=b"mine")
    (env.inbox / ("rec.dat" + SUFFIX.decode())).write_bytes(b"dtype: other\n")
    at_seam(monkeypatch, "after-put-back", _crash)
    with pytest.raises(Crash):
        _put_back(env, item)
    _put_back(env, replace(item, identity=None))
    holders = _sidecar_holders(env.inbox)
    assert all(n.endswith(SUFFIX) for n in holders), holders


# -- crashes and racing writers ----------------------------------------------------


def test_a_replay_after_the_input_moved_gives_its_sidecar_the_same_name(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed at after-put-back (the input back as rec~1.dat, rec.dat being taken), the
    replay puts the sidecar at rec~1.dat.nbank.yaml; the new rec.dat gets none."""
    item = _claimed(env, b"rec.dat", data=b"mine")
    (env.inbox / "rec.dat").write_bytes(b"new")
    at_seam(monkeypatch, "after-put-back", _crash)
    with pytest.raises(Crash):
        _put_back(env, item)
    _put_back(env, item)
    assert _listing(env.inbox) == {
        b"rec.dat": b"new", b"rec~1.dat": b"mine", b"rec~1.dat" + SUFFIX: SIDECAR,
    }  # fmt: skip


def test_a_name_taken_after_it_was_chosen_is_never_replaced(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer creates the free name put-back chose (rec~1.dat) before the move: the
    move fails without replacing it, and the next attempt puts the pair at rec~2."""
    item = _claimed(env, b"rec.dat", data=b"mine")
    (env.inbox / "rec.dat").write_bytes(b"new")
    real = rejection._free_name

    def racing(folder: Path, basename: bytes, suffix: bytes = b"") -> bytes:
        chosen = real(folder, basename, suffix)
        if not (env.inbox / os.fsdecode(chosen)).exists():
            (env.inbox / os.fsdecode(chosen)).write_bytes(b"racer")
        return chosen

    monkeypatch.setattr(rejection, "_free_name", racing)
    with pytest.raises(FileExistsError):
        _put_back(env, item)
    monkeypatch.setattr(rejection, "_free_name", real)
    _put_back(env, item)
    got = _listing(env.inbox)
    assert got[b"rec.dat"] == b"new" and got[b"rec~1.dat"] == b"racer"
    assert got[b"rec~2.dat"] == b"mine" and got[b"rec~2.dat" + SUFFIX] == SIDECAR


def test_a_sidecar_name_taken_between_the_moves_never_pairs_with_another_input(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rec.dat re-created; the input goes back as rec~1.dat; before its sidecar moves a
    writer creates rec~1.dat.nbank.yaml. The claimed sidecar must not land at
    rec.dat.nbank.yaml, where it becomes the new rec.dat's metadata."""
    item = _claimed(env, b"rec.dat", data=b"mine")
    (env.inbox / "rec.dat").write_bytes(b"new")
    theirs = env.inbox / ("rec~1.dat" + SUFFIX.decode())
    at_seam(monkeypatch, "after-put-back", lambda: theirs.write_bytes(b"dtype: theirs\n"))
    _put_back(env, item)
    got = _listing(env.inbox)
    assert got[b"rec~1.dat" + SUFFIX] == b"dtype: theirs\n"  # never replaced
    assert got.get(b"rec.dat" + SUFFIX) != SIDECAR, "the new rec.dat got the old sidecar"


def test_a_replay_whose_sidecar_name_was_taken_never_makes_the_sidecar_an_input(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed after the input went back as rec.dat; a writer then creates
    rec.dat.nbank.yaml. The replay must not put the claimed sidecar back as
    rec.dat.nbank~1.yaml, which the next scan deposits as an input of its own."""
    item = _claimed(env, b"rec.dat", data=b"mine")
    at_seam(monkeypatch, "after-put-back", _crash)
    with pytest.raises(Crash):
        _put_back(env, item)
    (env.inbox / ("rec.dat" + SUFFIX.decode())).write_bytes(b"dtype: theirs\n")
    _put_back(env, item)
    got = _listing(env.inbox)
    assert got[b"rec.dat" + SUFFIX] == b"dtype: theirs\n"
    holders = _sidecar_holders(env.inbox)
    assert all(n.endswith(SUFFIX) for n in holders), holders


# -- the rejection path ------------------------------------------------------------


def _old_free_name(folder: Path, basename: bytes) -> bytes:
    """_free_name as it was before 842845d (the reference for the rejection path)."""
    candidate = basename
    stem, dot, ext = basename.rpartition(b".") if b"." in basename[1:] else (basename, b"", b"")
    if rejection._is_temporary_name(basename):
        stem, dot, ext = basename, b"", b""
    n = 1
    while (
        rejection._is_temporary_name(candidate)
        or os.path.lexists(folder / os.fsdecode(candidate))
        or os.path.lexists(folder / os.fsdecode(rejection.reason_name(candidate)))
    ):
        candidate = stem + b"~%d" % n + dot + ext
        if len(candidate) > rejection.NAME_MAX:
            candidate = candidate[-rejection.NAME_MAX :]
        n += 1
    return candidate


@pytest.mark.parametrize(
    ("name", "present"),
    [
        (b"rec.dat", []),
        (b"rec.dat", [b"rec.dat", b"rec~1.dat.reason", b"rec~2.dat"]),
        (b".rec.dat.reason.tmp", [b".rec.dat.reason.tmp"]),
        (b".x.tmp", [b".x.tmp~1"]),
        (b"noext", [b"noext", b"noext~1"]),
        (b".hidden", [b".hidden"]),
        (b"r" * 251 + b".dat", [b"r" * 251 + b".dat", b"r" * 249 + b"~1.dat"]),
        (b"\xff" * 250 + b".dat", [b"\xff" * 250 + b".dat"]),
    ],
)
def test_the_rejection_path_chooses_the_names_it_chose_before(
    tmp_path: Path, name: bytes, present: list[bytes]
) -> None:
    """_free_name without a sidecar suffix (move_to_rejected's use) answers exactly as
    before the change, temporary ``.NAME.reason.tmp`` forms and long names included."""
    for p in present:
        (tmp_path / os.fsdecode(p)).write_bytes(b"x")
    assert rejection._free_name(tmp_path, name) == _old_free_name(tmp_path, name)


def test_a_long_input_rejected_under_a_free_name_keeps_its_sidecar(env: Env) -> None:
    """A 244-byte input with a sidecar rejected while rejected/ already holds its name:
    the rejection finishes (its sidecar's name, the free name plus .nbank.yaml, fits in
    255 bytes) instead of failing on every retry with ENAMETOOLONG."""
    rel = b"r" * 240 + b".dat"
    (env.inbox / "rejected" / os.fsdecode(rel)).write_bytes(b"rejected before")
    item = _claimed(env, rel, data=b"mine")
    item = env.journal.save(replace(item, error_code="bad", error_message="bad"))
    with env.spec.open_fs() as fs:
        rejection.move_to_rejected(env.spec, item, fs=fs, now=time.time(), save=env.journal.save)
    got = _listing(env.inbox / "rejected")
    [moved] = [n for n, d in got.items() if d == b"mine"]
    assert got.get(moved + SUFFIX) == SIDECAR


def test_the_rejection_name_search_ends_when_its_candidates_repeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``a.<253 x>`` (255 bytes) rejected while rejected/ holds it and ``0.<ext>`` to
    ``9.<ext>`` (its only candidates once cut to 255 bytes): the name search (run
    under the process-wide rejection lock) ends instead of looping forever."""
    ext = b"x" * 253
    for name in [b"a." + ext] + [b"%d." % d + ext for d in range(10)]:
        (tmp_path / os.fsdecode(name)).write_bytes(b"someone's")
    calls = itertools.count()
    real = rejection._is_temporary_name

    def guarded(name: bytes) -> bool:
        if next(calls) > 100_000:  # 11 names in the folder: 100,000 tries is a loop
            raise LoopGuard(name[:8])
        return real(name)

    monkeypatch.setattr(rejection, "_is_temporary_name", guarded)
    try:
        rejection._free_name(tmp_path, b"a." + ext)
    except LoopGuard:
        pytest.fail("_free_name never ends: its candidates cycle over 10 taken names")
    except OSError:
        pass  # failing is an answer; looping forever is not
