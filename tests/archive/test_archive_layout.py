"""Creating, opening and naming things in neurobank archives."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
from pathlib import Path

import pytest

from nbankd import errors
from nbankd.archive import layout, opening
from nbankd.archive.access import target_mode
from nbankd.archive.layout import Anomaly
from nbankd.archive.opening import create_archive, open_archive

URL = "http://127.0.0.1:1/neurobank/"


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_create_writes_neurobank_config(tmp_path: Path) -> None:
    """nbank.json has neurobank 0.13's keys and defaults, with the umask as an int."""
    archive = create_archive(tmp_path / "a", URL)
    config = json.loads(archive.config_path.read_text())
    assert list(config) == ["$schema", "project", "owner", "registry", "policy"]
    assert config["registry"] == URL
    assert config["policy"] == {
        "auto_identifiers": False,
        "auto_id_type": None,
        "keep_extensions": True,
        "allow_directories": False,
        "require_hash": True,
        "access": {
            "user": pwd.getpwuid(os.geteuid()).pw_name,
            "group": grp.getgrgid(os.getgid()).gr_name,
            "umask": 2,
            "read_only_resources": True,
        },
    }


def test_create_writes_gitignore_and_readme(tmp_path: Path) -> None:
    """.gitignore lists resources/ and staging/; README.md describes the layout."""
    archive = create_archive(tmp_path / "a", URL)
    assert (archive.path / ".gitignore").read_text() == "resources/\nstaging/\n"
    readme = (archive.path / "README.md").read_text()
    assert "resources/" in readme and "staging/" in readme and "nbank.json" in readme


def test_create_sets_setgid_folder_and_file_modes(tmp_path: Path) -> None:
    """resources/ and staging/ are 2775 and the files 0664 with umask 002."""
    archive = create_archive(tmp_path / "a", URL)
    assert mode(archive.resources_dir) == 0o2775
    assert mode(archive.staging_dir) == 0o2775
    for name in ("nbank.json", "README.md", ".gitignore"):
        assert mode(archive.path / name) == 0o664


def test_create_honours_umask(tmp_path: Path) -> None:
    """umask 027 gives 2750 folders and 0640 files."""
    archive = create_archive(tmp_path / "a", URL, umask=0o027)
    assert mode(archive.resources_dir) == 0o2750
    assert mode(archive.config_path) == 0o640
    assert archive.policy.access.umask == 0o027


def test_create_applies_group(tmp_path: Path, lab_group: str) -> None:
    """The group option sets the group of every created folder and file."""
    archive = create_archive(tmp_path / "a", URL, group=lab_group)
    gid = grp.getgrnam(lab_group).gr_gid
    for p in (archive.resources_dir, archive.staging_dir, archive.config_path):
        assert os.lstat(p).st_gid == gid
    assert archive.policy.access.group == lab_group


def test_create_shared_records_no_owner(tmp_path: Path) -> None:
    """shared=True records no user."""
    archive = create_archive(tmp_path / "a", URL, shared=True)
    assert archive.policy.access.user is None


def test_create_accepts_policy_overrides(tmp_path: Path) -> None:
    """Policy keywords land in nbank.json's policy."""
    archive = create_archive(tmp_path / "a", URL, auto_identifiers=True, auto_id_type="uuid")
    assert archive.policy.auto_identifiers and archive.policy.auto_id_type == "uuid"


def test_create_rejects_unknown_policy_key(tmp_path: Path) -> None:
    """An unknown policy keyword is a TypeError and writes nothing."""
    with pytest.raises(TypeError, match="frobnicate"):
        create_archive(tmp_path / "a", URL, frobnicate=True)
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("existing", ["nbank.json", "README.md", ".gitignore"])
def test_create_refuses_to_overwrite(tmp_path: Path, existing: str) -> None:
    """An existing file is named in the error and left alone; nothing else is written."""
    root = tmp_path / "a"
    root.mkdir()
    (root / existing).write_text("mine")
    with pytest.raises(errors.ArchiveError, match=existing):
        create_archive(root, URL)
    assert (root / existing).read_text() == "mine"
    assert sorted(os.listdir(root)) == [existing]


