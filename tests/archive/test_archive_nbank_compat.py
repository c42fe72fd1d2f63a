"""Cross-checks with the real neurobank 0.13 client and a django-neurobank server."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from archive_helpers import make_tree

from fixtures.django_server import DjangoServer, unique_name
from fixtures.users import TestUser
from nbankd.archive import durable
from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive, open_archive
from nbankd.registry.http import HttpRegistry

NBANK = str(Path(sys.executable).with_name("nbank"))
SUMMARY = re.compile(
    r"Resources in registry: (\d+); missing from archive: (\d*); missing from registry: (\d*);"
    r" read/verify errors: (\d*); other layout errors: (\d*); permission errors: (\d*);"
    r" registered elsewhere: (\d*)"
)


def nbank(
    server: DjangoServer, *args: str | Path, user: TestUser | None = None
) -> subprocess.CompletedProcess[str]:
    """Runs the nbank CLI against the test server (as ``user`` if given)."""
    argv = [NBANK, "-r", server.url, *map(str, args)]
    if user is not None:
        return user.run(argv)
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def register(server: DjangoServer, archive: Archive, resources: dict[str, str], dtype: str) -> str:
    """Registers the archive and {id: sha1} located in it with our HTTP client; returns its name."""
    name = unique_name("nbd")
    registry = HttpRegistry(server.url, (server.username, server.password))
    try:
        registry.add_archive(name, "neurobank", str(archive.path))
        for id, sha1 in resources.items():
            registry.add_resource(dtype=dtype, archive=name, name=id, sha1=sha1)
    finally:
        registry.close()
    return name


def check_summary(proc: subprocess.CompletedProcess[str]) -> tuple[str, ...]:
    text = proc.stdout + proc.stderr
    match = SUMMARY.search(text)
    assert match, text
    return match.groups()


def test_config_is_byte_identical_to_nbank_init(
    django_registry: DjangoServer, tmp_path: Path
) -> None:
    """create_archive writes the same nbank.json and .gitignore as `nbank init`, same modes."""
    theirs = tmp_path / unique_name("theirs")
    proc = nbank(
        django_registry,
        "-a",
        f"{django_registry.username}:{django_registry.password}",
        "init",
        theirs,
    )
    assert proc.returncode == 0, proc.stderr
    ours = create_archive(tmp_path / "ours", django_registry.url)
    theirs_config = json.loads((theirs / "nbank.json").read_text())
    ours_config = json.loads(ours.config_path.read_text())
    assert ours_config == theirs_config
    assert ours.config_path.read_text() == (theirs / "nbank.json").read_text()
    assert (ours.path / ".gitignore").read_text() == (theirs / ".gitignore").read_text()
    for name in ("nbank.json", "README.md", ".gitignore", "resources", "staging"):
        st_ours, st_theirs = os.lstat(ours.path / name), os.lstat(theirs / name)
        assert stat.S_IMODE(st_ours.st_mode) == stat.S_IMODE(st_theirs.st_mode), name
        assert st_ours.st_gid == st_theirs.st_gid, name
    assert open_archive(theirs).policy == ours.policy


FILL_AS_USER = r"""
import json, sys
from pathlib import Path
from nbankd.archive import durable
from nbankd.archive.opening import create_archive

