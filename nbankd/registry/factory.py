"""Opens the registry a configuration names: embedded SQLite, or django-neurobank over HTTP."""

from __future__ import annotations

from pathlib import Path

from nbankd.registry.base import Registry


def open_registry(
    registry: str,
    *,
    embedded_db: Path | None = None,
    served_url: str | None = None,
    registry_auth: Path | None = None,
    cli_auth: str | None = None,
) -> Registry:
    """``registry`` is "embedded" or an http(s) URL.

    Credentials for HTTP come from ``cli_auth`` (nbankctl -a), then
    ``$CREDENTIALS_DIRECTORY/registry``, the ``registry_auth`` file, or ``~/.netrc``.
    """
    if registry == "embedded":
        from nbankd.registry.embedded import EmbeddedRegistry

        if embedded_db is None:
            raise ValueError("the embedded registry needs its database path")
        return EmbeddedRegistry(embedded_db, url=served_url)
    from nbankd.registry import credentials
    from nbankd.registry.http import HttpRegistry

    creds = credentials.resolve(registry, registry_auth=registry_auth, cli_auth=cli_auth)
    return HttpRegistry(registry, creds)
