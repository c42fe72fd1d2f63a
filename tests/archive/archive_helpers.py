"""Helpers shared by the archive tests (import as ``archive_helpers``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nbankd.archive.layout import Archive


def make_tree(root: Path) -> Path:
    """Writes a small nested tree whose names exercise neurobank's sort order."""
    files = {
        "a/b": b"one",
        "a-b": b"two",
        "a.b": b"three",
        "a/c/d.txt": b"four" * 1000,
        ".hidden": b"five",
        "Z": b"",
        "ü/ß.bin": os.urandom(5000),
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "empty" / "nested").mkdir(parents=True)
    return root


def staged_entries(archive: Archive) -> list[str]:
    """Names left in staging/."""
    return sorted(os.listdir(archive.staging_dir))


def resource_entries(archive: Archive) -> list[str]:
    """Every path below resources/, relative to it."""
    out = []
    for dirpath, dirnames, filenames in os.walk(archive.resources_dir):
        for name in dirnames + filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), archive.resources_dir))
    return sorted(out)


def record_calls(monkeypatch: pytest.MonkeyPatch, events: list[str]) -> None:
    """Notes every fsync (``fsync INODE``), link (``link NAME``) and unlink (``unlink
    NAME``) in ``events``, in order; each really happens."""
    real_fsync, real_link, real_unlink = os.fsync, os.link, os.unlink

    def fsync(fd: int) -> None:
        events.append(f"fsync {os.fstat(fd).st_ino}")
        real_fsync(fd)

    def link(src: str | Path, dst: str | Path, **kw: object) -> None:
        events.append(f"link {Path(dst).name}")
        real_link(src, dst, **kw)  # type: ignore[arg-type]

    def unlink(path: str | Path, **kw: object) -> None:
        events.append(f"unlink {Path(path).name}")
        real_unlink(path, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(os, "unlink", unlink)
