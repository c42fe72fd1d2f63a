"""How the stub folders' names kept by inotify
(nbankd.archive.stubnames) are used: publishing (durable._publish, _other_name under
_identifier_lock), refiling (durable.refile, as ``nbankctl archive check --fix`` runs
it), lookups (Archive.stored_entries with ``known``), and the inboxes' watch proof
(nbankd.watch.liveness), which leaves out the stub folders whose names are kept."""

from __future__ import annotations

import ctypes
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from stubnames_helpers import elsewhere

from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.layout import Archive
from nbankd.archive.stubnames import STUB_NAMES, StubNames
from nbankd.watch import liveness

# -- findings ----------------------------------------------------------------------------


def test_an_inotify_instance_given_a_closed_stub_descriptors_number_is_read(
    names: StubNames, stub: Path, tmp_path: Path
) -> None:
    """The stub names' inotify instance is closed and another instance (an inbox's)
    gets its descriptor number: the watch proof reads that instance's watches."""
    libc = ctypes.CDLL(None, use_errno=True)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    assert names.names_of(stub, "abc") == ["abc.wav"]
    number = names._fd
    assert number is not None
    names.close()
    later = libc.inotify_init1(os.O_CLOEXEC)
    assert later >= 0
    try:
        if later != number:  # a lower number was free in this test process
            os.dup2(later, number)
            os.close(later)
            later = number
        assert libc.inotify_add_watch(later, str(inbox).encode(), 0x100) >= 0
        assert inbox.stat().st_ino in (liveness.kernel_watches() or frozenset())
    finally:
        os.close(later)


def test_a_kept_stub_folder_is_not_counted_as_an_inbox_watch(names: StubNames, stub: Path) -> None:
    """A stub folder whose names are kept is left out of the inboxes' watch proof."""
    assert names.names_of(stub, "abc") == ["abc.wav"]
    assert stub.stat().st_ino not in (liveness.kernel_watches() or frozenset())


# -- what held -----------------------------------------------------------------------------

_PUBLISHER = r"""
import random
import sys
from pathlib import Path
from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.opening import open_archive

archive, ext = open_archive(sys.argv[1]), sys.argv[2]
count, src = int(sys.argv[3]), Path(sys.argv[4])
src.write_bytes(ext.encode())
# this process's stub names keep the folder before the race
staged = durable.stage_copy(archive, src, f".nbankd-warm-{ext}")
durable.publish(archive, staged.path, archive.stored_file("pqw" + ext, "pqw" + ext), id="pqw" + ext)
print("ready", flush=True)
sys.stdin.readline()
refused = 0
order = list(range(count))
random.Random(ext).shuffle(order)  # each its own order: they meet on every identifier
for i in order:
    id = f"pq{i}"
    staged = durable.stage_copy(archive, src, f".nbankd-{ext}-{i}")
    try:
        durable.publish(archive, staged.path, archive.stored_file(id, f"{id}.{ext}"), id=id)
    except errors.StoredUnderOtherName:
        refused += 1
print(refused, flush=True)
"""


