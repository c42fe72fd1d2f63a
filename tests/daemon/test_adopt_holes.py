"""Holes left in the check of archives over a lost ``state_dir``
(:mod:`nbankd.daemon.late_archives`) and in the folder hash adoption and verification
share (:func:`nbankd.archive.verify.hash_folder`).

Findings, all fixed: a folder resource about a thousand levels deep hit
RecursionError when hashed."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath

import pytest

from nbankd.archive import verify
from nbankd.daemon import adopt_read


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


# --- a deep folder resource -----------------------------------------------------------


def reference_hash(top: Path) -> str:
    """neurobank's directory hash of ``top``, computed here independently: the regular
    files under it (links, FIFOs left out), as "relpath=sha1" lines sorted by path parts."""
    lines: list[tuple[tuple[str, ...], str]] = []
    stack = [top]
    while stack:
        folder = stack.pop()
        for entry in folder.iterdir():
            if entry.is_symlink():
                continue
            if entry.is_dir():
                stack.append(entry)
            elif entry.is_file():
                rel = PurePosixPath(entry.relative_to(top).as_posix())
                lines.append((rel.parts, f"{rel}={sha1(entry.read_bytes())}"))
    text = "\n".join(line for _parts, line in sorted(lines))
    return sha1(text.encode())


def _flat(top: Path) -> None:
    for i in range(5):
        (top / f"f{i}.bin").write_bytes(bytes([i]) * (i * 100))


def _nested(top: Path) -> None:
    (top / "a" / "b" / "c").mkdir(parents=True)
    (top / "a" / "x").mkdir()
    (top / "a-b").mkdir()
    (top / "empty").mkdir()
    for rel in ("top.txt", "a/one", "a/b/two", "a/b/c/three", "a/x/four", "a-b/five", "a.b"):
        (top / rel).write_bytes(rel.encode() * 3)
    (top / "a" / "b" / "zero").write_bytes(b"")


def _odd(top: Path) -> None:
    (top / "sub").mkdir()
    (top / "sub" / "é ü.dat").write_bytes(b"accents")
    (top / "sub" / "data").write_bytes(b"data")
    (top / "link-to-folder").symlink_to(top / "sub")
    (top / "dangling").symlink_to(top / "nothing")
    os.mkfifo(top / "sub" / "fifo")


TREES = {"flat": _flat, "nested": _nested, "odd": _odd}


@pytest.mark.parametrize("shape", sorted(TREES))
def test_folder_hash_matches_an_independent_reference(tmp_path: Path, shape: str) -> None:
    """The folder hash of verification and adoption is neurobank's, for flat, nested
    and odd trees (a link to a folder, a dangling link and a FIFO left out)."""
    top = tmp_path / "res"
    top.mkdir()
    TREES[shape](top)
    want = reference_hash(top)
    assert verify.stored_sha1(top) == want
    assert adopt_read.stored_sha1(top) == want


def test_a_folder_a_thousand_levels_deep_is_hashed(tmp_path: Path) -> None:
    """A folder resource 1200 levels deep is hashed (no RecursionError), by
    verification and by adoption, to neurobank's hash."""
    top = tmp_path / "deep"
    folder = top
    for level in range(1200):
        folder.mkdir()
        (folder / f"f{level % 7}").write_bytes(str(level).encode())
        folder = folder / "d"
    lines = sorted(
        (("d",) * n + (f"f{n % 7}",), f"{'d/' * n}f{n % 7}={sha1(str(n).encode())}")
        for n in range(1200)
    )
    want = sha1("\n".join(line for _parts, line in lines).encode())
    try:
        assert reference_hash(top) == want
        assert verify.stored_sha1(top) == want
        assert adopt_read.stored_sha1(top) == want
    finally:  # bottom up: shutil.rmtree recurses too
        while folder != top:
            folder = folder.parent
            for f in folder.iterdir():
                if f.is_dir():
                    f.rmdir()
                else:
                    f.unlink()
