"""Scanning inboxes on a real filesystem: kinds, ignore, companions, trees, odd names."""

from __future__ import annotations

import os
import pickle
import socket
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nbankd.names import lines_without_controls, printable, without_controls
from nbankd.watch.identity import Identity
from nbankd.watch.scan import Entry, EntryKind, is_ignored, scan_inbox

NOBODY = 65534


def kinds(entries: list[Entry]) -> dict[str, EntryKind]:
    return {e.relpath: e.kind for e in entries}


def scan(root: Path, **kw: object) -> list[Entry]:
    kw.setdefault("recursive", True)
    return scan_inbox(root, **kw)  # type: ignore[arg-type]


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    root = tmp_path / "inbox"
    root.mkdir()
    return root


# --- kinds ---------------------------------------------------------------------------


def _make_file(root: Path) -> None:
    (root / "x").write_bytes(b"data")


def _make_symlink_to_file(root: Path) -> None:
    (root / "target").mkdir()
    (root / "target" / "t").write_bytes(b"t")
    (root / "x").symlink_to(root / "target" / "t")


def _make_dangling_symlink(root: Path) -> None:
    (root / "x").symlink_to(root / "nowhere")


def _make_hardlink(root: Path) -> None:
    (root / "x").write_bytes(b"data")
    os.link(root / "x", root.parent / "elsewhere")


def _make_fifo(root: Path) -> None:
    os.mkfifo(root / "x")


def _make_socket(root: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(root / "x"))
    finally:
        sock.close()


def _has_cap_mknod() -> bool:
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) & (1 << 27))


def _make_device(root: Path) -> None:
    try:
        os.mknod(root / "x", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    except PermissionError:
        # Needs root with CAP_MKNOD: assert that is really why, then say so.
        assert not (os.geteuid() == 0 and _has_cap_mknod()), "mknod refused despite CAP_MKNOD"
        pytest.skip("device row needs root with CAP_MKNOD (os.mknod refused)")


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (_make_file, EntryKind.FILE),
        (_make_symlink_to_file, EntryKind.SYMLINK),
        (_make_dangling_symlink, EntryKind.SYMLINK),
        (_make_hardlink, EntryKind.HARDLINK),
        (_make_fifo, EntryKind.FIFO),
        (_make_socket, EntryKind.SOCKET),
        (_make_device, EntryKind.DEVICE),
    ],
    ids=["file", "symlink", "dangling-symlink", "hardlink", "fifo", "socket", "device"],
)
def test_entry_kind(inbox: Path, make: Callable[[Path], None], kind: EntryKind) -> None:
    """Each file type is classified from lstat, without following or opening it."""
    make(inbox)
    entry = next(e for e in scan(inbox) if e.relpath == "x")
    assert entry.kind is kind
    assert entry.identity == Identity.of(os.lstat(inbox / "x"))


def test_both_names_of_a_hard_link_are_hardlinks(inbox: Path) -> None:
    """Two names of one inode inside the inbox are both reported as HARDLINK."""
    (inbox / "a").write_bytes(b"data")
    os.link(inbox / "a", inbox / "b")
    assert kinds(scan(inbox)) == {"a": EntryKind.HARDLINK, "b": EntryKind.HARDLINK}


