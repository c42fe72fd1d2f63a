"""The catalogue of hostile inputs: what each one is, and its ONE expected outcome.

Each :class:`Row` makes one input in an inbox (through :class:`Ctx`) and names exactly
one outcome:

- :class:`Deposited`: archived under an identifier; the archived bytes equal the input's;
- :class:`Rejected`: moved to the rejected folder with a ``NAME.reason`` whose ``code``
  is the one named; what is in the rejected folder equals the input (bytes, link
  target, device number, whole tree);
- :class:`LeftInPlace`: still where it was (same inode, bytes and mtime), never archived;
  ``explain`` is the state ``nbankctl explain`` must report for it (the daemon's own
  verdict); the test then forces a rescan and checks the input is still untouched.

Rows are grouped by the daemon they need (``group``): most share one daemon run as
root with the embedded registry; the unprivileged, marker, folder-resource and
pause-seam rows each get their own. ``phase`` 1 rows are deposited before the rest
are dropped (the originals that duplicate-content and name-taken rows collide with).
The daemon-specific set-up lives in ``test_hostile_inputs.py``.
"""

from __future__ import annotations

import hashlib
import os
import socket
import stat
import unicodedata
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# --- expected outcomes -----------------------------------------------------------------


@dataclass(frozen=True)
class Deposited:
    id: str
    stored: str  # the file name under resources/<first two chars>/

    kind = "deposited"


@dataclass(frozen=True)
class Rejected:
    code: str
    companions: tuple[str, ...] = ()  # suffixes moved along: ".nbank.yaml", ".done"

    kind = "rejected"


@dataclass(frozen=True)
class LeftInPlace:
    explain: str  # the state `nbankctl explain` reports

    kind = "left-in-place"


Expect = Deposited | Rejected | LeftInPlace


# --- what a row makes -------------------------------------------------------------------


