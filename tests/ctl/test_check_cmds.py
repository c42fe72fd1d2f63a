"""nbankctl check registry | archive | all | tar, against both registry backends, and
side by side with the real ``nbank check`` where the registry is django-neurobank."""

from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
from pathlib import Path

import pytest
from nbank.util import hash_directory

from fixtures.cli_backends import NBANKCTL, Backend, base_env, make_backend, make_tar, store


def exported(id: str, ext: str = ".dat") -> str:
    """A member's name as export writes it."""
    return f"resources/{id[:2]}/{id}{ext}"


def summary(text: str) -> str:
    """The "Resources in registry: ..." line of a check's report."""
    return next(line for line in text.splitlines() if line.startswith("Resources in registry"))


# --- check archive ---------------------------------------------------------------------


def test_check_archive_and_archive_check_report_the_same(backend: Backend) -> None:
    """check archive and its alias archive check give the same report and status."""
    archive, arch = backend.archive()
    backend.resource(backend.blob("gone"), arch)
    store(archive, backend.name("stray"), backend.blob("stray"))
    new = backend.ctl("check", "archive", str(archive.path))
    alias = backend.ctl("archive", "check", str(archive.path))
    assert new.returncode == alias.returncode == 1
    assert new.stderr == alias.stderr and "missing from archive: 1" in new.stderr


def test_check_archive_named_like_its_folder(backend: Backend) -> None:
    """An archive registered under its folder's name (as init does; its listing is
    started before the registry says the name) is judged on that listing."""
    folder = backend.tmp / backend.name("same")
    assert backend.ctl("init", str(folder)).returncode == 0
    gone = backend.resource(backend.blob("gone"), folder.name)
    proc = backend.ctl("check", "archive", str(folder))
    assert proc.returncode == 1 and f" - {gone} - missing from archive" in proc.stderr


def test_check_archive_report_on_stderr_json_on_stdout(backend: Backend) -> None:
    """The report goes to standard error as nbank's does; --json goes to standard output."""
    archive, arch = backend.archive()
    name = backend.resource(backend.blob("ok"), arch)
    store(archive, name, backend.blob("ok"))
    plain = backend.ctl("check", "archive", str(archive.path))
    assert plain.returncode == 0 and plain.stdout == ""
    assert "Resources in registry: 1; missing from archive: 0" in plain.stderr
    as_json = backend.ctl("--json", "check", "archive", str(archive.path))
    doc = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and doc["ok"] and doc["resources_in_registry"] == 1
    assert doc["hashed"] is True


def test_check_archive_summary_equals_nbank(django_backend: Backend) -> None:
    """On the same archive, nbankctl's summary line and status equal nbank's."""
    backend = django_backend
    archive, arch = backend.archive()
    good = backend.resource(backend.blob("good"), arch)
    store(archive, good, backend.blob("good"))
    backend.resource(backend.blob("gone"), arch)
    corrupt = backend.resource(backend.blob("right"), arch)
    store(archive, corrupt, backend.blob("wrong")).chmod(0o644)
    store(archive, backend.name("stray"), backend.blob("stray"))
    (archive.staging_dir / "leftover.zip").write_bytes(b"x")
    ours = backend.ctl("check", "archive", str(archive.path))
    theirs = backend.nbank("check", "archive", str(archive.path))
    assert ours.returncode == theirs.returncode == 1
    assert summary(ours.stderr) == summary(theirs.stderr), theirs.stderr


def test_fix_sets_the_policy_modes(backend: Backend) -> None:
    """--fix gives a writable file and an open stub folder the policy's modes; the
    check is then clean (and so is nbank's)."""
    archive, arch = backend.archive()
    name = backend.resource(backend.blob("m"), arch)
    path = store(archive, name, backend.blob("m"))
    path.chmod(0o664)
    path.parent.chmod(0o755)
    before = backend.ctl("check", "archive", str(archive.path))
    assert before.returncode == 1 and "permission errors: 2" in before.stderr
    fixed = backend.ctl("check", "archive", "--fix", str(archive.path))
    assert fixed.returncode == 0, fixed.stderr
    assert f"set owner, group and mode of {path} to the policy's" in fixed.stderr
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2775
    if backend.url is not None:
        theirs = backend.nbank("check", "archive", str(archive.path))
        assert theirs.returncode == 0 and "permission errors: 0" in theirs.stderr


def test_fix_makes_a_missing_staging_folder(backend: Backend) -> None:
    """--fix makes staging/ when it is missing, with the policy's mode."""
    archive, _arch = backend.archive()
    archive.staging_dir.rmdir()
    assert backend.ctl("check", "archive", str(archive.path)).returncode == 1
    fixed = backend.ctl("check", "archive", "--fix", str(archive.path))
    assert fixed.returncode == 0, fixed.stderr
    assert stat.S_IMODE(archive.staging_dir.stat().st_mode) == 0o2775


