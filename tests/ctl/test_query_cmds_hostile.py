"""nbankctl's registry query and check commands (search, info, locate, verify,
registry-info, dtype, archive list|check, check) facing partial or broken registry
answers, odd input, and text meant for the terminal (regression tests of a hostile
review).

- archive check hashes every stored resource the registry places in the archive, also
  one its paged listing missed, and reports a folder resource it cannot hash;
- verify calls a file a match only for records of its SHA-1;
- a registry answer of the wrong shape is one line naming the registry (exit 3);
- an argument that is not UTF-8 is a usage error (exit 2) before anything is sent;
- terminal escapes in registry text and file names are shown as text, never raw.

Tests named ``test_guard_*`` pin behaviour that held up under the review. A broken
registry is a small HTTP server of the test's own (:class:`FakeRegistry`) answering
as a django-neurobank server, a proxy or a half-broken site would; what any registry
can hold (escapes in free text, unhashed records) is set up in the embedded registry."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, base_env, make_backend, store
from nbankd.archive.access import apply_access
from nbankd.archive.opening import create_archive

Answer = tuple[int, dict[str, str], bytes]
Route = Callable[[str, str, dict[str, str], bytes], Answer]


def sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def answer(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """A JSON answer."""
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()


NOT_FOUND = answer({"detail": "not found"}, 404)


class FakeRegistry:
    """A small HTTP server answering as a registry at ``/neurobank/``: ``route(method,
    path below /neurobank/, query, body)`` gives each answer."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.seen: list[tuple[str, str]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                parts = urlsplit(self.path)
                below = parts.path.removeprefix("/neurobank/")
                fake.seen.append((self.command, self.path))
                status, headers, data = fake.route(
                    self.command, below, dict(parse_qsl(parts.query)), body
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/neurobank/"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fake_registry() -> Iterator[Callable[[Route], FakeRegistry]]:
    made: list[FakeRegistry] = []

    def make(route: Route) -> FakeRegistry:
        made.append(FakeRegistry(route))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


def ctl(url: str, home: Path, *argv: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """Runs ``nbankctl -r URL ARGV`` with no configuration and no credentials."""
    env = base_env(home)
    env["NBANKD_CONFIG"] = str(home / "no-such-config.yaml")
    return subprocess.run([NBANKCTL, "-r", url, *argv], env=env, capture_output=True, timeout=120)


def record(name: str, data: bytes | None, archive: str | None, **more: Any) -> dict[str, Any]:
    """A resource record as django-neurobank 0.12 serialises it."""
    return {
        "name": name,
        "sha1": None if data is None else sha1(data),
        "dtype": "dt",
        "filename": name,
        "metadata": {},
        "experimenter": None,
        "animal": None,
        "locations": [] if archive is None else [archive],
        "created_by": "test",
        "created_on": "2024-01-01T00:00:00Z",
        **more,
    }


def bulk(records: dict[str, dict[str, Any]], body: bytes) -> Answer:
    """The answer of ``POST bulk/resources/``: one line per known name asked for."""
    names = json.loads(body)["names"]
    lines = [json.dumps(records[n]) for n in names if n in records]
    return 200, {"Content-Type": "text/html"}, "\n".join(lines).encode()


def no_traceback(proc: subprocess.CompletedProcess[bytes]) -> None:
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")


# --- archive check: resources the registry's listing did not name ----------------------


def test_check_archive_hashes_a_resource_registered_here_that_the_listing_missed(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry]
) -> None:
    """archive check reads and compares with its registered SHA-1 every stored resource
    the registry places in this archive, also one its paged listing missed (page 2
    answered 404 "Invalid page.", as django-neurobank does when the list shrank between
    pages): a corrupt copy is a hash mismatch and the check exits 1, never 'clean'."""
    arch = "arq"
    root = tmp_path / arch
    good, bad = b"good bytes", b"registered bytes"
    records = {"ra1": record("ra1", good, arch), "rb2": record("rb2", bad, arch)}

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        if path == "archives/":
            return answer([{"name": arch, "scheme": "neurobank", "root": str(root)}])
        if path == "resources/" and query.get("archive") == arch:
            if query.get("page", "1") == "1":
                nxt = f"<{fake.url}resources/?archive={arch}&page=2>"
                link = f'{nxt}; rel="next", {nxt}; rel="last"'
                return answer([records["ra1"]], headers={"Link": link})
            return answer({"detail": "Invalid page."}, 404)
        if path == "bulk/resources/":
            return bulk(records, body)
        return NOT_FOUND

    fake = fake_registry(route)
    archive = create_archive(root, fake.url)
    store(archive, "ra1", good)
    corrupt = store(archive, "rb2", b"silently corrupted")
    proc = ctl(fake.url, tmp_path / "home", "--json", "archive", "check", str(root))
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    kinds = {(f["resource"], f["kind"]) for f in doc["findings"]}
    assert proc.returncode == 1 and not doc["ok"], (doc, str(corrupt))
    assert any(res == "rb2" for res, _ in kinds), doc


@pytest.fixture
def emb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The embedded registry with a fresh datatype, as nbankctl sees it."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def run(b: Backend, *argv: str | bytes) -> subprocess.CompletedProcess[bytes]:
    """``nbankctl ARGV`` against the backend, output as bytes (names may not be UTF-8)."""
    return subprocess.run([NBANKCTL, *b.before, *argv], env=b.env, capture_output=True, timeout=120)


def folder_resource(b: Backend, arch: str, archive: Any, members: dict[bytes, bytes]) -> Path:
    """A folder resource stored in the archive (registered with the SHA-1 of a member,
    any hash will do: what is judged is whether the check can read it)."""
    id = b.resource(b"\n".join(members.values()), arch)
    stub = archive.resources_dir / id[:2]
    stub.mkdir(exist_ok=True)
    apply_access(archive, stub)
    folder = stub / id
    folder.mkdir()
    for name, data in members.items():
        member = os.path.join(os.fsencode(folder), name)
        with open(member, "wb") as f:
            f.write(data)
        apply_access(archive, Path(os.fsdecode(member)))
    apply_access(archive, folder)
    return folder


def test_check_archive_of_a_folder_resource_with_a_non_utf8_member_name_reports_it(
    emb: Backend,
) -> None:
    """A folder resource holding a member whose name is not UTF-8 has no neurobank hash:
    archive check reports it (unreadable / not verifiable, exit 1, valid --json), as
    verify does for the same folder, instead of dying with a traceback."""
    archive, arch = emb.archive()
    folder = folder_resource(emb, arch, archive, {b"ok.dat": b"a", b"bad\xff.dat": b"b"})
    proc = run(emb, "--json", "archive", "check", str(archive.path))
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    assert proc.returncode == 1 and not doc["ok"]
    assert any(f["path"] == str(folder) for f in doc["findings"]), doc


# --- terminal output: control characters from the registry or the archive ---------------

ESC = "\x1b]0;owned\x07\x1b[2J"  # sets the terminal's title, then clears the screen


def raw_escape(proc: subprocess.CompletedProcess[bytes]) -> bool:
    """Whether an ESC byte reached the terminal (stdout or stderr)."""
    return b"\x1b" in proc.stdout or b"\x1b" in proc.stderr


def test_check_archive_does_not_echo_control_characters_of_a_stray_file_name(
    emb: Backend,
) -> None:
    """A stray entry under resources/ named with terminal escapes is reported with the
    escapes shown as text (as nbankctl audit shows names, via printable), never sent raw
    to the terminal."""
    archive, _arch = emb.archive()
    stub = archive.resources_dir / "zz"
    stub.mkdir()
    apply_access(archive, stub)
    (stub / f"zz{ESC}.dat").write_bytes(b"stray")
    proc = run(emb, "archive", "check", str(archive.path))
    assert proc.returncode == 1 and b"zz" in proc.stderr, proc.stderr
    assert not raw_escape(proc), proc.stderr


def test_dtype_and_archive_list_do_not_echo_control_characters_from_the_registry(
    emb: Backend,
) -> None:
    """A datatype's content type and an archive's root are free text any registry user
    can set: dtype list and archive list show escapes in them as text, never raw."""
    emb.registry.add_datatype(emb.name("dt"), f"audio/wav{ESC}")
    emb.registry.add_archive(emb.name("tp"), "tape", f"TAPE{ESC}:1")
    dtypes = run(emb, "dtype", "list")
    archives = run(emb, "archive", "list")
    assert dtypes.returncode == archives.returncode == 0, (dtypes.stderr, archives.stderr)
    assert b"audio/wav" in dtypes.stdout and b"TAPE" in archives.stdout
    assert not raw_escape(dtypes), dtypes.stdout
    assert not raw_escape(archives), archives.stdout


def test_locate_does_not_echo_control_characters_of_a_tape_location(emb: Backend) -> None:
    """locate shows a tape location's root (free text in the registry) with escapes as
    text, never raw."""
    tape = emb.name("tp")
    emb.registry.add_archive(tape, "tape", f"TAPE{ESC}:1")
    id = emb.resource(b"on tape", tape)
    proc = run(emb, "locate", id)
    assert proc.returncode == 0 and b"tape://" in proc.stdout, proc.stderr
    assert not raw_escape(proc), proc.stdout


def test_search_and_verify_do_not_echo_control_characters_of_record_names(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry]
) -> None:
    """A registry (or a proxy in front of it) answering names holding terminal escapes:
    search and verify show them as text, never raw."""
    data = b"some recording"
    bad = record(f"ab{ESC}", data, "a")

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        if path == "resources/":
            return answer([bad])
        if path == "info/":
            return answer({"name": f"django-neurobank{ESC}", "version": "0.12.0"})
        return NOT_FOUND

    fake = fake_registry(route)
    file = tmp_path / "some.file.wav"  # no id in its name: verify looks its SHA-1 up
    file.write_bytes(data)
    found = ctl(fake.url, tmp_path / "home", "search", "ab")
    verified = ctl(fake.url, tmp_path / "home", "verify", str(file))
    info = ctl(fake.url, tmp_path / "home", "registry-info")
    assert found.returncode == verified.returncode == info.returncode == 0
    for proc in (found, verified, info):
        assert not raw_escape(proc), (proc.stdout, proc.stderr)


