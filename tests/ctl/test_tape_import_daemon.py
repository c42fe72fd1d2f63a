"""nbankctl tape import into an archive of a daemon configuration: handed to the
running daemon (admins only; the tar must be a file it can read, never stdin), and
by hand under the state directory's lock while it is stopped."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from ctl.test_copy_daemon import configured, ctl, deposited, two_archives
from fixtures.cli_backends import NBANKCTL, make_tar
from fixtures.daemon import start_until_said
from fixtures.users import TestUser
from nbankd.daemon import statelock

# The daemons that import run as root: an unprivileged user cannot reach this test
# machine's Python (under /root) and gets the system's 3.11.2, whose tarfile has no
# data_filter (3.11.4). The copy tests show the hand-over by a user not access.user.


def test_an_admin_imports_a_tar_through_the_running_daemon(daemon_factory: Any) -> None:
    """While nbankd runs, an admin's import of the named resource of a tar is done by it:
    stored, located, reported line by line as by hand."""
    h = two_archives(daemon_factory, None)
    h.start()
    id = deposited(h, b"a recording on tape")
    tar = make_tar(h.root / "tape.tar", [(f"{id}.dat", b"a recording on tape")])
    r = ctl(h, "tape", "import", str(tar), str(h.root / "dest"), id)
    h.stop()
    assert r.returncode == 0, r.stderr
    assert "nbankd is running: handing the import to it" in r.stderr
    assert f"source: {tar}" in r.stderr
    stored = h.root / "dest" / "resources" / id[:2] / f"{id}.dat"
    assert f"  - {id}.dat -> {stored}" in r.stderr
    assert "imported: 1; already: 0; skipped: 0; failed or refused: 0" in r.stderr
    assert stored.read_bytes() == b"a recording on tape"
    with h.open_registry() as reg:
        assert "dest" in reg.get_resource(id).locations


def test_a_mismatching_member_through_the_daemon_exits_1(daemon_factory: Any) -> None:
    """A member whose bytes differ from the registered SHA-1 is refused by the daemon's
    import: its ✗ line is printed and the command exits 1, nothing stored."""
    h = two_archives(daemon_factory, None)
    h.start()
    id = deposited(h, b"the registered bytes")
    tar = make_tar(h.root / "tape.tar", [(f"{id}.dat", b"other bytes")])
    r = ctl(h, "tape", "import", str(tar), str(h.root / "dest"))
    h.stop()
    assert r.returncode == 1, r.stderr
    assert f"  ✗ {id}.dat -> SHA-1" in r.stderr
    assert not (h.root / "dest" / "resources" / id[:2]).exists()


def test_a_tar_on_stdin_cannot_be_handed_to_the_daemon(
    daemon_factory: Any, unpriv_user: TestUser
) -> None:
    """With nbankd running, `tape import -` is refused (exit 2) with what to do instead."""
    h = two_archives(daemon_factory, unpriv_user)
    h.start()
    r = ctl(h, "tape", "import", "-", str(h.root / "dest"), input="")
    h.stop()
    assert r.returncode == 2, r.stderr
    assert "standard input cannot be handed to it" in r.stderr
    assert "give the tar file's path" in r.stderr


def test_a_user_who_is_not_an_admin_cannot_import_through_the_daemon(
    daemon_factory: Any, unpriv_user: TestUser, other_user: TestUser
) -> None:
    """The control socket refuses `tape-import` from a reader outside control.admins."""
    readers = {"control": {"readers": [other_user.name]}}
    h = two_archives(daemon_factory, unpriv_user, extra_config=readers)
    h.start()
    h.socket_path.chmod(0o666)  # reachable: the peer's credentials must refuse it
    id = deposited(h, b"not for readers")
    tar = make_tar(h.root / "tape.tar", [(f"{id}.dat", b"not for readers")])
    r = other_user.run(
        [NBANKCTL, "-c", str(h.config_path), "tape", "import", str(tar), str(h.root / "dest")],
        env={"PATH": os.environ["PATH"]},
    )
    h.stop()
    assert r.returncode == 2, r.stderr
    assert f"user {other_user.name} may not" in r.stderr, r.stderr
    assert not (h.root / "dest" / "resources" / id[:2]).exists()


def test_with_the_daemon_stopped_an_import_waits_for_the_state_directory_lock(
    tmp_path: Path,
) -> None:
    """With no daemon answering and another process holding the state directory's lock,
    the import says so and waits (nothing imported meanwhile), then imports."""
    config, state, dest, id = configured(tmp_path, listed=True)
    tar = make_tar(tmp_path / "tape.tar", [(f"{id}.dat", b"copied under the lock")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    lock = statelock.acquire(state)
    try:
        argv = [NBANKCTL, "-c", str(config), "tape", "import", str(tar), str(dest)]
        proc, said = start_until_said(argv, "waiting for it", env)
        assert not (dest / "resources" / "re").exists()  # nothing imported while it waits
    finally:
        lock.release()
    out, rest = proc.communicate(timeout=120)
    assert proc.returncode == 0, said + rest
    assert "imported: 1" in rest and out == ""
    assert (dest / "resources" / "re" / f"{id}.dat").read_bytes() == b"copied under the lock"


def test_with_the_daemon_stopped_a_tar_on_stdin_is_imported_by_hand(tmp_path: Path) -> None:
    """With no daemon running, `tape import -` reads the tar from stdin as before."""
    config, _, dest, id = configured(tmp_path, listed=True)
    tar = make_tar(tmp_path / "tape.tar", [(f"{id}.dat", b"copied under the lock")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBANK")}
    with open(tar, "rb") as stdin:
        r = subprocess.run(
            [NBANKCTL, "-c", str(config), "tape", "import", "-", str(dest)],
            stdin=stdin,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    assert r.returncode == 0, r.stderr
    assert (dest / "resources" / "re" / f"{id}.dat").read_bytes() == b"copied under the lock"
