"""nbankctl side by side with the real nbank 0.13 on one django-neurobank 0.12 server,
for the options no other test runs in both tools: ``dtype add``, ``tape prune`` beside
``archive prune``, ``locate -L/-0``, ``search -H``, ``fetch -f/-e``, ``export`` to a
folder, with ``-a``, ``-f`` and ``--manifest``, ``copy -y/-a``, ``tape register -y/-n``
beside ``archive register-tar``, ``tape import -y/-f`` beside ``archive import-tar``,
``check tar -a``, ``deposit -@`` and the global ``-a user:password``.

Each test builds the same situation for both tools (their own resources where the
registry wants unique names or SHA-1s) and compares records, files and exit codes
(nbank 1 for every failure; nbankctl 1 problems, 2 usage, 3 credentials refused)."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_fetch import downloadable, remote

from fixtures.cli_backends import NBANK, NBANKCTL, Backend, base_env, json_stream, make_tar, store
from fixtures.django_server import DjangoServer
from nbankd.archive.layout import Archive
from nbankd.hashing import directory_hash

Run = subprocess.CompletedProcess[str]


def ctl(b: Backend, *argv: str, input: str | None = None, env: dict[str, str] | None = None) -> Run:
    """``nbankctl -r URL ARGV``."""
    return subprocess.run(
        [NBANKCTL, *b.before, *argv],
        env=env or b.env,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def nbank(
    b: Backend, *argv: str, input: str | None = None, env: dict[str, str] | None = None
) -> Run:
    """The real ``nbank -r URL ARGV``."""
    assert b.url is not None
    return subprocess.run(
        [NBANK, "-r", b.url, *argv],
        env=env or b.env,
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )


def codes(ours: Run, theirs: Run) -> tuple[int, int]:
    return ours.returncode, theirs.returncode


def why(ours: Run, theirs: Run) -> str:
    return f"nbankctl:\n{ours.stdout}{ours.stderr}\nnbank:\n{theirs.stdout}{theirs.stderr}"


def stored_archive(
    b: Backend, labels: tuple[str, ...], folder: str = "arch"
) -> tuple[Archive, str, dict[str, str]]:
    """A registered archive holding one stored resource per label; returns it, its name
    and the ids by label."""
    archive, name = b.archive(folder)
    ids = {}
    for label in labels:
        ids[label] = b.resource(b.blob(label), name)
        store(archive, ids[label], b.blob(label))
    return archive, name, ids


def files_under(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root (relative path -> (mode bits, bytes))."""
    return {
        str(p.relative_to(root)): (p.stat().st_mode & 0o7777, p.read_bytes())
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def resource_files(archive: Archive) -> set[str]:
    """The names of the files stored under the archive's resources/."""
    return {p.name for p in archive.resources_dir.rglob("*") if p.is_file()}


def located(b: Backend, id: str, archive: str) -> bool:
    record = b.registry.get_resource(id)
    assert record is not None
    return archive in record.locations


def tape_archive(b: Backend) -> str:
    """A tape archive (as a previous register would leave it); returns its name."""
    name = b.name("tp")
    b.registry.add_archive(name, "tape", f"{name}:1", "offline")
    return name


# --- dtype add ----------------------------------------------------------------------------


def test_dtype_add_registers_the_record_nbank_registers(django_backend: Backend) -> None:
    """dtype add: the same record (name aside) and the same stderr message; exit 0 in both."""
    b = django_backend
    mine, yours = b.name("dto"), b.name("dtt")
    ours = ctl(b, "dtype", "add", mine, "audio/x-wav")
    theirs = nbank(b, "dtype", "add", yours, "audio/x-wav")
    assert codes(ours, theirs) == (0, 0), why(ours, theirs)
    assert ours.stdout == theirs.stdout == ""
    assert ours.stderr.replace(mine, "N") == theirs.stderr.replace(yours, "N")
    assert theirs.stderr == f"added datatype {yours} (content-type: audio/x-wav)\n"
    records = {d.name: d for d in b.registry.list_datatypes()}
    assert records[mine].to_json() | {"name": "N"} == records[yours].to_json() | {"name": "N"}
    for tool in (ctl, nbank):
        listed = tool(b, "dtype", "list")
        assert listed.returncode == 0, listed.stderr
        lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
        assert lines[mine].replace(mine, "N") == lines[yours].replace(yours, "N")
        assert lines[mine] == f"{mine:<25}\t(audio/x-wav)"


def test_dtype_add_a_taken_name_fails_as_nbank(django_backend: Backend) -> None:
    """dtype add of a name the registry has: both exit 1 and the datatype is unchanged."""
    b = django_backend
    ours = ctl(b, "dtype", "add", b.dtype, "text/plain")
    theirs = nbank(b, "dtype", "add", b.dtype, "text/plain")
    assert codes(ours, theirs) == (1, 1), why(ours, theirs)
    reason = "a dtype with this name already exists"
    assert reason in ours.stderr and reason in theirs.stderr
    assert ours.stdout == theirs.stdout == ""
    [record] = [d for d in b.registry.list_datatypes() if d.name == b.dtype]
    assert record.content_type == "application/octet-stream"


# --- tape prune beside archive prune ------------------------------------------------------


PRUNE_LABELS = ("taped", "copied", "only")


def prune_side(
    b: Backend, tar_members: list[tuple[str, bytes | None]], side: str
) -> dict[str, Any]:
    """One tool's archive for prune: a resource with a tape copy, one with a verified
    second copy in another local archive, one stored only here, and one listed that is
    stored in the other archive alone; adds the tape copy's member to tar_members."""
    archive, name, ids = stored_archive(b, tuple(f"{side}-{x}" for x in PRUNE_LABELS))
    ids = {x: ids[f"{side}-{x}"] for x in PRUNE_LABELS}
    other, other_name = b.archive("other")
    b.registry.add_location(ids["copied"], other_name)
    store(other, ids["copied"], b.blob(f"{side}-copied"))
    tar_members.append((f"{ids['taped']}.dat", b.blob(f"{side}-taped")))
    elsewhere = b.resource(b.blob(f"{side}-elsewhere"), other_name)
    store(other, elsewhere, b.blob(f"{side}-elsewhere"))
    ids["elsewhere"] = elsewhere
    listing = b.tmp / f"{side}-prune.txt"
    listing.write_text("# to prune\n\n" + "\n".join(ids.values()) + "\n")
    return {
        "archive": archive,
        "name": name,
        "ids": ids,
        "listing": listing,
        "other": other,
        "other_name": other_name,
    }


def prune_situation(b: Backend) -> tuple[dict[str, Any], dict[str, Any]]:
    """The same prune situation for nbankctl and for nbank; the tape copies are located
    by nbankctl tape register (keyed locations, which nbank takes as any other)."""
    members: list[tuple[str, bytes | None]] = []
    ours, theirs = prune_side(b, members, "ours"), prune_side(b, members, "theirs")
    tar = make_tar(b.tmp / "tape.tar", members)
    registered = ctl(b, "tape", "register", b.name("TAPE"), "1", str(tar))
    assert registered.returncode == 0, registered.stderr
    return ours, theirs


def kept(b: Backend, side: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The labels whose copy is still stored in the side's archive, and those the
    registry still locates there."""
    files = resource_files(side["archive"])
    ids = side["ids"]
    return (
        {x for x, id in ids.items() if f"{id}.dat" in files},
        {x for x, id in ids.items() if located(b, id, side["name"])},
    )


def test_tape_prune_deletes_the_copies_nbank_prune_deletes(django_backend: Backend) -> None:
    """tape prune deletes and unlocates the copies archive prune does; exit 0 in both."""
    b = django_backend
    ours, theirs = prune_situation(b)
    others = {id(side): files_under(side["other"].path) for side in (ours, theirs)}
    mine = ctl(b, "tape", "prune", ours["name"], str(ours["listing"]))
    real = nbank(b, "archive", "prune", theirs["name"], str(theirs["listing"]))
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert kept(b, ours) == kept(b, theirs) == ({"only"}, {"only"})
    for side in (ours, theirs):
        assert files_under(side["other"].path) == others[id(side)]
        for label in ("copied", "elsewhere"):
            assert located(b, side["ids"][label], side["other_name"])


def test_tape_prune_dry_run_changes_nothing_as_nbank(django_backend: Backend) -> None:
    """prune -y: both exit 0 and delete no file and no location."""
    b = django_backend
    ours, theirs = prune_situation(b)
    before = {id(side): files_under(side["archive"].path) for side in (ours, theirs)}
    mine = ctl(b, "tape", "prune", "-y", ours["name"], str(ours["listing"]))
    real = nbank(b, "archive", "prune", "-y", theirs["name"], str(theirs["listing"]))
    assert codes(mine, real) == (0, 0), why(mine, real)
    everything = {"taped", "copied", "only"}
    assert kept(b, ours) == kept(b, theirs) == (everything, everything)
    for side in (ours, theirs):
        assert files_under(side["archive"].path) == before[id(side)]


def test_tape_prune_of_an_unknown_id_fails_as_nbank(django_backend: Backend) -> None:
    """prune of an id the registry lacks: both exit 1 and delete nothing."""
    b = django_backend
    archive, name, ids = stored_archive(b, ("k",))
    listing = b.tmp / "unknown.txt"
    listing.write_text(f"{b.name('missing')}\n")
    mine = ctl(b, "tape", "prune", name, str(listing))
    real = nbank(b, "archive", "prune", name, str(listing))
    assert codes(mine, real) == (1, 1), why(mine, real)
    assert resource_files(archive) == {f"{ids['k']}.dat"}


# --- locate -L, -0 ------------------------------------------------------------------------


def test_locate_link_makes_the_links_nbank_makes(django_backend: Backend) -> None:
    """locate -L DIR: the same symbolic links in DIR and the same lines, DIR aside."""
    b = django_backend
    archive, _, ids = stored_archive(b, ("a", "b"))
    links = {tool: b.tmp / f"links-{tool}" for tool in ("ours", "theirs")}
    for folder in links.values():
        folder.mkdir()
    mine = ctl(b, "locate", "-L", str(links["ours"]), *ids.values())
    real = nbank(b, "locate", "-L", str(links["theirs"]), *ids.values())
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert mine.stdout.replace(str(links["ours"]), "D") == real.stdout.replace(
        str(links["theirs"]), "D"
    )
    made = {
        tool: {p.name: p.readlink() for p in folder.iterdir()} for tool, folder in links.items()
    }
    assert (
        made["ours"]
        == made["theirs"]
        == {f"{id}.dat": archive.resources_dir / id[:2] / f"{id}.dat" for id in ids.values()}
    )


def test_locate_print0_prints_what_nbank_prints(django_backend: Backend) -> None:
    """locate -0: the same NUL-separated paths on stdout as nbank's; exit 0 in both."""
    b = django_backend
    archive, _, ids = stored_archive(b, ("a", "b"))
    found = [ctl(b, "locate", "-0", *ids.values()), nbank(b, "locate", "-0", *ids.values())]
    assert codes(*found) == (0, 0), why(*found)
    paths = [str(archive.resources_dir / id[:2] / f"{id}.dat") for id in ids.values()]
    assert found[0].stdout == found[1].stdout == "".join(f"{p}\0" for p in paths)


def test_locate_print0_of_an_unknown_id_as_nbank(django_backend: Backend) -> None:
    """locate -0 of an id the registry lacks: nbank's "(not found)" line; exit 1 in both."""
    b = django_backend
    missing = b.name("missing")
    lost = [ctl(b, "locate", "-0", missing), nbank(b, "locate", "-0", missing)]
    assert codes(*lost) == (1, 1), why(*lost)
    assert lost[0].stdout == lost[1].stdout == f"{missing:<20}\t(not found)\n"


# --- search -H ----------------------------------------------------------------------------


HASH_QUERIES: dict[str, Callable[[str], str]] = {
    "whole": lambda sha1: sha1,
    "upper-case": str.upper,
    "part": lambda sha1: sha1[7:19],
}


@pytest.mark.parametrize("query", HASH_QUERIES)
def test_search_by_hash_as_nbank(django_backend: Backend, query: str) -> None:
    """search -H with a whole SHA-1, an upper-case one or a part finds what nbank finds."""
    b = django_backend
    _, _, ids = stored_archive(b, ("h",))
    record = b.registry.get_resource(ids["h"])
    assert record is not None and record.sha1 is not None
    value = HASH_QUERIES[query](record.sha1)
    mine, real = ctl(b, "search", "-H", value), nbank(b, "search", "-H", value)
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert mine.stdout.split() == real.stdout.split() == [ids["h"]]


def test_search_by_an_unknown_hash_finds_nothing_as_nbank(django_backend: Backend) -> None:
    """search -H with a SHA-1 nobody has: no names and exit 0 in both."""
    b = django_backend
    mine, real = ctl(b, "search", "-H", "0" * 40), nbank(b, "search", "-H", "0" * 40)
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert mine.stdout == real.stdout == ""


# --- fetch -f, -e -------------------------------------------------------------------------


def fetch_dests(b: Backend) -> dict[str, Path]:
    out = {tool: b.tmp / f"fetched-{tool}" for tool in ("ours", "theirs")}
    for folder in out.values():
        folder.mkdir()
    return out


def fetch_over_existing(b: Backend) -> tuple[str, dict[str, Path]]:
    """A stored resource and, per tool, a DEST already holding a file of its name."""
    _, _, ids = stored_archive(b, ("f",))
    dests = fetch_dests(b)
    for folder in dests.values():
        (folder / ids["f"]).write_bytes(b"mine")
    return ids["f"], dests


def test_fetch_keeps_an_existing_target_as_nbank(django_backend: Backend) -> None:
    """fetch without -f onto an existing target keeps it; exit 1 in both."""
    b = django_backend
    id, dests = fetch_over_existing(b)
    kept = [
        ctl(b, "fetch", "-d", str(dests["ours"]), id),
        nbank(b, "fetch", "-d", str(dests["theirs"]), id),
    ]
    assert codes(*kept) == (1, 1), why(*kept)
    assert all((folder / id).read_bytes() == b"mine" for folder in dests.values())


def test_fetch_force_replaces_as_nbank(django_backend: Backend) -> None:
    """fetch -f replaces an existing target with the resource; exit 0 in both."""
    b = django_backend
    id, dests = fetch_over_existing(b)
    forced = [
        ctl(b, "fetch", "-f", "-d", str(dests["ours"]), id),
        nbank(b, "fetch", "-f", "-d", str(dests["theirs"]), id),
    ]
    assert codes(*forced) == (0, 0), why(*forced)
    assert files_under(dests["ours"]) == files_under(dests["theirs"])
    assert (dests["ours"] / id).read_bytes() == b.blob("f")
    assert forced[0].stdout.replace(str(dests["ours"]), "D") == forced[1].stdout.replace(
        str(dests["theirs"]), "D"
    )


def test_fetch_extension_names_the_files_as_nbank(django_backend: Backend) -> None:
    """fetch -e EXT of stored copies: the same <id>.EXT files and lines, DEST aside."""
    b = django_backend
    _, _, ids = stored_archive(b, ("a", "b"))
    dests = fetch_dests(b)
    mine = ctl(b, "fetch", "-e", "bin", "-d", str(dests["ours"]), *ids.values())
    real = nbank(b, "fetch", "-e", "bin", "-d", str(dests["theirs"]), *ids.values())
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert files_under(dests["ours"]) == files_under(dests["theirs"])
    assert sorted(os.listdir(dests["ours"])) == sorted(f"{id}.bin" for id in ids.values())
    assert sorted(mine.stdout.replace(str(dests["ours"]), "D").splitlines()) == sorted(
        real.stdout.replace(str(dests["theirs"]), "D").splitlines()
    )


def test_fetch_extension_of_a_download_as_nbank(
    django_backend: Backend, django_registry: DjangoServer
) -> None:
    """fetch -e EXT of downloads from the registry: the same <id>.EXT files; exit 0."""
    b = django_backend
    downloadable(django_registry, b.dtype)
    _, ids = remote(b, ("a", "b"))
    dests = fetch_dests(b)
    mine = ctl(b, "fetch", "-e", "bin", "-d", str(dests["ours"]), *ids)
    real = nbank(b, "fetch", "-e", "bin", "-d", str(dests["theirs"]), *ids)
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert files_under(dests["ours"]) == files_under(dests["theirs"])
    assert {p: data for p, (_, data) in files_under(dests["ours"]).items()} == {
        f"{id}.bin": b.blob(x) for id, x in zip(ids, ("a", "b"), strict=True)
    }


# --- export: a folder, -a, -f, --manifest -------------------------------------------------


def with_folder_resource(b: Backend, archive: Archive, name: str) -> str:
    """Adds a stored, registered folder resource with a nested file; returns its id."""
    id = b.name("d")
    root = archive.resources_dir / id[:2] / id
    (root / "sub").mkdir(parents=True)
    (root / "x.txt").write_bytes(b.blob("dx"))
    (root / "sub" / "y.bin").write_bytes(b.blob("dy"))
    b.registry.add_resource(dtype=b.dtype, archive=name, name=id, sha1=directory_hash(root))
    return id


def test_export_to_a_folder_writes_what_nbank_writes(django_backend: Backend) -> None:
    """export to a folder: the same files, bytes and modes for a file and a folder resource."""
    b = django_backend
    archive, name, ids = stored_archive(b, ("a",))
    folder_id = with_folder_resource(b, archive, name)
    outs = {tool: b.tmp / f"export-{tool}" for tool in ("ours", "theirs")}
    mine = ctl(b, "export", str(outs["ours"]), ids["a"], folder_id)
    real = nbank(b, "export", str(outs["theirs"]), ids["a"], folder_id)
    assert codes(mine, real) == (0, 0), why(mine, real)
    assert files_under(outs["ours"]) == files_under(outs["theirs"])
    assert set(files_under(outs["ours"])) == {
        f"{ids['a']}.dat",
        f"{folder_id}/x.txt",
        f"{folder_id}/sub/y.bin",
    }


def test_export_from_one_archive_as_nbank(django_backend: Backend) -> None:
    """export -a ARCHIVE leaves out a resource stored elsewhere: same tar bytes, exit 1."""
    b = django_backend
    _, here, ids = stored_archive(b, ("in",), "here")
    _, _, there = stored_archive(b, ("out",), "there")
    tars = {tool: b.tmp / f"{tool}.tar" for tool in ("ours", "theirs")}
    mine = ctl(b, "export", "-a", here, str(tars["ours"]), ids["in"], there["out"])
    real = nbank(b, "export", "-a", here, str(tars["theirs"]), ids["in"], there["out"])
    assert codes(mine, real) == (1, 1), why(mine, real)
    assert there["out"] in mine.stderr and there["out"] in real.stderr
    with tarfile.open(tars["ours"]) as tar:
        assert tar.getnames() == [f"{ids['in']}.dat"]
    assert tars["ours"].read_bytes() == tars["theirs"].read_bytes()


def test_export_ids_from_a_file_as_nbank(django_backend: Backend) -> None:
    """export -f FILE with an id on the command line too: the same tar bytes; exit 0."""
    b = django_backend
    _, _, ids = stored_archive(b, ("a", "b", "c"))
    listing = b.tmp / "ids.txt"
    listing.write_text(f"{ids['b']}\n\n{ids['c']}\n{ids['a']}\n")
    tars = {tool: b.tmp / f"{tool}.tar" for tool in ("ours", "theirs")}
    mine = ctl(b, "export", "-f", str(listing), str(tars["ours"]), ids["a"])
    real = nbank(b, "export", "-f", str(listing), str(tars["theirs"]), ids["a"])
    assert codes(mine, real) == (0, 0), why(mine, real)
    with tarfile.open(tars["theirs"]) as tar:
        assert tar.getnames() == [f"{ids[x]}.dat" for x in ("a", "b", "c")]
    assert tars["ours"].read_bytes() == tars["theirs"].read_bytes()


def manifest(tar_path: Path) -> dict[str, Any]:
    with tarfile.open(tar_path) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        return json.loads(member.read())


def test_export_manifest_holds_nbanks_records(django_backend: Backend) -> None:
    """export --manifest: the same members and records (version key and time aside)."""
    b = django_backend
    _, _, ids = stored_archive(b, ("a", "b"))
    tars = {tool: b.tmp / f"{tool}.tar" for tool in ("ours", "theirs")}
    mine = ctl(b, "export", "--manifest", str(tars["ours"]), *ids.values())
    real = nbank(b, "export", "--manifest", str(tars["theirs"]), *ids.values())
    assert codes(mine, real) == (0, 0), why(mine, real)
    for path in tars.values():
        with tarfile.open(path) as tar:
            assert tar.getnames() == [*(f"{id}.dat" for id in ids.values()), "manifest.json"]
    ours, theirs = manifest(tars["ours"]), manifest(tars["theirs"])
    # nbankctl names its version "nbankctl_version" where nbank writes "nbank_version"
    assert set(ours) - set(theirs) == {"nbankctl_version"}
    assert set(theirs) - set(ours) == {"nbank_version"}
    assert ours["registry"] == theirs["registry"] == b.url
    assert ours["resources"] == theirs["resources"]
    assert [r["name"] for r in ours["resources"]] == list(ids.values())


# --- copy -y, -a --------------------------------------------------------------------------


def test_copy_dry_run_changes_nothing_as_nbank(django_backend: Backend) -> None:
    """copy -y: both check the resources, store and locate nothing; exit 0."""
    b = django_backend
    _, _, ids = stored_archive(b, ("a", "b"), "src")
    dests = {tool: b.archive(f"dest-{tool}") for tool in ("ours", "theirs")}
    before = {tool: files_under(a.path) for tool, (a, _) in dests.items()}
    mine = ctl(b, "copy", "-y", str(dests["ours"][0].path), *ids.values())
    real = nbank(b, "copy", "-y", str(dests["theirs"][0].path), *ids.values())
    assert codes(mine, real) == (0, 0), why(mine, real)
    for tool, (archive, name) in dests.items():
        assert files_under(archive.path) == before[tool]
        assert not any(located(b, id, name) for id in ids.values())
    assert "checked: 2" in mine.stderr and "checked: 2" in real.stderr


def test_copy_from_one_archive_as_nbank(django_backend: Backend) -> None:
    """copy -a ARCHIVE: a resource stored elsewhere fails, the other is copied; exit 1."""
    b = django_backend
    _, here, ids = stored_archive(b, ("in",), "here")
    _, _, there = stored_archive(b, ("out",), "there")
    dests = {tool: b.archive(f"dest-{tool}") for tool in ("ours", "theirs")}
    wanted = (ids["in"], there["out"])
    mine = ctl(b, "copy", "-a", here, str(dests["ours"][0].path), *wanted)
    real = nbank(b, "copy", "-a", here, str(dests["theirs"][0].path), *wanted)
    assert codes(mine, real) == (1, 1), why(mine, real)
    stored = {tool: files_under(a.resources_dir) for tool, (a, _) in dests.items()}
    assert stored["ours"] == stored["theirs"]
    assert {Path(p).name for p in stored["ours"]} == {f"{ids['in']}.dat"}
    for _, name in dests.values():
        assert located(b, ids["in"], name) and not located(b, there["out"], name)


# --- tape register beside archive register-tar --------------------------------------------


def tar_of(b: Backend, labels: tuple[str, ...]) -> tuple[Path, dict[str, str]]:
    """Resources registered to a local archive and a tar holding them as nbank export
    writes it (<id>.dat at the top)."""
    _, name = b.archive()
    ids = {x: b.resource(b.blob(x), name) for x in labels}
    tar = make_tar(b.tmp / f"{b.name('t')}.tar", [(f"{ids[x]}.dat", b.blob(x)) for x in labels])
    return tar, ids


def test_tape_register_dry_run_changes_nothing_as_register_tar(django_backend: Backend) -> None:
    """tape register -y as register-tar -y: no archive, no location; exit 0 in both."""
    b = django_backend
    tar, ids = tar_of(b, ("a", "b"))
    mine_tape, real_tape = b.name("TAPE"), b.name("TAPE")
    mine = ctl(b, "tape", "register", "-y", mine_tape, "3", str(tar))
    real = nbank(b, "archive", "register-tar", "-y", real_tape, "3", str(tar))
    assert codes(mine, real) == (0, 0), why(mine, real)
    for tape in (mine_tape, real_tape):
        assert b.registry.get_archive(f"{tape}-3") is None
    for id in ids.values():
        assert [loc.scheme for loc in b.registry.get_locations(id)] == ["neurobank"]


def test_tape_register_named_archive_as_register_tar(django_backend: Backend) -> None:
    """tape register -n NAME as register-tar -n: the same tape archive and locations."""
    b = django_backend
    tar, ids = tar_of(b, ("a", "b"))
    mine_name, real_name = b.name("mine"), b.name("real")
    mine_tape, real_tape = b.name("TAPE"), b.name("TAPE")
    mine = ctl(b, "tape", "register", "-n", mine_name, mine_tape, "4", str(tar))
    real = nbank(b, "archive", "register-tar", "-n", real_name, real_tape, "4", str(tar))
    assert codes(mine, real) == (0, 0), why(mine, real)
    ours, theirs = b.registry.get_archive(mine_name), b.registry.get_archive(real_name)
    assert ours is not None and theirs is not None
    assert (ours.scheme, ours.root, ours.accessibility) == ("tape", f"{mine_tape}:4", "offline")
    assert (theirs.scheme, theirs.root, theirs.accessibility) == (
        "tape",
        f"{real_tape}:4",
        "offline",
    )
    for tape in (mine_tape, real_tape):
        assert b.registry.get_archive(f"{tape}-4") is None
    for id in ids.values():
        locations = {loc.archive_name: loc for loc in b.registry.get_locations(id)}
        # nbankctl's location also carries the member it hashed
        assert locations[mine_name].key == f"{id}.dat" and locations[real_name].key is None


# --- tape import beside archive import-tar ------------------------------------------------


def import_situation(
    b: Backend, labels: tuple[str, ...]
) -> tuple[Path, dict[str, str], dict[str, tuple[Archive, str]]]:
    """Resources registered only on a tape archive, a tar holding them and one empty
    destination archive per tool."""
    tape = tape_archive(b)
    ids = {x: b.resource(b.blob(x), tape) for x in labels}
    tar = make_tar(b.tmp / "import.tar", [(f"{ids[x]}.dat", b.blob(x)) for x in labels])
    return tar, ids, {tool: b.archive(f"dest-{tool}") for tool in ("ours", "theirs")}


def test_tape_import_dry_run_changes_nothing_as_import_tar(django_backend: Backend) -> None:
    """tape import -y as import-tar -y: members checked, nothing stored; exit 0."""
    b = django_backend
    tar, ids, dests = import_situation(b, ("a", "b"))
    before = {tool: files_under(a.path) for tool, (a, _) in dests.items()}
    mine = ctl(b, "tape", "import", "-y", str(tar), str(dests["ours"][0].path))
    real = nbank(b, "archive", "import-tar", "-y", str(tar), str(dests["theirs"][0].path))
    assert codes(mine, real) == (0, 0), why(mine, real)
    for tool, (archive, name) in dests.items():
        assert files_under(archive.path) == before[tool]
        assert not any(located(b, id, name) for id in ids.values())


def test_tape_import_dry_run_fails_a_changed_member_as_import_tar(django_backend: Backend) -> None:
    """tape import -y of a member that fails its SHA-1: nothing stored; exit 1 in both."""
    b = django_backend
    tape = tape_archive(b)
    id = b.resource(b.blob("x"), tape)
    tar = make_tar(b.tmp / "bad.tar", [(f"{id}.dat", b"flipped")])
    dests = {tool: b.archive(f"dest-{tool}") for tool in ("ours", "theirs")}
    mine = ctl(b, "tape", "import", "-y", str(tar), str(dests["ours"][0].path))
    real = nbank(b, "archive", "import-tar", "-y", str(tar), str(dests["theirs"][0].path))
    assert codes(mine, real) == (1, 1), why(mine, real)
    for archive, name in dests.values():
        assert resource_files(archive) == set() and not located(b, id, name)


def test_tape_import_ids_from_a_file_as_import_tar(django_backend: Backend) -> None:
    """tape import -f FILE as import-tar -f: only the listed ids stored and located."""
    b = django_backend
    tar, ids, dests = import_situation(b, ("a", "b", "c"))
    listing = b.tmp / "ids.txt"
    listing.write_text(f"{ids['c']}\n\n{ids['a']}\n")
    mine = ctl(b, "tape", "import", "-f", str(listing), str(tar), str(dests["ours"][0].path))
    real = nbank(
        b, "archive", "import-tar", "-f", str(listing), str(tar), str(dests["theirs"][0].path)
    )
    assert codes(mine, real) == (0, 0), why(mine, real)
    stored = {tool: files_under(a.resources_dir) for tool, (a, _) in dests.items()}
    assert {Path(p).name for p in stored["ours"]} == {f"{ids[x]}.dat" for x in ("a", "c")}
    assert {p: data for p, (_, data) in stored["ours"].items()} == {
        p: data for p, (_, data) in stored["theirs"].items()
    }
    for _, name in dests.values():
        assert [located(b, ids[x], name) for x in ("a", "b", "c")] == [True, False, True]


# --- check tar -a -------------------------------------------------------------------------


def test_check_tar_archive_finds_a_missing_member_as_nbank(django_backend: Backend) -> None:
    """check tar -a ARCHIVE of a tar lacking one of its resources: named; exit 1 in both."""
    b = django_backend
    _, name, ids = stored_archive(b, ("a", "b"))
    partial = make_tar(b.tmp / "partial.tar", [(f"{ids['a']}.dat", b.blob("a"))])
    mine = ctl(b, "check", "tar", "-a", name, str(partial))
    real = nbank(b, "check", "tar", "-a", name, str(partial))
    assert codes(mine, real) == (1, 1), why(mine, real)
    for proc in (mine, real):
        missing = [line for line in proc.stderr.splitlines() if "MISSING" in line]
        assert len(missing) == 1 and ids["b"] in missing[0], proc.stderr


def test_check_tar_archive_whole_tar_passes_as_nbank(django_backend: Backend) -> None:
    """check tar -a ARCHIVE of a tar holding all its resources: exit 0 in both."""
    b = django_backend
    _, name, ids = stored_archive(b, ("a", "b"))
    whole = make_tar(b.tmp / "whole.tar", [(f"{ids[x]}.dat", b.blob(x)) for x in ("a", "b")])
    mine = ctl(b, "check", "tar", "-a", name, str(whole))
    real = nbank(b, "check", "tar", "-a", name, str(whole))
    assert codes(mine, real) == (0, 0), why(mine, real)


def test_check_tar_archive_unknown_fails_as_nbank(django_backend: Backend) -> None:
    """check tar -a with an archive the registry lacks: an error naming it, exit 1 in both."""
    b = django_backend
    tar = make_tar(b.tmp / "any.tar", [("x.dat", b.blob("x"))])
    nowhere = b.name("nowhere")
    mine = ctl(b, "check", "tar", "-a", nowhere, str(tar))
    real = nbank(b, "check", "tar", "-a", nowhere, str(tar))
    assert codes(mine, real) == (1, 1), why(mine, real)
    assert nowhere in mine.stderr and nowhere in real.stderr


# --- deposit -@ ---------------------------------------------------------------------------


def test_deposit_reads_more_file_names_from_stdin_as_nbank(django_backend: Backend) -> None:
    """deposit -@ deposits the files named on stdin too; the same -j records as nbank's."""
    b = django_backend
    archive, _ = b.archive()
    srcs: dict[str, list[Path]] = {}
    for tool in ("ours", "theirs"):
        folder = b.tmp / f"rig-{tool}"
        folder.mkdir()
        srcs[tool] = []
        for i in range(3):
            path = folder / f"{b.name(tool[0])}.dat"
            path.write_bytes(b.blob(f"{tool}{i}"))
            srcs[tool].append(path)

    def deposit(tool: Any, paths: list[Path]) -> Run:
        stdin = f"{paths[1]}\n\n{paths[2]}\n"
        return tool(
            b, "deposit", str(archive.path), "-d", b.dtype, "-j", "-@", str(paths[0]), input=stdin
        )

    mine, real = deposit(ctl, srcs["ours"]), deposit(nbank, srcs["theirs"])
    assert codes(mine, real) == (0, 0), why(mine, real)
    for proc, paths in ((mine, srcs["ours"]), (real, srcs["theirs"])):
        assert json_stream(proc.stdout) == [{"source": str(p), "id": p.stem} for p in paths]
        for p in paths:
            assert not p.exists()
            record = b.registry.get_resource(p.stem)
            assert record is not None and record.dtype == b.dtype
    assert resource_files(archive) == {f"{p.stem}.dat" for p in srcs["ours"] + srcs["theirs"]}


# --- the global -a user:password ----------------------------------------------------------


def without_netrc(b: Backend) -> dict[str, str]:
    """An environment whose home has no .netrc: only -a gives credentials."""
    env = base_env(b.tmp / "bare-home")
    env["NBANKD_CONFIG"] = str(b.tmp / "no-such-config.yaml")
    return env


def test_auth_option_writes_as_nbank(
    django_backend: Backend, django_registry: DjangoServer
) -> None:
    """-a user:password, no netrc: modify writes the same metadata; exit 0 in both."""
    b = django_backend
    _, arch = b.archive()
    mine, yours = b.resource(b.blob("m"), arch), b.resource(b.blob("y"), arch)
    env = without_netrc(b)
    auth = "{}:{}".format(*django_registry.auth)
    ours = ctl(b, "-a", auth, "modify", "-k", "rig=7", mine, env=env)
    theirs = nbank(b, "-a", auth, "modify", "-k", "rig=7", yours, env=env)
    assert codes(ours, theirs) == (0, 0), why(ours, theirs)
    records = [b.registry.get_resource(id) for id in (mine, yours)]
    assert [r.metadata if r else None for r in records] == [{"rig": 7}, {"rig": 7}]


@pytest.mark.parametrize("credentials", ["wrong password", "none"])
def test_a_write_with_refused_credentials_changes_nothing(
    django_backend: Backend, django_registry: DjangoServer, credentials: str
) -> None:
    """dtype add with a wrong -a password, or none: refused (nbank 1, nbankctl 3)."""
    b = django_backend
    env = without_netrc(b)
    wrong = ["-a", f"{django_registry.username}:not-the-password"]
    before = wrong if credentials == "wrong password" else []
    name = b.name("dta")
    ours = ctl(b, *before, "dtype", "add", name, "text/plain", env=env)
    theirs = nbank(b, *before, "dtype", "add", name, "text/plain", env=env)
    assert codes(ours, theirs) == (3, 1), why(ours, theirs)
    assert name not in {d.name for d in b.registry.list_datatypes()}
