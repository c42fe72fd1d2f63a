"""Edges of nbankctl deposit's probe (``manual.calibrate``): a work folder swapped by
another user, a deposit finished by a later run; and a download's redirect, which
sends no ~/.netrc credentials (the environment is read once, as the registry client
reads it)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fixtures.holders import held_open
from fixtures.manual_env import ManualFiles, manual_folder
from fixtures.steps_env import Env, env
from nbankd.deposit import manual
from nbankd.deposit.lifecycle import State
from nbankd.names import PROBE_PREFIX, WORK_DIR_NAME
from nbankd.transfer import fetching
from nbankd.transfer.placing import NewFile
from nbankd.watch import writers

__all__ = ["env"]


@pytest.fixture
def files(env: Env) -> Iterator[ManualFiles]:
    with manual_folder(env) as made:
        yield made


def test_a_work_folder_swapped_after_prepare_does_not_switch_off_the_writer_check(
    env: Env, files: ManualFiles
) -> None:
    """A user who can write the deposited folder and replaces the prepared ``.nbank``
    by an open folder of their own, where every file is held open for writing, does
    not make a file open for writing be journaled: the probe is never made in a work
    folder other than the one prepared, and the file is refused."""
    inbox, spec, folder = files
    os.rename(folder / WORK_DIR_NAME, folder / ".nbank-aside")  # same parent: allowed
    (folder / WORK_DIR_NAME).mkdir()
    os.chmod(folder / WORK_DIR_NAME, 0o777)
    planted = folder / WORK_DIR_NAME / f"{PROBE_PREFIX}planted"
    planted.write_bytes(b"")
    (folder / "rec.dat").write_bytes(b"recording in progress")
    with held_open(planted), held_open(folder / "rec.dat"):
        manual.calibrate(spec)
        items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert items == []
    assert [name for name, _why in refused] == ["rec.dat"]
    assert os.listdir(folder / WORK_DIR_NAME) == [planted.name]


def test_an_interrupted_deposit_on_a_filesystem_refusing_every_lease_is_finished(
    env: Env,
    files: ManualFiles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a filesystem that refuses every read lease (NFSv4 without delegations, CIFS
    without oplocks), a closed file journaled by one run is deposited by the next run,
    which asks about its probe in that folder before finishing it (as nbankctl deposit
    does for an earlier run's items), not put back as "still open for writing"."""
    inbox, spec, folder = files
    monkeypatch.setattr(writers, "_ask", lambda fd: True)  # every lease: EAGAIN
    (folder / "rec.dat").write_bytes(b"recorded, closed")
    manual.calibrate(spec)
    items, refused = manual.journal_files(env.journal, inbox, ["rec.dat"], kind="file", now=0.0)
    assert refused == [] and len(items) == 1
    writers._untrusted.clear()  # the run ends here; the next run starts afresh
    left_in = manual.spec_for_key(inbox.key)
    assert left_in is not None
    manual.calibrate(left_in)
    done = env.until(items[0], State.DONE)
    assert done.state is State.DONE, (done.state, done.error_code, done.error_message)


@pytest.fixture
def redirecting_server() -> Iterator[tuple[int, list[str | None]]]:
    """A loopback server: /start redirects to http://localhost:PORT/file (another host
    name), /file answers some bytes; yields its port and the Authorization headers
    /file was asked with."""
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            port = self.server.server_address[1]
            if self.path == "/start/":
                self.send_response(302)
                self.send_header("Location", f"http://localhost:{port}/file")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            seen.append(self.headers.get("Authorization"))
            body = b"resource bytes"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_redirected_download_sends_no_netrc_credentials(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    redirecting_server: tuple[int, list[str | None]],
) -> None:
    """nbankctl fetch's anonymous download, redirected to another host, sends that host
    no credentials from ~/.netrc (the server never asked for any)."""
    port, seen = redirecting_server
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login alice password secret\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    new = NewFile(tmp_path / "fetched")
    try:
        fetching._download(f"http://127.0.0.1:{port}/start/", new, None)
    finally:
        new.discard()
    assert seen == [None]
