"""verify_from_storage reads what storage holds, not what the page cache remembers.

The archive lives on an ext4 image mounted through a loop device inside a private
mount namespace. After publishing, one byte is flipped in the image file itself,
behind the mounted filesystem's back: a plain read still returns the cached (old)
bytes, and verification must see the corruption.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import json, os, sys
from pathlib import Path
from nbankd.archive import durable
from nbankd.archive.opening import create_archive
from nbankd.hashing import sha1_file

mnt, image = Path(sys.argv[1]), Path(sys.argv[2])
archive = create_archive(mnt / "arch", "http://127.0.0.1:1/neurobank/")
payload = os.urandom(256 * 1024)
(mnt / "in.bin").write_bytes(payload)
staged = durable.stage_copy(archive, mnt / "in.bin", ".nbankd-v")
stored = durable.publish(archive, staged.path, archive.new_resource_path("vv01", "in.bin")).path
os.unlink(mnt / "in.bin")
os.sync()
out = {"cached_before": sha1_file(stored) == staged.sha1}
with open(image, "r+b") as fp:
    data = fp.read()
    offset = data.find(payload[:4096])
    out["found_once"] = offset >= 0 and data.find(payload[:4096], offset + 1) < 0
    fp.seek(offset + 1000)
    fp.write(bytes([data[offset + 1000] ^ 0xFF]))
    fp.flush()
    os.fsync(fp.fileno())
out["cached_after"] = sha1_file(stored) == staged.sha1
out["verified"] = durable.verify_from_storage(stored, staged.sha1)
out["verified_synced"] = durable.verify_from_storage(stored, staged.sha1, synced=True)
print(json.dumps(out))
"""


def test_verify_sees_corruption_hidden_by_page_cache(tmp_path: Path) -> None:
    """A byte flipped on the device is caught although cached reads still look intact."""
    tools = ("unshare", "mkfs.ext4", "losetup", "mount")
    if os.geteuid() != 0 or any(shutil.which(t) is None for t in tools):
        pytest.skip("needs root, unshare, mkfs.ext4 and loop devices")
    image, mnt = tmp_path / "fs.img", tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as fp:
        fp.truncate(32 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, capture_output=True)
    shell = 'mount -o loop "$1" "$2" || exit 97; shift 2; "$@"; rc=$?; umount "$MNT"; exit $rc'
    argv = ["unshare", "-m", "sh", "-c", shell, "sh", str(image), str(mnt)]
    argv += [sys.executable, "-c", SCRIPT, str(mnt), str(image)]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, "MNT": str(mnt)}
    )
    if proc.returncode == 97:
        pytest.skip(f"cannot loop-mount here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cached_before"] and out["found_once"]
    assert out["cached_after"], "the page cache should still hold the old bytes"
    assert out["verified"] is False
    assert out["verified_synced"] is False  # no fdatasync first: still read from storage
