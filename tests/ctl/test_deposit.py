"""nbankctl deposit: nbank's deposit through the daemon's journaled, verified steps."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fixtures.cli_backends import (
    NBANKCTL,
    Backend,
    deposit_while_its_name_is_reused,
    json_stream,
    sha1,
)
from fixtures.daemon import start_until_said
from fixtures.fault_proxy import FaultProxy
from nbankd.archive.layout import Archive
from nbankd.archive.opening import create_archive
from nbankd.daemon import statelock
from nbankd.deposit.journal import Journal


def files_in(folder: Path) -> list[str]:
    """Every file under ``folder`` (relative paths), sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def stored(archive: Archive) -> list[str]:
    return files_in(archive.resources_dir)


def rig_folder(backend: Backend, name: str = "rig") -> Path:
    folder = backend.tmp / name
    folder.mkdir(exist_ok=True)
    return folder


def deposit(backend: Backend, archive: Archive, *argv: str, input: str | None = None):  # type: ignore[no-untyped-def]
    return backend.ctl("deposit", str(archive.path), "-d", backend.dtype, *argv, input=input)


def test_deposit_moves_the_file_into_the_archive_and_registers_it(backend: Backend) -> None:
    """A deposited file is registered with its SHA-1, stored under its stub folder and
    gone from where it was; -j prints nbank's {"source", "id"} line."""
    archive, name = backend.archive()
    folder = rig_folder(backend)
    data = backend.blob("one")
    src = folder / f"{backend.name('rec')}.wav"
    src.write_bytes(data)
    r = deposit(backend, archive, "-j", str(src))
    assert r.returncode == 0, r.stderr
    [line] = json_stream(r.stdout)
    id = src.stem
    assert line == {"source": str(src), "id": id}
    assert not src.exists()
    assert stored(archive) == [f"{id[:2]}/{id}.wav"]
    record = backend.registry.get_resource(id)
    assert record is not None and record.sha1 == sha1(data) and record.dtype == backend.dtype
    assert [loc.archive_name for loc in backend.registry.get_locations(id)] == [name]
    assert files_in(folder) == []  # no work or rejected folder left behind


def test_deposit_gives_what_nbank_deposit_gives(django_backend: Backend) -> None:
    """Side by side on one server: the same stored layout, record fields and -j keys."""
    b = django_backend
    archive, _ = b.archive()
    folder = rig_folder(b)
    ours, theirs = folder / f"{b.name('a')}.dat", folder / f"{b.name('b')}.dat"
    ours.write_bytes(b.blob("ours"))
    theirs.write_bytes(b.blob("theirs"))
    meta = ["-k", "session=3", "-k", "rig=r2"]
    r_ours = deposit(b, archive, "-j", *meta, str(ours))
    r_theirs = b.nbank("deposit", str(archive.path), "-d", b.dtype, "-j", *meta, str(theirs))
    assert r_ours.returncode == r_theirs.returncode == 0, (r_ours.stderr, r_theirs.stderr)
    [a], [t] = json_stream(r_ours.stdout), json_stream(r_theirs.stdout)
    assert set(a) == set(t) == {"source", "id"}
    assert stored(archive) == sorted(
        [f"{ours.stem[:2]}/{ours.stem}.dat", f"{theirs.stem[:2]}/{theirs.stem}.dat"]
    )
    ra, rt = b.registry.get_resource(ours.stem), b.registry.get_resource(theirs.stem)
    assert ra is not None and rt is not None
    assert (ra.dtype, ra.metadata) == (rt.dtype, rt.metadata)
    assert ra.metadata == {"session": 3, "rig": "r2"}
    check = b.nbank("verify", str(archive.resources_dir / ours.stem[:2] / f"{ours.stem}.dat"))
    assert check.returncode == 0, check.stdout + check.stderr