# --- verify: a match must be a match ---------------------------------------------------


def test_verify_does_not_call_a_record_with_another_sha1_a_match(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry]
) -> None:
    """verify of a file with no id in its name says 'matches registry resource X' only
    for records whose SHA-1 is the file's: a registry or proxy that ignores the sha1
    filter (an older server, a cache keyed without the query) answering other records
    is 'no matches', exit 1, not a match with exit 0."""
    other = record("rother1", b"another recording entirely", "a")

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        if path == "resources/":
            return answer([other])  # whatever the filter asked
        return NOT_FOUND

    fake = fake_registry(route)
    file = tmp_path / "take.1.wav"
    file.write_bytes(b"the bytes of this file")
    proc = ctl(fake.url, tmp_path / "home", "--json", "verify", str(file))
    no_traceback(proc)
    doc = json.loads(proc.stdout)
    assert doc["status"] != "match" and proc.returncode == 1, doc


# --- malformed registry answers -------------------------------------------------------


def _malformed(kind: str) -> Route:
    """A registry answering well-formed JSON of the wrong shape to one kind of request."""

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        if kind == "search" and path == "resources/":
            return answer([{"name": "abc"}])  # no dtype
        if kind == "search-ints" and path == "resources/":
            return answer([1, 2])
        if kind == "info" and path == "bulk/resources/":
            return 200, {"Content-Type": "text/html"}, json.dumps({"name": ["abc"]}).encode()
        if kind == "locate" and path == "resources/abc/locations/":
            return answer([{"archive_name": "a"}])  # no scheme, root, resource_name
        if kind == "archive-list" and path == "archives/":
            return answer([{"name": "a"}])
        if kind == "verify" and path == "resources/abc/":
            return answer({"name": "abc", "sha1": 12345, "dtype": "dt"})
        return NOT_FOUND

    return route


