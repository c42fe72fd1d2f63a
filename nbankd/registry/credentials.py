"""Registry credentials (HTTP Basic auth): where they come from, and keeping them secret.

The daemon looks, in this order (SPEC section 3.8), and never in argv:

1. ``$CREDENTIALS_DIRECTORY/registry`` (systemd ``LoadCredential``);
2. the configured ``registry_auth`` file;
3. ``~/.netrc`` (or ``$NETRC``), the entry for the registry's host.

A credentials file holds either ``user:password`` on one line or netrc entries
(``machine HOST login USER password PASS``); the format is detected. nbankctl
also takes ``-a user:password``, which :func:`parse_user_password` reads.

Errors name the file and what is wrong with it, never its content. Passwords never
appear in a repr or str.
"""

from __future__ import annotations

import netrc
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from nbankd import errors
from nbankd.smallfile import SmallFileError, open_regular, read_regular

CREDENTIAL_NAME = "registry"
#: a credentials file holds one line or a few netrc entries
CREDENTIALS_MAX_BYTES = 64 * 1024
ARGV_WARNING = "credentials given on the command line are visible to other users (ps)"
_NETRC_KEYWORDS = frozenset({"machine", "default", "macdef"})


@dataclass(frozen=True, repr=False)
class Credentials:
    """A username and password, and where they came from (for messages)."""

    username: str
    password: str = field(compare=True)
    source: str = ""
    #: a warning for the user, e.g. the file is readable by others
    warning: str | None = field(default=None, compare=False)

    def as_tuple(self) -> tuple[str, str]:
        return (self.username, self.password)

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password='***', source={self.source!r})"

    __str__ = __repr__


def registry_host(url: str) -> str:
    """The host name netrc entries are matched against (no port, as requests does)."""
    host = urlsplit(url).hostname
    if not host:
        raise errors.ConfigError(f"registry URL {url!r} has no host name")
    return host


