"""Which registry an nbankctl command talks to, and opening it.

Order (as ``nbank``, plus nbankd's configuration): ``-r URL``, else
``$NBANK_REGISTRY``, else the configuration file (``-c FILE``, ``$NBANKD_CONFIG``,
``/etc/nbankd/config.yaml``). When the configuration says ``registry: embedded``
the SQLite database under ``state_dir`` is opened directly; file permissions
decide who may read it (the group) and write it (the owner, nbankd's user).

Credentials for a django-neurobank URL: ``-a user:pass`` (with a warning, since
argv is visible to other users), else ``$CREDENTIALS_DIRECTORY/registry``, the
configuration's ``registry_auth`` (only when the configuration names this same
registry), or ``~/.netrc`` (``$NETRC``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nbankd import errors
from nbankd.registry import credentials

if TYPE_CHECKING:  # the configuration's modules (and yaml) load only when one is read
    from nbankd.config.model import Config
    from nbankd.registry.base import Registry

ENV_REGISTRY = "NBANK_REGISTRY"
ARGV_WARNING = (
    "nbankctl: warning: -a puts the password on the command line, where other users "
    "can see it (ps); prefer ~/.netrc (machine HOST login USER password PASS)"
)


@dataclass(frozen=True)
class Choice:
    """The registry to use: ``target`` is "embedded" or a URL; ``source`` says who chose it."""

    target: str
    source: str
    config: Config | None = None

    @property
    def embedded(self) -> bool:
        return self.target == "embedded"


def _load(args: argparse.Namespace) -> tuple[Path, Config | None, errors.ConfigError | None]:
    from nbankd.config import find_config_path, load_config

    path = find_config_path(getattr(args, "config", None))
    try:
        return path, load_config(path), None
    except errors.ConfigError as err:
        return path, None, err


def configured(args: argparse.Namespace) -> Config | None:
    """The configuration ``-c``, ``$NBANKD_CONFIG`` or the default path names, or None
    when there is none or it cannot be read."""
    return _load(args)[1]


def choose(
    args: argparse.Namespace,
    environ: Mapping[str, str] | None = None,
    *,
    fallback_url: str | None = None,
) -> Choice:
    """Decides which registry to use; ConfigError (exit 2) if none can be found.

    ``fallback_url`` (an archive's ``nbank.json`` registry) is used when neither
    ``-r``, ``$NBANK_REGISTRY`` nor a readable configuration names one.
    """
    env = os.environ if environ is None else environ
    url = getattr(args, "registry", None)
    if url:
        return Choice(url, "-r")
    if env.get(ENV_REGISTRY):
        return Choice(env[ENV_REGISTRY], f"${ENV_REGISTRY}")
    path, config, problem = _load(args)
    if config is not None:
        return Choice(config.registry, f"configuration {path}", config)
    from nbankd.config.model import CONFIG_ENV  # loaded by _load already

    explicit = bool(getattr(args, "config", None)) or bool(env.get(CONFIG_ENV))
    if fallback_url and not explicit and fallback_url.startswith(("http://", "https://")):
        return Choice(fallback_url, "the archive's nbank.json")
    if problem is not None and (explicit or path.exists()):
        raise problem  # a configuration was named or exists but is broken: say why
    raise errors.ConfigError(
        f"no registry to use: no -r URL, no ${ENV_REGISTRY}, and no configuration at {path}",
        hint=f"give -r https://HOST/neurobank/, set ${ENV_REGISTRY}, or -c CONFIG_FILE",
    )


def warn_cli_auth(args: argparse.Namespace) -> None:
    """Prints the argv warning once if ``-a`` was given."""
    if getattr(args, "auth", None) and not getattr(args, "_auth_warned", False):
        print(ARGV_WARNING, file=sys.stderr)
        args._auth_warned = True


def _open_embedded(config: Config) -> Registry:
    from nbankd.registry.embedded import EmbeddedRegistry

    db = config.embedded_db_path
    if not db.exists():
        raise errors.ConfigError(
            f"the embedded registry {db} does not exist (configuration {config.source})",
            hint="start nbankd once to create it, or check state_dir in the configuration",
        )
    if not os.access(db, os.R_OK):
        raise errors.RegistryAuthError(
            f"no permission to read the embedded registry {db}",
            hint="run as nbankd's user or a member of its group",
        )
    return EmbeddedRegistry(db, url=config.registry_url)


def open_chosen(choice: Choice, args: argparse.Namespace) -> Registry:
    """Opens the chosen registry (nothing is sent over the network yet)."""
    warn_cli_auth(args)
    if choice.embedded:
        if choice.config is None:  # "-r embedded" has no database to open
            raise errors.UsageError(
                "'embedded' is only valid in the configuration file",
                hint="use -c CONFIG_FILE whose registry is embedded, or -r URL",
            )
        if getattr(args, "auth", None):
            print("nbankctl: note: -a is ignored by the embedded registry", file=sys.stderr)
        return _open_embedded(choice.config)
    from nbankd.registry.http import HttpRegistry

    auth_file = None
    if choice.config is not None:
        auth_file = choice.config.registry_auth
    creds = credentials.resolve(
        choice.target, registry_auth=auth_file, cli_auth=getattr(args, "auth", None)
    )
    if creds is not None and creds.warning and creds.warning != credentials.ARGV_WARNING:
        print(f"nbankctl: warning: {creds.warning}", file=sys.stderr)
    return HttpRegistry(choice.target, creds)


def open_registry(args: argparse.Namespace, *, fallback_url: str | None = None) -> Registry:
    """Chooses and opens the registry for a command (see the module docstring)."""
    return open_chosen(choose(args, fallback_url=fallback_url), args)


def describe(registry: Registry) -> str:
    """The registry's address for messages: its URL, or the embedded database file."""
    db = getattr(registry, "db_path", None)
    return f"{registry.url} (embedded, {db})" if db is not None else registry.url


def daemon_config(args: argparse.Namespace) -> Config | None:
    """The daemon configuration named by -c or $NBANKD_CONFIG, never the default path
    (used like nbank, with -r URL or neither, a command works on its own); None then.
    ``deposit``, ``copy`` and ``tape import`` decide by it whether the daemon is
    involved."""
    from nbankd.config import find_config_path, load_config
    from nbankd.config.model import CONFIG_ENV

    if getattr(args, "registry", None) or not (args.config or os.environ.get(CONFIG_ENV)):
        return None
    return load_config(find_config_path(args.config))


__all__ = [
    "ARGV_WARNING",
    "ENV_REGISTRY",
    "Choice",
    "choose",
    "configured",
    "daemon_config",
    "describe",
    "open_chosen",
    "open_registry",
    "warn_cli_auth",
]
