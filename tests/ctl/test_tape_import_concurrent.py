"""Two ``nbankctl tape import`` runs of one tar into one archive at once (by hand, so
no state lock serialises them): each staged copy is its own, one file per resource."""

from __future__ import annotations

import os
import subprocess

from test_tape import member, tape_archive

from fixtures.cli_backends import NBANKCTL, Backend, make_tar


def test_two_concurrent_imports_store_and_locate_once(backend: Backend) -> None:
    """Both imports succeed; every resource is stored once with its bytes and located
    once, and staging/ is left empty (no run removed or published the other's copy)."""
    archive, arch = backend.archive("dest")
    tape = tape_archive(backend)
    blobs = {f"r{i}": os.urandom(256 * 1024) for i in range(8)}
    ids = {label: backend.resource(data, tape) for label, data in blobs.items()}
    tar = make_tar(backend.tmp / "t.tar", [(member(ids[x]), blobs[x]) for x in blobs])
    argv = [NBANKCTL, *backend.before, "tape", "import", str(tar), str(archive.path)]
    procs = [
        subprocess.Popen(
            argv, env=backend.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    for label, id in ids.items():
        [stored] = list((archive.resources_dir / id[:2]).glob(f"{id}*"))
        assert stored.read_bytes() == blobs[label]
        names = [loc.archive_name for loc in backend.registry.get_locations(id)]
        assert names.count(arch) == 1
    assert os.listdir(archive.staging_dir) == []
