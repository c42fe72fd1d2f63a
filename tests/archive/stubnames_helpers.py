"""Helpers shared by the tests of nbankd.archive.stubnames (import as
``stubnames_helpers``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nbankd.archive.stubnames import StubNames


def listed(stub: Path, id: str) -> list[str]:
    """What a listing made now says files ``id`` in ``stub``."""
    return sorted(n for n in os.listdir(stub) if n == id or n.startswith(id + "."))


def ask(names: StubNames, stub: Path, id: str) -> list[str] | None:
    found = names.names_of(stub, id)
    return None if found is None else sorted(found)


def right(names: StubNames, stub: Path, id: str) -> bool:
    """The answer about ``id`` is "not known" or what a listing made next says."""
    answer = ask(names, stub, id)
    return answer is None or answer == listed(stub, id)


def watched(folder: Path) -> bool:
    """Whether an inotify instance of this process watches ``folder``."""
    return watches(folder) > 0


def elsewhere(script: str, *args: str | Path) -> None:
    """Runs ``script`` (Python, its arguments in ``sys.argv[1:]``) in another process,
    to its end."""
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True)


def watches(*folders: Path) -> int:
    """Inotify watches this process holds on ``folders``, all instances, by device and
    inode as the kernel lists them in /proc/self/fdinfo."""
    wanted = set()
    for folder in folders:
        st = os.stat(folder)
        wanted.add(((os.major(st.st_dev) << 20) | os.minor(st.st_dev), st.st_ino))
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                for line in info:
                    if not line.startswith("inotify wd:"):
                        continue
                    fields = dict(w.split(":", 1) for w in line.split()[1:] if ":" in w)
                    count += (int(fields["sdev"], 16), int(fields["ino"], 16)) in wanted
        except OSError:
            continue
    return count


def record_listings(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Notes the folder (path or descriptor) of every ``os.listdir`` from now on, in
    the list returned; each listing really happens."""
    listings: list[object] = []
    real_listdir = os.listdir

    def listdir(path: object = ".") -> list[str]:
        listings.append(path)
        return real_listdir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "listdir", listdir)
    return listings
