"""The end of ``nbankctl registry switch``: giving nbankd's inboxes back.

After a switch, or after it stopped part-way, the inboxes it paused are resumed --
unless the daemon (or, when stopped, the configuration it starts on) would then
deposit into the old registry with the files half switched: those stay paused
until the same command is run again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbankctl.migrate_credentials import warn
from nbankd import errors
from nbankd.config import load_config
from nbankd.migration import switch
from nbankd.migration.pausing import PAUSED_NAME, read_paused, unpause_stopped

if TYPE_CHECKING:
    from nbankctl.migrate_switch import Switch


def release(run: Switch) -> bool:
    """Resumes the inboxes ``run`` paused, unless that would split the records;
    False if that failed."""
    daemon = run.daemon
    if run.dry_run:
        return True
    if not daemon.running:
        return release_stopped(run)
    keep = False
    if run.files_changed and not run.finished:
        try:
            keep = not switch.same_registry(daemon.registry_url(), run.url)
        except errors.NbankdError:
            keep = True
    if keep:
        warn(
            "nbankd stays paused (it would deposit into the old registry): run the same "
            "command again when fixed; it resumes the inboxes it paused"
        )
        return True
    try:
        daemon.resume()
    except errors.DaemonUnreachable as err:
        warn(f"could not resume nbankd's inboxes: {err}")
        warn("(nbankd starts with its inboxes running; run the switch again once it does)")
        return False
    except errors.NbankdError as err:
        warn(f"could not resume nbankd's inboxes: {err}")
        warn(f"run 'nbankctl resume' (inboxes: {', '.join(daemon.ours)})")
        return False
    return True


def config_names_url(run: Switch) -> bool:
    """Whether the configuration on disk names the URL (what nbankd starts on)."""
    try:
        return switch.same_registry(load_config(run.path).registry, run.url)
    except errors.ConfigError:
        return False


def release_stopped(run: Switch) -> bool:
    """With nbankd stopped: takes the inboxes an earlier run paused out of nbankd's
    paused.json, so that they run when it starts, unless it would start on the old
    registry with the files half switched; False if that failed."""
    state_dir = run.config.state_dir
    if run.files_changed and not run.finished and not config_names_url(run):
        if read_paused(state_dir):
            warn(
                "nbankd is not running; the inboxes an earlier switch paused stay paused "
                "(it would start on the old registry): run the same command again when "
                "fixed; it gives them back"
            )
        return True
    try:
        freed = unpause_stopped(state_dir)
    except OSError as err:
        held = state_dir / PAUSED_NAME
        inboxes = ", ".join(sorted(read_paused(state_dir)))
        warn(
            f"cannot take the inboxes an earlier switch paused ({inboxes}) out of {held}: "
            f"{err.strerror or err}"
        )
        warn(
            "run the same command again as root or as nbankd's user, or, once nbankd "
            "runs, 'nbankctl resume INBOX' for each of them"
        )
        return False
    if freed:
        run.say(
            f"nbankd is not running: unpaused {len(freed)} inbox(es) an earlier switch "
            f"paused ({', '.join(freed)}); they run when nbankd starts"
        )
    elif freed is not None:
        run.say("nbankd is not running: forgot the inboxes an earlier switch paused")
    return True


__all__ = ["release"]