root, url, group, fid, did = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
a = create_archive(root / "arch", url, group=group, allow_directories=True)
f = durable.stage_copy(a, root / "in" / "rec.wav", ".nbankd-f")
durable.publish(a, f.path, a.new_resource_path(fid, "rec.wav"))
t = durable.stage_copy_tree(a, root / "in" / "tree", ".nbankd-t")
durable.publish(a, t.path, a.resource_path(did))
print(json.dumps({fid: f.sha1, did: t.sha1}))
"""


def test_archive_filled_by_nbankd_passes_nbank_check(
    django_registry: DjangoServer,
    django_datatype: str,
    unpriv_user: TestUser,
    user_tmp_path: Path,
    lab_group: str,
) -> None:
    """An archive made and filled by a plain user passes `nbank archive check` cleanly."""
    (user_tmp_path / "in").mkdir()
    (user_tmp_path / "in" / "rec.wav").write_bytes(os.urandom(200_000))
    make_tree(user_tmp_path / "in" / "tree")
    subprocess.run(
        ["chown", "-R", f"{unpriv_user.uid}:{unpriv_user.gid}", user_tmp_path / "in"], check=True
    )
    fid, did = unique_name("f", 20), unique_name("d", 20)
    proc = unpriv_user.python(FILL_AS_USER, user_tmp_path, django_registry.url, lab_group, fid, did)
    assert proc.returncode == 0, proc.stderr
    hashes = json.loads(proc.stdout.strip().splitlines()[-1])
    archive = open_archive(user_tmp_path / "arch")
    register(django_registry, archive, hashes, django_datatype)
    check = nbank(django_registry, "archive", "check", archive.path, user=unpriv_user)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check_summary(check) == ("2", "0", "0", "0", "0", "0", "0")


def test_nbank_init_archive_accepts_our_resources(
    django_registry: DjangoServer, django_datatype: str, tmp_path: Path
) -> None:
    """An archive made by `nbank init` opens, takes our resources and still checks clean."""
    root = tmp_path / unique_name("init")
    auth = f"{django_registry.username}:{django_registry.password}"
    proc = nbank(django_registry, "-a", auth, "init", root)
    assert proc.returncode == 0, proc.stderr
    archive = open_archive(root)
    src = tmp_path / "rec.pprox"
    src.write_bytes(os.urandom(50_000))
    staged = durable.stage_copy(archive, src, ".nbankd-1")
    rid = unique_name("r", 20)
    durable.publish(archive, staged.path, archive.new_resource_path(rid, src.name))
    registry = HttpRegistry(
        django_registry.url, (django_registry.username, django_registry.password)
    )
    try:
        registry.add_resource(dtype=django_datatype, archive=root.name, name=rid, sha1=staged.sha1)
    finally:
        registry.close()
    check = nbank(django_registry, "archive", "check", root)
    assert check.returncode == 0, check.stdout + check.stderr
    assert check_summary(check) == ("1", "0", "0", "0", "0", "0", "0")


def test_nbank_locate_and_search_find_our_resources(
    django_registry: DjangoServer, django_datatype: str, archive: Archive, src_file: Path
) -> None:
    """`nbank locate` prints our stored path and `nbank search` lists our resource."""
    rid = unique_name("loc", 20)
    staged = durable.stage_copy(archive, src_file, ".nbankd-1")
    published = durable.publish(archive, staged.path, archive.new_resource_path(rid, src_file.name))
    name = register(django_registry, archive, {rid: staged.sha1}, django_datatype)
    located = nbank(django_registry, "locate", rid)
    assert located.returncode == 0, located.stderr
    assert str(published.path) in located.stdout
    found = nbank(django_registry, "search", "-n", name)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == [rid]
    by_hash = nbank(django_registry, "search", "-H", staged.sha1)
    assert rid in by_hash.stdout.split()


def test_nbank_check_would_report_a_wrong_mode(
    django_registry: DjangoServer, django_datatype: str, tmp_path: Path, src_file: Path
) -> None:
    """Control: a stored file made writable is a permission error for `nbank archive check`."""
    archive = create_archive(tmp_path / "live", django_registry.url)
    rid = unique_name("ctl", 20)
    staged = durable.stage_copy(archive, src_file, ".nbankd-1")
    published = durable.publish(archive, staged.path, archive.new_resource_path(rid, src_file.name))
    register(django_registry, archive, {rid: staged.sha1}, django_datatype)
    published.path.chmod(0o664)
    check = nbank(django_registry, "archive", "check", archive.path)
    assert check.returncode != 0
    assert check_summary(check)[5] == "1"
