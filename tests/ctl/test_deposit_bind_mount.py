"""nbankctl deposit of files in a folder reached through a bind mount of a folder on the
archive's filesystem: one device number, yet link() and rename() into the archive fail
with EXDEV, so moving the file in place is proved by a probe, never inferred.

The bind mount is made in a private mount namespace (``fixtures.mountns``) nbankctl runs
in: nothing is left mounted when a test fails."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, json_stream, make_backend, sha1
from fixtures.mountns import MountNamespace


@pytest.fixture
def embedded(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def _bound_rig(b: Backend, ns: MountNamespace) -> tuple[Path, Path]:
    """A folder on the archive's filesystem bound (in ``ns``) onto another: (the folder
    itself, the path nbankctl is given through the bind mount)."""
    real, bound = b.tmp / "rig-real", b.tmp / "rig"
    real.mkdir()
    bound.mkdir()
    ns.run("mount", "--bind", real, bound)
    return real, bound


def _deposit(
    b: Backend, ns: MountNamespace, archive: Path, *argv: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ns.enter, NBANKCTL, *b.before, "deposit", str(archive), "-d", b.dtype, *argv],
        env=b.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_file_in_a_bind_mounted_folder_is_registered_and_stored(
    embedded: Backend, mount_ns: MountNamespace
) -> None:
    """A file bind-mounted from the archive's filesystem is registered, stored and gone."""
    b = embedded
    archive, _ = b.archive()
    real, bound = _bound_rig(b, mount_ns)
    data = b.blob("bound") * 64
    (real / "rec.dat").write_bytes(data)
    assert (real / "rec.dat").stat().st_dev == archive.path.stat().st_dev
    r = _deposit(b, mount_ns, archive.path, "-j", "--wait", "5", str(bound / "rec.dat"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert json_stream(r.stdout) == [{"source": str(bound / "rec.dat"), "id": "rec"}]
    record = b.registry.get_resource("rec")
    assert record is not None and record.sha1 == sha1(data)
    assert (archive.resources_dir / "re" / "rec.dat").read_bytes() == data
    assert list(real.iterdir()) == []  # gone, and no work folder or probe file left
    assert list(archive.staging_dir.iterdir()) == []  # no probe file left either