def test_duplicate_bytes_are_refused_and_the_file_stays(backend: Backend) -> None:
    """A file whose bytes are already registered is not deposited, stays where it was
    (no work or rejected folder left), and the command exits 1 naming it."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    data = backend.blob("dup")
    first, second = folder / f"{backend.name('x')}.dat", folder / f"{backend.name('y')}.dat"
    first.write_bytes(data)
    assert deposit(backend, archive, str(first)).returncode == 0
    second.write_bytes(data)
    r = deposit(backend, archive, "-j", str(second))
    assert r.returncode == 1
    [line] = json_stream(r.stdout)
    assert line["source"] == str(second) and first.stem in line["error"]
    assert second.read_bytes() == data
    assert files_in(folder) == [second.name]
    assert backend.registry.get_resource(second.stem) is None


def test_a_taken_name_is_refused_and_the_file_stays(backend: Backend) -> None:
    """A file named for an existing resource keeps its bytes in place; exit 1."""
    archive, name = backend.archive()
    folder = rig_folder(backend)
    taken = backend.resource(backend.blob("old"), name)
    src = folder / f"{taken}.dat"
    src.write_bytes(backend.blob("new"))
    r = deposit(backend, archive, str(src))
    assert r.returncode == 1
    assert src.read_bytes() == backend.blob("new")
    assert str(src) in r.stderr


def test_links_folders_and_missing_files_are_refused_the_rest_deposited(
    backend: Backend,
) -> None:
    """A symlink, a folder and a missing path are each named; the good file goes in."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    good = folder / f"{backend.name('g')}.dat"
    good.write_bytes(backend.blob("good"))
    link = folder / "link.dat"
    link.symlink_to(good)
    sub = folder / "session"
    sub.mkdir()
    r = deposit(backend, archive, "-j", str(link), str(sub), str(folder / "gone.dat"), str(good))
    assert r.returncode == 1
    lines = {Path(d["source"]).name: d for d in json_stream(r.stdout)}
    assert "symbolic link" in lines["link.dat"]["error"]
    assert "directory" in lines["session"]["error"]
    assert "does not exist" in lines["gone.dat"]["error"]
    assert lines[good.name] == {"source": str(good), "id": good.stem}
    assert link.is_symlink() and sub.is_dir()


def test_dry_run_registers_and_moves_nothing(backend: Backend) -> None:
    """-y reports the id and metadata each file would get and changes nothing."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    src = folder / f"{backend.name('d')}.dat"
    src.write_bytes(backend.blob("dry"))
    r = deposit(backend, archive, "-y", "-j", "-k", "rig=3", str(src))
    assert r.returncode == 0, r.stderr
    [line] = json_stream(r.stdout)
    assert line == {"source": str(src), "id": src.stem, "dry_run": True, "metadata": {"rig": 3}}
    assert src.exists() and stored(archive) == []
    assert backend.registry.get_resource(src.stem) is None


def test_file_names_from_stdin_are_deposited(backend: Backend) -> None:
    """-@ reads more file names from standard input, one per line."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    names = [folder / f"{backend.name('s')}.dat" for _ in range(3)]
    for i, p in enumerate(names):
        p.write_bytes(backend.blob(f"stdin{i}"))
    r = deposit(backend, archive, "-@", input="".join(f"{p}\n" for p in names))
    assert r.returncode == 0, r.stderr
    assert stored(archive) == sorted(f"{p.stem[:2]}/{p.name}" for p in names)


