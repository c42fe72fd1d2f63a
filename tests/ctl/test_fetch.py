"""nbankctl fetch: resources fetched into a folder from a stored copy on this host (both
registry backends) or downloaded from django-neurobank's download location, side by side
with the real nbank 0.13."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, store
from fixtures.django_server import DjangoServer


def downloadable(server: DjangoServer, dtype: str, extension: str = "wav") -> None:
    """Marks a datatype downloadable on the server (it then lists a `registry` location)."""
    server.manage(
        "shell",
        "-c",
        "from nbank_registry.models import DataType; "
        f"DataType.objects.filter(name={dtype!r})"
        f".update(downloadable=True, extension={extension!r})",
    )


def remote(backend: Backend, labels: tuple[str, ...]) -> tuple[Path, list[str]]:
    """Resources stored where only the server reads them: a registered archive folder
    that is no archive for this host (no nbank.json), as one on another machine."""
    root = backend.tmp / backend.name("far")
    name = backend.name("far")
    backend.registry.add_archive(name, "neurobank", str(root))
    ids = []
    for label in labels:
        data = backend.blob(label)
        id = backend.resource(data, name)
        (root / "resources" / id[:2]).mkdir(parents=True, exist_ok=True)
        (root / "resources" / id[:2] / id).write_bytes(data)
        ids.append(id)
    return root, ids


@pytest.fixture
def served(django_backend: Backend, django_registry: DjangoServer) -> Backend:
    """The django backend with its datatype downloadable as .wav."""
    downloadable(django_registry, django_backend.dtype)
    return django_backend


def dest(backend: Backend, name: str = "dest") -> Path:
    folder = backend.tmp / name
    folder.mkdir()
    return folder


def test_fetch_downloads_from_registry(served: Backend) -> None:
    """fetch downloads a resource of a downloadable datatype to DEST/<id>.wav."""
    _, ids = remote(served, ("a",))
    out = dest(served)
    proc = served.ctl("fetch", "-d", str(out), ids[0])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / f"{ids[0]}.wav").read_bytes() == served.blob("a")
    assert proc.stdout == f"{ids[0]:<20}\t-> {out / ids[0]}.wav\n"


def test_fetch_matches_nbank_fetch(served: Backend) -> None:
    """nbankctl fetch and nbank fetch write the same files and print the same lines."""
    _, ids = remote(served, ("a", "b"))
    ours, theirs = dest(served, "ours"), dest(served, "theirs")
    mine = served.ctl("fetch", "-d", str(ours), *ids)
    real = served.nbank("fetch", "-d", str(theirs), *ids)
    assert (mine.returncode, real.returncode) == (0, 0), mine.stdout + real.stderr
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs)) == sorted(f"{i}.wav" for i in ids)
    for name in os.listdir(ours):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes()
    assert sorted(mine.stdout.replace(str(ours), "D").splitlines()) == sorted(
        real.stdout.replace(str(theirs), "D").splitlines()
    )


def test_fetch_refuses_download_with_wrong_sha1(served: Backend) -> None:
    """A download whose bytes differ from the registered SHA-1 leaves nothing at DEST; exit 1."""
    root, ids = remote(served, ("a",))
    (root / "resources" / ids[0][:2] / ids[0]).write_bytes(b"damaged on the server")
    out = dest(served)
    proc = served.ctl("fetch", "-d", str(out), ids[0])
    assert proc.returncode == 1 and "does not match the registered" in proc.stdout
    assert os.listdir(out) == []


def test_fetch_copies_local_stored_copy(backend: Backend) -> None:
    """A resource stored in an archive on this host is fetched from there (either registry)."""
    archive, arch = backend.archive()
    data = backend.blob("local")
    id = backend.resource(data, arch)
    store(archive, id, data)
    out = dest(backend)
    proc = backend.ctl("fetch", "-d", str(out), id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / id).read_bytes() == data and os.listdir(out) == [id]


def test_fetch_damaged_local_copy_fails(backend: Backend) -> None:
    """A stored copy that no longer matches its SHA-1 is not fetched; exit 1, DEST empty."""
    archive, arch = backend.archive()
    id = backend.resource(backend.blob("x"), arch)
    store(archive, id, b"not the registered bytes")
    out = dest(backend)
    proc = backend.ctl("fetch", "-d", str(out), id)
    assert proc.returncode == 1 and "does not match the registered" in proc.stdout
    assert os.listdir(out) == []


def test_fetch_keeps_existing_target_unless_forced(backend: Backend) -> None:
    """An existing target is kept (exit 1) and replaced whole with -f."""
    archive, arch = backend.archive()
    data = backend.blob("f")
    id = backend.resource(data, arch)
    store(archive, id, data)
    out = dest(backend)
    (out / id).write_bytes(b"mine")
    proc = backend.ctl("fetch", "-d", str(out), id)
    assert proc.returncode == 1 and "already exists" in proc.stdout
    assert (out / id).read_bytes() == b"mine"
    assert backend.ctl("fetch", "-f", "-d", str(out), id).returncode == 0
    assert (out / id).read_bytes() == data and os.listdir(out) == [id]


def test_fetch_extension_option(backend: Backend) -> None:
    """-e EXT names the fetched file <id>.EXT."""
    archive, arch = backend.archive()
    data = backend.blob("e")
    id = backend.resource(data, arch)
    store(archive, id, data)
    out = dest(backend)
    assert backend.ctl("fetch", "-e", "bin", "-d", str(out), id).returncode == 0
    assert (out / f"{id}.bin").read_bytes() == data


def test_fetch_unknown_id_like_nbank(django_backend: Backend) -> None:
    """An unknown identifier prints '(no locations found)' and exits 1, as nbank does."""
    out = dest(django_backend)
    mine = django_backend.ctl("fetch", "-d", str(out), "nosuchid")
    real = django_backend.nbank("fetch", "-d", str(out), "nosuchid")
    assert (mine.returncode, real.returncode) == (1, 1)
    assert mine.stdout == real.stdout == f"{'nosuchid':<20}\t-> (no locations found)\n"


def test_fetch_without_reachable_location_fails(backend: Backend) -> None:
    """A resource whose only copy is in an archive not on this host fails and leaves DEST empty."""
    _, ids = remote(backend, ("far",))
    out = dest(backend)
    proc = backend.ctl("fetch", "-d", str(out), ids[0])
    assert proc.returncode == 1 and "no location this host can fetch from" in proc.stdout
    assert os.listdir(out) == []


def test_fetch_missing_dest_is_usage_error(backend: Backend) -> None:
    """-d naming no folder exits 2."""
    proc = backend.ctl("fetch", "-d", str(backend.tmp / "nope"), "x")
    assert proc.returncode == 2 and "nope" in proc.stderr


def test_fetch_json_lines(backend: Backend) -> None:
    """--json prints one JSON line per identifier on stdout."""
    archive, arch = backend.archive()
    data = backend.blob("j")
    id = backend.resource(data, arch)
    store(archive, id, data)
    out = dest(backend)
    proc = backend.ctl("fetch", "--json", "-d", str(out), id, "nosuchid")
    assert proc.returncode == 1
    lines = {d["id"]: d for d in map(json.loads, proc.stdout.splitlines())}
    assert lines[id] == {"id": id, "status": "fetched", "path": str(out / id), "verified": True}
    assert lines["nosuchid"]["status"] == "failed"
