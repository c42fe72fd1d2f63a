"""nbankctl copy: resources copied into another archive on this host and located there,
against both registry backends, and side by side with the real nbank 0.13."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import subprocess
from pathlib import Path

from fixtures.cli_backends import NBANKCTL, Backend, store
from fixtures.django_server import DjangoServer
from fixtures.fault_proxy import FaultProxy
from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive
from nbankd.hashing import directory_hash
from nbankd.registry.http import HttpRegistry
from nbankd.transfer import receive

#: a refusal as the server words one: a 400 with field errors
REFUSED = {"archive": ["This archive may not locate this resource."]}


def setup(
    backend: Backend, labels: tuple[str, ...] = ("a",)
) -> tuple[str, list[str], Archive, str]:
    """A source archive with one stored resource per label, and an empty destination."""
    src, src_name = backend.archive("src")
    ids = []
    for label in labels:
        data = backend.blob(label)
        ids.append(backend.resource(data, src_name))
        store(src, ids[-1], data)
    dest, dest_name = backend.archive("dest")
    return src_name, ids, dest, dest_name


def stored(archive: Archive) -> dict[str, tuple[int, bytes]]:
    """Every stored file under resources/: relative path -> (mode, bytes)."""
    out = {}
    for p in sorted(archive.resources_dir.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(archive.resources_dir))] = (
                stat.S_IMODE(p.stat().st_mode),
                p.read_bytes(),
            )
    return out


def located(backend: Backend, id: str, archive: str) -> bool:
    return archive in backend.registry.get_resource(id).locations  # type: ignore[union-attr]


def test_copy_stores_with_policy_and_locates(backend: Backend) -> None:
    """copy stores each resource read-only under resources/<stub>/ and adds its location."""
    _, ids, dest, dest_name = setup(backend, ("a", "b"))
    proc = backend.ctl("copy", str(dest.path), *ids)
    assert proc.returncode == 0, proc.stderr
    for id, label in zip(ids, ("a", "b"), strict=True):
        path = dest.resources_dir / id[:2] / f"{id}.dat"
        assert path.read_bytes() == backend.blob(label)
        assert stat.S_IMODE(path.stat().st_mode) == 0o444
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o2775
        assert located(backend, id, dest_name)
    assert f"{ids[0]} -> {dest.resources_dir / ids[0][:2] / ids[0]}.dat" in proc.stderr
    assert "copied: 2" in proc.stderr and os.listdir(dest.staging_dir) == []
    assert backend.ctl("archive", "check", "-H", str(dest.path)).returncode == 0


def test_copy_as_another_user_than_the_archive_owner_is_refused(backend: Backend) -> None:
    """A destination whose access.user is someone else refuses the copy (exit 2), naming
    the user; nothing is stored or located."""
    _, ids, dest, dest_name = setup(backend, ("a",))
    config = json.loads(dest.config_path.read_text())
    config["policy"]["access"]["user"] = "nobody"
    dest.config_path.write_text(json.dumps(config))
    proc = backend.ctl("copy", str(dest.path), *ids)
    assert proc.returncode == 2
    assert "'nobody'" in proc.stderr
    assert not located(backend, ids[0], dest_name)
    assert not any(dest.resources_dir.iterdir())


def test_copy_matches_nbank_copy(django_backend: Backend) -> None:
    """nbankctl copy and nbank copy store the same files with the same modes; nbank's check
    passes on ours."""
    backend = django_backend
    _, ids, dest, _ = setup(backend, ("a", "b"))
    theirs, _ = backend.archive("theirs")
    real = backend.nbank("copy", str(theirs.path), *ids)
    mine = backend.ctl("copy", str(dest.path), *ids)
    assert (mine.returncode, real.returncode) == (0, 0), mine.stderr + real.stderr
    assert stored(dest) == stored(theirs)
    check = backend.nbank("archive", "check", str(dest.path))
    assert check.returncode == 0, check.stderr


def test_copy_folder_resource(backend: Backend) -> None:
    """A folder resource is copied as a tree, its hash checked, into an archive allowing folders."""
    src, src_name = backend.archive("src")
    id = backend.name("d")
    root = src.resources_dir / id[:2] / id
    (root / "sub").mkdir(parents=True)
    (root / "x.txt").write_bytes(backend.blob("x"))
    (root / "sub" / "y").write_bytes(backend.blob("y"))
    backend.registry.add_resource(
        dtype=backend.dtype, archive=src_name, name=id, sha1=directory_hash(root)
    )
    dest = create_archive(backend.tmp / "dirs", backend.registry.url, allow_directories=True)
    dest_name = backend.name("dirs")
    backend.registry.add_archive(dest_name, "neurobank", str(dest.path))
    proc = backend.ctl("copy", str(dest.path), id)
    assert proc.returncode == 0, proc.stderr
    copy = dest.resources_dir / id[:2] / id
    assert (copy / "sub" / "y").read_bytes() == backend.blob("y")
    assert directory_hash(copy) == directory_hash(root) and located(backend, id, dest_name)


def test_copy_refuses_damaged_source(backend: Backend) -> None:
    """A source whose bytes differ from the registry is not copied, located or left in staging."""
    _, ids, dest, dest_name = setup(backend)
    path = next((backend.tmp).glob(f"src-*/resources/{ids[0][:2]}/{ids[0]}.dat"))
    path.chmod(0o644)
    path.write_bytes(b"flipped")
    proc = backend.ctl("copy", str(dest.path), ids[0])
    assert proc.returncode == 1 and "does not match the registered" in proc.stderr
    assert stored(dest) == {} and os.listdir(dest.staging_dir) == []
    assert not located(backend, ids[0], dest_name)


def test_copy_again_skips_located(backend: Backend) -> None:
    """A second copy skips what the destination already holds and exits 0."""
    _, ids, dest, dest_name = setup(backend)
    assert backend.ctl("copy", str(dest.path), ids[0]).returncode == 0
    proc = backend.ctl("copy", str(dest.path), ids[0])
    assert proc.returncode == 0 and f"{ids[0]} -> already in the destination archive" in proc.stderr
    assert [loc.archive_name for loc in backend.registry.get_locations(ids[0])].count(
        dest_name
    ) == 1


def test_copy_onto_identical_unregistered_copy_locates_it(backend: Backend) -> None:
    """An identical copy already stored (a deposit's, or an unregistered earlier run) is kept
    as it is and located."""
    _, ids, dest, dest_name = setup(backend)
    there = store(dest, ids[0], backend.blob("a"))
    inode = there.stat().st_ino
    proc = backend.ctl("copy", str(dest.path), ids[0])
    assert proc.returncode == 0, proc.stderr
    assert there.stat().st_ino == inode and located(backend, ids[0], dest_name)


def test_copy_never_replaces_different_stored_file(backend: Backend) -> None:
    """A different file stored under the identifier in the destination is kept; exit 1."""
    _, ids, dest, dest_name = setup(backend)
    there = store(dest, ids[0], b"someone else's bytes")
    proc = backend.ctl("copy", str(dest.path), ids[0])
    assert proc.returncode == 1 and "already holds different contents" in proc.stderr
    assert there.read_bytes() == b"someone else's bytes" and os.listdir(dest.staging_dir) == []
    assert not located(backend, ids[0], dest_name)


def test_copy_dry_run_changes_nothing(backend: Backend) -> None:
    """copy -y reads and checks, and changes neither the archive nor the registry."""
    _, ids, dest, dest_name = setup(backend)
    proc = backend.ctl("copy", "-y", str(dest.path), ids[0])
    assert proc.returncode == 0 and f"{ids[0]} -> OK" in proc.stderr and "checked: 1" in proc.stderr
    assert stored(dest) == {} and not located(backend, ids[0], dest_name)


def test_copy_usage_errors_exit_2(backend: Backend) -> None:
    """A DEST that is no archive, or -a naming the destination itself, exit 2."""
    _, ids, dest, dest_name = setup(backend)
    plain = backend.tmp / "plain"
    plain.mkdir()
    proc = backend.ctl("copy", str(plain), ids[0])
    assert proc.returncode == 2 and str(plain) in proc.stderr
    proc = backend.ctl("copy", "-a", dest_name, str(dest.path), ids[0])
    assert proc.returncode == 2 and "the same" in proc.stderr
    if backend.url is not None:
        assert backend.nbank("copy", str(plain), ids[0]).returncode == 1


def test_copy_unreachable_registry_exits_3(backend: Backend) -> None:
    """With the registry out of reach copy exits 3 and stores nothing."""
    _, ids, dest, _ = setup(backend)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = f"http://127.0.0.1:{port}/neurobank/"
    proc = backend.ctl("-r", unreachable, "copy", str(dest.path), ids[0])  # the last -r wins
    assert proc.returncode == 3 and "unreachable" in proc.stderr
    assert stored(dest) == {}


def test_copy_json_lines(backend: Backend) -> None:
    """--json prints one line per resource and a summary on stdout, nothing on stderr."""
    _, ids, dest, dest_name = setup(backend)
    proc = backend.ctl("copy", "--json", str(dest.path), ids[0], "nosuchid")
    assert proc.returncode == 1 and proc.stderr == ""
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    by_id = {line.get("id"): line for line in lines}
    assert by_id["nosuchid"]["status"] == "failed"
    assert by_id[ids[0]]["status"] == "copied" and Path(by_id[ids[0]]["path"]).is_file()
    assert lines[-1]["summary"]["failed"] == 1 and lines[-1]["archive"] == dest_name


def test_two_concurrent_copies_store_and_locate_once(backend: Backend) -> None:
    """Two copies of the same resources into one archive at once both succeed: one stored
    file each, one location each."""
    _, ids, dest, dest_name = setup(backend, ("a", "b", "c"))
    argv = [NBANKCTL, *backend.before, "copy", str(dest.path), *ids]
    procs = [
        subprocess.Popen(
            argv, env=backend.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(stored(dest)) == sorted(f"{id[:2]}/{id}.dat" for id in ids)
    for id in ids:
        names = [loc.archive_name for loc in backend.registry.get_locations(id)]
        assert names.count(dest_name) == 1
    assert os.listdir(dest.staging_dir) == []


def test_a_refused_location_the_registry_already_lists_keeps_the_copy(
    django_backend: Backend, django_registry: DjangoServer, fault_proxy: FaultProxy
) -> None:
    """A copy whose location POST is refused while the registry already lists this
    archive (a concurrent run located it between this run's check and its POST) keeps
    the stored file: the registry never points at a copy this run removed."""
    _, ids, dest, dest_name = setup(django_backend, ("a",))
    [id] = ids
    data = django_backend.blob("a")
    source = dest.path.parent / "source.dat"
    source.write_bytes(data)
    copied = receive.copy_resource(dest, source, id, hashlib.sha1(data).hexdigest())
    assert copied.created
    django_backend.registry.add_location(id, dest_name)  # the concurrent run's location
    where = f"/resources/{id}/locations/"
    fault_proxy.inject("error500", methods={"POST"}, path_contains=where, status=400, body=REFUSED)
    with HttpRegistry(fault_proxy.url, django_registry.auth) as proxied:
        receive.register_copy(proxied, dest, copied, id, dest_name)
    assert fault_proxy.count("error500") == 1
    assert stored(dest) == {f"{id[:2]}/{id}.dat": (0o444, data)}
    assert located(django_backend, id, dest_name)


def test_copy_reads_ids_from_a_file(backend: Backend) -> None:
    """copy -f FILE copies the ids listed one a line (blank lines skipped), with those
    of the command line, each once."""
    _, ids, dest, dest_name = setup(backend, ("a", "b", "c"))
    listing = backend.tmp / "ids.txt"
    listing.write_text(f"{ids[0]}\n\n{ids[1]}\n{ids[0]}\n")
    proc = backend.ctl("copy", "-f", str(listing), str(dest.path), ids[2])
    assert proc.returncode == 0, proc.stderr
    assert "Resources requested: 3" in proc.stderr
    assert sorted(stored(dest)) == sorted(f"{id[:2]}/{id}.dat" for id in ids)
    assert all(located(backend, id, dest_name) for id in ids)
