"""An inbox named through a symbolic link is followed only when no other user could
have put the link there or could swap it (a writer of the folder above an inbox
could otherwise make the daemon claim another folder's files at its next start)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from fixtures.daemon import NBANKD
from nbankd import errors
from nbankd.daemon.setup import inbox_link_problem


def _link(tmp_path: Path, mode: int) -> Path:
    """``tmp_path/top/inbox``: a link (this user's) to ``tmp_path/real``, its folder
    given ``mode``."""
    (tmp_path / "real").mkdir()
    top = tmp_path / "top"
    top.mkdir()
    top.chmod(mode)
    link = top / "inbox"
    link.symlink_to(tmp_path / "real")
    return link


@pytest.mark.parametrize("mode", [0o755, 0o1777, 0o2755])
def test_a_link_only_root_may_change_is_followed(tmp_path: Path, mode: int) -> None:
    """A link of this user's in a folder only this user may change (or a sticky one,
    where no other user may rename it) is a configured link: accepted."""
    inbox_link_problem(_link(tmp_path, mode))


def test_a_real_folder_in_a_shared_folder_is_fine(tmp_path: Path) -> None:
    """A real inbox folder in a folder the lab may write is not a link: nothing to refuse."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared").chmod(0o2777)
    (tmp_path / "shared" / "inbox").mkdir()
    inbox_link_problem(tmp_path / "shared" / "inbox")


@pytest.mark.parametrize("mode", [0o777, 0o2775])
def test_a_link_in_a_folder_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    """A link in a folder its group or others may write (no sticky bit) could have been
    swapped in: refused, naming the folder, its mode and the real folder to name."""
    link = _link(tmp_path, mode)
    with pytest.raises(errors.ConfigError) as refused:
        inbox_link_problem(link)
    assert f"{link.parent} is writable by others (mode {mode:04o})" in str(refused.value)
    assert str(tmp_path / "real") in refused.value.hint


def test_a_link_another_user_owns_is_refused(tmp_path: Path, unpriv_user: Any) -> None:
    """A link belonging to another user, even in a folder only root may change, is refused."""
    link = _link(tmp_path, 0o755)
    os.lchown(link, unpriv_user.uid, unpriv_user.gid)
    with pytest.raises(errors.ConfigError, match=f"the link belongs to uid {unpriv_user.uid}"):
        inbox_link_problem(link)


def test_the_daemon_will_not_start_on_an_inbox_link_others_may_swap(daemon_factory: Any) -> None:
    """nbankd started on an inbox that is a link in a folder others may write exits 2
    with the reason, creating nothing in the folder the link names."""
    h = daemon_factory()
    real = h.root / "someone-elses"
    real.mkdir()
    shared = h.root / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    h.inbox = shared / "inbox"
    h.inbox.symlink_to(real)
    h.write_config()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}
    refused = subprocess.run(
        [NBANKD, "-c", str(h.config_path)], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 2, refused.stderr
    assert "is a symbolic link another user may have made or may replace" in refused.stderr
    assert list(real.iterdir()) == []


def test_a_link_higher_up_the_path_in_a_folder_others_may_write_is_refused(
    tmp_path: Path,
) -> None:
    """A real inbox folder reached through a link in a shared folder (one a lab writer
    could have swapped for a link to another folder) is refused, naming that link."""
    (tmp_path / "elsewhere" / "inbox").mkdir(parents=True)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "rig").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.ConfigError) as refused:
        inbox_link_problem(shared / "rig" / "inbox")
    assert f"is reached through {shared / 'rig'}, a symbolic link" in str(refused.value)
    assert f"{shared} is writable by others (mode 0777)" in str(refused.value)
    assert str(tmp_path / "elsewhere" / "inbox") in refused.value.hint


def test_a_link_higher_up_the_path_another_user_owns_is_refused(
    tmp_path: Path, unpriv_user: Any
) -> None:
    """A folder on the inbox's path that is another user's link is refused."""
    (tmp_path / "elsewhere" / "inbox").mkdir(parents=True)
    (tmp_path / "rig").symlink_to(tmp_path / "elsewhere")
    os.lchown(tmp_path / "rig", unpriv_user.uid, unpriv_user.gid)
    with pytest.raises(errors.ConfigError, match=f"the link belongs to uid {unpriv_user.uid}"):
        inbox_link_problem(tmp_path / "rig" / "inbox")


def test_a_link_met_through_another_link_is_judged_too(tmp_path: Path) -> None:
    """A link that an accepted link leads to, sitting in a folder others may write, is
    refused: every link followed counts, not only those written in the path."""
    (tmp_path / "real").mkdir()
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "hop").symlink_to(tmp_path / "real")
    (tmp_path / "inbox").symlink_to("shared/hop")
    with pytest.raises(errors.ConfigError, match=f"reached through {shared / 'hop'}"):
        inbox_link_problem(tmp_path / "inbox")


def test_a_chain_of_links_only_root_may_change_is_followed(tmp_path: Path) -> None:
    """Links of this user's in folders only this user may change, relative and absolute,
    through ``..``, lead to the inbox: accepted."""
    (tmp_path / "a" / "real").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "to-a").symlink_to("../a")
    (tmp_path / "top").symlink_to(tmp_path / "b")
    inbox_link_problem(tmp_path / "top" / "to-a" / "real")


def test_a_loop_of_links_is_refused_with_a_message(tmp_path: Path) -> None:
    """Links that lead to each other give a clear refusal, not a hang."""
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    with pytest.raises(errors.ConfigError, match="more than 40 symbolic links"):
        inbox_link_problem(tmp_path / "x" / "inbox")


def _config_through_loose_link(top: Path) -> Path:
    """A configuration whose inbox is ``top/shared/inbox``, a link (root's) in a folder
    every user may write, to ``top/real``."""
    (top / "real").mkdir()
    shared = top / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (shared / "inbox").symlink_to(top / "real")
    config = top / "nbankd.yaml"
    config.write_text(
        "state_dir: state\ncontrol_socket: control.sock\n"
        "archives:\n  - path: archive\n    create: true\n"
        f"inboxes:\n  - path: {shared / 'inbox'}\n    dtype: wav\n"
    )
    config.chmod(0o644)
    return config


def test_check_config_as_the_daemons_user_fails_on_a_link_it_would_refuse(
    user_tmp_path: Path, unpriv_user: Any
) -> None:
    """check-config run as the user nbankd runs as exits 2 on an inbox link that start
    would refuse, naming the inbox key and the link's folder."""
    config = _config_through_loose_link(user_tmp_path)
    proc = unpriv_user.run([NBANKD, "check-config", "--offline", "-c", str(config)], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "error:" in proc.stderr and "inboxes[0].path" in proc.stderr, proc.stderr
    assert f"{user_tmp_path / 'shared'} is writable by others" in proc.stderr


def test_check_config_as_root_warns_of_an_inbox_link_others_may_swap(tmp_path: Path) -> None:
    """check-config run as root, who cannot tell which user nbankd will run as, warns of
    an inbox link others may swap (exit 0), naming it."""
    config = _config_through_loose_link(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBANKD_", "NOTIFY"))}
    proc = subprocess.run(
        [NBANKD, "check-config", "--offline", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "warning:" in proc.stderr and "inboxes[0].path" in proc.stderr, proc.stderr
    assert "nbankd refuses to start on it" in proc.stderr
