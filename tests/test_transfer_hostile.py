"""Hostile review of the transfer code (nbankctl fetch / export / copy): odd names,
odd timestamps, full disks and one folder registered as two archives.
The full-disk and bind-mount tests need root (a private mount namespace).

Each test not marked as a guard was a defect the review found (fixed since), and
names the behaviour expected. Only the embedded registry is used: the defects
are in nbankctl's own code, not in a backend."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, store
from fixtures.mountns import MountNamespace
from nbankd.hashing import directory_hash
from nbankd.registry.base import ResourceRecord
from nbankd.transfer.fetching import target_path
from nbankd.transfer.sources import Source

_AFTER_2107 = 7258118400  # 2200-01-01: later than any zip (MS-DOS) timestamp


@pytest.fixture
def emb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The embedded registry with a fresh datatype, as nbankctl sees it."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def partials(folder: Path) -> list[str]:
    return [n for n in os.listdir(folder) if n.endswith(".partial")]


# --- export ---------------------------------------------------------------------------


def test_zip_export_with_a_file_dated_after_2107_keeps_the_other_resources(emb: Backend) -> None:
    """A file dated after 2107 (a rig with a bad clock) is clamped or fails alone: the zip
    holds the other resources, and no traceback (the tar of the same ids works)."""
    archive, arch = emb.archive()
    data = emb.blob("plain")
    plain = emb.resource(data, arch)
    store(archive, plain, data)
    folder = emb.name("d")
    root = archive.resources_dir / folder[:2] / folder
    root.mkdir(parents=True)
    (root / "late.txt").write_bytes(emb.blob("late"))
    os.utime(root / "late.txt", (_AFTER_2107, _AFTER_2107))
    emb.registry.add_resource(dtype=emb.dtype, archive=arch, name=folder, sha1=directory_hash(root))
    out = emb.tmp / "out.zip"
    proc = emb.ctl("export", "--json", str(out), plain, folder)
    assert "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert out.exists(), "the resource that could be written was not exported"
    assert partials(emb.tmp) == []


def test_folder_export_on_a_full_disk_does_not_say_nothing_was_exported(
    emb: Backend, mount_ns: MountNamespace
) -> None:
    """A folder export filling its disk fails the resource that did not fit; it does
    not claim 'nothing was exported' while the resources written before are in OUT."""
    archive, arch = emb.archive()
    small, big = b"small resource", os.urandom(3 << 20)
    ids = [emb.resource(small, arch), emb.resource(big, arch)]
    store(archive, ids[0], small)
    store(archive, ids[1], big)
    disk = emb.tmp / "disk"
    disk.mkdir()
    mount_ns.mount_tmpfs(disk, "1m")
    out = disk / "out"
    proc = mount_ns_ctl(mount_ns, emb, "export", str(out), *ids)
    seen = mount_ns.view(out)
    assert (seen / f"{ids[0]}.dat").read_bytes() == small  # published before the disk filled
    assert not (seen / f"{ids[1]}.dat").exists() and partials(seen) == []
    assert proc.returncode == 1, proc.stderr
    assert "nothing was exported" not in proc.stderr, proc.stderr
    assert "exported: 1" in proc.stderr, proc.stderr


def mount_ns_ctl(ns: MountNamespace, b: Backend, *argv: str) -> subprocess.CompletedProcess[str]:
    """Runs ``nbankctl ARGV`` inside the mount namespace."""
    return subprocess.run(
        [*ns.enter, NBANKCTL, *b.before, *argv],
        env=b.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# --- fetch ----------------------------------------------------------------------------


def test_fetch_of_a_name_too_long_fails_that_id_and_fetches_the_others(emb: Backend) -> None:
    """An id whose target name is longer than the filesystem allows fails alone (exit 1,
    a message, no traceback); the other ids of the command are still fetched."""
    archive, arch = emb.archive()
    long_data, data = emb.blob("long"), emb.blob("short")
    short_id = emb.resource(data, arch)
    store(archive, short_id, data)
    longer = emb.resource(long_data + b"2", arch, name="M" * 253)
    store(archive, longer, long_data + b"2", ext="")  # 253 + ".wav" > 255
    dest = emb.tmp / "dest"
    dest.mkdir()
    proc = emb.ctl("fetch", "-e", "wav", "-d", str(dest), longer, short_id)
    assert "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert proc.returncode == 1
    assert (dest / f"{short_id}.wav").read_bytes() == data
    assert partials(dest) == []


@pytest.mark.parametrize("filename", ["../x", "a/b", "/etc/x", "..", "."])
def test_fetch_never_targets_a_path_a_registered_file_name_leads_to(
    tmp_path: Path, filename: str
) -> None:
    """A registry answering a file name that is not a plain name (``../x``) gets no
    target outside DEST: the id fails alone."""
    record = ResourceRecord(name="x", sha1=None, dtype="d", filename=filename)
    with pytest.raises(ValueError, match="not a plain file name"):
        target_path(tmp_path, Source("x", record), None)


def test_fetch_with_an_extension_holding_a_slash_is_a_usage_error(emb: Backend) -> None:
    """-e with a '/' (not a suffix) is refused as a usage error (exit 2), no traceback."""
    archive, arch = emb.archive()
    data = emb.blob("x")
    id = emb.resource(data, arch)
    store(archive, id, data)
    dest = emb.tmp / "dest"
    dest.mkdir()
    proc = emb.ctl("fetch", "-e", "a/b", "-d", str(dest), id)
    assert "Traceback" not in proc.stderr, proc.stderr[-800:]
    assert proc.returncode == 2 and os.listdir(dest) == []


def test_fetch_of_an_unhashed_resource_says_it_was_not_checked(emb: Backend) -> None:
    """fetch --json of a resource with no registered SHA-1 says verified: false (export
    and copy say '(no registered hash to check)'); README promises every file checked."""
    archive, arch = emb.archive()
    data = emb.blob("u")
    id = emb.resource(data, arch, hashed=False)
    store(archive, id, data)
    dest = emb.tmp / "dest"
    dest.mkdir()
    proc = emb.ctl("fetch", "--json", "-d", str(dest), id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [line] = map(json.loads, proc.stdout.splitlines())
    assert line.get("verified") is False, line


def test_guard_fetch_force_replaces_a_symlink_not_what_it_points_to(emb: Backend) -> None:
    """Guard (passes): fetch -f over a target that is a symbolic link replaces the link
    itself; the file it pointed to, outside DEST, is untouched."""
    archive, arch = emb.archive()
    data = emb.blob("s")
    id = emb.resource(data, arch)
    store(archive, id, data)
    dest, elsewhere = emb.tmp / "dest", emb.tmp / "precious"
    dest.mkdir()
    elsewhere.write_bytes(b"not to be overwritten")
    (dest / id).symlink_to(elsewhere)
    assert emb.ctl("fetch", "-d", str(dest), id).returncode == 1  # kept without -f
    proc = emb.ctl("fetch", "-f", "-d", str(dest), id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elsewhere.read_bytes() == b"not to be overwritten"
    assert not (dest / id).is_symlink() and (dest / id).read_bytes() == data


# --- copy -----------------------------------------------------------------------------


def test_copy_into_the_same_folder_registered_under_another_root_is_refused(
    emb: Backend, mount_ns: MountNamespace
) -> None:
    """copy into an archive that is the source's own folder (registered again under
    another root: the same NAS mounted at two paths, here a bind mount) is refused: the
    registry must not list a second location for a single stored file."""
    src, src_name = emb.archive("src")
    data = emb.blob("one")
    id = emb.resource(data, src_name)
    stored = store(src, id, data)
    alias = emb.tmp / "alias"
    alias.mkdir()
    mount_ns.run("mount", "--bind", src.path, alias)
    alias_name = emb.name("al")
    emb.registry.add_archive(alias_name, "neurobank", str(alias))
    proc = mount_ns_ctl(mount_ns, emb, "copy", str(alias), id)
    record = emb.registry.get_resource(id)
    assert record is not None
    assert alias_name not in record.locations, (
        f"the registry now lists two copies ({record.locations}) of the one file {stored}; "
        f"exit {proc.returncode}: {proc.stderr}"
    )
    assert proc.returncode != 0
