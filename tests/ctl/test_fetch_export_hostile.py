"""Hostile review of the nbankctl commands that write outside the archive or read resources
out of it (fetch, export, locate, verify): existing destinations of every kind, full
disks, signals mid-write, hostile archive contents, a read-only archive.

Tests not marked as guards fail on the code reviewed and name the behaviour expected;
guards (names starting ``test_guard_``) pass and pin what held up. The embedded registry
is used throughout: the behaviour under test is nbankctl's, not a backend's. A download
location is an ``http`` archive of the registry served by a small server of the test's
own, which can hold a download half-way (no sleeps: the test waits for the partial file
to reach the size sent)."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.cli_backends import NBANKCTL, Backend, make_backend, store
from fixtures.daemon import wait_for
from fixtures.mountns import MountNamespace
from nbankd.hashing import directory_hash


@pytest.fixture
def emb(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The embedded registry with a fresh datatype, as nbankctl sees it."""
    b = make_backend("embedded", tmp_path, request)
    yield b
    b.registry.close()


def ns_ctl(ns: MountNamespace, b: Backend, *argv: str) -> subprocess.CompletedProcess[str]:
    """Runs ``nbankctl ARGV`` inside the mount namespace."""
    return subprocess.run(
        [*ns.enter, NBANKCTL, *b.before, *argv],
        env=b.env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def stored(b: Backend, data: bytes, *, hashed: bool = True) -> tuple[str, Path, str]:
    """A resource registered and stored in a fresh archive: (id, stored path, archive)."""
    archive, arch = b.archive()
    id = b.resource(data, arch, hashed=hashed)
    return id, store(archive, id, data), arch


def out_dir(b: Backend, name: str = "dest") -> Path:
    folder = b.tmp / name
    folder.mkdir()
    return folder


class HeldServer:
    """An HTTP server for one resource's download: it sends the headers and the first
    ``held`` bytes, then holds the rest until :meth:`release` (or the test ends)."""

    def __init__(self, data: bytes, held: int) -> None:
        self.data, self.held = data, held
        self.requests = 0
        self._go = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.data)))
                self.end_headers()
                self.wfile.write(server.data[: server.held])
                self.wfile.flush()
                server._go.wait(120)
                with contextlib.suppress(OSError):  # the client may be gone
                    self.wfile.write(server.data[server.held :])

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._go.set()

    def close(self) -> None:
        self._go.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def written(dest: Path) -> list[int]:
    """The sizes of the entries in ``dest`` (one, mid-download: its temporary file)."""
    return [os.stat(dest / n).st_size for n in os.listdir(dest)]


def web_resource(b: Backend, data: bytes, root: str) -> str:
    """A resource whose only location is an ``http`` archive of the registry at ``root``
    (its download URL is ``http://ROOT/ID/``)."""
    web = b.name("web")
    b.registry.add_archive(web, "http", root)
    return b.resource(data, web)


