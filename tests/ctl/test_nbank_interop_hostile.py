"""Hostile interchangeability checks between nbankd (daemon, ``nbankctl``) and the real
nbank 0.13 client, on the real django-neurobank server: what one tool writes, the other
must read the same way, and a lab's records must not differ by the tool that made them.

The tests that failed on review name defects since fixed; the guard tests (marked so
in their docstrings) pin cross-tool behaviour that held up under attack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fixtures.cli_backends import NBANK, Backend, json_stream
from fixtures.daemon import DaemonHarness
from nbankd.archive.opening import create_archive
from nbankd.hashing import directory_hash
from nbankd.registry.http import HttpRegistry


def deposit_both(
    b: Backend, archive: Path, label: str, *argv: str
) -> tuple[subprocess.CompletedProcess[str], subprocess.CompletedProcess[str], Path, Path]:
    """``nbankctl deposit`` and ``nbank deposit`` of two files (unique bytes), same ARGV."""
    rig = b.tmp / "rig"
    rig.mkdir(exist_ok=True)
    ours, theirs = rig / f"{b.name('o')}.dat", rig / f"{b.name('t')}.dat"
    ours.write_bytes(b.blob(f"{label}-ours"))
    theirs.write_bytes(b.blob(f"{label}-theirs"))
    r = b.ctl("deposit", str(archive), "-d", b.dtype, "-j", *argv, str(ours))
    t = b.nbank("deposit", str(archive), "-d", b.dtype, "-j", *argv, str(theirs))
    return r, t, ours, theirs


# --- metadata given with -k ------------------------------------------------------------


def test_deposit_k_python_literals_register_the_values_nbank_registers(
    django_backend: Backend,
) -> None:
    """-k flag=True / off=False / gone=None register true, false and null as nbank's
    deposit does (and as nbankctl modify does), not the strings "True", "False", "None"."""
    b = django_backend
    archive, _ = b.archive()
    argv = ["-k", "flag=True", "-k", "off=False", "-k", "gone=None", "-k", "n=3"]
    r, t, ours, theirs = deposit_both(b, archive.path, "literals", *argv)
    assert (r.returncode, t.returncode) == (0, 0), (r.stderr, t.stderr)
    mine = b.registry.get_resource(ours.stem)
    nbanks = b.registry.get_resource(theirs.stem)
    assert mine is not None and nbanks is not None
    assert nbanks.metadata == {"flag": True, "off": False, "gone": None, "n": 3}
    assert mine.metadata == nbanks.metadata


@pytest.mark.parametrize("value", ["[1,", "{bad"])
def test_deposit_k_malformed_json_list_or_object_is_refused_as_nbank(
    django_backend: Backend, value: str
) -> None:
    """-k x=[1, (a JSON list or object that does not parse) is a usage error (exit 2)
    that deposits nothing, as nbank's; never registered as the text of the typo."""
    b = django_backend
    archive, _ = b.archive()
    r, t, ours, _theirs = deposit_both(b, archive.path, "typo", "-k", f"x={value}")
    assert t.returncode == 2 and "not a valid JSON list or object" in t.stderr, t.stderr
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert b.registry.get_resource(ours.stem) is None
    assert ours.read_bytes() == b.blob("typo-ours")


# --- duplicates across tools -----------------------------------------------------------


def test_redepositing_a_copy_nbank_stored_says_already_deposited(
    django_backend: Backend,
) -> None:
    """A copy of a file `nbank deposit` already stored (same name, same bytes), given to
    `nbankctl deposit`: one record, the archive copy untouched, and the line on stderr
    says it was already deposited, not "deposited as" (the copy it removes was never
    archived by this run)."""
    b = django_backend
    archive, _ = b.archive()
    src = b.tmp / f"{b.name('dup')}.wav"
    src.write_bytes(b.blob("dup"))
    first = b.nbank("deposit", str(archive.path), "-d", b.dtype, str(src))
    assert first.returncode == 0, first.stderr
    stored = archive.resources_dir / src.stem[:2] / src.name
    again = b.tmp / "again"
    again.mkdir()
    shutil.copyfile(stored, again / src.name)
    r = b.ctl("deposit", str(archive.path), "-d", b.dtype, "-j", str(again / src.name))
    assert r.returncode == 0, r.stderr
    assert stored.read_bytes() == b.blob("dup")
    assert [p.name for p in b.registry.search(sha1=b.registry.get_resource(src.stem).sha1)] == [
        src.stem
    ]
    assert "already" in r.stderr, r.stderr


# --- guards: what held up --------------------------------------------------------------


def odd_tree(root: Path) -> None:
    """A session folder whose names attack a directory hash and a canonical zip: the
    component sort (``a/b`` against ``a-b/c``), dot-files and dot-folders, names an
    inbox's ignore patterns match, NFC and NFD unicode, spaces, an empty folder,
    modes 0755 and 0600, ten levels of folders."""
    (root / "a").mkdir(parents=True)
    (root / "a" / "b").write_bytes(b"ab")
    (root / "a-b").mkdir()
    (root / "a-b" / "c").write_bytes(b"a-b/c")
    (root / ".hidden").write_bytes(b"hidden")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_bytes(b"cfg")
    (root / "\u00fc nfc.txt").write_bytes(b"nfc")
    (root / "u\u0308 nfd.txt").write_bytes(b"nfd")
    (root / "empty").mkdir()
    (root / "x.tmp").write_bytes(b"tmp")
    (root / "y.part").write_bytes(b"part")
    (root / ".z.partial").write_bytes(b"partial")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    (root / "exec.sh").chmod(0o755)
    (root / "secret").write_bytes(b"secret")
    (root / "secret").chmod(0o600)
    deep = root.joinpath(*(f"d{i}" for i in range(10)))
    deep.mkdir(parents=True)
    (deep / "deep").write_bytes(b"deep")


def django_daemon(daemon_factory: Any, server: Any, **kwargs: Any) -> DaemonHarness:
    h = daemon_factory(registry=server.url, auth=(server.username, server.password), **kwargs)
    h.dtype = "dt" + h.archive_name
    with HttpRegistry(server.url, (server.username, server.password)) as reg:
        reg.add_datatype(h.dtype, "application/octet-stream")
    return h


def run_nbank(server: Any, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANK", "NETRC"))}
    return subprocess.run(
        [NBANK, "-r", server.url, *argv], capture_output=True, text=True, env=env, timeout=120
    )


CLEAN = (
    "missing from archive: 0; missing from registry: 0; read/verify errors: 0; "
    "other layout errors: 0; permission errors: 0; registered elsewhere: 0"
)


@pytest.mark.parametrize("mode", ["resources", "zip"])
def test_guard_daemon_folder_with_odd_names_reads_back_in_nbank(
    daemon_factory: Any, request: pytest.FixtureRequest, mode: str
) -> None:
    """Guard (passes): a folder with hostile names deposited by the daemon, as a folder
    or as a zip, keeps every file, has nbank's directory hash (or the exact bytes of
    nbank's canonical zip), and `nbank locate`, `nbank verify` and `nbank archive check`
    agree."""
    server = request.getfixturevalue("django_registry")
    h = django_daemon(daemon_factory, server, inbox_options={"directories": mode})
    create_archive(h.archive, h.registry_address, allow_directories=True)
    h.start()
    ident = "od" + os.urandom(4).hex()
    odd_tree(h.root / ident)
    ref = h.root / "ref" / ident
    shutil.copytree(h.root / ident, ref)
    os.rename(h.root / ident, h.inbox / ident)
    h.wait_settled(1)
    h.stop()
    [receipt] = h.receipts()
    stored = Path(receipt["archive_path"])
    if mode == "zip":
        theirs = h.root / "nbank.zip"
        zipped = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from nbank.canonical_zip import "
                "zip_directory; zip_directory(Path(sys.argv[1]), Path(sys.argv[2]))",
                str(ref),
                str(theirs),
            ],
            capture_output=True,
            text=True,
        )
        assert zipped.returncode == 0, zipped.stderr
        assert stored.read_bytes() == theirs.read_bytes()
    else:
        assert receipt["sha1"] == directory_hash(ref)
        verified = run_nbank(server, "verify", str(ref))
        assert verified.returncode == 0 and "OK" in verified.stdout, verified
    located = run_nbank(server, "locate", ident)
    assert located.stdout.split() == [ident, str(stored)], located
    check = run_nbank(server, "archive", "check", str(h.archive))
    assert check.returncode == 0 and CLEAN in check.stdout + check.stderr, check