@pytest.mark.parametrize(
    ("kind", "argv"),
    [
        ("search", ["search", "abc"]),
        ("search-ints", ["search", "abc"]),
        ("info", ["info", "abc"]),
        ("locate", ["locate", "abc"]),
        ("archive-list", ["archive", "list"]),
        ("verify", ["verify", "FILE"]),
    ],
)
def test_a_malformed_registry_answer_is_a_clear_error_not_a_traceback(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry], kind: str, argv: list[str]
) -> None:
    """Records of the wrong shape (a field missing, a number where text belongs, a list
    where a record belongs) give one line naming the registry and exit 3 (as a body
    that is not JSON does), never a traceback."""
    fake = fake_registry(_malformed(kind))
    file = tmp_path / "abc"
    file.write_bytes(b"abc")
    proc = ctl(fake.url, tmp_path / "home", *[str(file) if a == "FILE" else a for a in argv])
    no_traceback(proc)
    assert proc.returncode == 3 and fake.url.encode() in proc.stderr, proc.stderr


def test_guard_a_non_json_answer_is_a_clear_error(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry]
) -> None:
    """A body that is not JSON (here not even UTF-8) names the registry; exit 3."""

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        return 200, {"Content-Type": "application/json"}, b'[{"name": "a\xff\xfe'

    fake = fake_registry(route)
    proc = ctl(fake.url, tmp_path / "home", "search", "abc")
    no_traceback(proc)
    assert proc.returncode == 3 and b"did not answer JSON" in proc.stderr, proc.stderr