def test_an_interrupted_deposit_is_finished_by_the_next_run(backend: Backend) -> None:
    """Killed (-9) right after registering, the file is held in the work folder; the
    next `nbankctl deposit ARCHIVE` finishes it: one record, one stored file."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    data = backend.blob("crash")
    src = folder / f"{backend.name('c')}.dat"
    src.write_bytes(data)
    env = dict(backend.env, NBANKD_CRASH_AT="after-register")
    crashed = subprocess.run(
        [NBANKCTL, *backend.before, "deposit", str(archive.path), "-d", backend.dtype, str(src)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert crashed.returncode == -9
    assert not src.exists() and stored(archive) == []
    assert backend.registry.get_resource(src.stem) is not None
    r = deposit(backend, archive, "-j")
    assert r.returncode == 0, r.stderr
    assert json_stream(r.stdout) == [{"source": str(src), "id": src.stem}]
    assert stored(archive) == [f"{src.stem[:2]}/{src.name}"]
    assert (archive.resources_dir / src.stem[:2] / src.name).read_bytes() == data


def test_an_unreachable_registry_exits_3_and_leaves_the_file(backend: Backend) -> None:
    """With the registry unreachable nothing is claimed: the file stays, exit 3."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    src = folder / f"{backend.name('u')}.dat"
    src.write_bytes(backend.blob("unreach"))
    argv = ["-r", "http://127.0.0.1:9/neurobank/", "deposit", str(archive.path)]
    r = subprocess.run(
        [NBANKCTL, *argv, "-d", backend.dtype, str(src)],
        env={k: v for k, v in backend.env.items() if k != "NBANKD_CONFIG"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 3, r.stderr
    assert src.exists() and files_in(folder) == [src.name]


def test_a_deposit_waits_for_another_deposit_holding_the_state_directory(
    tmp_path: Path,
) -> None:
    """With a daemon configuration whose state directory another deposit holds (no
    daemon answers its socket), the command says so, waits for the lock, then deposits."""
    from nbankd.registry.embedded import EmbeddedRegistry

    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(f"registry: embedded\nstate_dir: {state}\n")
    reg = EmbeddedRegistry(state / "registry.sqlite3")
    archive = create_archive(tmp_path / "arch", reg.url)
    reg.add_archive("arch", "neurobank", str(archive.path))
    reg.add_datatype("wav", "audio/wav")
    reg.close()
    src = tmp_path / "rig" / "rec.wav"
    src.parent.mkdir()
    src.write_bytes(b"bytes")
    lock = statelock.acquire(state)
    try:
        argv = [NBANKCTL, "-c", str(config), "deposit", str(archive.path), "-d", "wav", str(src)]
        proc, said = start_until_said(argv, "waiting for it")
        assert src.read_bytes() == b"bytes"  # nothing touched while it waits
    finally:
        lock.release()
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 0, said + rest
    assert not src.exists()
    assert (archive.resources_dir / "re" / "rec.wav").read_bytes() == b"bytes"


def test_a_deposit_as_another_user_than_the_archive_owner_is_refused(backend: Backend) -> None:
    """An archive whose access.user is someone else refuses the deposit, naming the user."""
    archive = create_archive(backend.tmp / "owned", backend.registry.url)
    config = json.loads(archive.config_path.read_text())
    config["policy"]["access"]["user"] = "nobody"
    archive.config_path.write_text(json.dumps(config))
    backend.registry.add_archive(backend.name("ow"), "neurobank", str(archive.path))
    src = rig_folder(backend) / f"{backend.name('o')}.dat"
    src.write_bytes(backend.blob("owned"))
    r = deposit(backend, archive, str(src))
    assert r.returncode == 2
    assert "'nobody'" in r.stderr
    assert src.exists()


@pytest.mark.parametrize(
    "value,parsed",
    [("3", 3), ("[1, 2]", [1, 2]), ("NaN", "NaN"), ("a b", "a b"), ("True", True), ("None", None)],
)
def test_metadata_values_are_json_when_they_parse(value: str, parsed: object) -> None:
    """-k KEY=VALUE reads VALUE as JSON when it parses (never NaN; True/False/None as
    nbank reads them), else as text, as deposit and modify both read it."""
    from nbankctl.registry_cmds import parse_value

    assert parse_value(value) == parsed


def test_metadata_that_is_not_utf8_is_refused_and_nothing_deposited(backend: Backend) -> None:
    """A -k, --experimenter or --animal that is not UTF-8: exit 2 naming it, nothing done."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    src = folder / f"{backend.name('n')}.dat"
    src.write_bytes(backend.blob("not utf-8"))
    for option, value, named in (
        ("-k", "k\udcff=1", "-k 'k\\xff=1'"),
        ("-k", "k=\udcff", "-k 'k=\\xff'"),
        ("-k", 'k=["\udcff"]', "-k 'k=[\"\\xff\"]'"),
        ("--experimenter", "\udcff", "--experimenter '\\xff'"),
        ("--animal", "a\udcff", "--animal 'a\\xff'"),
    ):
        r = deposit(backend, archive, option, value, str(src))
        assert r.returncode == 2 and named in r.stderr, r.stderr
        assert "not UTF-8" in r.stderr
    assert files_in(folder) == [src.name]
    assert stored(archive) == []
    assert backend.registry.get_resource(src.stem) is None


def test_the_journal_holds_no_unfinished_item_after_a_clean_run(backend: Backend) -> None:
    """Every item a run journals has reached its end when the run exits 0."""
    archive, _ = backend.archive()
    src = rig_folder(backend) / f"{backend.name('j')}.dat"
    src.write_bytes(backend.blob("journal"))
    assert deposit(backend, archive, str(src)).returncode == 0
    if backend.kind == "embedded":
        state = backend.tmp / "state"
    else:
        state = Path(backend.env["HOME"]) / ".local" / "state" / "nbankctl"
    journal = Journal(state / "journal.sqlite3")
    try:
        assert journal.unfinished() == []
    finally:
        journal.close()


def test_a_held_file_refused_by_a_later_run_goes_back_in_place(
    django_backend: Backend, fault_proxy: FaultProxy
) -> None:
    """A file held by one run (the registry failing) and refused by the next (its name
    taken meanwhile by other bytes), which deposits nothing else from its folder: the
    file is put back where it was, unchanged, and nothing is left holding it."""
    b = django_backend
    name = b.name("held")
    archive = create_archive(b.tmp / f"arch-{name}", fault_proxy.url)
    b.registry.add_archive(name, "neurobank", str(archive.path))
    folder = rig_folder(b)
    src = folder / f"{b.name('h')}.dat"
    data = b.blob("held")
    src.write_bytes(data)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [NBANKCTL, "-r", fault_proxy.url, "deposit", str(archive.path), *argv],
            env=b.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    fault_proxy.inject("error500", methods={"POST"}, path_contains="resources")
    first = run("-d", b.dtype, "--wait", "0", str(src))
    assert first.returncode != 0 and not src.exists(), first.stderr
    fault_proxy.clear()
    b.resource(b.blob("someone else's"), None, name=src.stem)
    second = run("-j")
    assert second.returncode == 1, second.stderr
    [record] = json_stream(second.stdout)
    assert record["source"] == str(src) and "error" in record
    assert src.read_bytes() == data
    assert files_in(folder) == [src.name]
    assert stored(archive) == []


def test_a_refused_file_whose_place_was_taken_is_kept_and_the_user_told_what_to_do(
    backend: Backend,
) -> None:
    """A duplicate whose name someone reused while it was claimed stays held with its
    bytes; the run names where, says to move it back by hand, and -j gives kept_at."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    data = backend.blob("kept")
    first, again = folder / f"{backend.name('k')}.dat", folder / f"{backend.name('q')}.dat"
    first.write_bytes(data)
    assert deposit(backend, archive, str(first)).returncode == 0
    again.write_bytes(data)
    release = backend.tmp / "release"
    env = {**backend.env, "NBANKD_PAUSE_AT": "after-claim", "NBANKD_PAUSE_UNTIL": str(release)}
    argv = [NBANKCTL, *backend.before, "deposit", str(archive.path), "-d", backend.dtype]
    deposit_while_its_name_is_reused([*argv, "-j", str(again)], env, again, release, data)


def test_a_name_with_terminal_escapes_is_shown_as_text_on_stderr(backend: Backend) -> None:
    """A deposit's per-file line shows a file name's control characters as text, never
    as raw escapes reaching the user's terminal."""
    archive, _ = backend.archive()
    folder = rig_folder(backend)
    src = folder / "a\x1b]0;pwn\x07b.wav"
    src.write_bytes(backend.blob("escape"))
    r = deposit(backend, archive, str(src))
    assert r.returncode == 1
    assert not set(r.stderr) & {"\x1b", "\x07"}, repr(r.stderr)
    assert "a\\x1b]0;pwn\\x07b.wav: not deposited" in r.stderr
    assert src.exists()