def test_guard_daemon_into_an_nbank_archive_matches_nbanks_modes_and_duplicates(
    daemon_factory: Any, request: pytest.FixtureRequest, lab_group: str, tmp_path: Path
) -> None:
    """Guard (passes): an archive made and filled by nbank (umask 027, a lab group) takes
    the daemon's deposits in nbank's stub folders with nbank's group and modes; the
    file nbank stored, dropped again, is already deposited (one record), its bytes under
    another name or extension are rejected as duplicates; nbank's check stays clean."""
    server = request.getfixturevalue("django_registry")
    h = django_daemon(daemon_factory, server)
    home = tmp_path / "home"
    home.mkdir()
    server.write_netrc(home / ".netrc")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANK", "NETRC"))}
    env["HOME"] = str(home)

    def nbank(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NBANK, "-r", server.url, *argv], capture_output=True, text=True, env=env
        )

    made = nbank("init", "-u", "027", "-g", lab_group, str(h.archive))
    assert made.returncode == 0, made.stderr
    tag = os.urandom(3).hex()
    rig = tmp_path / "rig"
    rig.mkdir()
    (rig / f"ab{tag}1.wav").write_bytes(b"one" + tag.encode())
    (rig / f"cd{tag}1.wav").write_bytes(b"cd" + tag.encode())
    put = nbank(
        "deposit",
        "-d",
        h.dtype,
        str(h.archive),
        str(rig / f"ab{tag}1.wav"),
        str(rig / f"cd{tag}1.wav"),
    )
    assert put.returncode == 0, put.stderr
    h.start()
    h.drop(f"ab{tag}2.wav", b"two" + tag.encode())
    h.drop(f"ab{tag}1.wav", b"one" + tag.encode())
    h.drop(f"xx{tag}.wav", b"cd" + tag.encode())
    h.drop(f"cd{tag}1.dat", b"cd" + tag.encode())
    h.wait_settled(4)
    h.stop()
    outcomes = {r["id"]: r["outcome"] for r in h.receipts()}
    assert outcomes == {f"ab{tag}1": "already-deposited", f"ab{tag}2": "deposited"}
    assert sorted(r["code"] for r in h.reasons()) == ["duplicate", "duplicate"]
    ours, theirs = (h.archive / "resources" / "ab" / f"ab{tag}{i}.wav" for i in (2, 1))
    for a, t in ((ours, theirs), (ours.parent, theirs.parent.parent)):
        sa, st = a.stat(), t.stat()
        assert (sa.st_mode, sa.st_gid) == (st.st_mode, st.st_gid), a
    with HttpRegistry(server.url) as reg:
        assert [r.name for r in reg.search(sha1=reg.get_resource(f"cd{tag}1").sha1)] == [
            f"cd{tag}1"
        ]
    check = nbank("archive", "check", str(h.archive))
    assert check.returncode == 0 and CLEAN in check.stdout + check.stderr, check