def test_symlinked_folder_is_not_descended(inbox: Path, tmp_path: Path) -> None:
    """A symlink to a folder is one SYMLINK entry; nothing behind it is listed."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s")
    (inbox / "link").symlink_to(outside)
    assert kinds(scan(inbox)) == {"link": EntryKind.SYMLINK}


def test_unsafe_and_input_kinds_are_flagged() -> None:
    """Only FILE and DIRECTORY_RESOURCE are inputs; link and special kinds are unsafe."""
    assert {k for k in EntryKind if k.is_input} == {EntryKind.FILE, EntryKind.DIRECTORY_RESOURCE}
    assert {k for k in EntryKind if k.is_unsafe} == {
        EntryKind.SYMLINK,
        EntryKind.HARDLINK,
        EntryKind.FIFO,
        EntryKind.SOCKET,
        EntryKind.DEVICE,
        EntryKind.OTHER,
    }


# --- ignore and exclude ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("relpath", "patterns", "ignored"),
    [
        ("a.tmp", ["*.tmp"], True),
        ("sub/a.tmp", ["*.tmp"], True),
        ("a.wav", ["*.tmp"], False),
        (".hidden", [".*"], True),
        ("deep/er/.hidden", [".*"], True),
        ("deep/.git/config", [".*"], True),
        ("x.part/inner.wav", ["*.part"], True),
        ("raw/a.bak", ["raw/*.bak"], True),
        ("other/a.bak", ["raw/*.bak"], False),
        ("A.TMP", ["*.tmp"], False),
    ],
)
def test_is_ignored(relpath: str, patterns: list[str], ignored: bool) -> None:
    """Patterns match each path component; patterns with '/' match the whole path."""
    assert is_ignored(relpath, patterns) is ignored


def test_ignored_names_are_not_reported(inbox: Path) -> None:
    """Ignored files, dotfiles and dot-folders (with their contents) are skipped."""
    (inbox / "keep.wav").write_bytes(b"k")
    (inbox / "a.tmp").write_bytes(b"t")
    (inbox / ".dot").write_bytes(b"d")
    (inbox / "sub" / ".cache").mkdir(parents=True)
    (inbox / "sub" / ".cache" / "plain.wav").write_bytes(b"p")
    (inbox / "sub" / "ok.wav").write_bytes(b"o")
    entries = scan(inbox, ignore=["*.tmp", ".*"])
    assert [e.relpath for e in entries] == ["keep.wav", "sub/ok.wav"]


def test_work_folder_is_hidden_by_dot_pattern(inbox: Path) -> None:
    """With ignore '.*', the .nbank work folder is hidden even when not excluded."""
    (inbox / ".nbank").mkdir()
    (inbox / ".nbank" / "claimed.wav").write_bytes(b"c")
    assert scan(inbox, ignore=[".*"]) == []


def test_excluded_folders_are_never_listed(inbox: Path) -> None:
    """Work and rejected folders (even nested) are skipped whatever the ignore list."""
    for folder in (".nbank", "rejected", "sub/rej"):
        (inbox / folder).mkdir(parents=True)
        (inbox / folder / "f.wav").write_bytes(b"f")
    (inbox / "sub" / "ok.wav").write_bytes(b"o")
    entries = scan(inbox, exclude=[".nbank", "rejected", "sub/rej/"])
    assert [e.relpath for e in entries] == ["sub/ok.wav"]


# --- sidecars and markers ---------------------------------------------------------------


def test_sidecars_and_markers_name_their_input(inbox: Path) -> None:
    """NAME.nbank.yaml/.json are SIDECARs and NAME.done a MARKER, owned by NAME."""
    (inbox / "sub").mkdir()
    for name in ("a.wav", "a.wav.nbank.yaml", "a.wav.done", "sub/b", "sub/b.nbank.json"):
        (inbox / name).write_bytes(b"x")
    got = {e.relpath: (e.kind, e.owner) for e in scan(inbox)}
    assert got == {
        "a.wav": (EntryKind.FILE, None),
        "a.wav.nbank.yaml": (EntryKind.SIDECAR, "a.wav"),
        "a.wav.done": (EntryKind.MARKER, "a.wav"),
        "sub/b": (EntryKind.FILE, None),
        "sub/b.nbank.json": (EntryKind.SIDECAR, "sub/b"),
    }


def test_done_files_are_plain_files_without_markers(inbox: Path) -> None:
    """With markers=False (ready: settle) NAME.done is an ordinary input."""
    (inbox / "run.done").write_bytes(b"x")
    assert kinds(scan(inbox, markers=False)) == {"run.done": EntryKind.FILE}


def test_bare_sidecar_suffix_is_a_file(inbox: Path) -> None:
    """A file named only '.nbank.yaml' belongs to nothing and is a plain file."""
    (inbox / ".nbank.yaml").write_bytes(b"x")
    assert kinds(scan(inbox)) == {".nbank.yaml": EntryKind.FILE}


def test_symlinked_sidecar_stays_with_its_input(inbox: Path) -> None:
    """A sidecar that is a symlink is a SIDECAR of its input (which is then rejected)."""
    (inbox / "a.wav").write_bytes(b"x")
    (inbox / "a.wav.nbank.yaml").symlink_to("/etc/passwd")
    [car] = [e for e in scan(inbox) if e.relpath == "a.wav.nbank.yaml"]
    assert (car.kind, car.owner) == (EntryKind.SIDECAR, "a.wav")


# --- recursion and directory resources ------------------------------------------------------


def test_recursive_scan_lists_nested_files(inbox: Path) -> None:
    """A recursive scan reports nested files and no folders."""
    (inbox / "bird" / "day1").mkdir(parents=True)
    (inbox / "bird" / "day1" / "a.wav").write_bytes(b"a")
    (inbox / "top.wav").write_bytes(b"t")
    assert kinds(scan(inbox)) == {"bird/day1/a.wav": EntryKind.FILE, "top.wav": EntryKind.FILE}


def test_flat_scan_reports_folders_without_entering(inbox: Path) -> None:
    """A non-recursive scan lists top-level files and reports folders as DIRECTORY."""
    (inbox / "bird").mkdir()
    (inbox / "bird" / "a.wav").write_bytes(b"a")
    (inbox / "top.wav").write_bytes(b"t")
    got = kinds(scan(inbox, recursive=False))
    assert got == {"bird": EntryKind.DIRECTORY, "top.wav": EntryKind.FILE}


def test_top_level_folders_are_directory_resources(inbox: Path) -> None:
    """In resources mode each top-level folder is one entry; top-level files stay files."""
    (inbox / "rec1" / "deep").mkdir(parents=True)
    (inbox / "rec1" / "deep" / "a.bin").write_bytes(b"abc")
    (inbox / "rec1" / "b.bin").write_bytes(b"de")
    (inbox / "loose.wav").write_bytes(b"l")
    entries = scan(inbox, recursive=False, directories_as_resources=True)
    assert kinds(entries) == {"loose.wav": EntryKind.FILE, "rec1": EntryKind.DIRECTORY_RESOURCE}
    rec1 = next(e for e in entries if e.relpath == "rec1")
    assert rec1.identity is not None
    assert (rec1.identity.size, rec1.identity.nlink) == (5, 3)  # 2 files + 1 folder
    assert rec1.identity.ino == os.lstat(inbox / "rec1").st_ino
    assert rec1.problem is None


def test_directory_resource_names_its_unsafe_members(inbox: Path) -> None:
    """A folder resource holding a link and a FIFO is reported with both counted."""
    rec = inbox / "rec"
    rec.mkdir()
    (rec / "link").symlink_to("/etc")
    os.mkfifo(rec / "pipe")
    entry = scan(inbox, recursive=False, directories_as_resources=True)[0]
    assert entry.problem is not None and "2 member(s)" in entry.problem


# --- names and errors ------------------------------------------------------------


def test_odd_names_round_trip(inbox: Path) -> None:
    """Names with a newline or invalid UTF-8 come back as relpaths that reopen the file."""
    raw_names = [b"line\nbreak.wav", b"bad\xff\xfe.wav", b"caf\xc3\xa9.wav"]
    (inbox / "sub").mkdir()
    for raw in raw_names:
        with open(os.fsencode(inbox / "sub") + b"/" + raw, "wb") as f:
            f.write(raw)
    entries = scan(inbox)
    assert sorted(os.fsencode(e.relpath) for e in entries) == sorted(b"sub/" + r for r in raw_names)
    for e in entries:
        assert e.path(inbox).read_bytes() == os.fsencode(e.name)
        shown = printable(e.relpath)
        assert "\n" not in shown
        shown.encode("utf-8")  # always encodable


def test_printable_escapes_control_and_undecodable_bytes() -> None:
    """printable() escapes newlines, invalid bytes and backslashes unambiguously."""
    assert printable(os.fsdecode(b"a\nb\xffc\\d")) == "a\\x0ab\\xffc\\\\d"
    assert printable("a\u2028b\u2029c\x85d") == "a\\u2028b\\u2029c\\u0085d"


def test_without_controls_escapes_controls_keeps_backslashes_and_printables_result() -> None:
    """without_controls() escapes what a terminal acts on, keeps a backslash one, and
    leaves printable()'s result as it is."""
    assert without_controls("id\x1b[2J $'a\\x0a'") == "id\\x1b[2J $'a\\x0a'"
    name = os.fsdecode(b"a\nb\xff\\\x1b\xc2\x9b")
    assert without_controls(printable(name)) == printable(name)