def permission_warning(path: Path) -> str | None:
    """A warning if a credentials file can be read by its group or other users."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"credentials file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"run: chmod 600 {path}"
        )
    return None


def parse_user_password(text: str, *, source: str = "command line (-a)") -> Credentials:
    """Reads ``user:password`` (the password may contain ':'); ConfigError if malformed."""
    value = text.strip("\r\n")
    user, sep, password = value.partition(":")
    if not sep or not user or not password or "\n" in value or user != user.strip():
        raise errors.ConfigError(
            f"{source}: expected 'user:password'",
            hint="a username, a colon, then the password, on one line",
        )
    return Credentials(user, password, source)


def cli_credentials(text: str) -> Credentials:
    """``nbankctl -a user:password``, with the argv warning set."""
    creds = parse_user_password(text, source="command line (-a)")
    return Credentials(creds.username, creds.password, creds.source, ARGV_WARNING)


def _error(path: Path, err: SmallFileError) -> errors.ConfigError:
    """The credentials error for a file :mod:`nbankd.smallfile` could not read."""
    if err.reason == "missing":
        return errors.ConfigError(f"credentials file {path} does not exist")
    if err.reason == "not-regular":
        return errors.ConfigError(
            f"cannot read credentials file {path}: it is {err.noun}, not a regular file",
            hint="name a file holding user:password or netrc entries (registry_auth)",
        )
    if err.reason == "too-large":
        return errors.ConfigError(
            f"credentials file {path} is larger than {CREDENTIALS_MAX_BYTES // 1024} KiB",
            hint="it holds user:password or a few netrc entries; is it the right file?",
        )
    return errors.ConfigError(
        f"cannot read credentials file {path}: {err.strerror}",
        hint="check its owner and permissions",
    )


def _read(path: Path) -> str:
    try:
        data, _st = read_regular(path, CREDENTIALS_MAX_BYTES)
    except SmallFileError as err:
        raise _error(path, err) from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise errors.ConfigError(
            f"cannot read credentials file {path}: not text",
            hint="check its owner and permissions",
        ) from None


def _looks_like_netrc(text: str) -> bool:
    for line in text.splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        return words[0] in _NETRC_KEYWORDS
    return False


def _from_netrc(path: Path, host: str) -> Credentials | None:
    try:  # netrc opens it again: never a FIFO that blocks it
        os.close(open_regular(path)[0])
    except SmallFileError as err:
        raise _error(path, err) from None
    try:
        entries = netrc.netrc(str(path))
    except netrc.NetrcParseError as err:
        # err.msg may quote a token of the file (a password): report only the line
        raise errors.ConfigError(
            f"credentials file {path} is not a valid netrc file (line {err.lineno})",
            hint="entries look like: machine HOST login USER password PASSWORD",
        ) from None
    except OSError as err:
        raise errors.ConfigError(
            f"cannot read credentials file {path}: {err.strerror or 'error'}"
        ) from None
    found = entries.authenticators(host)
    if found is None:
        return None
    login, _account, password = found
    if not login or not password:
        raise errors.ConfigError(
            f"credentials file {path}: the entry for {host} lacks a login or password"
        )
    return Credentials(login, password, str(path), permission_warning(path))


def load_file(path: Path | str, host: str) -> Credentials:
    """Credentials from a file holding ``user:password`` or netrc entries for host."""
    path = Path(path).expanduser()
    text = _read(path)
    if _looks_like_netrc(text):
        creds = _from_netrc(path, host)
        if creds is None:
            raise errors.ConfigError(
                f"credentials file {path} has no entry for host {host}",
                hint=f"add: machine {host} login USER password PASSWORD",
            )
        return creds
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if len(lines) != 1:
        raise errors.ConfigError(
            f"credentials file {path} is malformed: expected 'user:password' on one line "
            "or netrc entries",
            hint="write user:password, or: machine HOST login USER password PASSWORD",
        )
    try:
        creds = parse_user_password(lines[0], source=str(path))
    except errors.ConfigError:
        raise errors.ConfigError(
            f"credentials file {path} is malformed: expected 'user:password' on one line "
            "or netrc entries",
            hint="write user:password, or: machine HOST login USER password PASSWORD",
        ) from None
    return Credentials(creds.username, creds.password, str(path), permission_warning(path))


def default_netrc(environ: Mapping[str, str] | None = None, home: Path | None = None) -> Path:
    """``$NETRC`` if set (as requests and curl honour it), else ``~/.netrc``."""
    env = os.environ if environ is None else environ
    if env.get("NETRC"):
        return Path(env["NETRC"]).expanduser()
    return (home if home is not None else Path.home()) / ".netrc"


def resolve(
    registry_url: str,
    *,
    registry_auth: Path | str | None = None,
    cli_auth: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Credentials | None:
    """The credentials to write to the registry with, or None if there are none.

    Order: ``cli_auth`` (nbankctl ``-a``; the daemon never passes it), then
    ``$CREDENTIALS_DIRECTORY/registry``, then the ``registry_auth`` file (which must
    exist and have an entry when configured), then ``~/.netrc`` when it has an entry
    for the registry's host (:func:`resolve_source` also says which one).
    """
    creds, _source = resolve_source(
        registry_url, registry_auth=registry_auth, cli_auth=cli_auth, environ=environ, home=home
    )
    return creds


def resolve_source(
    registry_url: str,
    *,
    registry_auth: Path | str | None = None,
    cli_auth: str | None = None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> tuple[Credentials | None, str]:
    """:func:`resolve`'s credentials and where they come from, in words
    (``"$CREDENTIALS_DIRECTORY/registry (systemd LoadCredential=)"``, a file's path,
    ``"none found"``)."""
    env = os.environ if environ is None else environ
    host = registry_host(registry_url)
    if cli_auth is not None:
        return cli_credentials(cli_auth), "the command line (-a)"
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir:
        path = Path(cred_dir) / CREDENTIAL_NAME
        # systemd's SetCredential= fallback gives an empty file when none is configured
        if path.exists() and _read(path).strip():
            return load_file(path, host), f"{path} (systemd LoadCredential=)"
    if registry_auth is not None and str(registry_auth) != "":
        return load_file(registry_auth, host), str(registry_auth)
    netrc_path = default_netrc(env, home)
    if netrc_path.is_file():
        return _from_netrc(netrc_path, host), str(netrc_path)
    return None, "none found"