@dataclass
class Ctx:
    """Where a row makes its input: the inbox, and a sentinel folder outside every root."""

    inbox: Path
    outside: Path
    scratch: Path  # on the inbox's filesystem, outside the inbox: write here, then rename in
    other: tuple[int, int] | None = None  # (uid, gid) of a user who is not the daemon's
    sockets: list[socket.socket] = field(default_factory=list)

    def drop(self, rel: str | bytes, data: bytes) -> Path:
        """Writes ``data`` elsewhere, then renames it into the inbox (as a rig would)."""
        dest = self.inbox / (os.fsdecode(rel) if isinstance(rel, bytes) else rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f"drop-{uuid.uuid4().hex}"
        tmp.write_bytes(data)
        os.rename(tmp, dest)
        return dest


@dataclass
class Made:
    """The input a row made: its path in the inbox (the one a reason names)."""

    path: Path


def payload(key: str, size: int = 3000) -> bytes:
    """Unique bytes for a row (no two rows share content unless they mean to)."""
    head = f"{key}:{uuid.uuid4().hex}:".encode("utf-8", "surrogateescape")
    return head + os.urandom(max(0, size - len(head)))


def fingerprint(path: Path | str) -> tuple[object, ...]:
    """What an entry is and holds, never following a link: compared before and after."""
    st = os.lstat(path)
    mode = st.st_mode
    if stat.S_ISREG(mode):
        with open(path, "rb") as f:
            return ("file", hashlib.sha1(f.read()).hexdigest(), st.st_size)
    if stat.S_ISLNK(mode):
        return ("symlink", os.readlink(path))
    if stat.S_ISDIR(mode):
        children = sorted(os.listdir(path))
        return ("dir", tuple((name, fingerprint(os.path.join(path, name))) for name in children))
    # no content to compare: the inode says it is the same one (moving keeps the inode)
    if stat.S_ISFIFO(mode):
        return ("fifo", st.st_ino)
    if stat.S_ISSOCK(mode):
        return ("socket", st.st_ino)
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return ("device", stat.S_IFMT(mode), st.st_rdev, st.st_ino)
    return ("other", stat.S_IFMT(mode), st.st_ino)


Maker = Callable[[Ctx], Made]


@dataclass(frozen=True)
class Row:
    key: str
    what: str
    make: Maker
    expect: Expect
    group: str = "main"
    phase: int = 2
    slow: bool = False


# --- makers -----------------------------------------------------------------------------


def file(rel: str | bytes, size: int = 3000) -> Maker:
    def make(ctx: Ctx) -> Made:
        return Made(ctx.drop(rel, payload(os.fsdecode(rel)[:40], size)))

    return make


def file_bytes(rel: str | bytes, data: bytes) -> Maker:
    def make(ctx: Ctx) -> Made:
        return Made(ctx.drop(rel, data))

    return make


def with_sidecar(rel: str, sidecar: str | bytes, suffix: str = ".nbank.yaml") -> Maker:
    """The sidecar first (so it has settled when the file is seen), then the file."""

    def make(ctx: Ctx) -> Made:
        text = sidecar.encode() if isinstance(sidecar, str) else sidecar
        ctx.drop(rel + suffix, text)
        return Made(ctx.drop(rel, payload(rel)))

    return make


def with_odd_sidecar(rel: str, put: Callable[[Ctx, Path], None]) -> Maker:
    """A sidecar that is not a plain file (``put`` makes it at the path given), then the file."""

    def make(ctx: Ctx) -> Made:
        put(ctx, ctx.inbox / (rel + ".nbank.yaml"))
        return Made(ctx.drop(rel, payload(rel)))

    return make


def symlink_to(rel: str, target: Callable[[Ctx], Path]) -> Maker:
    def make(ctx: Ctx) -> Made:
        path = ctx.inbox / rel
        os.symlink(target(ctx), path)
        return Made(path)

    return make


def hardlink_to_outside(rel: str) -> Maker:
    def make(ctx: Ctx) -> Made:
        path = ctx.inbox / rel
        os.link(ctx.outside / "linked-origin.wav", path)
        return Made(path)

    return make


def fifo(rel: str) -> Maker:
    def make(ctx: Ctx) -> Made:
        path = ctx.inbox / rel
        os.mkfifo(path)
        return Made(path)

    return make


def unix_socket(rel: str) -> Maker:
    def make(ctx: Ctx) -> Made:
        path = ctx.inbox / rel
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        ctx.sockets.append(sock)
        return Made(path)

    return make


def device(rel: str, kind: int, major: int, minor: int) -> Maker:
    def make(ctx: Ctx) -> Made:
        path = ctx.inbox / rel
        os.mknod(path, 0o600 | kind, os.makedev(major, minor))
        return Made(path)

    return make


def folder(rel: str, build: Callable[[Ctx, Path], None]) -> Maker:
    """A folder built in scratch, then renamed into the inbox whole."""

    def make(ctx: Ctx) -> Made:
        tmp = ctx.scratch / f"tree-{uuid.uuid4().hex}"
        tmp.mkdir()
        build(ctx, tmp)
        dest = ctx.inbox / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.rename(tmp, dest)
        return Made(dest)

    return make


def _tree_files(ctx: Ctx, top: Path) -> None:
    (top / "probe").mkdir()
    (top / "probe" / "spikes.dat").write_bytes(payload("spikes"))
    (top / "notes.txt").write_bytes(payload("notes", 200))


def _tree_with(extra: Callable[[Ctx, Path], None]) -> Callable[[Ctx, Path], None]:
    def build(ctx: Ctx, top: Path) -> None:
        _tree_files(ctx, top)
        extra(ctx, top)

    return build


def owned_by_other(rel: str, mode: int) -> Maker:
    """A file of another user (``Ctx.other``) with ``mode``."""

    def make(ctx: Ctx) -> Made:
        assert ctx.other is not None
        path = ctx.drop(rel, payload(rel))
        os.chown(path, *ctx.other)
        path.chmod(mode)
        return Made(path)

    return make


def in_foreign_folder(folder_rel: str, name: str, mode: int) -> Maker:
    """A readable file inside a folder of another user, with the folder's ``mode``."""

    def make(ctx: Ctx) -> Made:
        assert ctx.other is not None
        path = ctx.drop(f"{folder_rel}/{name}", payload(name))
        os.chown(path.parent, *ctx.other)
        path.parent.chmod(mode)
        return Made(path)

    return make


def with_marker(rel: str, data: bytes | None = None) -> Maker:
    def make(ctx: Ctx) -> Made:
        made = Made(ctx.drop(rel, payload(rel) if data is None else data))
        ctx.drop(rel + ".done", b"")
        return made

    return make


def deep_path(levels: int) -> str:
    return "/".join(f"d{i:03d}" for i in range(levels)) + "/deep.wav"


def billion_laughs() -> str:
    """Nine levels of nine aliases each: under 600 bytes, 9**9 strings expanded."""
    lines = ["metadata:", '  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for n in range(1, 9):
        refs = ",".join([f"*l{n - 1}"] * 9)
        lines.append(f"  l{n}: &l{n} [{refs}]")
    return "\n".join(lines) + "\n"


def huge_sidecar(min_bytes: int) -> str:
    """A block-style YAML mapping of at least ``min_bytes`` (cut anywhere, it still parses)."""
    lines = ["metadata:"]
    size, i = 10, 0
    while size < min_bytes:
        line = f"  key{i:07d}: value{i:07d}"
        lines.append(line)
        size += len(line) + 1
        i += 1
    return "\n".join(lines) + "\n"


LONG_VALID = "a" * 251 + ".wav"  # 255 bytes, a valid identifier of 251
LONG_INVALID = ("long name " * 30)[:251] + ".wav"  # 255 bytes with spaces
NFC = unicodedata.normalize("NFC", "café") + ".wav"
NFD = unicodedata.normalize("NFD", "café") + ".wav"
DUP_CONTENT = b"the same recording twice " + os.urandom(4000)
SIDE = (".nbank.yaml",)


def _add_symlink(ctx: Ctx, top: Path) -> None:
    os.symlink(ctx.outside / "secret.wav", top / "probe" / "evil.dat")


def _add_fifo(ctx: Ctx, top: Path) -> None:
    os.mkfifo(top / "pipe")


def _add_hardlink(ctx: Ctx, top: Path) -> None:
    os.link(ctx.outside / "linked-origin.wav", top / "hard.dat")


# --- the catalogue ----------------------------------------------------------------------

# fmt: off
ROWS: tuple[Row, ...] = (
    # phase 1: the originals that later rows collide with
    Row("dup-original", "first copy of some content",
        file_bytes("dup_first.wav", DUP_CONTENT), Deposited("dup_first", "dup_first.wav"), phase=1),
    Row("taken-original", "first file to take an identifier",
        file("taken.wav"), Deposited("taken", "taken.wav"), phase=1),
    # deposited
    Row("plain", "an ordinary file (control row)",
        file("plain.wav"), Deposited("plain", "plain.wav")),
    Row("leading-dash", "name starting with '-' (an option to careless tools)",
        file("-rf.wav"), Deposited("-rf", "-rf.wav")),
    Row("name-255-valid", "255-byte name that is a valid identifier",
        file(LONG_VALID), Deposited(LONG_VALID[:-4], LONG_VALID)),
    Row("deep-path", "file 120 folders deep",
        file(deep_path(120)), Deposited("deep", "deep.wav")),
    Row("undecodable-folder", "valid name inside a folder whose name is not UTF-8",
        file(b"dir\xff\xfe/utf8ok.wav"), Deposited("utf8ok", "utf8ok.wav")),
    Row("sidecar-id-fixes-name", "invalid file name, valid id in its sidecar",
        with_sidecar("bad name.wav", "id: from_sidecar\n"),
        Deposited("from_sidecar", "from_sidecar.wav")),
    Row("sidecar-json", "JSON sidecar with metadata",
        with_sidecar("jsonside.wav", '{"metadata": {"bird": "b1"}}', ".nbank.json"),
        Deposited("jsonside", "jsonside.wav")),
    Row("sidecar-big-ok", "sidecar with 200 KB of metadata (under the limit)",
        with_sidecar("bigmeta.wav", huge_sidecar(200_000)), Deposited("bigmeta", "bigmeta.wav")),
    Row("named-nbank-json", "file named nbank.json (the archive's own file name)",
        file("nbank.json"), Deposited("nbank", "nbank.json")),
    Row("named-like-workdir", "file named like the work folder (*.nbank)",
        file("worklike.nbank"), Deposited("worklike", "worklike.nbank")),
    Row("subfolder-named-rejected", "file in a sub-folder called rejected",
        file("sub/rejected/inner.wav"), Deposited("inner", "inner.wav")),
    # rejected
    Row("duplicate-content", "same bytes as an archived file, another name",
        file_bytes("dup_second.wav", DUP_CONTENT), Rejected("duplicate")),
    Row("name-taken", "identifier already registered for other content",
        file("again/taken.wav"), Rejected("name-taken")),
    Row("newline", "name with a newline",
        file("new\nline.wav"), Rejected("invalid-name")),
    Row("undecodable", "name with invalid UTF-8 bytes",
        file(b"bad\xff\xfe.wav"), Rejected("invalid-name")),
    Row("name-255-invalid", "255-byte name with spaces (reason name must be shortened)",
        file(LONG_INVALID), Rejected("invalid-name")),
    Row("only-spaces", "name that is only spaces",
        file("   "), Rejected("invalid-name")),
    Row("dot-dot", "name containing '..'",
        file("x..y.wav"), Rejected("invalid-name")),
    Row("shell-metachars", "name with shell metacharacters",
        file("$(touch pwned);`id`|&>x.wav"), Rejected("invalid-name")),
    Row("url-significant", "name with %, ? and #",
        file("a%2Fb?c#d.wav"), Rejected("invalid-name")),
    Row("unicode-nfc", "cafe with an acute e, NFC",
        file(NFC), Rejected("invalid-name")),
    Row("unicode-nfd", "the same name in NFD (a different name on Linux)",
        file(NFD), Rejected("invalid-name")),
    Row("zero-byte", "empty file",
        file_bytes("empty.wav", b""), Rejected("empty")),
    Row("reason-suffix-a", "name whose NAME.reason is the next row's name",
        file("clash me.wav"), Rejected("invalid-name")),
    Row("reason-suffix-b", "name ending in .reason",
        file("clash me.wav.reason"), Rejected("invalid-name")),
    Row("sidecar-id-traversal", "sidecar id ../../etc/passwd",
        with_sidecar("trav.wav", "id: ../../etc/passwd\n"), Rejected("invalid-name", SIDE)),
    Row("sidecar-id-separator", "sidecar id with a path separator",
        with_sidecar("sep.wav", "id: a/b\n"), Rejected("invalid-name", SIDE)),
    Row("sidecar-bad-yaml", "sidecar that is not YAML",
        with_sidecar("badyaml.wav", "id: [unclosed\n"), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-not-mapping", "sidecar that is a list",
        with_sidecar("listside.wav", "- id\n- dtype\n"), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-unknown-key", "sidecar with an unknown key",
        with_sidecar("unkkey.wav", "identifier: x\n"), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-unknown-dtype", "sidecar naming a datatype the registry lacks",
        with_sidecar("unkdt.wav", "dtype: no-such-dtype\n"), Rejected("unknown-dtype", SIDE)),
    Row("sidecar-huge", "sidecar over 1 MiB (must not be cut short silently)",
        with_sidecar("hugemeta.wav", huge_sidecar(1_300_000)), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-laughs", "500-byte sidecar of nested aliases (billion laughs)",
        with_sidecar("laughs.wav", billion_laughs()), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-deep", "sidecar nested 50,000 levels deep",
        with_sidecar("deepside.wav", "metadata: " + "[" * 50_000 + "]" * 50_000 + "\n"),
        Rejected("bad-sidecar", SIDE)),
    Row("sidecar-deep-json", "JSON sidecar nested 50,000 levels deep",
        with_sidecar("deepjson.wav", '{"metadata": ' + "[" * 50_000 + "]" * 50_000 + "}",
                     suffix=".nbank.json"),
        Rejected("bad-sidecar", (".nbank.json",))),
    Row("sidecar-duplicate-key", "sidecar naming id twice (not 'the last one wins')",
        with_sidecar("dupkey.wav", "id: first\nid: second\n"), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-not-utf8", "sidecar in Latin-1 (must not be altered silently)",
        with_sidecar("latin.wav", b"metadata: {who: Jos\xe9}\n"), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-symlink", "sidecar that is a symlink to /etc/shadow",
        with_odd_sidecar("sidelink.wav", lambda c, p: os.symlink("/etc/shadow", p)),
        Rejected("bad-sidecar", SIDE)),
    Row("sidecar-fifo", "sidecar that is a FIFO",
        with_odd_sidecar("sidefifo.wav", lambda c, p: os.mkfifo(p)), Rejected("bad-sidecar", SIDE)),
    Row("sidecar-hardlink", "sidecar that is a hard link to a file outside",
        with_odd_sidecar("sidehard.wav", lambda c, p: os.link(c.outside / "side-origin.yaml", p)),
        Rejected("bad-sidecar", SIDE)),
    Row("symlink-file-outside", "symlink to a file outside the inbox",
        symlink_to("link.wav", lambda c: c.outside / "secret.wav"), Rejected("unsupported")),
    Row("symlink-dir-outside", "symlink to a folder outside the inbox",
        symlink_to("linkdir", lambda c: c.outside / "dir"), Rejected("unsupported")),
    Row("symlink-etc-passwd", "symlink to /etc/passwd",
        symlink_to("passwd.wav", lambda c: Path("/etc/passwd")), Rejected("unsupported")),
    Row("symlink-dangling", "symlink to nothing",
        symlink_to("dangling.wav", lambda c: c.outside / "nothing"), Rejected("unsupported")),
    Row("hardlink-outside", "hard link to a file outside the inbox (nlink 2)",
        hardlink_to_outside("hard.wav"), Rejected("unsupported")),
    Row("fifo", "FIFO (opening it would block)",
        fifo("pipe.wav"), Rejected("unsupported")),
    Row("socket", "Unix socket",
        unix_socket("sock.wav"), Rejected("unsupported")),
    Row("char-device", "character device (mknod 1,3 like /dev/null)",
        device("null.wav", stat.S_IFCHR, 1, 3), Rejected("unsupported")),
    Row("block-device", "block device (mknod 7,0 like /dev/loop0)",
        device("loop.wav", stat.S_IFBLK, 7, 0), Rejected("unsupported")),
    # left in place
    Row("in-rejected-folder", "file dropped into the rejected folder itself",
        file("rejected/planted.wav"), LeftInPlace("in-rejected-folder")),
    Row("in-work-folder", "file dropped into the work folder .nbank/",
        file(".nbank/planted.wav"), LeftInPlace("internal")),
    Row("ignored-tmp", "*.tmp (ignore pattern)",
        file("notes.tmp"), LeftInPlace("ignored")),
    Row("ignored-dotfile", "dotfile",
        file(".hidden.wav"), LeftInPlace("ignored")),
    Row("ignored-nbank-file", "file named .nbank in a sub-folder",
        file("sub/.nbank"), LeftInPlace("ignored")),
    Row("orphan-sidecar", "sidecar for a file that does not exist",
        file_bytes("ghost.wav.nbank.yaml", b"id: ghost\n"), LeftInPlace("sidecar")),

    # --- rows that need their own daemon ---
    # run as an unprivileged user (root reads everything and would hide these)
    Row("unreadable-other-user", "file of another user, mode 0600",
        owned_by_other("private.wav", 0o600), Rejected("unreadable"), group="unpriv"),
    Row("readable-other-user", "file of another user, mode 0644",
        owned_by_other("shared.wav", 0o644), Deposited("shared", "shared.wav"), group="unpriv"),
    Row("unreadable-folder", "file in a folder of another user, mode 0700",
        in_foreign_folder("closed", "inside.wav", 0o700), LeftInPlace("hidden"),
        group="unpriv"),
    Row("unmovable-folder", "readable file in another user's 0755 folder (cannot be claimed)",
        in_foreign_folder("foreign", "stuck.wav", 0o755), LeftInPlace("in-flight"),
        group="unpriv"),
    # ready: marker
    Row("marker-and-file", "file with its NAME.done marker",
        with_marker("marked.wav"), Deposited("marked", "marked.wav"), group="marker"),
    Row("file-without-marker", "settled file, no marker yet",
        file("unmarked.wav"), LeftInPlace("waiting-for-marker"), group="marker"),
    Row("marker-without-file", "NAME.done for a file that does not exist",
        file_bytes("nofile.wav.done", b""), LeftInPlace("marker"), group="marker"),
    Row("marker-empty-file", "zero-byte file with its marker",
        with_marker("blank.wav", b""), Rejected("empty", (".done",)), group="marker"),
    # directories: resources (the archive allows directories)
    Row("folder-resource", "folder of plain files",
        folder("session_ok", _tree_files), Deposited("session_ok", "session_ok"), group="dirs"),
    Row("folder-with-symlink", "folder holding a symlink to a file outside",
        folder("session_link", _tree_with(_add_symlink)), Rejected("unsupported"), group="dirs"),
    Row("folder-with-fifo", "folder holding a FIFO",
        folder("session_fifo", _tree_with(_add_fifo)), Rejected("unsupported"), group="dirs"),
    Row("folder-with-hardlink", "folder holding a hard link to a file outside",
        folder("session_hard", _tree_with(_add_hardlink)), Rejected("unsupported"), group="dirs"),
    Row("folder-symlink-outside", "top-level symlink to a folder outside",
        symlink_to("session_alias", lambda c: c.outside / "dir"), Rejected("unsupported"),
        group="dirs"),
    # pause seams: the input is changed at an exact step
    Row("symlink-swapped-in", "claimed file replaced by a symlink to an outside file",
        file("swapped.wav"), Rejected("unsupported"), group="swap"),
    Row("truncated-mid-copy", "file truncated after the copy, before the identity check",
        file("cut.wav", 200_000), Deposited("cut", "cut.wav"), group="truncate"),
    Row("growing-short", "file appended to every 0.2 s for 4 s (settle 2 s)",
        file("grow.wav", 10), Deposited("grow", "grow.wav"), group="grow"),
    Row("growing-minute", "file appended to every 2 s for a minute (settle 5 s)",
        file("slowgrow.wav", 10), Deposited("slowgrow", "slowgrow.wav"), group="grow-slow",
        slow=True),
)
# fmt: on