def test_fix_never_asks_without_a_terminal(backend: Backend) -> None:
    """With standard input not a terminal, --fix asks nothing and deletes nothing, even
    given an answer on standard input; it says why."""
    archive, _arch = backend.archive()
    leftover = archive.staging_dir / "leftover.zip"
    leftover.write_bytes(b"x")
    os.utime(leftover, (0, 0))
    proc = backend.ctl("check", "archive", "--fix", str(archive.path), input="d\n")
    assert proc.returncode == 1 and leftover.exists()
    assert "standard input is not a terminal" in proc.stderr and "[d]elete" not in proc.stderr


def test_fix_at_a_terminal_adds_a_location_for_a_verified_copy(backend: Backend) -> None:
    """At a terminal, --fix offers to add this archive as a location of a resource
    registered elsewhere whose file here matches its SHA-1; answering 'a' adds it."""
    archive, arch = backend.archive()
    _other, other = backend.archive("other")
    data = backend.blob("copy")
    name = backend.resource(data, other)
    store(archive, name, data)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [NBANKCTL, *backend.before, "check", "archive", "--fix", str(archive.path)],
            env=backend.env,
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.write(master, b"a\n")
        _out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
        os.close(slave)
    assert proc.returncode == 0, err
    assert f"added {arch} as a location of {name}" in err
    record = backend.registry.get_resource(name)
    assert record is not None and set(record.locations) >= {arch, other}


# --- check registry --------------------------------------------------------------------


def test_check_registry_reports_resources_without_location(backend: Backend) -> None:
    """check registry names a resource no archive holds and exits 1; an archive holding
    nothing is named too."""
    homeless = backend.resource(backend.blob("homeless"), None)
    _archive, empty = backend.archive()
    proc = backend.ctl("check", "registry")
    assert proc.returncode == 1
    assert f" - {homeless}: has NO locations" in proc.stderr
    assert f" - archive {empty}: has no resources" in proc.stderr


