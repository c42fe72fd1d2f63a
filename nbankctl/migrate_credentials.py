"""``registry switch``, step 4: proving that nbankd will be able to write to the new
registry with the credentials nbankd itself will use, before anything irreversible.

- nbankd running: it is asked to try its own credentials (``check-registry`` over the
  control socket: its environment decides, as it will after the switch: systemd's
  ``$CREDENTIALS_DIRECTORY/registry``, then ``registry_auth``, then its user's netrc).
  Credentials loaded by ``LoadCredential=`` change only when the service restarts, so a
  refusal there stops the switch with what to put where and how to resume.
- nbankd stopped, ``registry_auth`` given or configured: that file must be readable by
  nbankd's user (the owner of ``state_dir``) and may write.
- nbankd stopped, no ``registry_auth``: provable only when this command runs as
  nbankd's user (its netrc); otherwise the switch stops and says why.

The proof is one authenticated ``POST resources/`` with an empty body, which creates
nothing (:meth:`~nbankd.registry.http.HttpRegistry.check_credentials`).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
import sys
from pathlib import Path

from nbankd import errors
from nbankd.config import Config
from nbankd.migration.pausing import Daemon
from nbankd.names import lines_without_controls
from nbankd.registry import credentials
from nbankd.registry.http import HttpRegistry


def warn(text: str) -> None:
    """A warning on stderr: its lines as they are, any other control character in what
    it quotes shown as text (:func:`~nbankd.names.lines_without_controls`)."""
    print(f"nbankctl: {lines_without_controls(text)}", file=sys.stderr, flush=True)


def unreadable_by(path: Path, uid: int) -> str:
    """Why user ``uid`` cannot read ``path`` (mode and owner of it and its folders), or ""."""
    if uid == 0:
        return ""
    try:
        entry = pwd.getpwuid(uid)
        name = entry.pw_name
        gids = set(os.getgrouplist(name, entry.pw_gid))
    except KeyError:
        name, gids = str(uid), set()

    def allowed(st: os.stat_result, bits: tuple[int, int, int]) -> bool:
        if st.st_uid == uid:
            return bool(st.st_mode & bits[0])
        if st.st_gid in gids:
            return bool(st.st_mode & bits[1])
        return bool(st.st_mode & bits[2])

    for folder in reversed(path.parents):
        if not allowed(os.stat(folder), (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)):
            return f"is in {folder}, which user {name} may not enter"
    st = os.stat(path)
    if not allowed(st, (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)):
        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        mode = stat.S_IMODE(st.st_mode)
        return f"is not readable by user {name} (owner {owner}:{group}, mode {mode:04o})"
    return ""


def prove(url: str, config: Config, path: Path | None, daemon: Daemon) -> list[str]:
    """Raises ProblemsFound, naming what to fix, unless nbankd's credentials may write to
    ``url``; ``path`` is the registry_auth file nbankd will be configured with. Returns
    what was proven, for the caller to say."""
    if daemon.running:
        return _ask_daemon(url, path, daemon)
    if path is not None:
        return [
            _file(url, config, path),
            "note: nbankd is not running; when it starts, credentials from systemd's "
            "LoadCredential= ($CREDENTIALS_DIRECTORY/registry) take precedence over this file",
        ]
    return [_own(url, config)]


def _ask_daemon(url: str, path: Path | None, daemon: Daemon) -> list[str]:
    request = {"url": url, "registry_auth": str(path) if path else None}
    try:
        answer = daemon.call("check-registry", request)
    except errors.NbankdError as err:
        if err.code == "unknown-command":  # an nbankd older than this command
            warn("nbankd is too old to check its own credentials; checking the file only")
            if path is None:
                return []
            return [
                _try(url, credentials.load_file(path, credentials.registry_host(url)), str(path))
            ]
        if "LoadCredential=" in str(err):
            source = (
                _load_credential_source() or "the file the unit's LoadCredential=registry:... names"
            )
            hint = (
                "put credentials for the new registry (user:password, or a netrc line for "
                f"{credentials.registry_host(url)}) in {source}, run 'systemctl restart "
                "nbankd' (systemd reads credentials only when the service starts), then run "
                "this same command again: it finishes the switch"
            )
        else:
            hint = (
                "give nbankd credentials that may add resources there (--registry-auth FILE "
                "readable by nbankd's user, or that user's ~/.netrc), then run this same "
                "command again: it finishes the switch"
            )
        raise errors.ProblemsFound(
            f"{err}; nothing irreversible was done: the archives and the configuration "
            "still name the old registry",
            hint=hint,
        ) from None
    return [f"nbankd's credentials ({answer.get('credentials')}) may write to {url}"]


def _load_credential_source(unit: str = "nbankd.service") -> str | None:
    """The file the unit's ``LoadCredential=registry:FILE`` names, as systemd reports it
    (``systemctl show``); None where systemd or the unit is not there."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return None
    try:
        shown = subprocess.run(
            [systemctl, "show", "--property=LoadCredential", unit],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return credential_path(shown.stdout)


def credential_path(shown: str) -> str | None:
    """The registry credential's source path in ``systemctl show -p LoadCredential``'s
    output (``LoadCredential=registry:/etc/nbankd/registry-credentials``, one or more)."""
    for word in shown.replace("LoadCredential=", " ").split():
        name, sep, path = word.partition(":")
        if sep and name == credentials.CREDENTIAL_NAME and path.startswith("/"):
            return path
    return None


def _file(url: str, config: Config, path: Path) -> str:
    creds = credentials.load_file(path, credentials.registry_host(url))
    uid = os.stat(config.state_dir).st_uid
    why = unreadable_by(path, uid)
    if why:
        raise errors.ProblemsFound(
            f"the credentials file {path} {why}; nbankd runs as the owner of "
            f"{config.state_dir} and could not write to {url}",
            hint="put it where that user may read it (e.g. /etc/nbankd/registry-auth, owned "
            "by that user, mode 0600), then run the switch again",
        )
    return _try(url, creds, str(path))


def _own(url: str, config: Config) -> str:
    uid = os.stat(config.state_dir).st_uid
    if os.geteuid() != uid:
        raise errors.ProblemsFound(
            "nbankd is not running and the configuration names no registry_auth: which "
            f"credentials nbankd will write to {url} with cannot be proven from here (its "
            "user's netrc, or systemd's LoadCredential=); nothing irreversible was done",
            hint="give --registry-auth FILE (readable by nbankd's user), or start nbankd and "
            "run this command again (it then asks nbankd to try its own credentials)",
        )
    creds, source = credentials.resolve_source(url)
    return _try(url, creds, source)


def _try(url: str, creds: credentials.Credentials | None, source: str) -> str:
    """What proves that ``creds`` may write to ``url`` (raises if they may not)."""
    with HttpRegistry(url, creds) as reg:
        reg.check_credentials()
    return f"credentials in {source} may write to {url}"


__all__ = ["credential_path", "prove", "unreadable_by"]
