"""The access policy as an unprivileged service user sees it (root would hide bugs)."""

from __future__ import annotations

import grp
import json
import os
import stat
from pathlib import Path

from fixtures.users import TestUser

PRELUDE = r"""
import json, os, stat, sys
from pathlib import Path
from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.opening import create_archive, open_archive

def info(p):
    st = os.lstat(p)
    return {"mode": oct(stat.S_IMODE(st.st_mode)), "gid": st.st_gid, "uid": st.st_uid}

out = {}
"""


def run_json(user: TestUser, code: str, *args: str | Path) -> dict:
    proc = user.python(PRELUDE + code + "\nprint(json.dumps(out))", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_inputs(root: Path, user: TestUser) -> None:
    (root / "in" / "tree" / "sub").mkdir(parents=True)
    (root / "in" / "rec.wav").write_bytes(os.urandom(100_000))
    (root / "in" / "tree" / "a.txt").write_text("a")
    (root / "in" / "tree" / "sub" / "b.txt").write_text("b")
    for dirpath, dirnames, filenames in os.walk(root / "in"):
        for name in [".", *dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), user.uid, user.gid)


CREATE_AND_PUBLISH = r"""
root, group = Path(sys.argv[1]), sys.argv[2]
a = create_archive(root / "arch", "http://127.0.0.1:1/neurobank/", group=group,
                   allow_directories=True)
f = durable.stage_copy(a, root / "in" / "rec.wav", ".nbankd-f")
pf = durable.publish(a, f.path, a.new_resource_path("abc001", "rec.wav"))
t = durable.stage_copy_tree(a, root / "in" / "tree", ".nbankd-t")
pt = durable.publish(a, t.path, a.resource_path("abtree"))
out["file"] = info(pf.path)
out["stub"] = info(pf.path.parent)
out["tree"] = info(pt.path)
out["tree_sub"] = info(pt.path / "sub")
out["tree_file"] = info(pt.path / "sub" / "b.txt")
out["resources"] = info(a.resources_dir)
out["staging"] = sorted(os.listdir(a.staging_dir))
out["created"] = [pf.created, pt.created]
"""


def test_unprivileged_user_creates_and_publishes(
    unpriv_user: TestUser, user_tmp_path: Path, lab_group: str
) -> None:
    """A plain user gets 2775 folders, 0444 files, 0555 tree folders, all in the lab group."""
    make_inputs(user_tmp_path, unpriv_user)
    out = run_json(unpriv_user, CREATE_AND_PUBLISH, user_tmp_path, lab_group)
    gid = grp.getgrnam(lab_group).gr_gid
    assert out["created"] == [True, True]
    assert out["resources"]["mode"] == out["stub"]["mode"] == oct(0o2775)
    assert out["file"]["mode"] == out["tree_file"]["mode"] == oct(0o444)
    assert out["tree"]["mode"] == out["tree_sub"]["mode"] == oct(0o555)
    for key in ("file", "stub", "tree", "tree_sub", "tree_file", "resources"):
        assert out[key]["gid"] == gid, key
        assert out[key]["uid"] == unpriv_user.uid, key
    assert out["staging"] == []


REPUBLISH = r"""
root = Path(sys.argv[1])
a = open_archive(root / "arch")
f = durable.stage_copy(a, root / "in" / "rec.wav", ".nbankd-f2")
out["again"] = durable.publish(a, f.path, a.new_resource_path("abc001", "rec.wav")).created
(root / "in" / "other.wav").write_bytes(b"different")
g = durable.stage_copy(a, root / "in" / "other.wav", ".nbankd-g")
try:
    durable.publish(a, g.path, a.new_resource_path("abc001", "rec.wav"))
except errors.ResourceExists as err:
    out["conflict"] = str(err)
t = durable.stage_copy_tree(a, root / "in" / "tree", ".nbankd-t2")
out["tree_again"] = durable.publish(a, t.path, a.resource_path("abtree")).created
out["staging"] = sorted(os.listdir(a.staging_dir))
"""


def test_unprivileged_republish_is_idempotent(
    unpriv_user: TestUser, user_tmp_path: Path, lab_group: str
) -> None:
    """As a plain user, identical re-publishes succeed and a different file is refused."""
    make_inputs(user_tmp_path, unpriv_user)
    run_json(unpriv_user, CREATE_AND_PUBLISH, user_tmp_path, lab_group)
    stored = (user_tmp_path / "arch" / "resources" / "ab" / "abc001.wav").read_bytes()
    out = run_json(unpriv_user, REPUBLISH, user_tmp_path)
    assert out["again"] is False and out["tree_again"] is False
    assert "abc001.wav" in out["conflict"]
    assert out["staging"] == []
    assert (user_tmp_path / "arch" / "resources" / "ab" / "abc001.wav").read_bytes() == stored


STAGE_AS_OTHER = r"""
root = Path(sys.argv[1])
a = open_archive(root / "arch")
(Path(sys.argv[2]) / "x.wav").write_bytes(b"x")
try:
    durable.stage_copy(a, Path(sys.argv[2]) / "x.wav", ".nbankd-o")
except errors.NbankdError as err:
    out["error"] = type(err).__name__
    out["transient"] = err.transient
"""


def test_other_user_without_group_gets_archive_unavailable(
    unpriv_user: TestUser, other_user: TestUser, user_tmp_path: Path, lab_group: str
) -> None:
    """A user outside the archive's group cannot stage: ArchiveUnavailable (EACCES), transient."""
    make_inputs(user_tmp_path, unpriv_user)
    run_json(unpriv_user, CREATE_AND_PUBLISH, user_tmp_path, lab_group)
    scratch = other_user.home / "scratch"
    scratch.mkdir(exist_ok=True)
    os.chown(scratch, other_user.uid, other_user.gid)
    out = run_json(other_user, STAGE_AS_OTHER, user_tmp_path, scratch)
    assert out == {"error": "ArchiveUnavailable", "transient": True}
    assert os.listdir(user_tmp_path / "arch" / "staging") == []


RESTAGE_READ_ONLY_LEFTOVER = r"""
root = Path(sys.argv[1])
a = open_archive(root / "arch")
t = durable.stage_copy_tree(a, root / "in" / "tree", ".nbankd-t")
for p in (t.path / "sub", t.path):
    p.chmod(0o555)  # as a crash after the access policy was applied would leave it
t2 = durable.stage_copy_tree(a, root / "in" / "tree", ".nbankd-t")
out["same"] = t2.sha1 == t.sha1
durable.discard_staged(a, t2.path)
out["staging"] = sorted(os.listdir(a.staging_dir))
"""


def test_unprivileged_user_replaces_read_only_staged_leftover(
    unpriv_user: TestUser, user_tmp_path: Path, lab_group: str
) -> None:
    """A read-only leftover tree in staging/ is replaced and discarded by its owner."""
    make_inputs(user_tmp_path, unpriv_user)
    run_json(unpriv_user, CREATE_AND_PUBLISH, user_tmp_path, lab_group)
    out = run_json(unpriv_user, RESTAGE_READ_ONLY_LEFTOVER, user_tmp_path)
    assert out == {"same": True, "staging": []}


def test_user_tmp_path_belongs_to_user(unpriv_user: TestUser, user_tmp_path: Path) -> None:
    """The fixture folder is owned by the unprivileged user, who can write there."""
    st = os.stat(user_tmp_path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (unpriv_user.uid, 0o755)
    proc = unpriv_user.run(["touch", user_tmp_path / "ok"])
    assert proc.returncode == 0, proc.stderr
