"""Hostile review of what moves or changes things after a deposit's first verdict:
``nbankctl requeue``, the rejected folder, ``modify`` and ``init``.

Each test names the behaviour a careful user expects; those marked so fail on the
code they were written against, and pass once the defect is fixed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, json_stream
from fixtures.daemon import DaemonHarness, nbankctl, wait_for


@pytest.fixture
def h(daemon_factory: Any) -> DaemonHarness:
    harness: DaemonHarness = daemon_factory()
    harness.start()
    return harness


def reject(h: DaemonHarness, name: str, data: bytes) -> Path:
    """Drops ``name`` (not a valid identifier: it holds a space) and waits until it is
    rejected; returns where it went (from its reason)."""
    before = {r["rejected_path"] for r in h.reasons()}
    h.drop(name, data)
    h.wait_settled(len(h.reasons()) + len(h.receipts()) + 1)
    [new] = [r for r in h.reasons() if r["rejected_path"] not in before]
    return Path(new["rejected_path"])


def tree(root: Path) -> dict[str, bytes | None]:
    """Every entry below ``root``: a file's bytes, None for a folder."""
    return {
        str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(root.rglob("*"))
    }


# --- requeue: the inbox and its rejected folder as recorded, never a replacement -------


def test_requeue_does_not_follow_an_inbox_swapped_for_a_link(
    h: DaemonHarness, tmp_path: Path
) -> None:
    """An inbox folder swapped for a link after start is never written through: a requeue
    of its rejected input refuses and touches nothing in the folder the link names."""
    rejected = reject(h, "bad one.dat", b"the lab's recording")
    elsewhere = tmp_path / "elsewhere"  # a folder the inbox's writer points the link at
    (elsewhere / "rejected").mkdir(parents=True)
    (elsewhere / "rejected" / "bad one.dat").write_bytes(b"a file of another folder")
    shutil.copy(rejected.with_name("bad one.dat.reason"), elsewhere / "rejected")
    before = tree(elsewhere)
    os.rename(h.inbox, tmp_path / "inbox.real")
    os.symlink(elsewhere, h.inbox)
    proc = nbankctl(h, "requeue", str(rejected), timeout=60)
    assert tree(elsewhere) == before, "the requeue wrote through the swapped-in link"
    assert proc.returncode != 0, proc.stdout
    assert (tmp_path / "inbox.real" / "rejected" / "bad one.dat").read_bytes() == (
        b"the lab's recording"
    )


def test_requeue_refuses_a_rejected_folder_replaced_by_another_folder(h: DaemonHarness) -> None:
    """A rejected folder replaced at run time by another user's folder is not used by
    requeue (the README: checked at each use against the folder recorded at start):
    nothing planted there is moved into the inbox, and the answer is not a success."""
    rejected = reject(h, "bad two.dat", b"the lab's recording")
    os.rename(h.rejected, h.inbox / "moved-aside")
    h.rejected.mkdir()  # made by an inbox writer: another user than the daemon's
    (h.rejected / "bad two.dat").write_bytes(b"planted")
    for path in (h.rejected, h.rejected / "bad two.dat"):
        os.chown(path, 65534, 65534)
    proc = nbankctl(h, "requeue", str(rejected), timeout=60)
    assert not (h.inbox / "bad two.dat").exists(), "the planted file was requeued"
    assert (h.rejected / "bad two.dat").read_bytes() == b"planted"
    assert proc.returncode != 0, proc.stdout


def test_requeue_all_rejected_goes_on_after_a_filesystem_error_and_says_what_moved(
    h: DaemonHarness,
) -> None:
    """requeue --all-rejected: a filesystem error on one input (here EPERM: an immutable
    file) does not stop the others, and the answer lists what was moved and what was
    not (exit 1), instead of one error that hides the moves already made."""
    a, b, c = (reject(h, f"bad {x}.dat", x.encode()) for x in "abc")
    assert ctl_ok(h, "pause")  # requeued files stay in the inbox to be looked at
    if subprocess.run(["chattr", "+i", str(b)], capture_output=True).returncode != 0:
        pytest.skip("needs chattr +i (root, a filesystem with immutable files)")
    try:
        proc = nbankctl(h, "requeue", "--all-rejected", "--json", timeout=60)
    finally:
        subprocess.run(["chattr", "-i", str(b)], check=True)
    moved = sorted(p.name for p in h.inbox.glob("bad *.dat"))
    assert proc.returncode == 1, proc.stderr
    assert moved == ["bad a.dat", "bad c.dat"], f"moved {moved}; said {proc.stderr.strip()}"
    result = json.loads(proc.stdout)
    assert sorted(Path(r["requeued"]).name for r in result["requeued"]) == moved
    assert [Path(f["path"]).name for f in result["failed"]] == ["bad b.dat"]
    assert b.read_bytes() == b"b" and a.name == "bad a.dat" and c.name == "bad c.dat"


# --- requeue: a sidecar goes back only with its own input ---------------------------------