def test_two_processes_publishing_the_same_identifiers_file_each_once(
    archive: Archive, tmp_path: Path
) -> None:
    """Two processes (two daemons), each with its stub names keeping the stub folder,
    publish the same 300 identifiers under two names at once: each identifier is filed
    under exactly one name, and every publish not filed was refused."""
    count = 300
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _PUBLISHER,
                str(archive.path),
                ext,
                str(count),
                str(tmp_path / f"src.{ext}"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for ext in ("wav", "dat")
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    refused = 0
    for child in children:
        out, _ = child.communicate(timeout=300)
        assert child.returncode == 0
        refused += int(out.strip())
    stub = archive.resources_dir / "pq"
    filed = [n for n in os.listdir(stub) if not n.startswith("pqw")]
    by_id: dict[str, list[str]] = {}
    for name in filed:
        by_id.setdefault(name.split(".")[0], []).append(name)
    assert {id: names for id, names in by_id.items() if len(names) != 1} == {}
    assert len(by_id) == count and refused == count


_REFILER = r"""
import sys
from pathlib import Path
from nbankd import errors
from nbankd.archive import durable
from nbankd.archive.opening import open_archive

archive, count = open_archive(sys.argv[1]), int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
refused = 0
for i in range(count):
    try:
        durable.refile(archive, archive.resources_dir / "zz" / f"rc{i}.dat", f"rc{i}")
    except errors.StoredUnderOtherName:
        refused += 1
print(refused, flush=True)
"""


def test_a_refile_racing_publishes_of_the_same_identifiers_files_each_once(
    archive: Archive, tmp_path: Path
) -> None:
    """Another process refiles 200 misplaced resources (``archive check --fix``) into
    the stub folder this process publishes the same identifiers into, with its names
    kept: each identifier ends with one name there, and each refused refile left its
    file where it was."""
    count = 200
    src = tmp_path / "in.wav"
    src.write_bytes(b"ours")
    staged = durable.stage_copy(archive, src, ".nbankd-warm")
    durable.publish(archive, staged.path, archive.stored_file("rcw", "rcw.wav"), id="rcw")
    misplaced = archive.resources_dir / "zz"
    misplaced.mkdir()
    for i in range(count):
        (misplaced / f"rc{i}.dat").write_bytes(b"theirs")
    child = subprocess.Popen(
        [sys.executable, "-c", _REFILER, str(archive.path), str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline() == "ready\n"
    assert child.stdin is not None
    child.stdin.write("go\n")
    child.stdin.flush()
    published = 0
    for i in reversed(range(count)):  # against the refiles' order: they meet midway
        staged = durable.stage_copy(archive, src, f".nbankd-{i}")
        try:
            durable.publish(
                archive, staged.path, archive.stored_file(f"rc{i}", f"rc{i}.wav"), id=f"rc{i}"
            )
            published += 1
        except errors.StoredUnderOtherName:
            pass
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0
    refused = int(out.strip())
    filed = sorted(n for n in os.listdir(archive.resources_dir / "rc") if n != "rcw.wav")
    ids = [n.split(".")[0] for n in filed]
    assert len(ids) == len(set(ids)) == count
    left = os.listdir(misplaced) if misplaced.exists() else []
    assert len(left) == refused and published + (count - refused) == count


def test_a_one_character_identifier_is_refused_by_a_name_filed_in_its_second_stub_folder(
    archive: Archive, tmp_path: Path
) -> None:
    """Identifier ``k``: with both its stub folders ``k`` and ``k.`` kept, another
    process files ``k.json`` in ``k.`` (as nbank 0.13 does): publishing ``k.wav`` is
    refused naming it."""
    for name in ("k", "k."):
        (archive.resources_dir / name).mkdir()
    assert archive.stored_entries("k", known=STUB_NAMES.names_of) == []
    elsewhere(
        "import sys; open(sys.argv[1] + '/k.json', 'x').close()", archive.resources_dir / "k."
    )
    src = tmp_path / "in.wav"
    src.write_bytes(b"ours")
    staged = durable.stage_copy(archive, src, ".nbankd-k")
    with pytest.raises(errors.StoredUnderOtherName) as caught:
        durable.publish(archive, staged.path, archive.stored_file("k", "k.wav"), id="k")
    assert caught.value.stored == str(archive.resources_dir / "k." / "k.json")
    assert os.listdir(archive.resources_dir / "k") == []


def test_a_second_stub_folder_made_after_the_first_question_is_seen(
    archive: Archive, tmp_path: Path
) -> None:
    """Identifier ``m``: its stub folder ``m`` kept while ``m.`` did not exist; another
    process then makes ``m.`` and files ``m.json`` there: publishing ``m.wav`` is
    refused."""
    (archive.resources_dir / "m").mkdir()
    assert archive.stored_entries("m", known=STUB_NAMES.names_of) == []
    elsewhere(
        "import os, sys; os.mkdir(sys.argv[1]); open(sys.argv[1] + '/m.json', 'x').close()",
        archive.resources_dir / "m.",
    )
    src = tmp_path / "in.wav"
    src.write_bytes(b"ours")
    staged = durable.stage_copy(archive, src, ".nbankd-m")
    with pytest.raises(errors.StoredUnderOtherName):
        durable.publish(archive, staged.path, archive.stored_file("m", "m.wav"), id="m")


def test_a_stub_folder_removed_and_made_again_by_another_process_is_seen_by_a_publish(
    archive: Archive, tmp_path: Path
) -> None:
    """A kept, empty stub folder is removed by another process (as refile removes an
    emptied one), made again and given ``em1.dat``: publishing ``em1.wav`` is refused."""
    stub = archive.resources_dir / "em"
    stub.mkdir()
    assert archive.stored_entries("em1", known=STUB_NAMES.names_of) == []
    elsewhere(
        "import os, sys; os.rmdir(sys.argv[1]); os.mkdir(sys.argv[1]);"
        " open(sys.argv[1] + '/em1.dat', 'x').close()",
        stub,
    )
    src = tmp_path / "in.wav"
    src.write_bytes(b"ours")
    staged = durable.stage_copy(archive, src, ".nbankd-em")
    with pytest.raises(errors.StoredUnderOtherName):
        durable.publish(archive, staged.path, archive.stored_file("em1", "em1.wav"), id="em1")


@pytest.mark.parametrize("seed", range(5))
def test_lookups_from_kept_names_equal_listings_for_awkward_identifiers(
    archive: Archive, seed: int
) -> None:
    """Random names (dots, shared prefixes, one-character identifiers in both stub
    folders, hidden names) filed and removed by another process after the folders are
    kept: stored_entries from the kept names equals stored_entries from a listing, for
    every identifier and prefix of one."""
    rng = random.Random(seed)
    alphabet = "ab.x"
    stubs = ["a", "a.", "ab", "aa", "b.", "bx"]
    for stub in stubs:
        (archive.resources_dir / stub).mkdir()
    names = StubNames()
    try:
        ids = {"a", "b", "ab", "aa", "ab.", "ab.x", "abx", "a.b", "a..", "bx", "bxa.a"}
        for id in ids:
            archive.stored_entries(id, known=names.names_of)  # keeps every folder
        script_lines = []
        for _ in range(200):
            stub = rng.choice(stubs)
            name = stub.rstrip(".") + "".join(
                rng.choice(alphabet) for _ in range(rng.randint(0, 4))
            )
            if name in (".", ".."):
                continue
            path = archive.resources_dir / stub / name
            script_lines.append(repr(str(path)))
            ids.add(name)
            ids.add(name.split(".")[0] or name)
        elsewhere(
            "import os, random, sys\n"
            f"rng = random.Random({seed})\n"
            f"for p in [{', '.join(script_lines)}]:\n"
            "    if rng.random() < 0.3 and os.path.lexists(p):\n"
            "        os.unlink(p)\n"
            "    elif not os.path.lexists(p):\n"
            "        open(p, 'x').close()\n"
        )
        for id in sorted(ids):
            if not id or "/" in id or id in (".", ".."):
                continue
            assert archive.stored_entries(id, known=names.names_of) == archive.stored_entries(id), (
                id
            )
    finally:
        names.close()
