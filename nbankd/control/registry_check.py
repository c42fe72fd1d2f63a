"""``check-registry``: may this daemon, with the credentials it would find, add
resources at a URL? Asked by ``nbankctl registry switch`` before its irreversible
steps; creates nothing.

The daemon's credentials go to whatever URL is named, so only root and the daemon's
own user may ask; a ``registry_auth`` file named in the request is read only when
the peer could read it too.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nbankd import errors
from nbankd.control.peer_rights import READ, PeerRights, peer_of
from nbankd.control.protocol import ProtocolError, string_arg
from nbankd.registry import credentials
from nbankd.registry.http import HttpRegistry

if TYPE_CHECKING:
    from nbankd.daemon.view import DaemonView as Daemon


def check_registry(daemon: Daemon, args: dict[str, Any]) -> dict[str, Any]:
    """Proves that this daemon, with the credentials it would find for ``url`` (its
    own environment: ``$CREDENTIALS_DIRECTORY``, then ``registry_auth`` as given or
    configured, then its user's netrc), may add resources there, creating nothing
    (``registry switch`` asks this before its irreversible steps). Returns the URL and
    where the credentials came from; a refusal is an error naming that source.

    The daemon's credentials go to whatever URL is named, so only root and the
    daemon's own user may ask (``registry switch`` runs as one of them); other admins
    are refused. A ``registry_auth`` named in the request is read only when the peer
    could read it too (:class:`~nbankd.control.peer_rights.PeerRights`)."""
    url = str(string_arg(args, "url", required=True))
    rights = PeerRights(peer_of(args))
    given = string_arg(args, "registry_auth") if args.get("registry_auth") != "" else None
    if given:
        _check_readable(rights, given)
    if rights.checked:
        raise ProtocolError(
            "denied",
            f"check-registry sends nbankd's own registry credentials to the URL it is "
            f"given, so only root or nbankd's user ({_daemon_user()!r}) may run it, not "
            f"{rights.who}; run 'nbankctl registry switch' (which asks it) as root or as "
            f"{_daemon_user()!r}",
        )
    auth = given or daemon.config.registry_auth
    creds, source = credentials.resolve_source(url, registry_auth=auth)
    try:
        with HttpRegistry(url, creds) as reg:
            reg.check_credentials()
    except errors.RegistryAuthError as err:
        raise errors.RegistryAuthError(
            f"nbankd (pid {os.getpid()}) cannot write to {url} with the credentials it "
            f"finds ({source}): {err.message}",
            hint=err.hint,
        ) from None
    return {"url": url, "credentials": source, "pid": os.getpid()}


def _daemon_user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


class _Unreadable(Exception):
    """Why the peer may not read a file (the message)."""


def _check_readable(rights: PeerRights, given: str) -> None:
    """A usage error naming ``given`` (a registry_auth file) unless the peer could read
    it itself: an absolute path, walked without links, readable by them."""
    path = Path(given)
    if not rights.checked:
        return
    if not path.is_absolute():
        raise ProtocolError("usage", f"'registry_auth' must be an absolute path, not {given!r}")
    try:
        fd = rights.walk(Path(os.path.realpath(path.parent)) / path.name, _Unreadable)
        try:
            readable = stat.S_ISREG(os.fstat(fd).st_mode) and rights.allows(fd, READ)
        finally:
            os.close(fd)
        why = None if readable else f"{rights.who} may not read it (or it is not a file)"
    except _Unreadable as err:
        why = str(err)
    except (OSError, ValueError) as err:
        why = f"nbankd cannot check it ({getattr(err, 'strerror', None) or err})"
    if why is not None:
        raise ProtocolError(
            "usage",
            f"nbankd will not read the registry_auth file {path} for {rights.who}: {why}; "
            "name a credentials file you can read yourself",
        )


__all__ = ["check_registry"]
