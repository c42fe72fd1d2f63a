"""One rule for which tar members the tape commands accept (nbankd.tape.member_problem):
tape prune trusts no tape key naming a member tape import refuses (a location recorded
before tape register applied the rule), check tar fails every such member, and tape
register reads the tar before it creates the tape archive's record."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import Backend, make_backend, make_tar, store
from nbankd.tape import key_problem


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """nbankctl on a fresh embedded registry."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


@pytest.mark.parametrize("key", ["../{}.dat", "/{}.dat", "sub/../{}.dat", "a\x1b[2J/{}.dat"])
def test_prune_keeps_a_copy_whose_tape_key_names_a_member_import_refuses(
    embedded: Backend, key: str
) -> None:
    """A tape location keyed (before the rule) by a name tape import refuses is no
    second copy: prune keeps the file and its location, says why, exits 1."""
    archive, arch = embedded.archive()
    data = embedded.blob("old")
    id = embedded.resource(data, arch)
    path = store(archive, id, data)
    tape = embedded.name("TAPE")
    embedded.registry.add_archive(f"{tape}-3", "tape", f"{tape}:3", "offline")
    embedded.registry.add_location(id, f"{tape}-3", key=key.format(id))
    proc = embedded.ctl("tape", "prune", arch, "-", input=id + "\n")
    assert proc.returncode == 1, proc.stderr
    assert path.read_bytes() == data
    assert arch in embedded.registry.get_resource(id).locations  # type: ignore[union-attr]
    assert f"refused to delete {path}" in proc.stderr, proc.stderr
    assert "which tape import refuses" in proc.stderr, proc.stderr


def test_the_rule_judges_a_key_by_its_name() -> None:
    """key_problem: what tape import refuses by name alone, and nothing else."""
    for bad in ("../a.dat", "/a.dat", "a/../b.dat", "a\nb.dat", "\udcff.dat", ""):
        assert key_problem(bad) is not None, bad
    for good in ("a.dat", "resources/ab/abcd.wav", "take\u2028/x.dat", "dir"):
        assert key_problem(good) is None, good


def test_prune_still_trusts_a_plain_tape_key(embedded: Backend) -> None:
    """The rule refuses nothing tape register keys: a plain member name still counts."""
    archive, arch = embedded.archive()
    data = embedded.blob("plain")
    id = embedded.resource(data, arch)
    path = store(archive, id, data)
    tar = make_tar(embedded.tmp / "t.tar", [(f"resources/{id[:2]}/{id}.dat", data)])
    tape = embedded.name("TAPE")
    assert embedded.ctl("tape", "register", tape, "0", str(tar)).returncode == 0
    proc = embedded.ctl("tape", "prune", arch, "-", input=id + "\n")
    assert proc.returncode == 0, proc.stderr
    assert not path.exists()


def test_check_tar_fails_a_stray_link_and_a_folder_holding_a_refused_member(
    embedded: Backend,
) -> None:
    """A link that is no resource, and a folder resource holding a member named with a
    control character, both fail check tar (as tape import refuses them), exit 1."""
    files = {"a.txt": embedded.blob("fa"), "b\x1b.txt": embedded.blob("fb")}
    idd = embedded.resource(b"", None, name=embedded.name("d"))
    tar_path = embedded.tmp / "t.tar"
    with tarfile.open(tar_path, "w") as tar:
        top = tarfile.TarInfo(idd)
        top.type, top.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(top)
        for rel, data in files.items():
            info = tarfile.TarInfo(f"{idd}/{rel}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("notes")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    proc = embedded.ctl("check", "tar", str(tar_path))
    assert proc.returncode == 1, proc.stderr
    assert "✗ notes -> tape import refuses it: a symbolic link" in proc.stderr, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith(f"  ✗ {idd} -> ")]
    assert f"cannot hash it: it holds '{idd}/b" in line and "tape import refuses" in line


def test_tape_register_of_a_missing_tar_creates_no_tape_archive(embedded: Backend) -> None:
    """A tar that cannot be read is an error before anything is recorded: no archive."""
    tape = embedded.name("TAPE")
    proc = embedded.ctl("tape", "register", tape, "0", str(embedded.tmp / "missing.tar"))
    assert proc.returncode == 2, proc.stderr
    assert "cannot read tar file" in proc.stderr
    assert embedded.registry.get_archive(f"{tape}-0") is None