def test_lines_without_controls_keeps_newlines_and_tabs_and_escapes_the_rest() -> None:
    """lines_without_controls() keeps newlines, tabs and backslashes; other controls as text."""
    text = os.fsdecode(b"a\x1b[2J\n\tb\r\x07\x7f\xc2\x9b\xe2\x80\xae\\x0a\xff")
    assert lines_without_controls(text) == "a\\x1b[2J\n\tb\\x0d\\x07\\x7f\\u009b\\u202e\\x0a\\xff"


def test_entries_are_sorted_by_name(inbox: Path) -> None:
    """Scan results come in on-disk byte order, whatever the listing order was."""
    for name in ("b", "a", "c/z", "c/a"):
        (inbox / name).parent.mkdir(exist_ok=True)
        (inbox / name).write_bytes(b"x")
    assert [e.relpath for e in scan(inbox)] == ["a", "b", "c/a", "c/z"]


def test_missing_root_raises(tmp_path: Path) -> None:
    """A missing inbox folder is an OSError, not an empty inbox."""
    with pytest.raises(FileNotFoundError):
        scan(tmp_path / "absent")


@pytest.fixture
def world_tmp() -> Iterator[Path]:
    """A temporary folder an unprivileged user can traverse (pytest's is 0700)."""
    with tempfile.TemporaryDirectory(prefix="nbankd-scan-") as d:
        os.chmod(d, 0o755)
        yield Path(d)
        for root, dirs, _ in os.walk(d):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o755)