def test_check_registry_clean_exits_0(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """An embedded registry where every resource has a location and every archive
    holds one checks clean (the shared django server holds other tests' records)."""
    backend = make_backend("embedded", tmp_path, request)
    try:
        _archive, arch = backend.archive()
        backend.resource(backend.blob("held"), arch)
        proc = backend.ctl("--json", "check", "registry")
    finally:
        backend.registry.close()
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0 and doc["no_location"] == [] and doc["empty_archives"] == []


def test_check_registry_names_what_nbank_names(django_backend: Backend) -> None:
    """On the same server, nbankctl and nbank list the same resources without locations."""
    backend = django_backend
    backend.resource(backend.blob("homeless"), None)
    ours = backend.ctl("check", "registry")
    theirs = backend.nbank("check", "registry")

    def names(text: str) -> set[str]:
        return {
            line.split(":")[0].strip(" -")
            for line in text.splitlines()
            if line.endswith("has NO locations")
        }

    assert ours.returncode == theirs.returncode == 1
    assert names(ours.stderr) == names(theirs.stderr) != set()


# --- check all -------------------------------------------------------------------------


def test_check_all_checks_local_archives_and_skips_others(backend: Backend) -> None:
    """check all checks each neurobank archive on this host, names the failing one,
    and lists a tape archive and a folder not on this host as skipped."""
    good, good_name = backend.archive("good")
    name = backend.resource(backend.blob("g"), good_name)
    store(good, name, backend.blob("g"))
    _bad, bad_name = backend.archive("bad")
    backend.resource(backend.blob("gone"), bad_name)
    tape = backend.name("tape")
    backend.registry.add_archive(tape, "tape", f"{tape}:1")
    away = backend.name("away")
    backend.registry.add_archive(away, "neurobank", str(backend.tmp / "not-here"))
    proc = backend.ctl("--json", "check", "all")
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert bad_name in doc["failed"] and good_name not in doc["failed"]
    assert doc["skipped"][tape] == "tape archive" and "not on this host" in doc["skipped"][away]


# --- check tar -------------------------------------------------------------------------


def test_check_tar_hashes_every_member(backend: Backend) -> None:
    """check tar passes a member whose bytes match, fails one that does not, and
    only notes a file that is not registered."""
    good = backend.resource(backend.blob("good"), None)
    bad = backend.resource(backend.blob("right"), None)
    stray = backend.name("stray")
    tar = make_tar(
        backend.tmp / "t.tar",
        [
            (exported(good), backend.blob("good")),
            (exported(bad), backend.blob("wrong")),
            (exported(stray), b"unregistered"),
        ],
    )
    proc = backend.ctl("check", "tar", str(tar))
    assert proc.returncode == 1
    assert f"  - {exported(good)} -> OK" in proc.stderr
    assert f"  ✗ {exported(bad)} -> SHA-1" in proc.stderr
    assert f"'{stray}' not in the registry" in proc.stderr
    assert (
        "Resources checked: 2; failed: 1; no registered hash: 0; files not in the registry: 1"
        in proc.stderr
    )


def test_check_tar_folder_resource(backend: Backend) -> None:
    """A folder resource in a tar is checked by neurobank's directory hash."""
    files = {"a.txt": backend.blob("fa"), "sub/b.bin": backend.blob("fb")}
    root = backend.tmp / "folder"
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    name = backend.registry.add_resource(
        dtype=backend.dtype, archive=None, name=backend.name(), sha1=hash_directory(root)
    ).name
    top = f"resources/{name[:2]}/{name}"
    tar = make_tar(
        backend.tmp / "d.tar",
        [(top, None), (f"{top}/sub", None)] + [(f"{top}/{r}", d) for r, d in files.items()],
    )
    proc = backend.ctl("--json", "check", "tar", str(tar))
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert [(m["id"], m["status"]) for m in doc["members"]] == [(name, "ok")]


def test_check_tar_does_not_list_a_folder_resources_files_as_unregistered(
    backend: Backend,
) -> None:
    """The files of a folder resource in a tar are part of it, not unregistered files."""
    root = backend.tmp / "folder"
    root.mkdir()
    (root / "a.txt").write_bytes(backend.blob("fa"))
    name = backend.registry.add_resource(
        dtype=backend.dtype, archive=None, name=backend.name(), sha1=hash_directory(root)
    ).name
    tar = make_tar(backend.tmp / "d.tar", [(name, None), (f"{name}/a.txt", backend.blob("fa"))])
    proc = backend.ctl("check", "tar", str(tar))
    assert proc.returncode == 0 and "a.txt ->" not in proc.stderr, proc.stderr
    assert "files not in the registry: 0" in proc.stderr


def test_check_tar_archive_option_reports_missing(backend: Backend) -> None:
    """With -a ARCHIVE, a resource the registry places there but the tar lacks is an
    error, and a member registered only elsewhere is named."""
    _archive, arch = backend.archive()
    there = backend.resource(backend.blob("there"), arch)
    absent = backend.resource(backend.blob("absent"), arch)
    elsewhere = backend.resource(backend.blob("elsewhere"), None)
    tar = make_tar(
        backend.tmp / "a.tar",
        [
            (exported(there), backend.blob("there")),
            (exported(elsewhere), backend.blob("elsewhere")),
        ],
    )
    proc = backend.ctl("check", "tar", "-a", arch, str(tar))
    assert proc.returncode == 1
    assert f"  ✗ {absent}: registered to {arch} but MISSING from the tar file" in proc.stderr
    assert f"{exported(elsewhere)} -> not registered to {arch}" in proc.stderr
    assert f"Missing from the tar file: 1; not registered to {arch}: 1" in proc.stderr


def test_check_tar_status_equals_nbank(django_backend: Backend) -> None:
    """nbankctl and nbank agree on a good tar (0) and on one with a corrupt member (1)."""
    backend = django_backend
    good = backend.resource(backend.blob("good"), None)
    bad = backend.resource(backend.blob("right"), None)
    clean = make_tar(backend.tmp / "c.tar", [(exported(good), backend.blob("good"))])
    corrupt = make_tar(backend.tmp / "x.tar", [(exported(bad), backend.blob("wrong"))])
    for tar, status in ((clean, 0), (corrupt, 1)):
        ours = backend.ctl("check", "tar", str(tar))
        theirs = backend.nbank("check", "tar", str(tar))
        assert ours.returncode == theirs.returncode == status, theirs.stderr


def test_check_registry_unreachable_exits_3(tmp_path: Path) -> None:
    """check registry against a registry nobody answers at exits 3 naming its URL."""
    url = "http://127.0.0.1:9/neurobank/"
    env = base_env(tmp_path / "home")
    env["NBANKD_CONFIG"] = str(tmp_path / "none.yaml")
    proc = subprocess.run(
        [NBANKCTL, "-r", url, "check", "registry"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3 and url in proc.stderr


def test_check_tar_reads_standard_input(backend: Backend) -> None:
    """check tar - reads the tar from standard input and checks its members."""
    good = backend.resource(backend.blob("piped"), None)
    tar = make_tar(backend.tmp / "p.tar", [(exported(good), backend.blob("piped"))])
    proc = subprocess.run(
        [NBANKCTL, *backend.before, "--json", "check", "tar", "-"],
        env=backend.env,
        input=tar.read_bytes(),
        capture_output=True,
        timeout=120,
    )
    doc = json.loads(proc.stdout)
    assert proc.returncode == 0, proc.stderr
    assert [(m["id"], m["status"]) for m in doc["members"]] == [(good, "ok")]


def test_check_archive_verbose_lists_each_resource_in_nbanks_words(backend: Backend) -> None:
    """-v lists every resource checked as nbank does: "OK", or "OK (hash not checked)"
    with --no-hash."""
    archive, arch = backend.archive()
    name = backend.resource(backend.blob("v"), arch)
    path = store(archive, name, backend.blob("v"))
    hashed = backend.ctl("check", "archive", "-v", str(archive.path))
    assert hashed.returncode == 0 and f" - {name} : {path} - OK\n" in hashed.stderr
    quick = backend.ctl("check", "archive", "-v", "--no-hash", str(archive.path))
    assert quick.returncode == 0 and f" - {name} : {path} - OK (hash not checked)" in quick.stderr