def test_create_rejects_unknown_group(tmp_path: Path) -> None:
    """A group that does not exist is an ArchiveError naming it."""
    with pytest.raises(errors.ArchiveError, match="no-such-group-xyz"):
        create_archive(tmp_path / "a", URL, group="no-such-group-xyz")


def test_open_reads_what_create_wrote(tmp_path: Path) -> None:
    """open_archive returns the same archive create_archive did."""
    created = create_archive(tmp_path / "a", URL, allow_directories=True)
    assert open_archive(tmp_path / "a") == created


def test_open_old_form_config(tmp_path: Path) -> None:
    """Umask as an octal string, no read_only_resources/auto_id_type and no staging/ work."""
    root = tmp_path / "old"
    (root / "resources").mkdir(parents=True)
    old = {
        "$schema": "https://melizalab.github.io/neurobank/config.json#",
        "project": {"name": None, "description": None},
        "owner": {"name": None, "email": None},
        "registry": URL,
        "policy": {
            "auto_identifiers": False,
            "keep_extensions": True,
            "allow_directories": False,
            "require_hash": True,
            "access": {"user": None, "group": "root", "umask": "027"},
        },
    }
    (root / "nbank.json").write_text(json.dumps(old))
    archive = open_archive(root)
    assert archive.policy.access.umask == 0o027
    assert archive.policy.access.read_only_resources is False
    assert archive.policy.auto_id_type is None
    assert opening.ensure_staging(archive) == root / "staging"
    assert mode(root / "staging") == 0o2750


def test_open_missing_config_names_file_and_remedy(tmp_path: Path) -> None:
    """A folder without nbank.json raises NotAnArchive naming it and asking about mounts."""
    with pytest.raises(errors.NotAnArchive) as info:
        open_archive(tmp_path)
    text = str(info.value)
    assert str(tmp_path / "nbank.json") in text
    assert "mounted" in text and "nbankctl init" in text


def test_open_malformed_config_names_file(tmp_path: Path) -> None:
    """Invalid JSON raises NotAnArchive naming the file."""
    (tmp_path / "nbank.json").write_text("{not json")
    with pytest.raises(errors.NotAnArchive, match=r"nbank\.json is not valid JSON"):
        open_archive(tmp_path)


def test_open_config_without_registry_names_key(tmp_path: Path) -> None:
    """A config without a registry URL raises NotAnArchive naming the key."""
    (tmp_path / "nbank.json").write_text(json.dumps({"policy": {}}))
    with pytest.raises(errors.NotAnArchive, match="'registry'"):
        open_archive(tmp_path)


def test_open_bad_umask_names_key(tmp_path: Path) -> None:
    """A umask that is not octal raises NotAnArchive naming policy.access.umask."""
    config = {"registry": URL, "policy": {"access": {"umask": "9x"}}}
    (tmp_path / "nbank.json").write_text(json.dumps(config))
    with pytest.raises(errors.NotAnArchive, match="umask"):
        open_archive(tmp_path)


@pytest.mark.parametrize("kind", ["fifo", "link-to-device", "folder"])
def test_open_a_config_that_is_not_a_regular_file_is_not_an_archive(
    tmp_path: Path, kind: str
) -> None:
    """An nbank.json that is a FIFO (an open would wait for a writer for ever), a link
    to /dev/zero (a read would never end) or a folder is refused at once as not an
    archive, naming what it is, without opening it so that it blocks."""
    cfg = tmp_path / "nbank.json"
    if kind == "fifo":
        os.mkfifo(cfg)
    elif kind == "link-to-device":
        cfg.symlink_to("/dev/zero")
    else:
        cfg.mkdir()
    noun = {"fifo": "a FIFO", "link-to-device": "a device file", "folder": "a directory"}[kind]
    with pytest.raises(errors.NotAnArchive, match=f"nbank\\.json is {noun}, not a file"):
        open_archive(tmp_path)


