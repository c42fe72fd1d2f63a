"""A tar is read to its end or the tape commands say where they stopped: a damaged
header in the middle (tarfile takes it for the end) fails ``tape register``, ``tape
import`` and ``check tar``; the blocks of zeros that end a tar, however many, do not."""

from __future__ import annotations

import bz2
import gzip
import lzma
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, make_tar
from nbankd.tape import open_tar


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _two_members(path: Path) -> Path:
    return make_tar(path, [("r1.dat", b"first"), ("r2.dat", b"second")])


def _damaged(path: Path) -> Path:
    """The tar at ``path`` (two one-block members) with the second one's header
    overwritten, as a bad tape block would."""
    raw = bytearray(path.read_bytes())
    raw[1024 : 1024 + 100] = b"\xff" * 100
    path.write_bytes(bytes(raw))
    return path


def _names(path: str | Path) -> list[str]:
    """The members open_tar gives, read to the end."""
    names = []
    with open_tar(path) as tar:
        while (member := tar.next()) is not None:
            names.append(member.name)
    return names


def _registered_damaged_tar(b: Backend) -> tuple[Path, list[str]]:
    _, arch = b.archive("src")
    ids = [b.resource(d, arch) for d in (b"first", b"second")]
    tar = make_tar(b.tmp / "t.tar", [(f"{ids[0]}.dat", b"first"), (f"{ids[1]}.dat", b"second")])
    return _damaged(tar), ids


def test_register_fails_a_tar_with_a_damaged_header_in_the_middle(embedded: Backend) -> None:
    """tape register keys the member read before the damage, names the offset, exits 1."""
    tar, ids = _registered_damaged_tar(embedded)
    proc = embedded.ctl("tape", "register", embedded.name("TAPE"), "0", str(tar))
    assert proc.returncode == 1 and "unreadable from offset 1024" in proc.stderr, proc.stderr
    assert f"{ids[0]}.dat" in proc.stderr and f"{ids[1]}.dat" not in proc.stderr


def test_import_fails_a_tar_with_a_damaged_header_in_the_middle(embedded: Backend) -> None:
    """A whole-tar import stops at a damaged header with exit 1, naming the offset."""
    tar, _ = _registered_damaged_tar(embedded)
    dest, _ = embedded.archive("dest")
    proc = embedded.ctl("tape", "import", "--dry-run", str(tar), str(dest.path))
    assert proc.returncode == 1 and "unreadable from offset 1024" in proc.stderr, proc.stderr


def test_check_tar_fails_a_damaged_gzip_tar_read_from_standard_input(embedded: Backend) -> None:
    """The end is checked on the uncompressed bytes of a gzip tar read from a pipe."""
    compressed = gzip.compress(_damaged(_two_members(embedded.tmp / "t.tar")).read_bytes())
    proc = subprocess.run(
        [NBANKCTL, *embedded.before, "check", "tar", "-"],
        env=embedded.env, input=compressed, capture_output=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and b"unreadable from offset 1024" in proc.stderr, proc.stderr


def test_two_tars_written_one_after_another_are_not_taken_for_the_first(tmp_path: Path) -> None:
    """Members after the first tar's end blocks (cat a.tar b.tar) are not silently ignored."""
    one = _two_members(tmp_path / "one.tar").read_bytes()
    (tmp_path / "cat.tar").write_bytes(one + one)
    with pytest.raises(tarfile.ReadError, match=f"unreadable from offset {len(one)}"):
        _names(tmp_path / "cat.tar")


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz"])
def test_a_tar_padded_with_zeros_is_read_to_its_end(tmp_path: Path, suffix: str) -> None:
    """Zero blocks after the end of a tar (a tape's block size), compressed or not, are its end."""
    plain = _two_members(tmp_path / "t.tar").read_bytes() + bytes(1 << 20)
    path = tmp_path / f"p.tar{suffix}"
    opener = {"": open, ".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    with opener(path, "wb") as out:
        out.write(plain)
    assert _names(path) == ["r1.dat", "r2.dat"]