def test_requeue_stopped_by_a_newcomer_leaves_no_sidecar_beside_it(daemon_factory: Any) -> None:
    """When a file of the same name appears in the inbox while a requeue runs (a rig
    drops it between the sidecar's move and the input's), the requeue stops and the
    rejected input's sidecar does not stay in the inbox as the newcomer's metadata."""
    h: DaemonHarness = daemon_factory()
    go = h.root / "go"
    h.start(env={"NBANKD_PAUSE_AT": "requeue-side-moved", "NBANKD_PAUSE_UNTIL": str(go)})
    (h.inbox / "bad three.dat.nbank.yaml").write_text(
        "id: old0001\ndtype: no-such-dtype\nmetadata: {bird: b1}\n"
    )
    rejected = reject(h, "bad three.dat", b"the rejected recording")
    assert rejected.with_name("bad three.dat.nbank.yaml").exists()
    assert ctl_ok(h, "pause")  # the newcomer stays in the inbox to be looked at
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANKD_")}
    asked = subprocess.Popen(
        [NBANKCTL, "-c", str(h.config_path), "requeue", str(rejected)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    newcomer = h.inbox / "bad three.dat"
    try:
        wait_for(lambda: Path(f"{go}.reached").exists(), 30, "the requeue to move the sidecar")
        newcomer.write_bytes(b"a new recording, not the rejected one")
    finally:
        go.touch()
        _, said = asked.communicate(timeout=60)
    assert asked.returncode != 0, said
    assert "appeared while requeueing" in said and "nothing was moved" in said, said
    assert newcomer.read_bytes() == b"a new recording, not the rejected one"
    assert not (h.inbox / "bad three.dat.nbank.yaml").exists(), (
        "the rejected input's sidecar (id: old0001) now sits beside the newcomer"
    )
    assert rejected.read_bytes() == b"the rejected recording"
    assert rejected.with_name("bad three.dat.nbank.yaml").exists()


# --- the rejected folder: a new rejection never inherits what lies there ----------------


def test_rejection_does_not_pair_an_input_with_a_stale_sidecar(h: DaemonHarness) -> None:
    """A rejected input is never given a name whose sidecar slot in the rejected folder
    already holds another input's sidecar: requeueing it must not bring that sidecar
    (another recording's identifier and metadata) back with it."""
    (h.inbox / "bad four.dat.nbank.yaml").write_text(
        "id: first001\ndtype: no-such-dtype\nmetadata: {bird: b1}\n"
    )
    first = reject(h, "bad four.dat", b"first recording, found bad")
    # the person deletes the bad recording and its reason; its sidecar stays behind
    first.unlink()
    first.with_name("bad four.dat.reason").unlink()
    stale = first.with_name("bad four.dat.nbank.yaml")
    assert stale.exists()
    second = reject(h, "bad four.dat", b"second recording, another bird")
    assert not second.with_name(second.name + ".nbank.yaml").exists(), (
        f"{second.name} was rejected beside the first recording's sidecar"
    )
    assert ctl_ok(h, "pause")  # the requeued file stays in the inbox to be looked at
    assert ctl_ok(h, "requeue", str(second))
    assert not (h.inbox / "bad four.dat.nbank.yaml").exists(), (
        "the requeue brought the first recording's sidecar back with the second"
    )


def ctl_ok(h: DaemonHarness, *args: str) -> bool:
    proc = nbankctl(h, *args, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return True


# --- modify: -k values as nbank reads them -----------------------------------------------


def test_modify_stores_nan_and_infinity_as_text_as_nbank_does(backend: Backend) -> None:
    """nbank 0.13 reads ``-k x=NaN`` (and Infinity, -Infinity) as the text, not a number
    JSON cannot hold; nbankctl modify stores the same text, and exits 0."""
    _, arch = backend.archive()
    mine = backend.resource(backend.blob("mine"), arch, metadata={"keep": 1})
    change = ["-k", "x=NaN", "-k", "y=-Infinity"]
    if backend.url is not None:
        yours = backend.resource(backend.blob("yours"), arch, metadata={"keep": 1})
        theirs = backend.nbank("modify", *change, yours)
        assert theirs.returncode == 0, theirs.stderr
        [record] = json_stream(theirs.stdout)
        assert (record["metadata"]["x"], record["metadata"]["y"]) == ("NaN", "-Infinity")
    ours = backend.ctl("modify", *change, mine)
    assert ours.returncode == 0, ours.stderr
    [record] = json_stream(ours.stdout)
    assert record["metadata"] == {"keep": 1, "x": "NaN", "y": "-Infinity"}


# --- init: finished by running it again ----------------------------------------------------


def test_init_stopped_by_a_full_disk_is_finished_by_running_it_again(
    backend: Backend, mount_ns: Any, tmp_path: Path
) -> None:
    """An init that registered the archive, then ran out of space half way through
    writing its files, says to run it again; once there is room, running it again
    finishes the archive (README: "finished by running it again")."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mount_ns.mount_tmpfs(mnt, "8k")  # two pages: README.md and nbank.json, no more
    folder = mnt / backend.name("full")

    def init() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*mount_ns.enter, NBANKCTL, *backend.before, "init", str(folder)],
            env=backend.env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    first = init()
    assert first.returncode != 0, first.stderr
    assert "run the same nbankctl init again" in first.stderr, first.stderr
    assert backend.registry.get_archive(folder.name) is not None
    mount_ns.run("mount", "-o", "remount,size=1m", mnt)
    again = init()
    assert again.returncode == 0, again.stderr
    view = mount_ns.view(folder)
    assert json.loads((view / "nbank.json").read_text())["registry"] == backend.registry.url
    assert (view / ".gitignore").read_text() == "resources/\nstaging/\n"