def dead_port() -> int:
    """A local port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- fetch: a full destination ---------------------------------------------------------


def test_fetch_into_a_full_disk_says_the_disk_is_full_not_that_the_registry_is_down(
    emb: Backend, mount_ns: MountNamespace
) -> None:
    """A fetch that fills DEST's disk fails as a full disk (exit 1, 'No space left'),
    not as the failure of another location tried after it (here a download that cannot
    connect: exit 3, 'check that the registry is up'); nothing is left in DEST."""
    big = os.urandom(3 << 20)
    id, _, _ = stored(emb, big)
    web = emb.name("web")
    emb.registry.add_archive(web, "http", f"127.0.0.1:{dead_port()}/nb")
    emb.registry.add_location(id, web)  # listed after the stored copy
    disk = out_dir(emb, "disk")
    mount_ns.mount_tmpfs(disk, "1m")
    proc = ns_ctl(mount_ns, emb, "fetch", "-d", str(disk), id)
    assert os.listdir(mount_ns.view(disk)) == []
    assert "No space left on device" in proc.stdout + proc.stderr, (
        f"exit {proc.returncode}; the user is told: {proc.stdout.strip()}"
    )
    assert proc.returncode == 1


def test_guard_fetch_force_into_a_full_disk_keeps_the_existing_target(
    emb: Backend, mount_ns: MountNamespace
) -> None:
    """Guard: fetch -f that fills DEST's disk keeps the file it was to replace (nbank's
    -f removes it first), and leaves no partial file."""
    big = os.urandom(3 << 20)
    id, _, _ = stored(emb, big)
    disk = out_dir(emb, "disk")
    mount_ns.mount_tmpfs(disk, "1m")
    seen = mount_ns.view(disk)
    (seen / id).write_bytes(b"the user's older copy")
    proc = ns_ctl(mount_ns, emb, "fetch", "-f", "-d", str(disk), id)
    assert proc.returncode != 0
    assert os.listdir(seen) == [id] and (seen / id).read_bytes() == b"the user's older copy"


# --- fetch: stopped mid-write ----------------------------------------------------------


@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT-guard"]
)
def test_fetch_stopped_by_a_signal_leaves_nothing_in_dest(emb: Backend, sig: int) -> None:
    """A fetch stopped mid-download by SIGTERM (kill, a job's time limit) or SIGHUP (the
    SSH session closed) leaves nothing in DEST, as Ctrl-C (SIGINT, the guard case) does:
    README promises 'nothing partial is ever left at a destination'."""
    data = os.urandom(3 << 20)
    server = HeldServer(data, held=(1 << 20) + 4096)  # nbankctl writes 1 MiB blocks
    try:
        id = web_resource(emb, data, f"127.0.0.1:{server.port}/nb")
        dest = out_dir(emb)
        proc = subprocess.Popen(
            [NBANKCTL, "fetch", "-d", str(dest), id],
            env=emb.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:

            def half_written() -> bool:
                return len(written(dest)) == 1 and written(dest)[0] > 0

            wait_for(half_written, 60, "the first part of the download in DEST")
            proc.send_signal(sig)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    finally:
        server.close()
    assert proc.returncode != 0
    left = os.listdir(dest)
    assert left == [], f"left in DEST after signal {sig!r}: {left}"


def test_guard_fetch_killed_mid_download_leaves_nothing_under_the_final_name(
    emb: Backend,
) -> None:
    """Guard: a fetch killed with SIGKILL mid-download leaves no file under the name
    asked for (only a hidden temporary name), and a second fetch then completes."""
    data = os.urandom(3 << 20)
    server = HeldServer(data, held=(1 << 20) + 4096)  # nbankctl writes 1 MiB blocks
    try:
        id = web_resource(emb, data, f"127.0.0.1:{server.port}/nb")
        dest = out_dir(emb)
        proc = subprocess.Popen(
            [NBANKCTL, "fetch", "-d", str(dest), id],
            env=emb.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for(
                lambda: len(written(dest)) == 1 and written(dest)[0] > 0,
                60,
                "the first part of the download in DEST",
            )
            proc.kill()
        finally:
            proc.kill()
            proc.wait()
        assert not (dest / id).exists() and not (dest / id).is_symlink()
        server.release()
        again = emb.ctl("fetch", "-d", str(dest), id)
    finally:
        server.close()
    assert again.returncode == 0, again.stdout + again.stderr
    assert (dest / id).read_bytes() == data


# --- fetch and export: destinations that exist ----------------------------------------


def _existing(dest: Path, name: str, kind: str, elsewhere: Path) -> None:
    target = dest / name
    if kind == "file":
        target.write_bytes(b"mine")
    elif kind == "link-to-file":
        elsewhere.write_bytes(b"precious, outside DEST")
        target.symlink_to(elsewhere)
    elif kind == "dangling-link":
        target.symlink_to(elsewhere)  # elsewhere does not exist
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "folder":
        target.mkdir()
        (target / "kept").write_bytes(b"kept")


def _unchanged(dest: Path, name: str, kind: str, elsewhere: Path) -> None:
    target = dest / name
    if kind == "file":
        assert target.read_bytes() == b"mine"
    elif kind == "link-to-file":
        assert target.is_symlink() and elsewhere.read_bytes() == b"precious, outside DEST"
    elif kind == "dangling-link":
        assert target.is_symlink() and not os.path.lexists(elsewhere)
    elif kind == "fifo":
        assert target.is_fifo()
    elif kind == "folder":
        assert os.listdir(target) == ["kept"]
    assert [n for n in os.listdir(dest) if n.endswith(".partial")] == []


KINDS = ["file", "link-to-file", "dangling-link", "fifo", "folder"]


@pytest.mark.parametrize("kind", KINDS)
def test_guard_fetch_keeps_an_existing_target_of_any_kind(emb: Backend, kind: str) -> None:
    """Guard: without -f, a target that exists as a file, a link to a file elsewhere, a
    dangling link (never written through), a FIFO (never opened) or a folder is kept
    as it is; the id fails (exit 1), nothing is written anywhere."""
    data = emb.blob("x")
    id, _, _ = stored(emb, data)
    dest = out_dir(emb)
    elsewhere = emb.tmp / "elsewhere"
    _existing(dest, id, kind, elsewhere)
    proc = emb.ctl("fetch", "-d", str(dest), id)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    _unchanged(dest, id, kind, elsewhere)


@pytest.mark.parametrize("kind", KINDS)
def test_guard_folder_export_keeps_an_existing_member_of_any_kind(emb: Backend, kind: str) -> None:
    """Guard: a folder export never replaces nor writes through what is already in OUT
    under a resource's stored name; that resource fails, the others are exported."""
    archive, arch = emb.archive()
    data, other = emb.blob("x"), emb.blob("y")
    id, oid = emb.resource(data, arch), emb.resource(other, arch)
    store(archive, id, data)
    store(archive, oid, other)
    dest = out_dir(emb)
    elsewhere = emb.tmp / "elsewhere"
    _existing(dest, f"{id}.dat", kind, elsewhere)
    proc = emb.ctl("export", str(dest), id, oid)
    assert proc.returncode == 1, proc.stderr
    _unchanged(dest, f"{id}.dat", kind, elsewhere)
    assert (dest / f"{oid}.dat").read_bytes() == other