def test_guard_auto_ids_of_odd_names_store_the_suffix_nbank_stores(
    django_backend: Backend,
) -> None:
    """Guard (passes): with -A, odd file names (``.tar.gz``, no extension, a unicode or
    spaced extension, a trailing dot, a sidecar's or marker's name) are stored with the
    same suffix by nbankctl and nbank, and both tools' checks stay clean."""
    b = django_backend
    archive, _ = b.archive()
    names = [
        "rec.tar.gz",
        "noext",
        "rec.WAV",
        "rec.w\u00e4v",
        "rec.a b",
        "rec.",
        "a.b.c.d",
        "sp ace.wav",
        "rec.wav.nbank.yaml",
        "rec.done",
        "rec.partial",
    ]
    suffixes: dict[str, list[str]] = {}
    for tool, run in (("ctl", b.ctl), ("nbank", b.nbank)):
        folder = b.tmp / tool
        folder.mkdir()
        for i, n in enumerate(names):
            (folder / n).write_bytes(b.blob(f"{tool}{i}"))
        p = run(
            "deposit",
            str(archive.path),
            "-d",
            b.dtype,
            "-A",
            "-j",
            *[str(folder / n) for n in names],
        )
        assert p.returncode == 0, p.stderr
        suffixes[tool] = []
        for rec in json_stream(p.stdout):
            [stored] = (archive.resources_dir / rec["id"][:2]).glob(rec["id"] + "*")
            suffixes[tool].append(stored.name[len(rec["id"]) :])
    assert suffixes["ctl"] == suffixes["nbank"]
    for check in (
        b.nbank("archive", "check", str(archive.path)),
        b.ctl("archive", "check", str(archive.path)),
    ):
        assert check.returncode == 0 and CLEAN in check.stdout + check.stderr, check