def test_open_a_config_past_the_bound_is_not_an_archive(tmp_path: Path) -> None:
    """An nbank.json larger than the bound is refused (read no further than it)."""
    (tmp_path / "nbank.json").write_bytes(b" " * (opening.ARCHIVE_CONFIG_MAX_BYTES + 1))
    with pytest.raises(errors.NotAnArchive, match="larger than 1 MiB"):
        open_archive(tmp_path)


def test_open_a_config_by_a_link_to_a_regular_file(tmp_path: Path) -> None:
    """A link to a regular nbank.json is still followed (as nbank reads it)."""
    created = create_archive(tmp_path / "a", URL)
    (tmp_path / "a" / "nbank.json").rename(tmp_path / "real.json")
    (tmp_path / "a" / "nbank.json").symlink_to(tmp_path / "real.json")
    assert open_archive(tmp_path / "a") == created


def test_open_a_file_as_an_archive_says_no_config_and_a_link_loop_is_unavailable(
    tmp_path: Path,
) -> None:
    """A file given as the archive's folder (ENOTDIR) has no nbank.json, as before; an
    nbank.json that cannot be read (a link loop) is the archive unavailable, as before."""
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(errors.NotAnArchive, match="does not exist"):
        open_archive(tmp_path / "file")
    (tmp_path / "nbank.json").symlink_to("nbank.json")
    with pytest.raises(errors.ArchiveUnavailable, match="while reading"):
        open_archive(tmp_path)


def test_resource_paths_use_two_character_stub(tmp_path: Path) -> None:
    """resource_path is resources/<first two>/<id>[.ext]."""
    archive = create_archive(tmp_path / "a", URL)
    assert archive.resource_path("abc123") == archive.resources_dir / "ab" / "abc123"
    assert archive.resource_path("abc123", ext="wav") == archive.resources_dir / "ab" / "abc123.wav"
    assert archive.resource_path("abc123", ext=".wav").name == "abc123.wav"


def test_new_resource_path_keeps_source_suffix(tmp_path: Path) -> None:
    """keep_extensions keeps the last suffix of the source name."""
    archive = create_archive(tmp_path / "a", URL)
    assert archive.new_resource_path("xy1", "rec.tar.gz").name == "xy1.gz"
    assert archive.new_resource_path("xy1", "noext").name == "xy1"


def test_new_resource_path_without_extensions(tmp_path: Path) -> None:
    """keep_extensions false drops the suffix."""
    archive = create_archive(tmp_path / "a", URL, keep_extensions=False)
    assert archive.new_resource_path("xy1", "rec.wav").name == "xy1"


def test_stored_path_resolves_extension(tmp_path: Path) -> None:
    """stored_path finds the stored file whatever its extension, or None."""
    archive = create_archive(tmp_path / "a", URL)
    assert archive.stored_path("abc") is None
    target = archive.resource_path("abc", "wav")
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert archive.stored_path("abc") == target
    assert archive.stored_path("abcd") is None


def test_stored_path_sees_dangling_symlink(tmp_path: Path) -> None:
    """A dangling symlink at the resource path still counts as stored (never overwritten)."""
    archive = create_archive(tmp_path / "a", URL)
    target = archive.resource_path("abc")
    target.parent.mkdir()
    target.symlink_to(tmp_path / "nowhere")
    assert archive.stored_path("abc") == target


def test_iter_resources_lists_resources_and_collects_anomalies(tmp_path: Path) -> None:
    """Resources are yielded; strays, symlinks, partials and misplaced files are collected."""
    archive = create_archive(tmp_path / "a", URL)
    res = archive.resources_dir
    for rel in ("ab/abc.wav", "ab/.abd.wav.partial", "cd/xyz.wav", "stray.txt"):
        (res / rel).parent.mkdir(exist_ok=True)
        (res / rel).write_bytes(b"x")
    (res / "ef" / "efg").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"x")
    (res / "gh").symlink_to(outside)
    (res / "ef" / "eflink").symlink_to(outside / "secret")
    anomalies: list[Anomaly] = []
    found = list(archive.iter_resources(anomalies))
    assert found == [("abc", res / "ab" / "abc.wav"), ("efg", res / "ef" / "efg")]
    assert sorted(a.path.relative_to(res).as_posix() for a in anomalies) == [
        "ab/.abd.wav.partial",
        "cd/xyz.wav",
        "ef/eflink",
        "gh",
        "stray.txt",
    ]


