"""The switch's bookkeeping: paused.json, daemon identity, who may read the credentials."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fixtures.users import TestUser
from nbankctl.migrate_credentials import unreadable_by
from nbankd import errors
from nbankd.migration import pausing


def test_paused_inboxes_survive_in_the_state_folder(tmp_path: Path) -> None:
    """What a switch paused is written before pausing and read back by the next run."""
    pausing.write_paused(tmp_path, ["/in/b", "/in/a"], tmp_path / "sock")
    assert pausing.read_paused(tmp_path) == {"/in/a", "/in/b"}
    assert oct(pausing.paused_path(tmp_path).stat().st_mode & 0o777) == "0o640"
    assert pausing.forget_paused(tmp_path) and not pausing.forget_paused(tmp_path)
    assert pausing.read_paused(tmp_path) == set()


def test_an_unusable_migration_folder_is_named(tmp_path: Path) -> None:
    """state_dir/migration that cannot be made: a usage error naming it, no traceback."""
    (tmp_path / "migration").write_text("a file in the way")
    with pytest.raises(errors.UsageError, match=f"cannot make {tmp_path / 'migration'}: "):
        pausing.write_paused(tmp_path, ["/in"], tmp_path / "sock")


def test_a_restart_changes_the_identity() -> None:
    """Another pid, or the same pid started at another time, is another daemon."""
    now = pausing.identity_of({"pid": 10, "uptime": 100.0})
    assert now.same(pausing.identity_of({"pid": 10, "uptime": 100.5}))
    assert not now.same(pausing.identity_of({"pid": 11, "uptime": 100.0}))
    assert not now.same(pausing.identity_of({"pid": 10, "uptime": 3.0}))


def test_readability_follows_owner_group_other_and_folders(
    user_tmp_path: Path, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """The owner's, the group's or everyone's read bit decides; a closed folder too."""
    folder = user_tmp_path / "creds"
    folder.mkdir(mode=0o750)
    os.chown(folder, 0, unpriv_user.gid)
    path = folder / "auth"
    path.write_text("u:p\n")
    os.chown(path, 0, unpriv_user.gid)
    path.chmod(0o600)
    assert "is not readable by user nbanktest" in unreadable_by(path, unpriv_user.uid)
    path.chmod(0o640)  # the user's group may read it
    assert unreadable_by(path, unpriv_user.uid) == ""
    assert f"which user {other_user.name} may not enter" in unreadable_by(path, other_user.uid)
    os.chown(path, unpriv_user.uid, unpriv_user.gid)
    path.chmod(0o400)
    assert unreadable_by(path, unpriv_user.uid) == "" and unreadable_by(path, 0) == ""


def test_the_load_credential_source_is_read_from_systemctl_show() -> None:
    """The registry credential's file is found in `systemctl show -p LoadCredential`
    output, so the switch can say exactly which file to fill."""
    from nbankctl.migrate_credentials import credential_path

    assert credential_path("LoadCredential=registry:/etc/nbankd/registry-credentials\n") == (
        "/etc/nbankd/registry-credentials"
    )
    assert credential_path("LoadCredential=other:/x registry:/srv/creds\n") == "/srv/creds"
    assert credential_path("LoadCredential=\n") is None