def test_guard_check_archive_with_a_5xx_on_page_3_is_not_clean(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry]
) -> None:
    """A listing that fails on page 3 of 3 (500) ends the check with exit 3, naming the
    registry; nothing is called clean."""
    arch = "arp"
    root = tmp_path / arch

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        if path == "archives/":
            return answer([{"name": arch, "scheme": "neurobank", "root": str(root)}])
        if path == "resources/" and query.get("archive") == arch:
            page = int(query.get("page", "1"))
            if page == 3:
                return 500, {"Content-Type": "text/html"}, b"<h1>Server Error</h1>"
            last = f'<{fake.url}resources/?archive={arch}&page=3>; rel="last"'
            nxt = f'<{fake.url}resources/?archive={arch}&page={page + 1}>; rel="next"'
            return (
                answer([], headers={"Link": f"{nxt}, {last}"})
                if page > 1
                else answer([record(f"rp{page}", b"x", arch)], headers={"Link": f"{nxt}, {last}"})
            )
        if path == "bulk/resources/":
            return bulk({}, body)
        return NOT_FOUND

    fake = fake_registry(route)
    create_archive(root, fake.url)
    proc = ctl(fake.url, tmp_path / "home", "--json", "archive", "check", str(root))
    no_traceback(proc)
    assert proc.returncode != 0 and b'"ok": true' not in proc.stdout, proc.stdout


# --- archive check and verify on damaged copies (guards) -------------------------------


def _damage(kind: str, b: Backend, archive: Any, arch: str) -> str:
    """Stores a resource damaged in one way; returns its id."""
    from nbankd.hashing import directory_hash

    data = b.blob("data")
    if kind.startswith("folder"):
        src = b.tmp / "src"
        src.mkdir()
        (src / "a.dat").write_bytes(b"member a")
        (src / "b.dat").write_bytes(b"member b")
        id = b.registry.add_resource(
            dtype=b.dtype, archive=arch, name=b.name(), sha1=directory_hash(src)
        ).name
        members = {b"a.dat": b"member a", b"b.dat": b"member b"}
        if kind == "folder-extra":
            members[b"c.dat"] = b"member c"
        else:
            del members[b"b.dat"]
        stub = archive.resources_dir / id[:2]
        stub.mkdir(exist_ok=True)
        apply_access(archive, stub)
        folder = stub / id
        folder.mkdir()
        for name, content in members.items():
            (folder / os.fsdecode(name)).write_bytes(content)
            apply_access(archive, folder / os.fsdecode(name))
        apply_access(archive, folder)
        return id
    id = b.resource(data, arch)
    if kind == "missing":
        return id
    if kind == "truncated":
        path = store(archive, id, data[:-1])
    elif kind == "altered":
        path = store(archive, id, data[:-1] + b"X")
    else:  # a link to another resource's good copy
        good = b.blob("good")
        other = b.resource(good, arch)
        target = store(archive, other, good)
        path = archive.resources_dir / id[:2] / f"{id}.dat"
        path.parent.mkdir(exist_ok=True)
        apply_access(archive, path.parent)
        path.symlink_to(target)
    return id