# --- reading from a hostile archive ----------------------------------------------------


def test_guard_an_unhashed_resource_replaced_by_a_link_is_not_handed_out(emb: Backend) -> None:
    """Guard: a stored file replaced in the archive by a link to a foreign file is not
    fetched nor exported, even for a resource with no registered SHA-1 to catch it."""
    id, path, _ = stored(emb, emb.blob("real"), hashed=False)
    foreign = emb.tmp / "foreign"
    foreign.write_bytes(b"someone else's file")
    path.unlink()
    path.symlink_to(foreign)
    dest = out_dir(emb)
    assert emb.ctl("fetch", "-d", str(dest), id).returncode == 1
    assert emb.ctl("export", str(dest / "x.tar"), id).returncode == 1
    assert emb.ctl("export", str(dest / "folder"), id).returncode == 1
    assert sorted(os.listdir(dest)) in ([], ["folder"])
    assert not (dest / "folder").exists() or os.listdir(dest / "folder") == []


def test_a_location_whose_archive_file_is_a_fifo_does_not_hang_locate_or_fetch(
    emb: Backend,
) -> None:
    """A location in an archive folder whose nbank.json is a FIFO (any local user can
    make one, at a root the registry lists) is passed over: locate and fetch answer
    (the stored copy elsewhere is still fetched) instead of waiting forever."""
    trap = emb.tmp / "trap"
    (trap / "resources").mkdir(parents=True)
    os.mkfifo(trap / "nbank.json")
    trap_name = emb.name("trap")
    emb.registry.add_archive(trap_name, "neurobank", str(trap))
    data = emb.blob("x")
    id = emb.resource(data, trap_name)  # the trap is its first location
    archive, arch = emb.archive()
    store(archive, id, data)
    emb.registry.add_location(id, arch)
    dest = out_dir(emb)
    argv = [NBANKCTL, *emb.before]
    for cmd in (["locate", id], ["fetch", "-d", str(dest), id]):
        try:
            proc = subprocess.run(
                [*argv, *cmd], env=emb.env, capture_output=True, text=True, timeout=15
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"nbankctl {cmd[0]} still waits after 15 s on the FIFO {trap}/nbank.json")
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (dest / id).read_bytes() == data


def test_guard_a_read_only_archive_serves_fetch_export_locate_and_verify(
    emb: Backend, mount_ns: MountNamespace
) -> None:
    """Guard: with the archive on a read-only mount, fetch, tar, zip and folder exports
    (file and folder resources), locate and verify all work (exit 0)."""
    archive, arch = emb.archive()
    data = emb.blob("a")
    id = emb.resource(data, arch)
    path = store(archive, id, data)
    fid = emb.name("d")
    root = archive.resources_dir / fid[:2] / fid
    (root / "s").mkdir(parents=True)
    (root / "s" / "f").write_bytes(emb.blob("f"))
    emb.registry.add_resource(dtype=emb.dtype, archive=arch, name=fid, sha1=directory_hash(root))
    mount_ns.run("mount", "--bind", archive.path, archive.path)
    mount_ns.run("mount", "-o", "remount,bind,ro", archive.path)
    dest = out_dir(emb)
    for argv in (
        ["fetch", "-d", str(dest), id],
        ["export", str(dest / "x.tar"), id, fid],
        ["export", str(dest / "x.zip"), id, fid],
        ["export", str(dest / "folder"), id, fid],
        ["locate", id, fid],
        ["verify", str(path)],
    ):
        proc = ns_ctl(mount_ns, emb, *argv)
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    assert (dest / id).read_bytes() == data
    assert hashlib.sha1((dest / "folder" / fid / "s" / "f").read_bytes()).hexdigest() == (
        hashlib.sha1(emb.blob("f")).hexdigest()
    )


# --- odd names -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_export_to_a_long_non_ascii_name_the_filesystem_takes(emb: Backend, suffix: str) -> None:
    """A tar or zip OUT whose name the filesystem takes (120 'é' and the suffix: 244
    bytes, under the 255-byte limit; nbank writes it) is exported to. Its temporary name
    is cut at 200 characters, not bytes: 262 bytes, so the export fails with 'File name
    too long (check the folder's permissions)'."""
    id, _, _ = stored(emb, emb.blob("x"))
    out = emb.tmp / ("é" * 120 + suffix)
    assert len(os.fsencode(out.name)) <= 255
    proc = emb.ctl("export", str(out), id)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