def _scan_unprivileged(root: Path, **kw: object) -> list[Entry]:
    """Scans as an unprivileged user: root reads everything, so drop privileges first."""
    if os.geteuid() != 0:
        return scan(root, **kw)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            with os.fdopen(w, "wb") as out:
                pickle.dump(scan(root, **kw), out)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as inp:
        data = inp.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return pickle.loads(data)


def test_unreadable_subfolder_is_reported(world_tmp: Path) -> None:
    """A folder the daemon cannot list is an UNREADABLE entry; the scan goes on."""
    root = world_tmp / "inbox"
    (root / "locked").mkdir(parents=True)
    (root / "locked" / "secret.wav").write_bytes(b"s")
    (root / "open").mkdir()
    (root / "open" / "a.wav").write_bytes(b"a")
    for p in (root, root / "open"):
        p.chmod(0o755)
    (root / "open" / "a.wav").chmod(0o644)
    (root / "locked").chmod(0o000)
    entries = _scan_unprivileged(root)
    assert kinds(entries) == {"locked": EntryKind.UNREADABLE, "open/a.wav": EntryKind.FILE}
    locked = entries[0]
    assert locked.identity is None and locked.problem and "Permission denied" in locked.problem


def test_unreadable_folder_inside_directory_resource(world_tmp: Path) -> None:
    """A directory resource with an unlistable sub-folder says so in its problem."""
    root = world_tmp / "inbox"
    (root / "rec" / "locked").mkdir(parents=True)
    for p in (root, root / "rec"):
        p.chmod(0o755)
    (root / "rec" / "locked").chmod(0o000)
    entries = _scan_unprivileged(root, directories_as_resources=True)
    assert kinds(entries) == {"rec": EntryKind.DIRECTORY_RESOURCE}
    assert entries[0].problem is not None and "1 unreadable folder(s)" in entries[0].problem


def test_listed_folders_are_handed_back_by_inode(inbox: Path) -> None:
    """``folders`` receives every folder the scan listed (root as ""), none it skipped."""
    (inbox / "bird" / "day1").mkdir(parents=True)
    (inbox / ".nbank").mkdir()
    (inbox / "rejected" / "sub").mkdir(parents=True)
    (inbox / "bird" / "link").symlink_to(inbox / "rejected")
    folders: dict[int, str] = {}
    scan_inbox(inbox, recursive=True, exclude=[".nbank", "rejected"], folders=folders)
    assert folders == {
        inbox.stat().st_ino: "",
        (inbox / "bird").stat().st_ino: "bird",
        (inbox / "bird" / "day1").stat().st_ino: "bird/day1",
    }
