"""A tar holding a resource twice (``tar -r`` appended a second copy, or two member
names standing for one identifier): tape import, asked for that resource, restores the
copy tape register checked and keyed, not merely the first it meets."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, make_backend, make_tar, store


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _pruned_to_tape(
    b: Backend, members: list[tuple[str, bytes | None]], data: bytes
) -> tuple[str, Path]:
    """A resource stored locally, registered on a tape whose tar holds ``members``,
    then pruned locally; returns its id and the tar."""
    archive, arch = b.archive("src")
    id = b.resource(data, arch)
    path = store(archive, id, data)
    tar = make_tar(b.tmp / "t.tar", [(name.format(id=id), body) for name, body in members])
    tape = b.name("TAPE")
    b.ctl("tape", "register", tape, "0", str(tar))
    proc = b.ctl("tape", "prune", arch, "-", input=id + "\n")
    assert proc.returncode == 0 and not path.exists(), proc.stderr
    return id, tar


@pytest.mark.parametrize(
    "first", ["{id}.dat", "{id}.wav", "older/{id}.dat"], ids=["same-name", "other-ext", "other-dir"]
)
def test_import_by_id_reaches_the_checked_copy_behind_a_damaged_one(
    embedded: Backend, first: str
) -> None:
    """Asked for one resource, tape import passes a member of it whose SHA-1 does not
    match and restores the later one that does (the copy prune trusted)."""
    data = embedded.blob("good")
    id, tar = _pruned_to_tape(embedded, [(first, b"damaged"), ("{id}.dat", data)], data)
    dest, _ = embedded.archive("dest")
    proc = embedded.ctl("tape", "import", str(tar), str(dest.path), id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data
    assert "does not match" in proc.stderr, proc.stderr


def test_import_by_id_fails_when_no_copy_matches(embedded: Backend) -> None:
    """Every member of the resource damaged: import by id fails once per member, says
    none matched, stores nothing and exits 1 (not reported missing from the tar)."""
    _, arch = embedded.archive("src")
    id = embedded.resource(embedded.blob("good"), arch)
    tar = make_tar(embedded.tmp / "t.tar", [(f"{id}.dat", b"bad 1"), (f"{id}.dat", b"bad 2")])
    dest, _ = embedded.archive("dest")
    proc = embedded.ctl("tape", "import", str(tar), str(dest.path), id)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert dest.stored_path(id) is None
    assert proc.stderr.count("does not match") == 2, proc.stderr
    assert "not in tar file" not in proc.stderr, proc.stderr


def test_full_import_notes_the_damaged_copy_it_passed_over(embedded: Backend) -> None:
    """Importing the whole tar, a damaged member followed by a good one of the same
    resource: the good one is stored, the damaged one noted as passed over, exit 0."""
    _, arch = embedded.archive("src")
    data = embedded.blob("good")
    id = embedded.resource(data, arch)
    tar = make_tar(embedded.tmp / "t.tar", [(f"{id}.dat", b"damaged"), (f"{id}.dat", data)])
    dest, _ = embedded.archive("dest")
    proc = embedded.ctl("tape", "import", "--json", str(tar), str(dest.path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stored = dest.stored_path(id)
    assert stored is not None and stored.read_bytes() == data
    assert '"passed-over"' in proc.stdout and "taken instead" in proc.stdout, proc.stdout


def test_a_dry_run_by_id_checks_past_a_damaged_copy(embedded: Backend) -> None:
    """A dry run asked for one resource says the later, matching member checks OK and
    writes nothing."""
    _, arch = embedded.archive("src")
    data = embedded.blob("good")
    id = embedded.resource(data, arch)
    tar = make_tar(embedded.tmp / "t.tar", [(f"{id}.dat", b"damaged"), (f"{id}.dat", data)])
    dest, _ = embedded.archive("dest")
    proc = embedded.ctl("tape", "import", "--dry-run", str(tar), str(dest.path), id)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "checks OK" in proc.stderr and dest.stored_path(id) is None, proc.stderr
