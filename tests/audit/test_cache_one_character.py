"""What an audit keeps in its cache when a stub folder cannot be listed: every stub
folder a resource may be filed in counts (layout.candidate_stubs), including the
second one of a one-character identifier."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from audit_helpers import make_setup
from test_audit_races import AS_USER  # the audit run as another user

from fixtures.cli_backends import sha1, store
from fixtures.users import TestUser
from nbankd.audit.model import MISSING_FROM_ARCHIVE
from nbankd.audit.walk import Walk


@pytest.mark.parametrize(
    ("unlisted", "name", "complete"),
    [
        (set(), "a", True),
        ({"a"}, "a", False),
        ({"a."}, "a", False),  # nbank 0.13 files a.json of identifier a in a./
        ({"ab"}, "a", True),
        ({"ab"}, "abc", False),
        ({"a."}, "abc", True),
        ({"a", "a."}, "ab", True),
    ],
)
def test_a_walk_is_complete_for_a_name_only_if_each_of_its_stubs_was_listed(
    unlisted: set[str], name: str, complete: bool
) -> None:
    """Walk.complete is False when any stub folder the name may be filed in was not listed."""
    assert Walk(unlisted_stubs=unlisted).complete(name) is complete
    assert Walk(unlisted_stubs=unlisted, listed_top=False).complete(name) is False


def test_a_one_character_resource_behind_an_unlistable_second_stub_stays_cached(
    unpriv_user: TestUser, user_tmp_path: Path
) -> None:
    """Run as an unprivileged user: identifier "a", cached by an audit that found it in
    resources/a/, then found only in resources/a./ which the user cannot list, is neither
    forgotten by the cache nor reported missing."""
    s = make_setup(user_tmp_path, n=1, group=unpriv_user.group, shared=True)
    data = b"one character" * 50
    s.registry.add_resource(dtype="dat", archive="arch", name="a", sha1=sha1(data))
    filed = store(s.archive, "a", data)
    assert filed == s.archive.stored_file("a", "a.dat")
    s.registry.close()
    for folder, dirs, files in os.walk(user_tmp_path):
        for entry in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(entry, unpriv_user.uid, unpriv_user.gid)

    def audit() -> dict[str, object]:
        proc = unpriv_user.python(AS_USER, s.state, s.archive.path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.splitlines()[-1])  # type: ignore[no-any-return]

    def cached() -> set[str]:
        with sqlite3.connect(s.state / "audits" / "cache.sqlite3") as db:
            return {n for (n,) in db.execute("SELECT name FROM entries")}

    assert audit()["ok"] is True
    assert "a" in cached()
    other = s.archive.resources_dir / "a."
    other.mkdir()
    filed.rename(other / filed.name)
    os.chown(other, 0, unpriv_user.gid)
    other.chmod(0o700)
    [result] = audit()["archives"]  # type: ignore[index]
    kinds = {(f["kind"], f["resource"]) for f in result["findings"]}
    assert (MISSING_FROM_ARCHIVE, "a") not in kinds
    assert "a" in cached()