@pytest.mark.parametrize(
    "kind", ["missing", "truncated", "altered", "symlink", "folder-extra", "folder-missing"]
)
def test_guard_archive_check_and_verify_catch_a_damaged_copy(emb: Backend, kind: str) -> None:
    """archive check (plain and --json) exits 1 naming the damaged resource; verify of
    the stored path exits 1 too."""
    archive, arch = emb.archive()
    id = _damage(kind, emb, archive, arch)
    plain = run(emb, "archive", "check", str(archive.path))
    as_json = run(emb, "--json", "archive", "check", str(archive.path))
    doc = json.loads(as_json.stdout)
    assert plain.returncode == as_json.returncode == 1, plain.stderr
    assert id.encode() in plain.stderr and not doc["ok"]
    assert any(f["resource"] == id for f in doc["findings"]), doc
    if kind != "missing":
        [path] = [p for p in (archive.resources_dir / id[:2]).iterdir() if p.name.startswith(id)]
        assert run(emb, "verify", str(path)).returncode == 1


def test_verbose_archive_check_does_not_call_an_unhashed_resource_verified(emb: Backend) -> None:
    """archive check -v lists a resource registered with no SHA-1 as nbank does, "OK (no
    hash to verify)", not as "OK", which says its bytes were checked."""
    archive, arch = emb.archive()
    data = emb.blob("unhashed")
    id = emb.resource(data, arch, hashed=False)
    store(archive, id, b"anything at all")
    proc = run(emb, "archive", "check", "-v", str(archive.path))
    assert proc.returncode == 0, proc.stderr
    [line] = [ln for ln in proc.stderr.decode().splitlines() if ln.startswith(f" - {id} ")]
    assert line.endswith("OK (no hash to verify)"), line


def test_verify_does_not_echo_control_characters_of_a_file_name(emb: Backend) -> None:
    """verify of files another user named (nbankctl verify inbox/*) shows a name's
    terminal escapes as text, never raw."""
    file = emb.tmp / f"take{ESC}.wav"
    file.write_bytes(b"a take")
    proc = run(emb, "verify", str(file))
    assert proc.returncode == 1 and b"no matches" in proc.stdout, proc.stdout
    assert not raw_escape(proc), proc.stdout


# --- bad user input --------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [b"search", b"ab\xff"],
        [b"search", b"-k", b"k\xff=1"],
        [b"archive", b"list", b"-n", b"ar\xff"],
    ],
    ids=["search-name", "search-metadata-key", "archive-list-name"],
)
def test_a_non_utf8_argument_is_a_usage_error_not_a_traceback(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry], argv: list[bytes]
) -> None:
    """A filter given with bytes that are not UTF-8 (a name pasted from a mangled
    listing) is refused with exit 2 and a message, before anything is sent, instead of a
    UnicodeEncodeError traceback (info and locate already answer such a name)."""
    fake = fake_registry(lambda *_: answer([]))
    proc = ctl(fake.url, tmp_path / "home", *argv)
    no_traceback(proc)
    assert proc.returncode == 2 and proc.stderr.startswith(b"nbankctl"), proc.stderr
    assert fake.seen == []


def test_guard_info_and_locate_answer_a_non_utf8_or_path_like_id(
    tmp_path: Path, fake_registry: Callable[[Route], FakeRegistry]
) -> None:
    """Ids that cannot be resource names (undecodable bytes, '..', a path, very long)
    are 'not found' (exit 1) without a request naming them being sent."""

    def route(method: str, path: str, query: dict[str, str], body: bytes) -> Answer:
        return bulk({}, body) if path == "bulk/resources/" else NOT_FOUND

    fake = fake_registry(route)
    for word in (b"ab\xff", b"..", b"../../etc/passwd", b"x" * 5000):
        for cmd in (b"info", b"locate"):
            proc = ctl(fake.url, tmp_path / "home", cmd, word)
            no_traceback(proc)
            assert proc.returncode == 1 and b"no resource" in proc.stderr, proc.stderr
    assert all("etc" not in path and ".." not in path for _m, path in fake.seen), fake.seen
