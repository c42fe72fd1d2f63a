"""An input put back into its inbox keeps its sidecar: under a free name when its own
was taken meanwhile, the sidecar follows that name, and never lands under a name the
scan would take for an input of its own."""

from __future__ import annotations

import os

from fixtures.steps_env import Env
from nbankd.deposit import rejection
from nbankd.deposit.journal import Item
from nbankd.deposit.lifecycle import State, Step

SIDECAR = b"dtype: test-file\nmetadata: {animal: bird7}\n"


def _drop_with_sidecar(env: Env, name: str) -> Item:
    """``name`` and ``name.nbank.yaml`` in the inbox, journaled and claimed: both are in
    the work folder."""
    path = env.inbox / name
    path.write_bytes(os.urandom(4096))
    (env.inbox / f"{name}.nbank.yaml").write_bytes(SIDECAR)
    item = env.journal_existing(name, sidecar=os.fsencode(f"{name}.nbank.yaml"))
    item = env.step(item, Step.CLAIM)
    assert item.state is State.CLAIMED, (item.error_code, item.error_message)
    assert not path.exists()
    return item


def _put_back(env: Env, item: Item) -> None:
    with env.spec.open_fs() as fs:
        rejection.put_back(env.spec, item, fs=fs)


def _names(env: Env) -> list[str]:
    return sorted(p.name for p in env.inbox.iterdir() if p.name not in (".nbank", "rejected"))


def test_a_sidecar_follows_its_input_to_a_free_name(env: Env) -> None:
    """rec.dat re-created while claimed: the input goes back as rec~1.dat with its
    sidecar as rec~1.dat.nbank.yaml; the new rec.dat is not given the old sidecar."""
    item = _drop_with_sidecar(env, "rec.dat")
    (env.inbox / "rec.dat").write_bytes(b"a new recording under the old name")
    _put_back(env, item)
    assert _names(env) == ["rec.dat", "rec~1.dat", "rec~1.dat.nbank.yaml"]
    assert (env.inbox / "rec~1.dat.nbank.yaml").read_bytes() == SIDECAR


def test_a_taken_sidecar_name_moves_the_input_too(env: Env) -> None:
    """rec.dat free but rec.dat.nbank.yaml re-created: both go back under rec~1, never
    the sidecar alone under a name that is no sidecar's (it would be deposited as an
    input)."""
    item = _drop_with_sidecar(env, "rec.dat")
    (env.inbox / "rec.dat.nbank.yaml").write_bytes(b"dtype: other\n")
    _put_back(env, item)
    assert _names(env) == ["rec.dat.nbank.yaml", "rec~1.dat", "rec~1.dat.nbank.yaml"]
    assert (env.inbox / "rec~1.dat.nbank.yaml").read_bytes() == SIDECAR


def test_a_put_back_run_again_finds_its_input_by_identity(env: Env) -> None:
    """Run again after a crash between the input's move (to rec~1.dat, its sidecar's
    name being taken) and its sidecar's, the sidecar joins the input where it went,
    found by the identity journaled at claim."""
    item = _drop_with_sidecar(env, "rec.dat")
    (env.inbox / "rec.dat.nbank.yaml").write_bytes(b"dtype: other\n")
    os.rename(env.inbox / ".nbank" / item.token, env.inbox / "rec~1.dat")  # the first run
    _put_back(env, item)
    assert _names(env) == ["rec.dat.nbank.yaml", "rec~1.dat", "rec~1.dat.nbank.yaml"]
    assert (env.inbox / "rec~1.dat.nbank.yaml").read_bytes() == SIDECAR


def test_an_input_goes_back_under_its_own_name_with_its_sidecar(env: Env) -> None:
    """Nothing taken: both go back under their own names."""
    item = _drop_with_sidecar(env, "rec.dat")
    _put_back(env, item)
    assert _names(env) == ["rec.dat", "rec.dat.nbank.yaml"]
    assert (env.inbox / "rec.dat.nbank.yaml").read_bytes() == SIDECAR
