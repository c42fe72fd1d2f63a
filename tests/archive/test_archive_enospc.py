"""A full filesystem: staging fails as ArchiveUnavailable and leaves nothing behind.

Each test mounts a 1 MiB tmpfs inside a private mount namespace (``unshare -m``) and
runs the code in that subprocess; the mount disappears with it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nbankd.hashing import sha1_file

SCRIPT = r"""
import json, os, sys
from pathlib import Path
from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.opening import create_archive

mnt, src, kind = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
archive = create_archive(mnt / "arch", "http://127.0.0.1:1/neurobank/", allow_directories=True)
result = {"error": None}
try:
    if kind == "file":
        durable.stage_copy(archive, src, ".nbankd-full")
    else:
        durable.stage_copy_tree(archive, src, ".nbankd-full")
except errors.NbankdError as err:
    result["error"] = type(err).__name__
    result["message"] = str(err)
    result["transient"] = err.transient
result["staging"] = sorted(os.listdir(archive.staging_dir))
result["resources"] = sorted(str(p) for p in archive.resources_dir.rglob("*"))
print(json.dumps(result))
"""


def run_on_full_tmpfs(tmp_path: Path, src: Path, kind: str) -> dict[str, object]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount a private tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    shell = 'mount -t tmpfs -o size=1m nbankd-test "$1" && shift && exec "$@"'
    argv = ["unshare", "-m", "sh", "-c", shell, "sh", str(mnt)]
    argv += [sys.executable, "-c", SCRIPT, str(mnt), str(src), kind]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        pytest.skip(f"cannot mount tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_full_disk_during_stage_copy(tmp_path: Path) -> None:
    """ENOSPC while staging a 3 MiB file is ArchiveUnavailable; source intact, nothing left."""
    src = tmp_path / "big.wav"
    src.write_bytes(os.urandom(3 << 20))
    before = sha1_file(src)
    result = run_on_full_tmpfs(tmp_path, src, "file")
    assert result["error"] == "ArchiveUnavailable" and result["transient"] is True
    assert "No space left" in str(result["message"])
    assert result["staging"] == [] and result["resources"] == []
    assert sha1_file(src) == before


def test_full_disk_during_stage_copy_tree(tmp_path: Path) -> None:
    """ENOSPC while staging a tree is ArchiveUnavailable and removes the partial tree."""
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for i in range(3):
        (src / "sub" / f"part{i}.bin").write_bytes(os.urandom(1 << 20))
    result = run_on_full_tmpfs(tmp_path, src, "tree")
    assert result["error"] == "ArchiveUnavailable"
    assert result["staging"] == [] and result["resources"] == []
    assert len(list(src.rglob("*.bin"))) == 3