def test_target_modes_follow_neurobank_policy(tmp_path: Path) -> None:
    """Layout folders 2775; read-only resources 0444/0555; writable ones 0664/0775."""
    ro = create_archive(tmp_path / "ro", URL)
    rw = create_archive(tmp_path / "rw", URL, read_only_resources=False)
    stub = ro.resources_dir / "ab"
    assert target_mode(ro, stub, is_dir=True) == 0o2775
    assert target_mode(ro, stub / "abc", is_dir=False) == 0o444
    assert target_mode(ro, stub / "abc" / "sub", is_dir=True) == 0o555
    assert target_mode(rw, rw.resources_dir / "ab" / "abc", is_dir=False) == 0o664
    assert target_mode(rw, rw.resources_dir / "ab" / "abc", is_dir=True) == 0o775


@pytest.mark.parametrize("id", ["abc", "ab", "a", "abcd", "zz"])
def test_stored_entries_from_a_listing_are_those_listed_now(tmp_path: Path, id: str) -> None:
    """An identifier's entries found through a Listing made earlier are the ones a fresh
    listing of its stub folders finds, for names that only start like it included."""
    archive = create_archive(tmp_path / "a", URL)
    names = {
        "ab": ["abc", "abc.wav", "abc.tar.gz", "abcd.wav", "abc.", ".abc", "ab.wav", "ab"],
        "a": ["a.wav", "ab"],
        "a.": ["a.dat"],
        "zz": ["zz9.wav"],
    }
    for stub, entries in names.items():
        (archive.resources_dir / stub).mkdir()
        for name in entries:
            (archive.resources_dir / stub / name).write_bytes(b"")
    listings = {
        archive.resources_dir / stub: layout.Listing(os.listdir(archive.resources_dir / stub))
        for stub in names
    }

    def known(stub: Path, id: str) -> list[str] | None:
        if stub not in listings:
            raise FileNotFoundError(2, "No such file or directory", str(stub))
        return listings[stub].of(id)

    assert archive.stored_entries(id, known=known) == archive.stored_entries(id)


def test_a_listing_follows_its_owners_changes() -> None:
    """Names added to a Listing are found for their identifier; discarded ones are not."""
    listing = layout.Listing(["abc.wav"])
    listing.add("abc.dat")
    listing.discard("abc.wav")
    listing.discard("never.there")
    assert listing.of("abc") == ["abc.dat"] and listing.of("ab") == []


@pytest.mark.parametrize(
    "changes",
    [
        ["+abc", "+abc.wav", "+abc.dat", "-abc.wav", "-abc", "+abc.wav", "-abc.dat"],
        ["+abc", "+abc", "-abc", "-abc", "+abc.x"],
        ["+a.b.c", "+a.b", "+a", "-a.b"],
        ["-abc", "+abc.wav", "+abc.wav", "-abc.wav", "-abc.wav"],
    ],
)
def test_a_listing_after_changes_answers_as_a_set_of_its_names(changes: list[str]) -> None:
    """A Listing's answers and size after adds and discards, repeats included, are a
    plain set's, for identifiers with and without a dot."""
    listing, names = layout.Listing(), set[str]()
    for change in changes:
        name = change[1:]
        if change[0] == "+":
            listing.add(name)
            names.add(name)
        else:
            listing.discard(name)
            names.discard(name)
        assert len(listing) == len(names)
        for id in ("a", "a.b", "abc", "ab"):
            expected = sorted(n for n in names if n == id or n.startswith(id + "."))
            assert sorted(listing.of(id)) == expected
