"""tape prune's two steps: it removes a copy's location, checks again that another copy
is listed and verified, and only then deletes the file. What happens when it stops,
fails or finds the second copy changed between the two (a crash, an unexpected error,
another command at the same time), and what a later prune makes of the copy a crash
leaves stored but unlisted."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, store
from fixtures.daemon import wait_for
from nbankd.archive.layout import Archive


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def two_copies(backend: Backend) -> tuple[str, Archive, str, Archive, str, bytes]:
    """A resource stored and located in archives A and B: its id, A and its name, B
    and its name, its bytes."""
    a, a_name = backend.archive("a")
    b, b_name = backend.archive("b")
    data = backend.blob("copy") * 100
    id = backend.resource(data, a_name)
    backend.registry.add_location(id, b_name)
    store(a, id, data)
    store(b, id, data)
    return id, a, a_name, b, b_name, data


def located(backend: Backend, id: str) -> set[str]:
    return {loc.archive_name for loc in backend.registry.get_locations(id)}


def prune(
    backend: Backend, archive: str, id: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NBANKCTL, *backend.before, "tape", "prune", archive, "-"],
        input=id + "\n",
        env=dict(backend.env, **(env or {})),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_prune_killed_after_removing_its_location_keeps_the_file(backend: Backend) -> None:
    """kill -9 between the location's removal and the file's deletion: the file stays
    whole (unlisted in A), and B's copy and location stay."""
    id, a, a_name, b, b_name, data = two_copies(backend)
    proc = prune(backend, a_name, id, {"NBANKD_CRASH_AT": "prune-location-removed"})
    assert proc.returncode == -9, proc.stderr
    assert a.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    assert b.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    assert located(backend, id) == {b_name}


def test_prune_skips_a_stored_copy_not_located_in_its_archive(embedded: Backend) -> None:
    """A copy stored in A but not located there (what a killed prune leaves) is never
    deleted by a later prune of A, which says how to list it again."""
    id, a, a_name, _b, b_name, data = two_copies(embedded)
    embedded.registry.remove_location(id, a_name)
    proc = prune(embedded, a_name, id)
    assert proc.returncode == 0, proc.stderr
    assert f"though stored at {a.stored_path(id)}" in proc.stderr, proc.stderr
    assert f"nbankctl check archive {a.path} --fix" in proc.stderr, proc.stderr
    assert a.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    assert located(embedded, id) == {b_name}


def test_an_error_after_removing_its_location_lists_the_copy_again(embedded: Backend) -> None:
    """An unexpected error between the two steps (as Ctrl-C would be): the copy is kept
    and located in A again."""
    id, a, a_name, _b, b_name, data = two_copies(embedded)
    proc = prune(embedded, a_name, id, {"NBANKD_RAISE_AT": "prune-location-removed"})
    assert proc.returncode == 1, proc.stderr  # nbankctl on an unexpected error
    assert a.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    assert located(embedded, id) == {a_name, b_name}


def prune_paused(backend: Backend, archive: str, id: str, meanwhile: Callable[[], None]) -> str:
    """Runs ``tape prune`` held once it has removed the copy's location, runs
    ``meanwhile`` there, lets it go on; returns its standard error and exit status."""
    until = backend.tmp / "go"
    env = {"NBANKD_PAUSE_AT": "prune-location-removed", "NBANKD_PAUSE_UNTIL": str(until)}
    proc = subprocess.Popen(
        [NBANKCTL, *backend.before, "tape", "prune", archive, "-"],
        env=dict(backend.env, **env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdin is not None and proc.stderr is not None
        proc.stdin.write(id + "\n")
        proc.stdin.close()
        wait_for(lambda: Path(f"{until}.reached").exists(), 60, "the location removed")
        meanwhile()
        until.touch()
        err = proc.stderr.read()
        return f"{proc.wait(timeout=120)}: {err}"
    finally:
        proc.kill()


def test_a_second_copy_damaged_after_the_first_check_keeps_the_copy(backend: Backend) -> None:
    """B's copy hashed good, then damaged once A's location is removed: the second check
    hashes it again, so A's copy is kept, located again, and the run exits 1."""
    id, a, a_name, b, b_name, data = two_copies(backend)
    theirs = b.stored_path(id)
    assert theirs is not None

    def damage() -> None:
        os.chmod(theirs, 0o644)
        theirs.write_bytes(b"X" + data[1:])

    result = prune_paused(backend, a_name, id, damage)
    assert result.startswith("1: "), result
    assert "does not match the registered SHA-1" in result and "kept" in result, result
    assert a.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    assert located(backend, id) == {a_name, b_name}


def test_a_copy_listed_again_by_another_command_meanwhile_is_kept(embedded: Backend) -> None:
    """Another command (``check archive --fix``) lists A's copy again while prune holds
    its location removed: prune keeps the copy, located once, and says why."""
    id, a, a_name, _b, b_name, data = two_copies(embedded)
    result = prune_paused(embedded, a_name, id, lambda: embedded.registry.add_location(id, a_name))
    assert result.startswith("1: "), result
    assert f"listed it in '{a_name}' again meanwhile" in result, result
    assert "again failed" not in result, result
    assert a.stored_path(id).read_bytes() == data  # type: ignore[union-attr]
    names = [loc.archive_name for loc in embedded.registry.get_locations(id)]
    assert sorted(names) == sorted([a_name, b_name])
